"""What a finished detectron2 training run left in its ``OUTPUT_DIR`` that a comparison reads:
the training metrics and the COCO evaluator's detections."""

import json
import os
import statistics
from typing import List

__all__ = ["read_metrics", "seconds_per_iter", "results_file"]


def read_metrics(output_dir: str) -> List[dict]:
    """The records of ``output_dir/metrics.json`` (detectron2's JSONWriter: one JSON object
    per line), in order."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def seconds_per_iter(output_dir: str) -> float:
    """Median of detectron2's training time per iteration (s, the ``time`` of each logged
    window) over the run; NaN if none was logged."""
    times = [r["time"] for r in read_metrics(output_dir) if "time" in r]
    return statistics.median(times) if times else float("nan")


def results_file(cfg) -> str:
    """The COCO results file (detections, ``[{"image_id", "category_id", "bbox", "score"}]``)
    that detectron2's COCOEvaluator writes for ``cfg.DATASETS.TEST[0]`` under
    ``cfg.OUTPUT_DIR/inference/`` (as :class:`dkd_det.engine.Trainer` evaluates)."""
    return os.path.join(
        cfg.OUTPUT_DIR, "inference", cfg.DATASETS.TEST[0], "coco_instances_results.json"
    )

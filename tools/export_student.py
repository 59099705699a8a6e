#!/usr/bin/env python
"""Export a trained student as a plain detectron2 model (no dkd-det needed to use it).

    python tools/export_student.py --config-file configs/COCO/dkd_r101_r18.yaml \\
        --weights output/dkd_r101_r18/model_final.pth --output exported/dkd_r101_r18

writes OUTPUT/config.yaml (GeneralizedRCNN + StandardROIHeads, no distillation keys),
OUTPUT/model_final.pth (the student's weights only) and, when the test dataset's class names
are known, OUTPUT/metadata.json (which tools/demo.py reads). Vanilla detectron2 then runs it:

    cfg = get_cfg(); cfg.merge_from_file("exported/dkd_r101_r18/config.yaml")
    model = build_model(cfg); DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
"""

import argparse
import logging
import sys

from detectron2.utils.logger import setup_logger

from dkd_det.checkpoint import checkpoint_size, export_student, resolve_weights
from dkd_det.config import get_dkd_cfg, student_cfg
from dkd_det.data import dataset_metadata, save_metadata
from dkd_det.engine import load_student

logger = logging.getLogger("dkd_det.export")


def export(args):
    """Load the trained student strictly (on the CPU) and write the export; returns
    {"config", "weights", "teacher_weights"} paths ("" when the teacher's file is unavailable)."""
    cfg = student_cfg(get_dkd_cfg(args.config_file, args.opts))
    cfg.MODEL.DEVICE = "cpu"
    if args.weights:
        cfg.MODEL.WEIGHTS = args.weights
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "No weights: pass --weights (e.g. output/dkd_r101_r18/model_final.pth) "
            "or set MODEL.WEIGHTS."
        )
    paths = export_student(cfg, load_student(cfg), args.output)
    classes = dataset_metadata(cfg).get("thing_classes", None)
    if classes is not None:
        save_metadata(args.output, classes)
    paths["teacher_weights"] = ""
    if cfg.MODEL.TEACHER.WEIGHTS:
        try:
            paths["teacher_weights"] = resolve_weights(
                cfg.MODEL.TEACHER.WEIGHTS, "MODEL.TEACHER.WEIGHTS"
            )
        except OSError as e:
            logger.warning("Teacher's weights not available, their size is not reported: %s", e)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file",
        required=True,
        metavar="FILE",
        help="the distillation (or plain) config it was trained with",
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="the trained checkpoint (default: the config's MODEL.WEIGHTS)",
    )
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs"
    )
    args = parser.parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger()
    setup_logger(name="dkd_det")
    try:
        paths = export(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {paths['config']} and {paths['weights']}")
    for who, path in (("student", paths["weights"]), ("teacher", paths["teacher_weights"])):
        if path:
            size = checkpoint_size(path)
            print(f"{who}: {path}: {size['mb']:.1f} MB, {size['params'] / 1e6:.2f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())

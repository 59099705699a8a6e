"""Comparing detectors as a paper should: paired-seed statistics of COCO AP (:mod:`.stats`),
the evaluation noise of the test images by a bootstrap with pycocotools (:mod:`.coco`), what
a detectron2 run left behind (:mod:`.runs`), tables, plots and the report of a comparison
(:mod:`.report`), and the cost
measurements of the benchmarks (:mod:`.timing`).

Nothing here builds or trains a model: it reads numbers and files, or times callables.
"""

from .coco import ImageResampledAP, bootstrap_ap, bootstrap_difference
from .plots import DETECTION_LOSSES, LOSS_PANELS, plot_ap_per_seed, plot_losses
from .report import TASK_NAMES, comparison_markdown, cost_by_variant, run_table, summarise
from .runs import read_metrics, results_file, seconds_per_iter
from .stats import describe, mean_sd, paired_difference, spread, t_half_width, t_quantile
from .tables import difference_table, fmt, seed_table
from .timing import (
    calibrate_norms,
    device_description,
    equalise_candidates,
    interleaved_ms,
    peak_mib,
    peak_rss_mib,
    random_inputs,
    ratio_spread,
    time_ms,
)

__all__ = [
    "ImageResampledAP",
    "bootstrap_ap",
    "bootstrap_difference",
    "DETECTION_LOSSES",
    "LOSS_PANELS",
    "TASK_NAMES",
    "comparison_markdown",
    "cost_by_variant",
    "run_table",
    "summarise",
    "plot_ap_per_seed",
    "plot_losses",
    "read_metrics",
    "results_file",
    "seconds_per_iter",
    "describe",
    "mean_sd",
    "paired_difference",
    "spread",
    "t_half_width",
    "t_quantile",
    "difference_table",
    "fmt",
    "seed_table",
    "calibrate_norms",
    "device_description",
    "equalise_candidates",
    "interleaved_ms",
    "peak_mib",
    "peak_rss_mib",
    "random_inputs",
    "ratio_spread",
    "time_ms",
]

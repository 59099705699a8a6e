"""Comparing detectors as a paper should: paired-seed statistics of COCO AP (:mod:`.stats`),
the evaluation noise of the test images by a bootstrap with pycocotools (:mod:`.coco`), what
a detectron2 run left behind (:mod:`.runs`), tables and plots of a comparison.

Nothing here builds or trains a model: it reads numbers and files.
"""

from .coco import ImageResampledAP, bootstrap_ap, bootstrap_difference
from .plots import LOSS_PANELS, plot_ap_per_seed, plot_losses
from .runs import read_metrics, results_file, seconds_per_iter
from .stats import describe, mean_sd, paired_difference, spread, t_half_width, t_quantile
from .tables import difference_table, fmt, seed_table

__all__ = [
    "ImageResampledAP",
    "bootstrap_ap",
    "bootstrap_difference",
    "LOSS_PANELS",
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
]

"""dkd-det: Decoupled Knowledge Distillation for detectron2's Faster R-CNN.

Importing the package registers ``DistillationRCNN`` (META_ARCH_REGISTRY),
``DistillROIHeads`` (ROI_HEADS_REGISTRY) and the MobileNetV2 backbones (BACKBONE_REGISTRY).
"""

from . import modeling  # noqa: F401  (registers the components)
from .config import add_dkd_config, get_dkd_cfg, student_cfg
from .data import check_datasets, register_coco_format

__all__ = ["add_dkd_config", "get_dkd_cfg", "student_cfg", "register_coco_format", "check_datasets"]

"""The configuration keys dkd-det adds to detectron2's."""

import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

DISTILL_TYPES = ("DKD", "KD", "NONE")

__all__ = ["DISTILL_TYPES", "add_dkd_config", "get_dkd_cfg", "student_cfg"]


def add_dkd_config(cfg):
    """Add the distillation keys to a detectron2 config (in place).

    ``MODEL.DISTILL`` says how the student learns from the teacher's ROI
    classification logits; ``MODEL.TEACHER`` says which frozen detector teaches.
    ``DATASETS.COCO_FORMAT`` registers users' own COCO-format datasets.
    ``MODEL.MOBILENET`` configures the MobileNetV2 backbone (``build_mobilenet_v2_fpn_backbone``).
    """
    _C = cfg

    _C.MODEL.DISTILL = CN()
    # "DKD": alpha * TCKD + beta * NCKD; "KD": classic KD (Hinton et al.);
    # "NONE": the plain student (no teacher is built or loaded).
    _C.MODEL.DISTILL.TYPE = "DKD"
    # Weight of the target-class part (TCKD); DKD only.
    _C.MODEL.DISTILL.ALPHA = 1.0
    # Weight of the non-target-class part (NCKD); DKD only.
    _C.MODEL.DISTILL.BETA = 0.25
    # Softmax temperature T > 0; the loss is multiplied by T^2.
    _C.MODEL.DISTILL.TEMPERATURE = 1.0
    # Multiplies the whole distillation loss (loss_dkd / loss_kd).
    _C.MODEL.DISTILL.LOSS_WEIGHT = 1.0
    # The loss weight ramps linearly from 0 to LOSS_WEIGHT over this many
    # iterations (0: no warm-up).
    _C.MODEL.DISTILL.WARMUP_ITERS = 0

    _C.MODEL.TEACHER = CN()
    # The teacher's own detectron2 config: a model-zoo name such as
    # "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml" or a path to a yaml file.
    _C.MODEL.TEACHER.CONFIG_FILE = ""
    # The teacher's trained weights: a path, or a URL such as detectron2://...
    # Required: training against a random teacher is always an error.
    _C.MODEL.TEACHER.WEIGHTS = ""
    # Overrides merged into the teacher's config, as KEY VALUE pairs:
    # e.g. ["MODEL.ROI_HEADS.NUM_CLASSES", "20"].
    _C.MODEL.TEACHER.OPTS = []

    # Users' own COCO-format datasets, registered by name before training:
    # a list of (name, json_file, image_root) triples, e.g. in yaml
    #   COCO_FORMAT: [["my_train", "data/train.json", "data/images"]]
    # or on the command line
    #   DATASETS.COCO_FORMAT "[('my_train','data/train.json','data/images')]"
    _C.DATASETS.COCO_FORMAT = []

    # MobileNetV2 (dkd_det/modeling/backbone/mobilenet_v2.py), used when MODEL.BACKBONE.NAME
    # is "build_mobilenet_v2_fpn_backbone" or "build_mobilenet_v2_backbone".
    _C.MODEL.MOBILENET = CN()
    # Outputs, a subset of "m2", "m3", "m4", "m5" (strides 4, 8, 16, 32; 24, 32, 96 and 320
    # channels) and "last" (stride 32, 1280 channels: the final 1x1 conv of the classifier net).
    _C.MODEL.MOBILENET.OUT_FEATURES = ["m2", "m3", "m4", "m5"]
    # The norm of every conv: "FrozenBN" (fixed ImageNet statistics, as RESNETS.NORM),
    # "BN" (per-GPU batch statistics) or "SyncBN" (statistics across GPUs).
    _C.MODEL.MOBILENET.NORM = "FrozenBN"
    # Stages frozen (no gradient, FrozenBN) from the input on, counted as stem, m2, m3, m4,
    # m5: 0 trains everything, 2 freezes the stem and m2 (like BACKBONE.FREEZE_AT for ResNet).
    _C.MODEL.MOBILENET.FREEZE_AT = 2


def get_dkd_cfg(config_file: str, opts=(), key: str = "--config-file") -> CN:
    """detectron2's defaults plus dkd-det's keys, ``config_file`` merged, then ``opts``
    (KEY VALUE pairs); not frozen. The one way dkd-det assembles a config, the teacher's
    included. A missing file is a FileNotFoundError that names it and ``key``, the option or
    config key it came from."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{key} {config_file!r}: no such file.")
    cfg = get_cfg()
    add_dkd_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def student_cfg(cfg: CN) -> CN:
    """The student alone: a copy of ``cfg`` (dkd-det or plain detectron2) whose teacher is
    never built or loaded (``MODEL.DISTILL.TYPE NONE``), for evaluation, inference and export.
    The copy is frozen if ``cfg`` was. The one place that switches distillation off."""
    out = cfg.clone()
    frozen = out.is_frozen()
    out.defrost()
    out.MODEL.DISTILL.TYPE = "NONE"
    if frozen:
        out.freeze()
    return out

"""The configuration keys dkd-det adds to detectron2's."""

import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .checkpoint import add_checkpoint_config, merge_config_file

DISTILL_TYPES = ("DKD", "KD", "NONE")

__all__ = ["DISTILL_TYPES", "add_dkd_config", "get_dkd_cfg", "student_cfg", "uses_teacher"]


def add_dkd_config(cfg):
    """Add the distillation keys to a detectron2 config (in place).

    ``MODEL.DISTILL`` says how the student learns from the teacher: a logit term on the ROI
    classification logits (``TYPE``) and a feature term on the FPN features
    (``FEATURE.TYPE``), composable; ``MODEL.TEACHER`` says which frozen detector teaches.
    ``DATASETS.COCO_FORMAT`` registers users' own COCO-format datasets.
    ``DATALOADER.SKIP_BROKEN_IMAGES`` leaves missing or undecodable training images out (with
    a warning) instead of stopping before training.
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

    # The feature term, independent of the logit term above (both, either or neither):
    # a name in dkd_det.modeling.FEATURE_DISTILLER_REGISTRY (matched case-insensitively) or
    # "NONE". "REVIEWKD": ReviewKD's ABF fusion + HCL loss (Chen et al., CVPR 2021), whose
    # fusion modules are trained with the student but never exported.
    _C.MODEL.DISTILL.FEATURE = CN()
    _C.MODEL.DISTILL.FEATURE.TYPE = "NONE"
    # Multiplies the feature loss (loss_reviewkd).
    _C.MODEL.DISTILL.FEATURE.LOSS_WEIGHT = 1.0
    _C.MODEL.DISTILL.FEATURE.REVIEWKD = CN()
    # The student's and the teacher's backbone outputs distilled, fused top-down from the last
    # (coarsest) one: FPN's p2..p6, all the levels the reference distils.
    _C.MODEL.DISTILL.FEATURE.REVIEWKD.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # Channels of the fused features inside the ABF modules.
    _C.MODEL.DISTILL.FEATURE.REVIEWKD.MID_CHANNELS = 256
    # The ABF modules' norm (get_norm): "BN" as the reference, "SyncBN", "GN", "" (none).
    _C.MODEL.DISTILL.FEATURE.REVIEWKD.NORM = "BN"
    # HCL's pooled scales (output side of adaptive average pooling), each weighted half the
    # previous one after the full-resolution term; a scale >= a level's min(H, W) is skipped.
    _C.MODEL.DISTILL.FEATURE.REVIEWKD.POOL_SCALES = [4, 2, 1]

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

    # Before the first iteration every image of DATASETS.TRAIN and DATASETS.TEST is checked to
    # exist and decode (header and JPEG/PNG end marker, else a full decode), shared by ranks.
    # False: a missing or broken training image is an error that lists the files. True: such
    # training images are left out with a warning that names them, before training and when
    # one breaks during training. Test sets are never skipped (AP over fewer images would not
    # be comparable): a broken test image is always an error.
    _C.DATALOADER.SKIP_BROKEN_IMAGES = False

    # MobileNetV2 (dkd_det/modeling/backbone/mobilenet_v2.py), used when MODEL.BACKBONE.NAME
    # is "build_mobilenet_v2_fpn_backbone" or "build_mobilenet_v2_backbone".
    _C.MODEL.MOBILENET = CN()
    # Outputs, a subset of "m2", "m3", "m4", "m5" (strides 4, 8, 16, 32; 24, 32, 96 and 320
    # channels) and "last" (stride 32, 1280 channels: the final 1x1 conv of the classifier net).
    _C.MODEL.MOBILENET.OUT_FEATURES = ["m2", "m3", "m4", "m5"]
    # The norm of every conv: "FrozenBN" (fixed ImageNet statistics, as RESNETS.NORM),
    # "BN" (per-GPU batch statistics) or "SyncBN" (statistics across GPUs).
    _C.MODEL.MOBILENET.NORM = "FrozenBN"
    # The frozen stages are detectron2's MODEL.BACKBONE.FREEZE_AT, as for ResNet: stages
    # (no gradient, FrozenBN) from the input on, counted as stem, m2, m3, m4, m5.
    add_checkpoint_config(_C)


def get_dkd_cfg(config_file: str, opts=(), key: str = "--config-file") -> CN:
    """detectron2's defaults plus dkd-det's keys, ``config_file`` merged, then ``opts``
    (KEY VALUE pairs); not frozen. The one way dkd-det assembles a config, the teacher's
    included. A missing file is a FileNotFoundError that names it and ``key``, the option or
    config key it came from."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{key} {config_file!r}: no such file.")
    cfg = get_cfg()
    add_dkd_config(cfg)
    merge_config_file(cfg, config_file, key)
    cfg.merge_from_list(list(opts))
    return cfg


def uses_teacher(cfg: CN) -> bool:
    """Whether ``cfg`` trains against a teacher: a logit or a feature distillation term is on."""
    distill = cfg.MODEL.get("DISTILL", None)
    if distill is None:
        return False
    feature = distill.get("FEATURE", None)
    return distill.TYPE != "NONE" or (feature is not None and feature.TYPE != "NONE")


def student_cfg(cfg: CN) -> CN:
    """The student alone: a copy of ``cfg`` (dkd-det or plain detectron2) whose teacher and
    training-only modules are never built or loaded (``MODEL.DISTILL.TYPE`` and
    ``MODEL.DISTILL.FEATURE.TYPE`` NONE), for evaluation, inference and export.
    The copy is frozen if ``cfg`` was. The one place that switches distillation off."""
    out = cfg.clone()
    frozen = out.is_frozen()
    out.defrost()
    out.MODEL.DISTILL.TYPE = "NONE"
    if "FEATURE" in out.MODEL.DISTILL:
        out.MODEL.DISTILL.FEATURE.TYPE = "NONE"
    if frozen:
        out.freeze()
    return out

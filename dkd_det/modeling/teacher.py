"""Building the frozen teacher: its own config, its own weights, checked before training."""

import contextlib
import logging
import os

import torch
from detectron2 import model_zoo
from detectron2.modeling import GeneralizedRCNN, build_model

from ..checkpoint import StrictCheckpointer, resolve_weights
from ..config import get_dkd_cfg

__all__ = ["build_teacher", "get_teacher_cfg", "teacher_autocast", "TEACHER_DTYPES"]

TEACHER_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}

logger = logging.getLogger(__name__)


def get_teacher_cfg(cfg):
    """The teacher's own detectron2 config, built from ``MODEL.TEACHER.CONFIG_FILE``.

    The file may be a model-zoo name (``COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml``) or
    a path; ``MODEL.TEACHER.OPTS`` is merged on top and the device is the student's.
    """
    path = cfg.MODEL.TEACHER.CONFIG_FILE
    if not path:
        raise ValueError(
            f"MODEL.DISTILL.TERMS is {list(cfg.MODEL.DISTILL.TERMS)} but "
            "MODEL.TEACHER.CONFIG_FILE is empty. Set it to the teacher's detectron2 config (a "
            "path, or a model-zoo name such as COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml), "
            "or MODEL.DISTILL.TERMS to [] for the plain student."
        )
    if not os.path.isfile(path):
        try:
            path = model_zoo.get_config_file(path)
        except RuntimeError:
            raise FileNotFoundError(
                f"MODEL.TEACHER.CONFIG_FILE = {path!r} is neither a file nor a detectron2 "
                "model-zoo config name (such as COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml)."
            ) from None
    # dkd-det's keys too, so that a config written for dkd-det also reads as a teacher
    tcfg = get_dkd_cfg(path, cfg.MODEL.TEACHER.OPTS, key="MODEL.TEACHER.CONFIG_FILE")
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = cfg.MODEL.TEACHER.WEIGHTS
    tcfg.freeze()
    return tcfg


def build_teacher(cfg, tcfg=None) -> GeneralizedRCNN:
    """Build, load, check and freeze the teacher described by ``cfg.MODEL.TEACHER``.

    Raises a clear error if the config or weights are missing, if the weights do not fit
    the architecture, if the teacher is not a ``GeneralizedRCNN``, or if its class count
    differs from the student's ``MODEL.ROI_HEADS.NUM_CLASSES``. (What a distillation term
    needs of the teacher beyond that, the term checks.)

    Args:
        tcfg: the teacher's config if already built (:func:`get_teacher_cfg`).

    Returns:
        the teacher in eval mode with ``requires_grad=False`` on every parameter.
    """
    tcfg = tcfg if tcfg is not None else get_teacher_cfg(cfg)
    if not cfg.MODEL.TEACHER.WEIGHTS:
        raise ValueError(
            "MODEL.TEACHER.WEIGHTS is empty: a randomly initialised teacher teaches nothing. "
            "Set it to the teacher's trained checkpoint (a path or a detectron2:// URL)."
        )
    weights = resolve_weights(
        cfg.MODEL.TEACHER.WEIGHTS, "MODEL.TEACHER.WEIGHTS", cfg.MODEL.TEACHER.get("SHA256", "")
    )
    who = (
        f"the teacher (MODEL.TEACHER.CONFIG_FILE {cfg.MODEL.TEACHER.CONFIG_FILE!r} with "
        "MODEL.TEACHER.OPTS)"
    )
    teacher = build_model(tcfg)
    heads = getattr(teacher, "roi_heads", None)
    if not isinstance(teacher, GeneralizedRCNN):
        raise TypeError(
            f"The teacher ({who}) is a {tcfg.MODEL.META_ARCHITECTURE}, not a two-stage R-CNN: "
            "dkd-det distils a GeneralizedRCNN teacher (Faster/Mask R-CNN)."
        )
    if heads is not None and heads.num_classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(
            f"The teacher predicts {heads.num_classes} classes but the student "
            f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES} (MODEL.ROI_HEADS.NUM_CLASSES): their logits "
            "cannot be compared. Use a teacher trained on the student's classes, or set "
            "MODEL.ROI_HEADS.NUM_CLASSES to match."
        )
    StrictCheckpointer(
        teacher,
        key="MODEL.TEACHER.WEIGHTS",
        hint="Check that MODEL.TEACHER.WEIGHTS was trained with MODEL.TEACHER.CONFIG_FILE "
        "(and MODEL.TEACHER.OPTS, e.g. the class count).",
    ).load(weights)
    logger.info("Teacher %s loaded from %s", tcfg.MODEL.META_ARCHITECTURE, weights)
    teacher.eval()
    teacher.requires_grad_(False)
    t = cfg.MODEL.TEACHER
    if t.DTYPE not in TEACHER_DTYPES:
        raise ValueError(f"MODEL.TEACHER.DTYPE = {t.DTYPE!r}: one of {sorted(TEACHER_DTYPES)}.")
    teacher.autocast_dtype = TEACHER_DTYPES[t.DTYPE]
    teacher.channels_last = bool(t.CHANNELS_LAST)
    if teacher.channels_last:
        teacher.to(memory_format=torch.channels_last)
    if t.COMPILE:
        teacher.backbone = torch.compile(teacher.backbone, backend=t.COMPILE, dynamic=True)
        logger.info("Teacher backbone compiled with torch.compile(backend=%r)", t.COMPILE)
    return teacher


def teacher_autocast(teacher, device: torch.device):
    """The autocast context the teacher runs in (``MODEL.TEACHER.DTYPE``); a no-op context
    (the caller's autocast, if any, applies) for float32."""
    dtype = getattr(teacher, "autocast_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

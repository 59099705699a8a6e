"""Building the frozen teacher: its own config, its own weights, checked before training."""

import logging
import os

from detectron2 import model_zoo
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads

from ..checkpoint import StrictCheckpointer, resolve_weights
from ..config import get_dkd_cfg
from .roi_heads import check_softmax_classifier, check_softmax_predictor

__all__ = ["build_teacher", "get_teacher_cfg"]

logger = logging.getLogger(__name__)


def get_teacher_cfg(cfg):
    """The teacher's own detectron2 config, built from ``MODEL.TEACHER.CONFIG_FILE``.

    The file may be a model-zoo name (``COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml``) or
    a path; ``MODEL.TEACHER.OPTS`` is merged on top and the device is the student's.
    """
    path = cfg.MODEL.TEACHER.CONFIG_FILE
    if not path:
        raise ValueError(
            f"MODEL.DISTILL.TYPE is {cfg.MODEL.DISTILL.TYPE} and MODEL.DISTILL.FEATURE.TYPE "
            f"{cfg.MODEL.DISTILL.FEATURE.TYPE} but MODEL.TEACHER.CONFIG_FILE is empty. "
            "Set it to the teacher's detectron2 config (a path, or a model-zoo name such as "
            "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml), or set both types to NONE."
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


def build_teacher(cfg) -> GeneralizedRCNN:
    """Build, load, check and freeze the teacher described by ``cfg.MODEL.TEACHER``.

    Raises a clear error if the config or weights are missing, if the weights do not fit
    the architecture, if the teacher is not a two-stage R-CNN with a softmax box predictor
    (no sigmoid cross-entropy or federated loss), or if its class count differs from the
    student's ``MODEL.ROI_HEADS.NUM_CLASSES``.

    Returns:
        the teacher in eval mode with ``requires_grad=False`` on every parameter.
    """
    tcfg = get_teacher_cfg(cfg)
    if not cfg.MODEL.TEACHER.WEIGHTS:
        raise ValueError(
            "MODEL.TEACHER.WEIGHTS is empty: a randomly initialised teacher teaches nothing. "
            "Set it to the teacher's trained checkpoint (a path or a detectron2:// URL)."
        )
    weights = resolve_weights(cfg.MODEL.TEACHER.WEIGHTS, "MODEL.TEACHER.WEIGHTS")
    who = (
        f"the teacher (MODEL.TEACHER.CONFIG_FILE {cfg.MODEL.TEACHER.CONFIG_FILE!r} with "
        "MODEL.TEACHER.OPTS)"
    )
    box = tcfg.MODEL.ROI_BOX_HEAD
    check_softmax_classifier(box.USE_SIGMOID_CE, box.USE_FED_LOSS, who)
    teacher = build_model(tcfg)
    heads = getattr(teacher, "roi_heads", None)
    if not (
        isinstance(teacher, GeneralizedRCNN)
        and isinstance(heads, StandardROIHeads)
        and isinstance(getattr(heads, "box_predictor", None), FastRCNNOutputLayers)
    ):
        raise TypeError(
            f"The teacher ({tcfg.MODEL.META_ARCHITECTURE} with "
            f"{tcfg.MODEL.ROI_HEADS.NAME if heads is not None else 'no ROI heads'}) is not a "
            "two-stage R-CNN with an ROI box predictor: DKD distils the box head's classification "
            "logits, so the teacher must be a Faster/Mask R-CNN (GeneralizedRCNN with "
            "StandardROIHeads), not e.g. RetinaNet or Cascade R-CNN."
        )
    check_softmax_predictor(heads.box_predictor, who)
    if heads.num_classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
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
    return teacher

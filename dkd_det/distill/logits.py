"""What the terms on the ROI box classifier's logits share: both detectors must score regions
with a softmax over K+1 classes."""

import logging
from typing import List, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads

from .base import DistillTerm

__all__ = [
    "LogitTerm",
    "box_predictors",
    "check_softmax_classifier",
    "check_softmax_predictor",
    "classifier_flags",
]

logger = logging.getLogger(__name__)


def check_softmax_classifier(use_sigmoid_ce: bool, use_fed_loss: bool, who: str) -> None:
    """Raise ValueError if the box classifier of ``who`` ("the student", "the teacher (...)")
    is trained with a sigmoid cross-entropy or the federated loss (``MODEL.ROI_BOX_HEAD.
    USE_SIGMOID_CE`` / ``USE_FED_LOSS``) instead of a softmax over its K+1 logits, which the
    logit terms assume: its logits then are not a distribution to distil."""
    for used, key, loss in (
        (use_sigmoid_ce, "USE_SIGMOID_CE", "a sigmoid cross-entropy"),
        (use_fed_loss, "USE_FED_LOSS", "the federated loss"),
    ):
        if used:
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.{key} is True for {who}: its box classifier is trained "
                f"with {loss}, but the logit terms (MODEL.DISTILL.TERMS) distil a softmax over "
                "the K+1 class logits, which would mean nothing here. Use a softmax box "
                f"predictor (MODEL.ROI_BOX_HEAD.{key} False) on both teacher and student, or "
                "drop the logit terms from MODEL.DISTILL.TERMS."
            )


def check_softmax_predictor(predictor: torch.nn.Module, who: str) -> None:
    """:func:`check_softmax_classifier` for a built box predictor (``FastRCNNOutputLayers``)."""
    check_softmax_classifier(
        getattr(predictor, "use_sigmoid_ce", False), getattr(predictor, "use_fed_loss", False), who
    )


def box_predictors(heads) -> List[torch.nn.Module]:
    """The box predictors of built ROI heads, one per stage: ``CascadeROIHeads``' stages in order,
    the one of ``StandardROIHeads``; [] for heads without a box predictor (or not ROI heads)."""
    if isinstance(heads, CascadeROIHeads):
        return list(heads.box_predictor)
    if isinstance(heads, StandardROIHeads):
        return [heads.box_predictor]
    return []


def classifier_flags(cfg) -> Tuple[bool, bool]:
    """(use_sigmoid_ce, use_fed_loss) of a config's box classifier before it is built: a yacs
    config's ``MODEL.ROI_BOX_HEAD`` keys, or for a LazyConfig (the teacher's ``.py``) the
    arguments of ``model.roi_heads.box_predictor`` / ``box_predictors`` (any stage's)."""
    if isinstance(cfg, CfgNode):
        return cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE, cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS
    from omegaconf import OmegaConf

    heads = OmegaConf.select(cfg, "model.roi_heads", default=None)
    if heads is None:
        return False, False
    predictors = heads.get("box_predictors", None) or [heads.get("box_predictor", None)]
    predictors = [p for p in predictors if p is not None and hasattr(p, "get")]
    return (
        any(bool(p.get("use_sigmoid_ce", False)) for p in predictors),
        any(bool(p.get("use_fed_loss", False)) for p in predictors),
    )


class LogitTerm(DistillTerm):
    """A term on the (R, K+1) box classifier logits of student and teacher for the sampled
    boxes. Subclasses call :meth:`check_models` from their ``from_config``."""

    reads = frozenset({"student_logits", "teacher_logits", "gt_classes"})

    @classmethod
    def check_config(cls, cfg, teacher_cfg) -> None:
        # Before detectron2 builds (or asserts on) the predictors.
        for who, c in (("the student", cfg), (_teacher(cfg), teacher_cfg)):
            check_softmax_classifier(*classifier_flags(c), who)

    @classmethod
    def check_models(cls, cfg, student, teacher) -> None:
        """Every built box predictor of both (each stage's of a Cascade R-CNN) is a softmax
        classifier (:func:`check_softmax_predictor`)."""
        for who, model in (("the student", student), (_teacher(cfg), teacher)):
            for predictor in box_predictors(model.roi_heads):
                check_softmax_predictor(predictor, who)


def _teacher(cfg) -> str:
    return (
        f"the teacher (MODEL.TEACHER.CONFIG_FILE {cfg.MODEL.TEACHER.CONFIG_FILE!r} with "
        "MODEL.TEACHER.OPTS)"
    )

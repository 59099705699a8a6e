"""What the terms on the ROI box classifier's logits share: both detectors must score regions
with a softmax over K+1 classes."""

import logging

import torch

from .base import DistillTerm

__all__ = ["LogitTerm", "check_softmax_classifier", "check_softmax_predictor"]

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


class LogitTerm(DistillTerm):
    """A term on the (R, K+1) box classifier logits of student and teacher for the sampled
    boxes. Subclasses call :meth:`check_models` from their ``from_config``."""

    reads = frozenset({"student_logits", "teacher_logits", "gt_classes"})

    @classmethod
    def check_config(cls, cfg, teacher_cfg) -> None:
        # Before detectron2 builds (or asserts on) the predictors.
        for who, c in (("the student", cfg), (_teacher(cfg), teacher_cfg)):
            check_softmax_classifier(
                c.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE, c.MODEL.ROI_BOX_HEAD.USE_FED_LOSS, who
            )

    @classmethod
    def check_models(cls, cfg, student, teacher) -> None:
        """Both built box predictors are softmax classifiers (:func:`check_softmax_predictor`)."""
        check_softmax_predictor(student.roi_heads.box_predictor, "the student")
        check_softmax_predictor(teacher.roi_heads.box_predictor, _teacher(cfg))


def _teacher(cfg) -> str:
    return (
        f"the teacher (MODEL.TEACHER.CONFIG_FILE {cfg.MODEL.TEACHER.CONFIG_FILE!r} with "
        "MODEL.TEACHER.OPTS)"
    )

"""PKD (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
Correlation Coefficient", NeurIPS 2022): each FPN level of student and teacher standardised
per channel, then compared by MSE, which is ``1 - r`` for r their Pearson correlation.

The hyperparameters are those of the reference implementation's Faster R-CNN setting
(mmrazor's ``pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py``):
levels p2..p5, loss weight 6 on each.

Differences from the reference (mmrazor's ``PKDLoss``): the variance is the population one
(so the loss is exactly ``1 - r``; mmrazor divides by the unbiased std, which scales the loss
by ``(M - 1) / M`` for M values per channel, 1e-3 relative at our test sizes) and its epsilon
is added to the variance, not to the std; maps of different sizes are an error, where
mmrazor would resize the student's bilinearly.
"""

from typing import Dict, Sequence

import torch
from detectron2.config import configurable

from .base import DISTILL_TERM_REGISTRY, DistillInputs, DistillTerm
from .feature_losses import check_feature_sizes, pkd_loss

__all__ = ["PKD"]


@DISTILL_TERM_REGISTRY.register()
class PKD(DistillTerm):
    """``{"loss_pkd": weight * sum over levels of pkd_loss(student, teacher)}``.

    No parameters: the term has no training-only module, and student and teacher must have
    the same channels on every level it distils (a clear error otherwise).
    """

    reads = frozenset({"student_features", "teacher_features"})
    default_loss_weight = 6.0

    @configurable
    def __init__(self, *, in_features: Sequence[str], **kw):
        """
        Args:
            in_features: the levels distilled, e.g. ["p2", "p3", "p4", "p5"].
            kw: :class:`DistillTerm`'s (loss weight, warm-up).
        """
        super().__init__(**kw)
        self.in_features = list(in_features)

    @classmethod
    def add_term_config(cls, node):
        # The student's and the teacher's backbone outputs distilled: p2..p5, the four levels
        # of the reference's Faster R-CNN config (FPN outputs 0-3).
        node.IN_FEATURES = ["p2", "p3", "p4", "p5"]

    @classmethod
    def from_config(cls, cfg, student, teacher):
        names, _, _, _ = cls.feature_levels(cfg, student, teacher, same_channels=True)
        return {**cls.shared_kwargs(cfg), "in_features": names}

    def losses(self, inputs: DistillInputs) -> Dict[str, torch.Tensor]:
        """{name: (N, C, H, W)} student and teacher features -> {"loss_pkd": scalar}."""
        s, t = inputs.student_features, inputs.teacher_features
        check_feature_sizes("PKD", self.in_features, s, t)
        return {"loss_pkd": sum(pkd_loss(s[f], t[f]) for f in self.in_features)}

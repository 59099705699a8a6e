"""CWD (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021):
each channel of an FPN level becomes a distribution over its positions (softmax at
temperature tau), and the student's is pulled towards the teacher's by KL divergence, times
tau^2.

The hyperparameters are those of the reference implementation's Faster R-CNN setting
(mmrazor's ``cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py``): levels p2..p6 (all five FPN
outputs), tau 1, loss weight 10 on each.

Differences from the reference (mmrazor's ``ChannelWiseDivergence``): none in the value (equal
to float64 rounding in a side-by-side run); KL is taken from two log-softmaxes, and maps of
different sizes or channels are a clear error instead of an assertion.
"""

from typing import Dict, Sequence

import torch
from detectron2.config import configurable

from .base import DISTILL_TERM_REGISTRY, DistillInputs, DistillTerm
from .feature_losses import check_feature_sizes, cwd_loss

__all__ = ["CWD"]


@DISTILL_TERM_REGISTRY.register()
class CWD(DistillTerm):
    """``{"loss_cwd": weight * sum over levels of cwd_loss(student, teacher, tau)}``.

    No parameters: the term has no training-only module, and student and teacher must have
    the same channels on every level it distils (a clear error otherwise).
    """

    reads = frozenset({"student_features", "teacher_features"})
    default_loss_weight = 10.0

    @configurable
    def __init__(self, *, in_features: Sequence[str], temperature: float = 1.0, **kw):
        """
        Args:
            in_features: the levels distilled, e.g. ["p2", ..., "p6"].
            temperature: tau > 0 of the spatial softmax; the loss is multiplied by tau^2.
            kw: :class:`DistillTerm`'s (loss weight, warm-up).
        """
        super().__init__(**kw)
        if not temperature > 0:
            raise ValueError(f"MODEL.DISTILL.CWD.TEMPERATURE = {temperature}: must be > 0.")
        self.in_features = list(in_features)
        self.temperature = temperature

    @classmethod
    def add_term_config(cls, node):
        # The student's and the teacher's backbone outputs distilled: all five FPN levels, as
        # the reference's Faster R-CNN config.
        node.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        # tau > 0, the temperature of each channel's softmax over its positions (loss x tau^2).
        node.TEMPERATURE = 1.0

    @classmethod
    def from_config(cls, cfg, student, teacher):
        node = cls.term_config(cfg)
        names, _, _, _ = cls.feature_levels(cfg, student, teacher, same_channels=True)
        return {**cls.shared_kwargs(cfg), "in_features": names, "temperature": node.TEMPERATURE}

    def losses(self, inputs: DistillInputs) -> Dict[str, torch.Tensor]:
        """{name: (N, C, H, W)} student and teacher features -> {"loss_cwd": scalar}."""
        s, t = inputs.student_features, inputs.teacher_features
        check_feature_sizes("CWD", self.in_features, s, t)
        loss = sum(cwd_loss(s[f], t[f], self.temperature) for f in self.in_features)
        return {"loss_cwd": loss}

"""MGD (Yang et al., "Masked Generative Distillation", ECCV 2022) on the FPN levels: random
pixels of the student's map are masked (set to 0, all channels alike), and a small generation
block must produce the teacher's full map from what is left.

Per level, with ``M`` the random mask (each pixel 0 with probability lambda, drawn from
torch's global generator, as dropout draws, so detectron2's seeding makes it reproducible),
``f_align`` a 1x1 conv to the teacher's channels where they differ, and ``G`` two 3x3 convs
with a ReLU between:

    L_dis = sum_{c,h,w} (F^T - G(f_align(F^S) * M))^2 / N

The term sums it over the levels; LOSS_WEIGHT is the paper's alpha. Masking happens only in
training (``self.training``); in eval mode the block generates from the whole map.

The generation blocks and the align convs are training-only modules of the term, like
ReviewKD's ABF: optimised, synchronised and resumed with the student, never exported.

The hyperparameters are those of MGD's own two-stage config (Faster R-CNN R-50 student,
``cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py``): levels p2..p5,
alpha 5e-7, lambda 0.45.

Differences from the reference (MGD's ``FeatureLoss`` and mmrazor's ``MGDConnector``): a
pixel is masked where ``R < lambda`` (the paper's rule; the code masks ``R > 1 - lambda``, the
same distribution but other pixels for a given draw); no mask in eval mode (the reference
masks whenever called); MGD's configs clip gradients (max norm 35), which is not done here.
Without the mask, a side-by-side float64 run agrees exactly.
"""

from typing import Dict, Optional, Sequence

import torch
from detectron2.config import configurable
from torch import nn

from .base import DISTILL_TERM_REGISTRY, DistillInputs, DistillTerm
from .feature_losses import check_feature_sizes, mgd_loss, mgd_mask

__all__ = ["MGD", "MGDBlock"]


class MGDBlock(nn.Module):
    """MGD's training-only modules of one level: ``align`` (1x1 conv from the student's
    channels to the teacher's, only where they differ, else None) and ``generation``
    (3x3 conv, ReLU, 3x3 conv on the teacher's channels, PyTorch's default initialisation)."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.align: Optional[nn.Module] = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            if student_channels != teacher_channels
            else None
        )
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor, ratio: float, masked: bool) -> torch.Tensor:
        """(N, C_s, H, W) -> (N, C_t, H, W): ``G(f_align(x) * M)``, M all ones unless
        ``masked``."""
        if self.align is not None:
            x = self.align(x)
        if masked:
            x = x * mgd_mask(tuple(x.shape), ratio, x.device, x.dtype)
        return self.generation(x)


@DISTILL_TERM_REGISTRY.register()
class MGD(DistillTerm):
    """``{"loss_mgd": alpha * sum over levels of L_dis}`` (alpha: LOSS_WEIGHT)."""

    reads = frozenset({"student_features", "teacher_features"})
    default_loss_weight = 5e-7

    @configurable
    def __init__(
        self,
        *,
        in_features: Sequence[str],
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        lambda_: float = 0.45,
        **kw,
    ):
        """
        Args:
            in_features: the levels distilled, finest first (the masks are drawn in this order,
                one (N, 1, H, W) draw per level).
            student_channels, teacher_channels: of each of those levels.
            lambda_: the ratio of masked pixels, in [0, 1).
            kw: :class:`DistillTerm`'s (loss weight alpha, warm-up).
        """
        super().__init__(**kw)
        if not 0 <= lambda_ < 1:
            raise ValueError(f"MODEL.DISTILL.MGD.LAMBDA = {lambda_}: must be in [0, 1).")
        self.in_features = list(in_features)
        self.lambda_ = lambda_
        self.blocks = nn.ModuleDict(
            {
                f: MGDBlock(c_s, c_t)
                for f, c_s, c_t in zip(in_features, student_channels, teacher_channels)
            }
        )

    @classmethod
    def add_term_config(cls, node):
        # The student's and the teacher's backbone outputs distilled: p2..p5, the four levels of
        # MGD's Faster R-CNN config (FPN outputs 0-3).
        node.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        # lambda: the ratio of the student's pixels masked, in [0, 1) (training only).
        node.LAMBDA = 0.45

    @classmethod
    def from_config(cls, cfg, student, teacher):
        node = cls.term_config(cfg)
        names, c_s, c_t, _ = cls.feature_levels(cfg, student, teacher, same_channels=False)
        return {
            **cls.shared_kwargs(cfg),
            "in_features": names,
            "student_channels": c_s,
            "teacher_channels": c_t,
            "lambda_": node.LAMBDA,
        }

    def losses(self, inputs: DistillInputs) -> Dict[str, torch.Tensor]:
        """{name: (N, C_s, H, W)}, {name: (N, C_t, H, W)} -> {"loss_mgd": scalar}."""
        s, t = inputs.student_features, inputs.teacher_features
        check_feature_sizes("MGD", self.in_features, s, t)
        loss = sum(
            mgd_loss(self.blocks[f](s[f], self.lambda_, masked=self.training), t[f])
            for f in self.in_features
        )
        return {"loss_mgd": loss}

"""ReviewKD for detection (Chen et al., "Distilling Knowledge via Knowledge Review",
CVPR 2021): attention-based fusion (ABF) of the student's FPN levels, top-down, then the
hierarchical context loss (HCL) against the teacher's levels.

The level set is FPN's p2..p6 (``MODEL.DISTILL.REVIEWKD.IN_FEATURES``): the
reference implementations (ReviewKD's and mdistiller's detection code) distil every output
of the student's FPN backbone, which for detectron2's FPN with its max-pooled P6 are these
five. Fusion starts at the coarsest level: p6 goes through its ABF alone; each finer level
fuses its own features with the coarser level's fused features, upsampled (nearest) to its
size, weighted by a 2-channel sigmoid attention map computed from both.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from fvcore.nn import weight_init
from torch import nn

from ..losses import hcl_loss
from .base import DISTILL_TERM_REGISTRY, DistillInputs, DistillTerm

__all__ = ["ABF", "ReviewKD"]


class ABF(nn.Module):
    """One attention-based fusion block.

    ``conv1`` (1x1) projects the student's level to ``mid_channels``; if the block fuses, the
    coarser level's fused features (``mid_channels``, upsampled) are mixed in with per-pixel
    weights ``sigmoid(att_conv([x, residual]))``; ``conv2`` (3x3) maps the result to the
    teacher's ``out_channels``.
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool, norm: str = "BN"
    ):
        """
        Args:
            in_channels: channels of the student's level.
            mid_channels: channels of the fused features passed to the next, finer level.
            out_channels: channels of the teacher's level.
            fuse: whether a coarser level's fused features come in (False for the coarsest).
            norm: the norm after conv1 and conv2 (``get_norm``; "" for none, with a bias).
        """
        super().__init__()
        self.conv1 = Conv2d(
            in_channels, mid_channels, 1, bias=not norm, norm=get_norm(norm, mid_channels)
        )
        self.conv2 = Conv2d(
            mid_channels,
            out_channels,
            3,
            padding=1,
            bias=not norm,
            norm=get_norm(norm, out_channels),
        )
        self.att_conv = Conv2d(2 * mid_channels, 2, 1) if fuse else None
        for conv in (self.conv1, self.conv2):
            weight_init.c2_xavier_fill(conv)

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: (N, in_channels, H, W) the student's level.
            residual: (N, mid_channels, h, w) the coarser level's fused features (any h, w);
                required if and only if the block fuses.

        Returns:
            (out, fused): (N, out_channels, H, W) to compare with the teacher, and
            (N, mid_channels, H, W) to pass to the next, finer level.
        """
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            attention = torch.sigmoid(self.att_conv(torch.cat([x, residual], dim=1)))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        return self.conv2(x), x


@DISTILL_TERM_REGISTRY.register()
class ReviewKD(DistillTerm):
    """ReviewKD's feature term: ``{"loss_reviewkd": weight * HCL(ABF(student), teacher)}``.

    Its ABF modules are trained with the student (they are in ``model.parameters()``) and
    exist only in training: see :mod:`dkd_det.distill.base`.
    """

    reads = frozenset({"student_features", "teacher_features"})

    @configurable
    def __init__(
        self,
        *,
        in_features: Sequence[str],
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        mid_channels: int = 256,
        norm: str = "BN",
        pool_scales: Sequence[int] = (4, 2, 1),
        **kw,
    ):
        """
        Args:
            in_features: backbone output names, finest first (e.g. p2..p6).
            student_channels, teacher_channels: channels of each of those levels.
            mid_channels: channels of the fused features.
            norm: the ABF modules' norm.
            pool_scales: HCL's pooled scales (see :func:`dkd_det.losses.hcl_loss`).
            kw: :class:`DistillTerm`'s (loss weight, warm-up).
        """
        super().__init__(**kw)
        if not pool_scales or min(pool_scales) < 1:
            raise ValueError(
                f"MODEL.DISTILL.REVIEWKD.POOL_SCALES = {list(pool_scales)}: must be "
                "non-empty, each >= 1."
            )
        self.in_features = list(in_features)
        last = len(self.in_features) - 1
        self.abfs = nn.ModuleList(
            ABF(c_s, mid_channels, c_t, fuse=i < last, norm=norm)
            for i, (c_s, c_t) in enumerate(zip(student_channels, teacher_channels))
        )
        self.pool_scales = tuple(pool_scales)
        self.norm = norm

    @classmethod
    def add_term_config(cls, node):
        # The student's and the teacher's backbone outputs distilled, fused top-down from the
        # last (coarsest) one: FPN's p2..p6, all the levels the reference distils.
        node.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        # Channels of the fused features inside the ABF modules.
        node.MID_CHANNELS = 256
        # The ABF modules' norm (get_norm): "BN" as the reference, "SyncBN", "GN", "" (none).
        node.NORM = "BN"
        # HCL's pooled scales (output side of adaptive average pooling), each weighted half the
        # previous one after the full-resolution term; a scale >= a level's min(H, W) is skipped.
        node.POOL_SCALES = [4, 2, 1]

    @classmethod
    def renamed_keys(cls):
        old = "MODEL.DISTILL.FEATURE.REVIEWKD"
        keys = ("IN_FEATURES", "MID_CHANNELS", "NORM", "POOL_SCALES")
        return {
            old: "MODEL.DISTILL.REVIEWKD",
            **{f"{old}.{k}": f"MODEL.DISTILL.REVIEWKD.{k}" for k in keys},
        }

    @classmethod
    def from_config(cls, cfg, student, teacher):
        student_shape: Dict[str, ShapeSpec] = student.backbone.output_shape()
        teacher_shape: Dict[str, ShapeSpec] = teacher.backbone.output_shape()
        r = cls.term_config(cfg)
        names = list(r.IN_FEATURES)
        for who, shape in (("student", student_shape), ("teacher", teacher_shape)):
            missing = [f for f in names if f not in shape]
            if not names or missing:
                raise ValueError(
                    f"MODEL.DISTILL.REVIEWKD.IN_FEATURES {names}: the {who}'s backbone "
                    f"has no {missing or 'levels'}; its outputs are {sorted(shape)}."
                )
        for f in names:
            if student_shape[f].stride != teacher_shape[f].stride:
                raise ValueError(
                    f"ReviewKD level {f!r} has stride {student_shape[f].stride} in the student "
                    f"but {teacher_shape[f].stride} in the teacher: the maps would not align."
                )
        names.sort(key=lambda f: student_shape[f].stride)  # finest first, fused from the last
        return {
            **cls.shared_kwargs(cfg),
            "in_features": names,
            "student_channels": [student_shape[f].channels for f in names],
            "teacher_channels": [teacher_shape[f].channels for f in names],
            "mid_channels": r.MID_CHANNELS,
            "norm": r.NORM,
            "pool_scales": list(r.POOL_SCALES),
        }

    def fuse(self, student_features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """The student's levels after top-down ABF fusion, finest first:
        ``{name: (N, C_s, H, W)}`` -> [(N, C_t, H, W) for each of ``in_features``]."""
        outputs: List[torch.Tensor] = [None] * len(self.in_features)  # type: ignore[list-item]
        fused = None
        for i in reversed(range(len(self.in_features))):
            outputs[i], fused = self.abfs[i](student_features[self.in_features[i]], fused)
        return outputs

    def losses(self, inputs: DistillInputs) -> Dict[str, torch.Tensor]:
        """{name: (N, C_s, H, W)}, {name: (N, C_t, H, W)} -> {"loss_reviewkd": float32 scalar}."""
        student_features, teacher_features = inputs.student_features, inputs.teacher_features
        for f in self.in_features:
            if student_features[f].shape[-2:] != teacher_features[f].shape[-2:]:
                raise ValueError(
                    f"ReviewKD level {f!r}: student {tuple(student_features[f].shape)} and "
                    f"teacher {tuple(teacher_features[f].shape)} differ in size; teacher and "
                    "student must pad images alike (the backbones' size_divisibility)."
                )
            if self.training and self.norm == "BN" and student_features[f][:, 0].numel() == 1:
                raise ValueError(
                    f"ReviewKD level {f!r} is a single pixel of a single image: batch norm in "
                    "the ABF modules needs more than one value per channel. Use larger images "
                    "or more images per GPU, or MODEL.DISTILL.REVIEWKD.NORM GN or ''."
                )
        loss = hcl_loss(
            self.fuse(student_features),
            [teacher_features[f] for f in self.in_features],
            self.pool_scales,
        )
        return {"loss_reviewkd": loss}

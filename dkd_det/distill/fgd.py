"""FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022) on the
FPN levels.

Focal distillation separates foreground and background with the ground-truth boxes (mapped
onto each level by its stride) and weights every position and channel by the teacher's
spatial and channel attention; the student also imitates the teacher's attention. Global
distillation compares the two maps after a GcBlock each (GCNet's global context block), so
that the student learns the relations between pixels. Per level, with ``F^S`` the student's
features mapped to the teacher's channels:

    loss = alpha * L_fg + beta * L_bg + gamma * L_at + lambda * L_global

(see :mod:`dkd_det.distill.feature_losses`); the term sums it over the levels.

The GcBlocks (one for the student's map, one for the teacher's, per level, as in FGD's code)
and the 1x1 convs that map the student's channels to the teacher's where they differ are
training-only modules of the term, like ReviewKD's ABF: optimised, synchronised and resumed
with the student, never exported.

The hyperparameters are those of FGD's own Faster R-CNN R-101 -> R-50 config
(``fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py``): levels p2..p5,
T 0.5, alpha 5e-5, beta 2.5e-5, gamma 5e-5, lambda 5e-7.

Differences from the reference (FGD's ``FeatureLoss``; with its mask convention swapped in, a
side-by-side float64 run agrees to 2e-9 relative):

* box -> pixels: a feature pixel belongs to a box if its stride x stride cell overlaps the box,
  and a box's scale is 1 / (its pixels on the map, after clipping to it). FGD's code also
  marks the row and column after ``ceil(x2 / stride)`` (one more of each) and counts them in
  the area, even where they fall outside the map.
* boxes are mapped by the level's stride; FGD's code scales them by feature size / unpadded
  image size, which stretches them in a padded batch.
* FGD's R-101 config also initialises the student's neck and heads from the teacher
  (``init_student``) and clips gradients (max norm 35); neither is done here.
"""

from typing import Dict, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from .base import DISTILL_TERM_REGISTRY, DistillInputs, DistillTerm
from .feature_losses import (
    check_feature_sizes,
    fgd_focal_losses,
    fgd_global_loss,
    fgd_masks,
)

__all__ = ["FGD", "FGDBlock", "GcBlock"]


class GcBlock(nn.Module):
    """GCNet's global context block with channel-add fusion, FGD's relation module:
    ``R(F) = F + W_v2(ReLU(LN(W_v1(sum_j softmax_j(W_k F) F_j))))``.

    ``w_k`` (1x1, C -> 1) scores every position; the softmax-weighted sum of the positions'
    features is the (N, C, 1, 1) context; ``w_v1`` (C -> C/2), LayerNorm, ReLU and ``w_v2``
    (C/2 -> C) transform it, and it is added to every position. ``w_v2`` starts at zero (the
    block starts as the identity), ``w_k`` with He initialisation, as GCNet and FGD.
    """

    def __init__(self, channels: int):
        """
        Args:
            channels: C, the channels of the maps it takes.
        """
        super().__init__()
        hidden = max(1, channels // 2)
        self.w_k = nn.Conv2d(channels, 1, kernel_size=1)
        self.w_v1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.ln = nn.LayerNorm([hidden, 1, 1])
        self.w_v2 = nn.Conv2d(hidden, channels, kernel_size=1)
        nn.init.kaiming_normal_(self.w_k.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.w_k.bias)
        nn.init.zeros_(self.w_v2.weight)
        nn.init.zeros_(self.w_v2.bias)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, 1, 1): the attention-pooled sum of the positions."""
        weights = torch.softmax(self.w_k(x).flatten(1), dim=1)  # (N, H*W)
        return torch.einsum("ncp,np->nc", x.flatten(2), weights)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        return x + self.w_v2(torch.relu(self.ln(self.w_v1(self.context(x)))))


class FGDBlock(nn.Module):
    """FGD's training-only modules of one level: ``align`` (1x1 conv from the student's
    channels to the teacher's, only where they differ, else None), ``gc_student`` and
    ``gc_teacher`` (a :class:`GcBlock` each, on the teacher's channels)."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.align: Optional[nn.Module] = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            if student_channels != teacher_channels
            else None
        )
        self.gc_student = GcBlock(teacher_channels)
        self.gc_teacher = GcBlock(teacher_channels)


@DISTILL_TERM_REGISTRY.register()
class FGD(DistillTerm):
    """``{"loss_fgd": weight * sum over levels of (alpha L_fg + beta L_bg + gamma L_at +
    lambda L_global)}``.

    The four parts (weighted by alpha, beta, gamma, lambda, summed over the levels, before the
    term's LOSS_WEIGHT) are also written to the event storage as ``fgd/fg``, ``fgd/bg``,
    ``fgd/at`` and ``fgd/global``, averaged over the ranks like the losses.
    """

    reads = frozenset({"student_features", "teacher_features", "gt_instances"})

    @configurable
    def __init__(
        self,
        *,
        in_features: Sequence[str],
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        strides: Sequence[int],
        temperature: float = 0.5,
        alpha: float = 5e-5,
        beta: float = 2.5e-5,
        gamma: float = 5e-5,
        lambda_: float = 5e-7,
        **kw,
    ):
        """
        Args:
            in_features: the levels distilled, finest first.
            student_channels, teacher_channels, strides: of each of those levels (the strides
                map the ground-truth boxes, in input pixels, onto the levels).
            temperature: T > 0 of the spatial and channel attention.
            alpha, beta, gamma, lambda_: the weights (>= 0) of the foreground and background
                feature losses, the attention loss and the global loss.
            kw: :class:`DistillTerm`'s (loss weight, warm-up).
        """
        super().__init__(**kw)
        if not temperature > 0:
            raise ValueError(f"MODEL.DISTILL.FGD.TEMPERATURE = {temperature}: must be > 0.")
        for key, value in (("ALPHA", alpha), ("BETA", beta), ("GAMMA", gamma), ("LAMBDA", lambda_)):
            if value < 0:
                raise ValueError(f"MODEL.DISTILL.FGD.{key} = {value}: must be >= 0.")
        self.in_features = list(in_features)
        self.strides = list(strides)
        self.temperature = temperature
        self.alpha, self.beta, self.gamma, self.lambda_ = alpha, beta, gamma, lambda_
        self.blocks = nn.ModuleDict(
            {
                f: FGDBlock(c_s, c_t)
                for f, c_s, c_t in zip(in_features, student_channels, teacher_channels)
            }
        )

    @classmethod
    def add_term_config(cls, node):
        # The student's and the teacher's backbone outputs distilled: p2..p5, the four levels of
        # FGD's Faster R-CNN configs (FPN outputs 0-3).
        node.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        # T > 0, the temperature of the spatial and channel attention.
        node.TEMPERATURE = 0.5
        # alpha: weight of the foreground feature loss.
        node.ALPHA = 5e-5
        # beta: weight of the background feature loss.
        node.BETA = 2.5e-5
        # gamma: weight of the attention loss (L1 between the attention maps).
        node.GAMMA = 5e-5
        # lambda: weight of the global (GcBlock relation) loss.
        node.LAMBDA = 5e-7

    @classmethod
    def from_config(cls, cfg, student, teacher):
        node = cls.term_config(cfg)
        names, c_s, c_t, strides = cls.feature_levels(cfg, student, teacher, same_channels=False)
        return {
            **cls.shared_kwargs(cfg),
            "in_features": names,
            "student_channels": c_s,
            "teacher_channels": c_t,
            "strides": strides,
            "temperature": node.TEMPERATURE,
            "alpha": node.ALPHA,
            "beta": node.BETA,
            "gamma": node.GAMMA,
            "lambda_": node.LAMBDA,
        }

    def level_parts(
        self, name: str, stride: int, student: torch.Tensor, teacher: torch.Tensor, boxes
    ) -> Dict[str, torch.Tensor]:
        """The unweighted parts of one level: {"fg", "bg", "at", "global"} scalars.

        Args:
            student: (N, C_s, H, W); teacher: (N, C_t, H, W).
            boxes: per image, (G_n, 4) ground-truth boxes XYXY in input pixels.
        """
        block = self.blocks[name]
        if block.align is not None:
            student = block.align(student)
        dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
        fg, bg = fgd_masks(boxes, stride, tuple(teacher.shape[-2:]), dtype)
        parts = fgd_focal_losses(student, teacher, fg, bg, self.temperature)
        parts["global"] = fgd_global_loss(block.gc_student(student), block.gc_teacher(teacher))
        return parts

    def losses(self, inputs: DistillInputs) -> Dict[str, torch.Tensor]:
        """{name: (N, C_s, H, W)}, {name: (N, C_t, H, W)} and the ground truth ->
        {"loss_fgd": scalar}."""
        s, t = inputs.student_features, inputs.teacher_features
        check_feature_sizes("FGD", self.in_features, s, t)
        boxes = [inst.gt_boxes.tensor for inst in inputs.gt_instances]
        weights = {"fg": self.alpha, "bg": self.beta, "at": self.gamma, "global": self.lambda_}
        total = {k: 0.0 for k in weights}
        for f, stride in zip(self.in_features, self.strides):
            for k, v in self.level_parts(f, stride, s[f], t[f], boxes).items():
                total[k] = total[k] + weights[k] * v
        stats = torch.stack([torch.as_tensor(total[k]).detach().float() for k in weights])
        if comm.get_world_size() > 1:
            # Every rank computes the term in every iteration (see DKD), so all enter this.
            torch.distributed.all_reduce(stats)
            stats /= comm.get_world_size()
        get_event_storage().put_scalars(**{f"fgd/{k}": v for k, v in zip(weights, stats)})
        return {"loss_fgd": sum(total.values())}

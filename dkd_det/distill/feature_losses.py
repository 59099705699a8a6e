"""Pure-torch formulas of the feature distillation terms PKD, CWD, FGD and MGD, one function
each, plus the level checks the four terms share (torch only: no detectron2 import).

Shapes: N images, C channels, (H, W) the size of one FPN level. Feature maps are
``(N, C, H, W)``; every loss is a float32 scalar (half-precision inputs are upcast; float64
inputs stay float64, for the tests), summed over its elements and divided as its paper's
reference implementation divides (stated per function), so that the papers' loss weights
apply unchanged.

* PKD (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
  Correlation Coefficient", NeurIPS 2022): :func:`pkd_loss`.
* CWD (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021):
  :func:`cwd_loss`.
* FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022):
  :func:`fgd_masks`, :func:`fgd_attention`, :func:`fgd_focal_losses`,
  :func:`fgd_global_loss`.
* MGD (Yang et al., "Masked Generative Distillation", ECCV 2022): :func:`mgd_mask`,
  :func:`mgd_loss`.
"""

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "PKD_EPS",
    "channel_standardise",
    "check_feature_sizes",
    "cwd_loss",
    "feature_levels",
    "fgd_attention",
    "fgd_focal_losses",
    "fgd_global_loss",
    "fgd_masks",
    "mgd_loss",
    "mgd_mask",
    "pkd_loss",
]

# Added to each channel's variance before its square root: a constant channel standardises to
# 0 (and its gradient stays finite) instead of dividing by 0.
PKD_EPS = 1e-6


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---- PKD -----------------------------------------------------------------------------------


def channel_standardise(x: torch.Tensor, eps: float = PKD_EPS) -> torch.Tensor:
    """Each channel to zero mean and unit variance over the batch and the positions.

    (N, C, H, W) -> (N, C, H, W): ``(x - mean_c) / sqrt(var_c + eps)``, with ``mean_c`` and
    the population variance ``var_c`` of channel c over its N * H * W values.
    """
    x = _upcast(x)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / (var + eps).sqrt()


def pkd_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = PKD_EPS) -> torch.Tensor:
    """PKD's feature imitation loss of one level: the MSE of the channel-standardised maps.

    ``1/2 * mean((s_hat - t_hat)^2)`` over the N * C * H * W values, with ``s_hat``,
    ``t_hat`` from :func:`channel_standardise`. Per channel this is ``1 - r_c``, r_c the
    Pearson correlation of student and teacher over the channel's values (exactly, for
    ``eps`` = 0): the loss is the mean of ``1 - r_c`` over the channels, in [0, 2],
    unitless, and invariant to an affine rescaling of either map per channel.

    Args:
        student, teacher: (N, C, H, W) each, the same shape.
    """
    return (
        0.5 * (channel_standardise(student, eps) - channel_standardise(teacher, eps)).pow(2).mean()
    )


# ---- CWD -----------------------------------------------------------------------------------


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """CWD's channel-wise distillation loss of one level.

    Each channel's H * W activations become a distribution over the positions,
    ``phi(y)_i = softmax(y / tau)_i``; the loss is ``tau^2 * KL(phi(teacher) || phi(student))``
    per (image, channel), averaged over the N * C of them (nats).

    Args:
        student, teacher: (N, C, H, W) each, the same shape.
        temperature: tau > 0.
    """
    s = _upcast(student).flatten(2) / temperature
    t = _upcast(teacher).flatten(2) / temperature
    log_p_t = F.log_softmax(t, dim=2)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=2))).sum(dim=2)  # (N, C)
    return temperature**2 * kl.mean()


# ---- FGD -----------------------------------------------------------------------------------


def fgd_masks(
    boxes: Sequence[torch.Tensor],
    stride: int,
    size: Tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FGD's foreground (binary times scale) and background masks of one level.

    A feature pixel (i, j) covers the input pixels ``[j * stride, (j + 1) * stride)`` by
    ``[i * stride, (i + 1) * stride)``; it belongs to a box if that cell and the box overlap
    with positive area. For a box covering ``H_r x W_r`` pixels of the level, its pixels get
    the scale ``1 / (H_r * W_r)``; a pixel in several boxes takes the largest scale (the
    smallest box). The background mask is ``(1 - M) / N_bg``, ``N_bg`` the number of pixels in
    no box (all zero if there is none).

    Args:
        boxes: per image, (G_n, 4) boxes XYXY in input pixels (the images' padded tensor's
            coordinates); G_n may be 0.
        stride: the level's stride in input pixels.
        size: (H, W) of the level.
        dtype: of the masks.

    Returns:
        (fg, bg), each (N, H, W): fg is ``M * S`` (the binary mask times the scale mask), bg is
        ``(1 - M) / N_bg``; each image's fg sums to its number of boxes present on the level
        (where no boxes overlap) and its bg to 1 (or 0).
    """
    height, width = size
    fgs, bgs = [], []
    for b in boxes:
        rows = torch.arange(height, device=b.device)
        cols = torch.arange(width, device=b.device)
        if len(b):
            x = b.float() / stride
            j0 = x[:, 0].floor().clamp(0, width).long()
            j1 = x[:, 2].ceil().clamp(0, width).long()
            i0 = x[:, 1].floor().clamp(0, height).long()
            i1 = x[:, 3].ceil().clamp(0, height).long()
            in_cols = (cols >= j0[:, None]) & (cols < j1[:, None])  # (G, W)
            in_rows = (rows >= i0[:, None]) & (rows < i1[:, None])  # (G, H)
            inside = in_rows[:, :, None] & in_cols[:, None, :]  # (G, H, W)
            area = ((j1 - j0).clamp(min=0) * (i1 - i0).clamp(min=0)).to(dtype)
            scale = torch.where(area > 0, 1 / area.clamp(min=1), torch.zeros_like(area))
            fg = (inside.to(dtype) * scale[:, None, None]).amax(dim=0)
        else:
            fg = torch.zeros(height, width, dtype=dtype, device=b.device)
        bg = (fg == 0).to(dtype)
        bg = bg / bg.sum().clamp(min=1)
        fgs.append(fg)
        bgs.append(bg)
    return torch.stack(fgs), torch.stack(bgs)


def fgd_attention(x: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """FGD's spatial and channel attention of a feature map.

    ``A^S = H * W * softmax(mean_c |x| / T)`` over the H * W positions and
    ``A^C = C * softmax(mean_hw |x| / T)`` over the C channels (each averages 1).

    Args:
        x: (N, C, H, W).
        temperature: T > 0.

    Returns:
        (A^S (N, H, W), A^C (N, C)).
    """
    x = _upcast(x).abs()
    n, c, h, w = x.shape
    spatial = h * w * F.softmax(x.mean(dim=1).flatten(1) / temperature, dim=1).view(n, h, w)
    channel = c * F.softmax(x.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial, channel


def fgd_focal_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    fg: torch.Tensor,
    bg: torch.Tensor,
    temperature: float,
) -> Dict[str, torch.Tensor]:
    """FGD's focal distillation of one level, unweighted: the feature loss split into its
    foreground and background parts, and the attention loss.

    With the teacher's attention ``A^S_t``, ``A^C_t`` (:func:`fgd_attention`):

    * ``fg = sum_{c,h,w} M S A^S_t A^C_t (F^T - F^S)^2 / N``;
    * ``bg = sum_{c,h,w} (1 - M)/N_bg A^S_t A^C_t (F^T - F^S)^2 / N``;
    * ``at = (sum |A^S_t - A^S_s| + sum |A^C_t - A^C_s|) / N`` (L1, per image).

    Args:
        student: (N, C, H, W), already mapped to the teacher's channels.
        teacher: (N, C, H, W).
        fg, bg: (N, H, W) from :func:`fgd_masks`.
        temperature: the attention's T.

    Returns:
        {"fg", "bg", "at"}: scalars.
    """
    student, teacher = _upcast(student), _upcast(teacher)
    n = student.shape[0]
    spatial_t, channel_t = fgd_attention(teacher, temperature)
    spatial_s, channel_s = fgd_attention(student, temperature)
    weight = spatial_t[:, None] * channel_t[:, :, None, None]  # (N, C, H, W)
    error = weight * (teacher - student).pow(2)
    return {
        "fg": (error * fg[:, None]).sum() / n,
        "bg": (error * bg[:, None]).sum() / n,
        "at": ((spatial_t - spatial_s).abs().sum() + (channel_t - channel_s).abs().sum()) / n,
    }


def fgd_global_loss(student_relation: torch.Tensor, teacher_relation: torch.Tensor) -> torch.Tensor:
    """FGD's global distillation of one level, unweighted:
    ``sum (R(F^T) - R(F^S))^2 / N``, given the GcBlock outputs (N, C, H, W) each."""
    diff = _upcast(teacher_relation) - _upcast(student_relation)
    return diff.pow(2).sum() / diff.shape[0]


# ---- MGD -----------------------------------------------------------------------------------


def mgd_mask(
    shape: Tuple[int, int, int, int], ratio: float, device, dtype=torch.float32
) -> torch.Tensor:
    """MGD's random pixel mask: (N, 1, H, W), 0 where ``R < ratio`` and 1 elsewhere, R uniform
    on [0, 1) from torch's global generator of ``device`` (as dropout draws), one draw per
    pixel shared by all channels.

    Args:
        shape: (N, C, H, W) of the features to mask.
        ratio: lambda, the expected fraction of pixels masked, in [0, 1).
    """
    n, _, h, w = shape
    return (torch.rand((n, 1, h, w), device=device) >= ratio).to(dtype)


def mgd_loss(generated: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MGD's generation loss of one level, unweighted: ``sum (T - G(f_align(S) * M))^2 / N``,
    given the generated features and the teacher's, (N, C, H, W) each."""
    diff = _upcast(teacher) - _upcast(generated)
    return diff.pow(2).sum() / diff.shape[0]


# ---- the level checks the feature terms share ----------------------------------------------


def feature_levels(
    term: str,
    names: Sequence[str],
    student_shape: Dict[str, Any],
    teacher_shape: Dict[str, Any],
    same_channels: bool,
) -> Tuple[List[str], List[int], List[int], List[int]]:
    """The levels a feature term distils, checked against both backbones' outputs.

    Args:
        term: the term's config name, e.g. "PKD" (for messages naming
            ``MODEL.DISTILL.<term>.IN_FEATURES``).
        names: the levels, e.g. ["p2", "p3", "p4", "p5"].
        student_shape, teacher_shape: the backbones' ``output_shape()`` (detectron2
            ShapeSpecs: ``.channels``, ``.stride``).
        same_channels: refuse levels whose channels differ (terms without an alignment
            layer in their reference implementation).

    Returns:
        (names finest first, student channels, teacher channels, strides), per level.
    """
    key = f"MODEL.DISTILL.{term}.IN_FEATURES"
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{key} = {names}: must name at least one level, each once.")
    for who, shape in (("student", student_shape), ("teacher", teacher_shape)):
        missing = [f for f in names if f not in shape]
        if missing:
            raise ValueError(
                f"{key} = {names}: the {who}'s backbone has no {missing}; its outputs are "
                f"{sorted(shape)}."
            )
    strides = [f for f in names if student_shape[f].stride != teacher_shape[f].stride]
    if strides:
        raise ValueError(
            f"{key}: the levels {strides} have strides "
            f"{[student_shape[f].stride for f in strides]} in the student but "
            f"{[teacher_shape[f].stride for f in strides]} in the teacher: the maps would not "
            "align."
        )
    names.sort(key=lambda f: student_shape[f].stride)
    if same_channels:
        differ = [f for f in names if student_shape[f].channels != teacher_shape[f].channels]
        if differ:
            raise ValueError(
                f"{term} compares student and teacher channel by channel and, as its reference "
                f"implementation, has no layer to align them, but the levels {differ} of "
                f"{key} have {[student_shape[f].channels for f in differ]} channels in the "
                f"student and {[teacher_shape[f].channels for f in differ]} in the teacher. "
                "Give both the same MODEL.FPN.OUT_CHANNELS (the teacher's through "
                "MODEL.TEACHER.OPTS), or use FGD or MGD, which align channels with a 1x1 conv."
            )
    return (
        names,
        [student_shape[f].channels for f in names],
        [teacher_shape[f].channels for f in names],
        [student_shape[f].stride for f in names],
    )


def check_feature_sizes(
    term: str,
    names: Sequence[str],
    student_features: Dict[str, torch.Tensor],
    teacher_features: Dict[str, torch.Tensor],
) -> None:
    """Raise a clear error if a level's student and teacher maps differ in batch or size."""
    for f in names:
        s, t = student_features[f], teacher_features[f]
        if s.shape[0] != t.shape[0] or s.shape[-2:] != t.shape[-2:]:
            raise ValueError(
                f"{term} level {f!r}: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                "differ in batch or size; teacher and student must pad images alike (the "
                "backbones' size_divisibility)."
            )

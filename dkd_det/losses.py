"""Knowledge-distillation losses (pure torch): DKD and KD on classification logits, and
ReviewKD's hierarchical context loss (HCL) on feature maps.

Notation follows Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).
For a region with target class ``t`` (the background class included) and
temperature ``T``, with ``p = softmax(z / T)`` for teacher and student:

* ``b = [p_t, 1 - p_t]``: the binary target / non-target split;
* ``p_hat``: the distribution over the non-target classes, renormalised;
* ``TCKD = KL(b_teacher || b_student)``;
* ``NCKD = KL(p_hat_teacher || p_hat_student)``;
* ``DKD = (alpha * TCKD + beta * NCKD) * T^2``;
* classic ``KD = KL(p_teacher || p_student) * T^2
  = (TCKD + (1 - p_t_teacher) * NCKD) * T^2`` per region.

Everything is computed from ``log_softmax`` and ``logsumexp`` in float32, with
autocast disabled: no probability is ever passed to ``log``, so the losses are
finite and exact for logits of any finite size (the reference implementation
overflows at logit scale ~20), and half-precision inputs are upcast.

HCL (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021) compares two
feature maps at full resolution and average-pooled to a few small scales; see
:func:`hcl_loss`.
"""

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["decoupled_kd", "dkd_loss", "hcl_loss", "kd_loss"]


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from finite log-probabilities: (N, C), (N, C) -> (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _check(logits_student: torch.Tensor, logits_teacher: torch.Tensor) -> None:
    if logits_student.shape != logits_teacher.shape or logits_student.dim() != 2:
        raise ValueError(
            "Distillation needs student and teacher logits of the same shape (N, K+1); got "
            f"{tuple(logits_student.shape)} and {tuple(logits_teacher.shape)}. Teacher and "
            "student must predict the same classes (MODEL.ROI_HEADS.NUM_CLASSES)."
        )


class _DecoupledKD(torch.autograd.Function):
    """TCKD and NCKD per batch (means, times T^2) with a closed-form gradient.

    Autograd through the formulas would keep about ten (N, C) intermediates alive until
    backward; this keeps none (only per-region scalars) and recomputes the two softmaxes in
    backward, in place. With ``p`` the student's softmax at temperature T, ``p_hat`` its
    renormalised non-target part, ``b_t`` the teacher's target probability and ``q_hat``
    the teacher's non-target distribution, the gradients with respect to the student's
    logits are (times T / N):

    * d TCKD = p - b_t * onehot(t) - (1 - b_t) * p_hat
    * d NCKD = p_hat - q_hat            (both zero-padded at the target class)
    """

    @staticmethod
    def forward(ctx, logits_student, logits_teacher, target, temperature):
        is_target = F.one_hot(target, logits_student.shape[1]).bool()
        index = target[:, None]
        log_p = F.log_softmax(logits_student.float() / temperature, dim=1)
        log_q = F.log_softmax(logits_teacher.float() / temperature, dim=1)
        # log(1 - p_t) as the logsumexp of the non-target log-probs: exact even when p_t ~ 1.
        log_nt_s = torch.logsumexp(log_p.masked_fill(is_target, float("-inf")), dim=1, keepdim=True)
        log_nt_t = torch.logsumexp(log_q.masked_fill(is_target, float("-inf")), dim=1, keepdim=True)
        log_p_t, log_q_t = log_p.gather(1, index), log_q.gather(1, index)
        tckd = log_q_t.exp() * (log_q_t - log_p_t) + log_nt_t.exp() * (log_nt_t - log_nt_s)
        # NCKD = sum_j q_hat_j (log q_hat_j - log p_hat_j)
        #      = sum_j q_hat_j (log q_j - log p_j) - (log_nt_t - log_nt_s)
        diff = log_q - log_p
        q_hat = log_q.sub_(log_nt_t).exp_().masked_fill_(is_target, 0.0)
        nckd = (diff.mul_(q_hat)).sum(dim=1, keepdim=True) - (log_nt_t - log_nt_s)
        ctx.save_for_backward(logits_student, logits_teacher, target, log_nt_s, log_nt_t, log_q_t)
        ctx.temperature = temperature
        scale = temperature**2
        return tckd.mean() * scale, nckd.mean() * scale

    @staticmethod
    def backward(ctx, grad_tckd, grad_nckd):
        logits_student, logits_teacher, target, log_nt_s, log_nt_t, log_q_t = ctx.saved_tensors
        temperature = ctx.temperature
        is_target = F.one_hot(target, logits_student.shape[1]).bool()
        b_t = log_q_t.exp()
        grad = F.log_softmax(logits_student.float() / temperature, dim=1)
        p_hat = (grad - log_nt_s).exp_().masked_fill_(is_target, 0.0)
        grad.exp_()  # p
        grad.addcmul_(p_hat, 1.0 - b_t, value=-1.0).scatter_add_(1, target[:, None], -b_t)
        grad.mul_(grad_tckd)
        q_hat = F.log_softmax(logits_teacher.float() / temperature, dim=1)
        q_hat.sub_(log_nt_t).exp_().masked_fill_(is_target, 0.0)
        grad.add_(p_hat.sub_(q_hat).mul_(grad_nckd))
        grad.mul_(temperature / logits_student.shape[0])
        return grad.to(logits_student.dtype), None, None, None


def decoupled_kd(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two parts of DKD, each averaged over regions and multiplied by T^2.

    Args:
        logits_student: (N, C) classification logits of the student, C >= 2
            (for a detector C = K + 1, the last column being background).
        logits_teacher: (N, C) logits of the teacher for the same regions.
            Gradients are not propagated to it.
        target: (N,) int64 class index in [0, C) of each region.
        temperature: softmax temperature T > 0.

    Returns:
        (tckd, nckd): float32 scalars. For N = 0 both are 0 (and still carry a
        graph to the student's logits, so that every rank's backward matches).
    """
    _check(logits_student, logits_teacher)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, c = logits_student.shape
    if c < 2:
        raise ValueError(f"DKD needs at least 2 classes (target and non-target), got {c}")
    if n == 0:
        zero = logits_student.float().sum() * 0.0
        return zero, zero
    with torch.autocast(device_type=logits_student.device.type, enabled=False):
        return _DecoupledKD.apply(
            logits_student, logits_teacher.detach(), target.long(), float(temperature)
        )


def dkd_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 0.25,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (times T^2), averaged over regions.

    Shapes as in :func:`decoupled_kd`; returns a float32 scalar.
    """
    tckd, nckd = decoupled_kd(logits_student, logits_teacher, target, temperature)
    return alpha * tckd + beta * nckd


def kd_loss(
    logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Classic KD (Hinton et al.): ``KL(p_teacher || p_student) * T^2``, averaged over rows.

    Args:
        logits_student, logits_teacher: (N, C) logits; no gradient reaches the teacher.
        temperature: softmax temperature T > 0.
    Returns:
        float32 scalar (0 for N = 0).
    """
    _check(logits_student, logits_teacher)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=logits_student.device.type, enabled=False):
        log_p_s = F.log_softmax(logits_student.float() / temperature, dim=1)
        log_p_t = F.log_softmax(logits_teacher.detach().float() / temperature, dim=1)
        if logits_student.shape[0] == 0:
            return log_p_s.sum() * 0.0
        return _kl_from_log_probs(log_p_t, log_p_s).mean() * temperature**2


def hcl_loss(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    pool_scales: Sequence[int] = (4, 2, 1),
) -> torch.Tensor:
    """ReviewKD's hierarchical context loss, summed over feature levels.

    For each level, with ``F_s``, ``F_t`` of shape (N, C, H, W), ``P_k`` adaptive average
    pooling to (k, k) and ``mse`` the mean of squared differences over all elements:

        HCL = (mse(F_s, F_t) + sum_j 2^-j mse(P_kj(F_s), P_kj(F_t))) / (1 + sum_j 2^-j)

    where k1, k2, ... are the ``pool_scales`` smaller than min(H, W), in order (a scale as
    large as the map would only copy or upsample it), j = 1, 2, ... their rank among those
    used. As the reference implementations, which skip a scale >= H: the same whenever H is
    the smaller side, as on COCO for p2..p6.

    Args:
        student_features: per level, (N, C, H, W) student features (after ABF fusion).
        teacher_features: per level, the teacher's of the same shapes; no gradient reaches them.
        pool_scales: the pooled output sizes, each > 0.

    Returns:
        float32 scalar, in squared feature units (autocast disabled).
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"HCL needs as many student as teacher levels (at least one); got "
            f"{len(student_features)} and {len(teacher_features)}."
        )
    total = None
    with torch.autocast(device_type=student_features[0].device.type, enabled=False):
        for f_s, f_t in zip(student_features, teacher_features):
            if f_s.shape != f_t.shape or f_s.dim() != 4:
                raise ValueError(
                    f"HCL compares (N, C, H, W) maps of equal shape; got {tuple(f_s.shape)} "
                    f"(student) and {tuple(f_t.shape)} (teacher)."
                )
            f_s, f_t = f_s.float(), f_t.detach().float()
            loss = F.mse_loss(f_s, f_t)
            weight, weights = 1.0, 1.0
            for k in pool_scales:
                if k >= min(f_s.shape[-2:]):
                    continue
                weight /= 2.0
                pooled = F.adaptive_avg_pool2d(f_s, k), F.adaptive_avg_pool2d(f_t, k)
                loss = loss + weight * F.mse_loss(*pooled)
                weights += weight
            total = loss / weights if total is None else total + loss / weights
    return total

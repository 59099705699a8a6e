"""Knowledge-distillation losses on classification logits (pure torch).

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
"""
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["decoupled_kd", "dkd_loss", "kd_loss"]


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
    with torch.autocast(device_type=logits_student.device.type, enabled=False):
        z_s = logits_student.float() / temperature
        z_t = logits_teacher.detach().float() / temperature
        is_target = F.one_hot(target.long(), c).bool()
        # The C-1 non-target logits of each row, in their original order.
        z_s_nt = z_s[~is_target].view(n, c - 1)
        z_t_nt = z_t[~is_target].view(n, c - 1)

        def binary_log_probs(z, z_nt):
            # log [p_t, 1 - p_t], with log(1 - p_t) = logsumexp of the non-target log-probs:
            # exact even when p_t rounds to 1.
            log_norm = torch.logsumexp(z, dim=1, keepdim=True)
            log_p_t = z.gather(1, target.long()[:, None]) - log_norm
            log_p_nt = torch.logsumexp(z_nt, dim=1, keepdim=True) - log_norm
            return torch.cat([log_p_t, log_p_nt], dim=1)

        tckd = _kl_from_log_probs(binary_log_probs(z_t, z_t_nt), binary_log_probs(z_s, z_s_nt))
        nckd = _kl_from_log_probs(F.log_softmax(z_t_nt, dim=1), F.log_softmax(z_s_nt, dim=1))
        scale = temperature**2
        if n == 0:
            zero = z_s.sum() * 0.0
            return zero, zero
        return tckd.mean() * scale, nckd.mean() * scale


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

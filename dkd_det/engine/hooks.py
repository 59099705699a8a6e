"""Training hooks that guard a long distillation run."""

import logging

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["TeacherCheck", "teacher_fingerprint"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def teacher_fingerprint(teacher: torch.nn.Module) -> float:
    """A float64 checksum of every parameter and buffer of ``teacher`` (position-weighted,
    so that swapped values change it too)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(list(teacher.parameters()) + list(teacher.buffers())):
        total += (i + 1) * t.detach().double().sum().cpu()
    return float(total)


class TeacherCheck(HookBase):
    """Checks at the end of training that the teacher did not change and, with several
    processes, that every rank had the same teacher; raises ``RuntimeError`` otherwise."""

    def __init__(self, teacher: torch.nn.Module):
        self._teacher = teacher
        self._before = None

    def before_train(self):
        self._before = teacher_fingerprint(self._teacher)

    def after_train(self):
        after = teacher_fingerprint(self._teacher)
        if after != self._before:
            raise RuntimeError(
                f"The teacher changed during training (checksum {self._before!r} -> {after!r})."
            )
        ranks = comm.all_gather(after)
        if len(set(ranks)) != 1:
            raise RuntimeError(f"The teacher differs between ranks: checksums {ranks}.")
        logger.info(
            "Teacher unchanged by training and identical on %d rank(s) (checksum %r).",
            len(ranks),
            after,
        )

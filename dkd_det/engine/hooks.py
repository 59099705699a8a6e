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
    processes, that every rank had the same teacher; raises ``RuntimeError`` otherwise.

    The check runs only after training completed its last iteration. detectron2 calls every
    hook's ``after_train`` in a ``finally``, also after an exception; a rank that failed (a
    non-finite loss on the main process, an out-of-memory, a data error) must not enter the
    check's ``all_gather`` while the others wait in DDP's all-reduce: NCCL would block until
    the process-group timeout and hide the real error. The guard is stricter than EvalHook's
    (``iter + 1 >= max_iter``), which also holds after an exception in the last iteration.
    Register it after the EvalHook, so that its error does not pre-empt the final evaluation.
    """

    def __init__(self, teacher: torch.nn.Module):
        self._teacher = teacher
        self._before = None

    def before_train(self):
        self._before = teacher_fingerprint(self._teacher)

    def after_train(self):
        # TrainerBase.train increments iter past the loop only when no exception was raised.
        if self.trainer.iter < self.trainer.max_iter:
            logger.info("Training did not complete: the teacher check is skipped.")
            return
        after = teacher_fingerprint(self._teacher)
        # Gathered before anything is decided, so that every rank raises the same error rather
        # than one rank leaving while the others wait in the gather.
        ranks = comm.all_gather((self._before, after))
        changed = [(i, b, a) for i, (b, a) in enumerate(ranks) if a != b]
        if changed:
            raise RuntimeError(
                f"The teacher changed during training: (rank, checksum before, after) {changed}."
            )
        if len({a for _, a in ranks}) != 1:
            raise RuntimeError(
                f"The teacher differs between ranks: checksums {[a for _, a in ranks]}."
            )
        logger.info(
            "Teacher unchanged by training and identical on %d rank(s) (checksum %r).",
            len(ranks),
            after,
        )

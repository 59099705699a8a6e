"""Training hooks and checkpointing that guard a long distillation run."""
import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["AtomicCheckpointer", "TeacherCheck", "teacher_fingerprint"]

logger = logging.getLogger(__name__)


class AtomicCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` whose ``last_checkpoint`` is replaced atomically.

    fvcore writes ``model_XXXXXXX.pth`` first and tags it in ``last_checkpoint`` after; a
    process killed during the model write leaves ``last_checkpoint`` on the previous, complete
    file. Writing the tag through a temporary file and ``os.replace`` means a kill during the
    tag write cannot leave it empty or truncated either: ``--resume`` always finds a whole file.
    """

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        tmp = save_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(last_filename_basename)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, save_file)


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
            raise RuntimeError(f"The teacher changed during training (checksum {self._before!r} -> {after!r}).")
        ranks = comm.all_gather(after)
        if len(set(ranks)) != 1:
            raise RuntimeError(f"The teacher differs between ranks: checksums {ranks}.")
        logger.info("Teacher unchanged by training and identical on %d rank(s) (checksum %r).", len(ranks), after)

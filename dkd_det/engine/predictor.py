"""The trained student alone: strict loading for evaluation, export and inference."""

from typing import Optional

import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from ..checkpoint import StrictCheckpointer, resolve_weights
from ..config import student_cfg
from ..modeling import TRAINING_ONLY_PREFIXES

__all__ = ["load_student", "Predictor"]

_HINT = "Use the config the checkpoint was trained with (and the same class count)."


def _load_strictly(model: torch.nn.Module, weights: str, sha256: str = "") -> None:
    if not weights:
        raise ValueError(
            "MODEL.WEIGHTS is empty: set it to the trained model, e.g. "
            "MODEL.WEIGHTS output/dkd_r101_r18/model_final.pth."
        )
    # A training checkpoint also holds the training-only modules (e.g. ReviewKD's ABF), which
    # the student alone does not have.
    checkpointer = StrictCheckpointer(
        model, key="MODEL.WEIGHTS", hint=_HINT, drop_prefixes=TRAINING_ONLY_PREFIXES
    )
    checkpointer.load(resolve_weights(weights, "MODEL.WEIGHTS", sha256))


def load_student(cfg: CfgNode, weights: Optional[str] = None) -> torch.nn.Module:
    """The trained student of a dkd-det (or plain detectron2) config, in eval mode on
    ``cfg.MODEL.DEVICE``. The teacher and training-only modules are never built; every key
    of the student must be in the checkpoint and every key of the checkpoint in the student,
    except training-only modules' (e.g. ReviewKD's ABF), which are dropped. The file is
    loaded as data (see :mod:`dkd_det.checkpoint.safe_load`) and, when it is
    ``cfg.MODEL.WEIGHTS``, checked against ``MODEL.WEIGHTS_SHA256``.

    Args:
        weights: the checkpoint (path or URL); None for ``cfg.MODEL.WEIGHTS``.

    Raises:
        ValueError: no weights given, a checkpoint that does not fit the student, one that would
            run code (UnsafeFileError) or whose SHA-256 is not the pinned one.
        FileNotFoundError, OSError: a missing file or an unreachable URL.
    """
    cfg = student_cfg(cfg)
    model = build_model(cfg)
    # The pin is MODEL.WEIGHTS's: not that of another file (e.g. --eval-only --resume's).
    own = weights is None or weights == cfg.MODEL.WEIGHTS
    sha256 = cfg.MODEL.get("WEIGHTS_SHA256", "") if own else ""
    _load_strictly(model, cfg.MODEL.WEIGHTS if weights is None else weights, sha256)
    return model.eval()


class Predictor(DefaultPredictor):
    """detectron2's :class:`DefaultPredictor` for the student alone, loaded strictly: one
    (H, W, C) image in ``cfg.INPUT.FORMAT`` (BGR by default in detectron2's demo) in, the
    student's ``{"instances": Instances}`` out, boxes in input pixels."""

    def __init__(self, cfg: CfgNode):
        cfg = student_cfg(cfg)
        unloaded = cfg.clone()
        unloaded.defrost()
        unloaded.MODEL.WEIGHTS = ""  # DefaultPredictor's own loading is lenient: load below
        super().__init__(unloaded)
        self.cfg = cfg
        _load_strictly(self.model, cfg.MODEL.WEIGHTS, cfg.MODEL.get("WEIGHTS_SHA256", ""))

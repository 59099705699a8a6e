"""DKD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022) on the ROI box classifier:
``alpha * TCKD + beta * NCKD`` (times T^2) between the student's and the teacher's logits for
the boxes the student sampled."""

import logging
from typing import Dict

import torch
from detectron2.config import configurable
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..losses import decoupled_kd
from .base import DISTILL_TERM_REGISTRY, DistillInputs
from .logits import LogitTerm

__all__ = ["DKD"]

logger = logging.getLogger(__name__)


@DISTILL_TERM_REGISTRY.register()
class DKD(LogitTerm):
    """``{"loss_dkd": weight * (alpha * TCKD + beta * NCKD)}``, averaged over the regions.

    TCKD and NCKD (unweighted, times T^2) are also written to the event storage as
    ``dkd/tckd`` and ``dkd/nckd``, averaged over the ranks like the losses, so that
    metrics.json and TensorBoard show them.
    """

    @configurable
    def __init__(self, *, alpha: float = 1.0, beta: float = 0.25, temperature: float = 1.0, **kw):
        """
        Args:
            alpha, beta: weights of TCKD and NCKD, >= 0.
            temperature: softmax temperature, > 0.
            kw: :class:`DistillTerm`'s (loss weight, warm-up).
        """
        super().__init__(**kw)
        for key, value in (("ALPHA", alpha), ("BETA", beta)):
            if value < 0:
                raise ValueError(f"MODEL.DISTILL.DKD.{key} = {value}: must be >= 0.")
        if temperature <= 0:
            raise ValueError(f"MODEL.DISTILL.DKD.TEMPERATURE = {temperature}: must be > 0.")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature

    @classmethod
    def add_term_config(cls, node):
        # Weight of the target-class part (TCKD).
        node.ALPHA = 1.0
        # Weight of the non-target-class part (NCKD).
        node.BETA = 0.25
        # Softmax temperature T > 0; the loss is multiplied by T^2.
        node.TEMPERATURE = 1.0

    @classmethod
    def renamed_keys(cls):
        return {f"MODEL.DISTILL.{k}": f"MODEL.DISTILL.DKD.{k}" for k in ("ALPHA", "BETA")}

    @classmethod
    def from_config(cls, cfg, student, teacher):
        cls.check_models(cfg, student, teacher)
        if student.roi_heads.num_classes == 1:
            logger.warning(
                "MODEL.ROI_HEADS.NUM_CLASSES is 1: each region's only non-target class is the "
                "other of (object, background), so NCKD is identically 0 and DKD reduces to "
                "MODEL.DISTILL.DKD.ALPHA x TCKD (MODEL.DISTILL.DKD.BETA has no effect)."
            )
        node = cls.term_config(cfg)
        return {
            **cls.shared_kwargs(cfg),
            "alpha": node.ALPHA,
            "beta": node.BETA,
            "temperature": node.TEMPERATURE,
        }

    def losses(self, inputs: DistillInputs) -> Dict[str, torch.Tensor]:
        """(R, K+1) student and teacher logits, (R,) classes -> {"loss_dkd": scalar}."""
        tckd, nckd = decoupled_kd(
            inputs.student_logits, inputs.teacher_logits, inputs.gt_classes, self.temperature
        )
        stats = torch.stack([tckd.detach(), nckd.detach()])
        if comm.get_world_size() > 1:
            # The mean over ranks, as detectron2 logs the losses. Every rank runs this (the
            # model's training forward, inside DDP's forward) in every iteration, so the
            # all_reduce cannot be entered by one rank alone.
            stats = stats.float()
            torch.distributed.all_reduce(stats)
            stats /= comm.get_world_size()
        get_event_storage().put_scalars(**{"dkd/tckd": stats[0], "dkd/nckd": stats[1]})
        return {"loss_dkd": self.alpha * tckd + self.beta * nckd}

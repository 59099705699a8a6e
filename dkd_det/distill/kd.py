"""Classic KD (Hinton et al., 2015) on the ROI box classifier: ``KL(p_teacher || p_student)``
(times T^2) for the boxes the student sampled."""

from typing import Dict

import torch
from detectron2.config import configurable

from ..losses import kd_loss
from .base import DISTILL_TERM_REGISTRY, DistillInputs
from .logits import LogitTerm

__all__ = ["KD"]


@DISTILL_TERM_REGISTRY.register()
class KD(LogitTerm):
    """``{"loss_kd": weight * KL(p_teacher || p_student) * T^2}``, averaged over the regions."""

    reads = frozenset({"student_logits", "teacher_logits"})

    @configurable
    def __init__(self, *, temperature: float = 1.0, **kw):
        """
        Args:
            temperature: softmax temperature, > 0.
            kw: :class:`DistillTerm`'s (loss weight, warm-up).
        """
        super().__init__(**kw)
        if temperature <= 0:
            raise ValueError(f"MODEL.DISTILL.KD.TEMPERATURE = {temperature}: must be > 0.")
        self.temperature = temperature

    @classmethod
    def add_term_config(cls, node):
        # Softmax temperature T > 0; the loss is multiplied by T^2.
        node.TEMPERATURE = 1.0

    @classmethod
    def from_config(cls, cfg, student, teacher):
        cls.check_models(cfg, student, teacher)
        return {**cls.shared_kwargs(cfg), "temperature": cls.term_config(cfg).TEMPERATURE}

    def losses(self, inputs: DistillInputs) -> Dict[str, torch.Tensor]:
        """(R, K+1) student and teacher logits -> {"loss_kd": scalar}."""
        return {"loss_kd": kd_loss(inputs.student_logits, inputs.teacher_logits, self.temperature)}

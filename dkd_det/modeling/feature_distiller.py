"""The registry of feature distillation terms: training-only modules beside the student.

A feature distillation term is an ``nn.Module`` registered in
:data:`FEATURE_DISTILLER_REGISTRY` and selected by ``MODEL.DISTILL.FEATURE.TYPE``. It is
built as ``cls(cfg, student_shape, teacher_shape)`` (detectron2's ``@configurable``
convention), where the shapes are the student's and the teacher's
``backbone.output_shape()``, and is called in training as

    term(student_features, teacher_features) -> {"loss_<name>": float32 scalar}

with both arguments ``{name: (N, C, H, W)}`` backbone outputs of the same batch (the
teacher's computed without grad, by the one teacher backbone pass that also feeds its box
head). A new method is one module that registers a class and one config file that names
it; :class:`DistillationRCNN` calls whatever was built and never branches on the method.

Where the modules live: :class:`DistillationRCNN` holds the term as its submodule
``feature_distiller``, so that its parameters are in ``model.parameters()`` (optimised, and
synchronised by DDP like the student's) and in training checkpoints (``--resume`` restores
them). They are never part of the student for inference: the student alone
(:func:`dkd_det.config.student_cfg`) does not build them, strict student loading
(:func:`dkd_det.engine.load_student`) and the export (:func:`dkd_det.export.export_student`)
drop their keys (``dkd_det.modeling.TRAINING_ONLY_PREFIXES``).
"""

from typing import Dict, Optional

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import nn

__all__ = ["FEATURE_DISTILLER_REGISTRY", "build_feature_distiller"]

FEATURE_DISTILLER_REGISTRY = Registry("FEATURE_DISTILLER")
FEATURE_DISTILLER_REGISTRY.__doc__ = """
Feature distillation terms (see :mod:`dkd_det.modeling.feature_distiller`). A registered
class is called with ``(cfg, student_shape, teacher_shape)`` and returns a module mapping
``(student_features, teacher_features)`` to a dict of weighted losses.
"""


def build_feature_distiller(
    cfg, student_shape: Dict[str, ShapeSpec], teacher_shape: Dict[str, ShapeSpec]
) -> Optional[nn.Module]:
    """The feature term named by ``cfg.MODEL.DISTILL.FEATURE.TYPE`` (case-insensitive), or None
    for "NONE". An unknown name is a ValueError that lists the registered ones."""
    name = cfg.MODEL.DISTILL.FEATURE.TYPE
    if name.upper() == "NONE":
        return None
    registered = {key.upper(): key for key, _ in FEATURE_DISTILLER_REGISTRY}
    if name.upper() not in registered:
        raise ValueError(
            f"MODEL.DISTILL.FEATURE.TYPE = {name!r}: must be NONE or one of "
            f"{sorted(registered)} (FEATURE_DISTILLER_REGISTRY)."
        )
    return FEATURE_DISTILLER_REGISTRY.get(registered[name.upper()])(
        cfg, student_shape, teacher_shape
    )

"""Everything about weight files: resolving paths and URLs, strict and atomic checkpointers,
converters from torchvision, and the export of a trained student."""

from .convert import (
    CONVERTERS,
    convert_torchvision,
    load_torchvision_state_dict,
    missing_weights_hint,
    save_d2_pkl,
)
from .export import export_student, plain_detectron2_cfg
from .weights import AtomicCheckpointer, StrictCheckpointer, checkpoint_size, resolve_weights

__all__ = [
    "CONVERTERS",
    "convert_torchvision",
    "load_torchvision_state_dict",
    "missing_weights_hint",
    "save_d2_pkl",
    "export_student",
    "plain_detectron2_cfg",
    "AtomicCheckpointer",
    "StrictCheckpointer",
    "checkpoint_size",
    "resolve_weights",
]

"""Weight files: resolving paths and URLs, strict and atomic checkpointers, converters from
torchvision. (Exporting a trained student is :mod:`dkd_det.export`.)"""

from .convert import (
    CONVERTERS,
    convert_torchvision,
    load_torchvision_state_dict,
    missing_weights_hint,
    save_d2_pkl,
)
from .weights import (
    AtomicCheckpointer,
    NotACheckpointError,
    StrictCheckpointer,
    checkpoint_size,
    describe_weights_file,
    resolve_weights,
)

__all__ = [
    "CONVERTERS",
    "convert_torchvision",
    "load_torchvision_state_dict",
    "missing_weights_hint",
    "save_d2_pkl",
    "AtomicCheckpointer",
    "NotACheckpointError",
    "describe_weights_file",
    "StrictCheckpointer",
    "checkpoint_size",
    "resolve_weights",
]

"""Weight files: resolving paths and URLs (https only, SHA-256 checked), loading weights and
configs as data, strict and atomic checkpointers, converters from torchvision. (Exporting a
trained student is :mod:`dkd_det.export`.)"""

from .convert import (
    CONVERTERS,
    convert_torchvision,
    load_torchvision_state_dict,
    missing_weights_hint,
    save_d2_pkl,
)
from .safe_load import (
    TRUST_ENV,
    HashMismatchError,
    UnsafeFileError,
    check_fetchable,
    file_sha256,
    load_lazy_config,
    load_weights_file,
    merge_config_file,
    trusted,
)
from .weights import (
    SHA256_KEYS,
    AtomicCheckpointer,
    NotACheckpointError,
    StrictCheckpointer,
    add_checkpoint_config,
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
    "TRUST_ENV",
    "HashMismatchError",
    "UnsafeFileError",
    "check_fetchable",
    "file_sha256",
    "load_lazy_config",
    "load_weights_file",
    "merge_config_file",
    "trusted",
    "SHA256_KEYS",
    "AtomicCheckpointer",
    "NotACheckpointError",
    "add_checkpoint_config",
    "describe_weights_file",
    "StrictCheckpointer",
    "checkpoint_size",
    "resolve_weights",
]

"""Loading other people's files as data: weights through restricted unpicklers, configs without
python tags.

Distillation loads files that others made (a model-zoo teacher, a colleague's student, a paper's
config). ``pickle.load``, ``torch.load(weights_only=False)`` (torch 2.3.1's default) and
``yaml.unsafe_load`` (detectron2's ``merge_from_file`` default fallback) run whatever code such a
file names. Here:

- a detectron2 ``.pkl`` is unpickled allowing only what a dict of numpy arrays needs
  (:data:`PICKLE_GLOBALS`);
- a ``torch.save`` file may name only the globals of detectron2's checkpoints (model, optimizer,
  scheduler, iteration: tensors, storages, dtypes, numpy arrays, containers and plain values;
  :data:`TORCH_GLOBALS`). On torch >= 2.6 it is read by torch's own weights-only unpickler
  (``torch.load(weights_only=True)``, this list added with ``torch.serialization.safe_globals``)
  after a scan of its pickle has refused any global outside the list (torch's default list has
  more: sparse, quantized and nested tensors, legacy tensor classes, ``collections.Counter``).
  Before 2.6 torch's ``weights_only`` has a known bypass (CVE-2025-32434), so there it is read by
  ``torch.load`` with this module's restricted unpickler, whose ``find_class`` refuses the rest,
  and a user's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (which makes torch refuse any pickle module)
  is set aside for that call;
- a config (and its ``_BASE_`` chain) is parsed with ``yaml.safe_load``; a python tag is an error
  that names the file and the line;
- a LazyConfig ``.py`` file is Python code, never read as data: it is refused unless it is one of
  detectron2's own model-zoo configs inside the installed package (:func:`load_lazy_config`).

A user who trusts a file sets ``DKD_DET_TRUST_FILES=1`` (:data:`TRUST_ENV`): weights are then
unpickled without restriction and configs may use python tags, and the log says so (a WARNING
naming the file) each time.
"""

import contextlib
import hashlib
import importlib
import io
import logging
import os
import pickle
import pickletools
import re
import tarfile
import types
import warnings
import zipfile
from typing import Any, FrozenSet, Iterator, Optional, Tuple

import torch
import yaml
from detectron2.config import CfgNode

from ..files import model_zoo_dir

__all__ = [
    "FETCHED_SCHEMES",
    "HashMismatchError",
    "NAME_HASH_RULE",
    "TRUST_ENV",
    "PICKLE_GLOBALS",
    "TORCH_GLOBALS",
    "UnsafeFileError",
    "trusted",
    "check_fetchable",
    "file_sha256",
    "is_packaged_config",
    "name_hash_prefix",
    "is_torchscript_archive",
    "load_pickle_file",
    "load_torch_file",
    "load_weights_file",
    "load_lazy_config",
    "merge_config_file",
]

logger = logging.getLogger(__name__)

TRUST_ENV = "DKD_DET_TRUST_FILES"
_TRUE = ("1", "true", "yes", "y", "on")

# Fetched URL schemes: detectron2:// resolves to https://dl.fbaipublicfiles.com/detectron2/.
FETCHED_SCHEMES = ("https://", "detectron2://")


def _numpy_globals() -> FrozenSet[Tuple[str, str]]:
    # numpy < 2 writes numpy.core.*, numpy >= 2 numpy._core.* (numpy 1.26 reads both).
    names = {("numpy", "ndarray"), ("numpy", "dtype")}
    for core in ("numpy.core", "numpy._core"):
        names |= {(f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar")}
        names.add((f"{core}.numeric", "_frombuffer"))  # arrays pickled with protocol 5
    return frozenset(names)


# What a dict of numpy arrays (detectron2's model-zoo and converted-backbone .pkl) needs: numpy's
# array reconstruction, dtype and scalar, OrderedDict, and _codecs.encode (bytes in protocol 2).
PICKLE_GLOBALS: FrozenSet[Tuple[str, str]] = _numpy_globals() | {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}

# What detectron2's checkpoints hold (the model's state dict, SGD/AdamW state, LRMultiplier's
# {"base_lrs", "last_epoch"}, the grad scaler's floats, the iteration): tensors and parameters,
# dtypes, devices, sizes, the numpy arrays above, and plain constructors of data. Storage types
# (torch.FloatStorage, ...) never reach find_class: torch's own unpickler resolves them.
TORCH_GLOBALS: FrozenSet[Tuple[str, str]] = (
    PICKLE_GLOBALS
    | {
        ("torch._utils", name)
        for name in (
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
        )
    }
    | {("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Tensor")}
    | {("torch.nn.parameter", "Parameter"), ("torch", "Size"), ("torch", "device")}
    | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
    | {
        (module, name)
        for module in ("builtins", "__builtin__")  # protocol 2 writes Python 2's names
        for name in ("set", "frozenset", "bytearray", "complex", "slice")
    }
)


class UnsafeFileError(ValueError):
    """A file that loading would let run code (a pickle naming a global that data never needs, a
    yaml python tag) or that would travel over an insecure URL; the message names the file, the
    config key or option, what was refused and how to opt in."""


class HashMismatchError(ValueError):
    """A weights file whose SHA-256 is not the expected one (pinned in the config, or carried by
    a torchvision file name); a file that dkd-det downloaded has been deleted, a user's own is
    kept."""


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


def trusted() -> bool:
    """Whether the user opted in to unrestricted loading (``DKD_DET_TRUST_FILES=1``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in _TRUE


def _warn_trusted(path: str, key: str, how: str) -> None:
    logger.warning(
        "%s=%s: %s = %r is loaded with %s: it can run any code it contains.",
        TRUST_ENV,
        os.environ.get(TRUST_ENV),
        key,
        path,
        how,
    )


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``allowed``; any other is refused before
    it is imported or called (find_class is the one way a pickle reaches code: GLOBAL,
    STACK_GLOBAL, INST and the extension registry all go through it)."""

    allowed: FrozenSet[Tuple[str, str]] = PICKLE_GLOBALS

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise _RefusedGlobal(module, name)


class _TorchUnpickler(_RestrictedUnpickler):
    allowed = TORCH_GLOBALS


def _torch_pickle_module() -> types.ModuleType:
    # torch.load(pickle_module=...) subclasses pickle_module.Unpickler (adding the storage types
    # and its persistent_load) and calls pickle_module.load for a legacy file's headers.
    module = types.ModuleType("dkd_det_restricted_pickle")
    module.Unpickler = _TorchUnpickler
    module.load = lambda f, **kwargs: _TorchUnpickler(f, **kwargs).load()
    return module


_TORCH_PICKLE = _torch_pickle_module()

# torch's weights-only unpickler has no known bypass from 2.6 on (CVE-2025-32434: up to 2.5.1).
_TORCH_WEIGHTS_ONLY = torch.torch_version.TorchVersion(torch.__version__) >= (2, 6)
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _torch_safe_globals() -> list:
    """What torch's weights-only unpickler needs beyond its defaults to read what
    :data:`TORCH_GLOBALS` allows: each global, under the name a file writes (numpy 1 writes
    ``numpy.core.*``, which numpy 2 has moved to ``numpy._core``), and numpy's dtype classes
    (numpy 2's ``numpy.dtypes.Float32DType``, ...), which a pickled dtype's BUILD sets state on.
    Which names a file may use is decided by :func:`_torch_file_globals`'s scan, not by this."""
    import numpy as np

    safe = [type(np.dtype(code)) for code in np.typecodes["All"]]
    with warnings.catch_warnings():  # numpy 2's numpy.core shim
        warnings.simplefilter("ignore", DeprecationWarning)
        for module, name in sorted(TORCH_GLOBALS):
            for where in (module.replace("numpy.core", "numpy._core"), module):
                try:
                    safe.append((getattr(importlib.import_module(where), name), f"{module}.{name}"))
                    break
                except (ImportError, AttributeError):  # __builtin__ (torch maps it), old numpy
                    pass
    return safe + [(torch._tensor._rebuild_from_type_v2, "torch.tensor._rebuild_from_type_v2")]


def _torch_file_globals(path: str) -> Iterator[Tuple[str, str]]:
    """(module, name) of every global that the pickles ``torch.load`` reads from ``path`` name,
    in file order, as torch.load's own unpickler (which the restricted one subclasses) hands
    them to ``find_class``: a zip's ``data.pkl`` (its ``torch.tensor`` read as ``torch._tensor``,
    torch 1.8's rename), a legacy file's five pickles (magic number, protocol, system info, the
    object, the storage keys). A global named by means the scan cannot follow is an
    UnpicklingError (torch's weights-only unpickler refuses them all: it reads protocol 2)."""
    if _starts_as_zip(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if len(set(names)) != len(names):  # which copy would torch read?
                raise pickle.UnpicklingError(f"{path!r} is a zip with duplicate entries")
            f, count = io.BytesIO(z.read(names[0].split("/")[0] + "/data.pkl")), 1
        renamed = {"torch.tensor": "torch._tensor"}
    else:
        f, count, renamed = open(path, "rb"), 5, {}
    with f:
        for _ in range(count):
            # What the last operations pushed: a string, or None for anything else; STACK_GLOBAL
            # (protocol 4) takes its module and name from the two strings pushed last.
            pushed, memo = [None, None], {}
            for opcode, arg, _ in pickletools.genops(f):
                op = opcode.name
                if op in ("GLOBAL", "INST"):
                    module, name = arg.split(" ", 1)
                    yield renamed.get(module, module), name
                elif op == "STACK_GLOBAL" and all(isinstance(s, str) for s in pushed[-2:]):
                    yield renamed.get(pushed[-2], pushed[-2]), pushed[-1]
                elif op in ("STACK_GLOBAL", "OBJ", "EXT1", "EXT2", "EXT4"):
                    raise pickle.UnpicklingError(f"{op} naming an unknown global")
                if op in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if op == "MEMOIZE" else arg] = pushed[-1]
                elif op in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                else:
                    pushed.append(arg if "UNICODE" in op else None)


def _is_storage_type(name: str) -> bool:
    # torch.load's find_class resolves such a name to a storage type before the unpickler's own.
    try:
        return "Storage" in name and bool(torch.serialization.StorageType(name))
    except KeyError:
        return False


@contextlib.contextmanager
def _env_without(name: str):
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


def _load_torch_restricted(path: str) -> Any:
    if not _TORCH_WEIGHTS_ONLY:
        # torch < 2.6: its weights_only is not safe; TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 would make
        # torch refuse the pickle module that is (and is stricter than torch's weights_only).
        with _env_without(_FORCE_WEIGHTS_ONLY):
            return torch.load(
                path, map_location="cpu", pickle_module=_TORCH_PICKLE, weights_only=False
            )
    unread = None
    try:
        for module, name in _torch_file_globals(path):  # refused in file order, as find_class
            if (module, name) not in TORCH_GLOBALS and not _is_storage_type(name):
                raise _RefusedGlobal(module, name)
    except _RefusedGlobal:
        raise
    except Exception as e:  # not a pickle: torch.load names the problem (if it reads the file
        unread = e  # after all, that is an error too: nothing unchecked is returned)
    with torch.serialization.safe_globals(_torch_safe_globals()):
        data = torch.load(path, map_location="cpu", weights_only=True)
    if unread is not None:
        raise unread
    return data


def _refused(path: str, key: str, e: _RefusedGlobal, allowed: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{key} = {path!r}: refused to load: unpickling it would call {e.module}.{e.name}, which "
        f"a weights file never needs. dkd-det loads weights as data ({allowed}); a file that "
        "names other globals can run code on every process that loads it. Use a file from a "
        f"source you trust (or re-save its tensors with torch.save); if you trust this one, set "
        f"{TRUST_ENV}=1 to load it with unrestricted pickle."
    )


def _starts_as_zip(path: str) -> bool:
    # As torch.load decides (torch.serialization._is_zipfile): the local-file magic at byte 0.
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def is_torchscript_archive(path: str) -> bool:
    """Whether ``path`` is a zip written by ``torch.jit.save`` (it has a ``constants.pkl``)."""
    if not _starts_as_zip(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_pickle_file(path: str, key: str) -> Any:
    """Unpickle ``path`` (a detectron2 ``.pkl``: a dict of numpy arrays) allowing only
    :data:`PICKLE_GLOBALS`, with ``encoding="latin1"`` as detectron2 reads them (Python 2 files).

    Args:
        key: the config key or option ``path`` came from, named in the error.

    Raises:
        UnsafeFileError: the pickle names another global (nothing of it was called).
    """
    with open(path, "rb") as f:
        if trusted():
            _warn_trusted(path, key, "unrestricted pickle.load")
            return pickle.load(f, encoding="latin1")
        try:
            return _RestrictedUnpickler(f, encoding="latin1").load()
        except _RefusedGlobal as e:
            raise _refused(path, key, e, "numpy arrays, dicts and plain values") from None


def load_torch_file(path: str, key: str) -> Any:
    """``torch.load(path, map_location="cpu")`` allowing only :data:`TORCH_GLOBALS`: tensors,
    parameters, storages, dtypes, numpy arrays, containers and plain values. torch's zip format
    (torch >= 1.6) and its legacy pickle format are read, through the same unpickler; the tar
    format of torch < 0.4 is not (torch would extract it to disk first).

    Raises:
        UnsafeFileError: the file names another global (nothing of it was called).
        ValueError: the file is a TorchScript archive (``torch.jit.save``), not a checkpoint,
            or a torch < 0.4 tar file.
    """
    if is_torchscript_archive(path):
        # torch.load would hand it to torch.jit.load: a program, not a checkpoint.
        raise ValueError(
            f"{path!r} is a TorchScript archive (torch.jit.save, e.g. an exported model.ts), not "
            "a checkpoint"
        )
    if not trusted() and not _starts_as_zip(path) and tarfile.is_tarfile(path):
        raise ValueError(
            f"{path!r} is a tar file (torch < 0.4's checkpoint format), which dkd-det does not "
            f"read: re-save its state with a recent torch.save, or set {TRUST_ENV}=1"
        )
    if trusted():
        _warn_trusted(path, key, "unrestricted torch.load(weights_only=False)")
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return _load_torch_restricted(path)
    except _RefusedGlobal as e:
        raise _refused(
            path, key, e, "tensors, numpy arrays, dicts, lists and plain values"
        ) from None


def load_weights_file(path: str, key: str) -> Any:
    """A weights file as data: ``.pkl`` with :func:`load_pickle_file`, anything else with
    :func:`load_torch_file`. Returns what the file holds (not normalised to a checkpoint)."""
    if path.endswith(".pkl"):
        return load_pickle_file(path, key)
    return load_torch_file(path, key)


def check_fetchable(path: str, key: str) -> None:
    """Refuse a URL that dkd-det does not fetch (anything but ``https://`` and ``detectron2://``),
    before any connection. Local paths pass.

    Raises:
        UnsafeFileError: naming ``key``, the URL and what to do.
    """
    if "://" not in path or path.startswith(FETCHED_SCHEMES):
        return
    scheme = path.split("://", 1)[0]
    raise UnsafeFileError(
        f"{key} = {path!r}: {scheme}:// is not fetched: only https:// and detectron2:// (which is "
        "https://dl.fbaipublicfiles.com/detectron2/) are, because a file fetched otherwise can be "
        "read or replaced on the way. Use the https:// URL, or download the file yourself, check "
        f"it, and set {key} to its local path."
    )


# torch.hub's convention (check_hash), used by torchvision's files such as resnet18-f37072fd.pth:
# the hex digits after the last "-" of the file name start its SHA-256. 8 or more here, so that
# a name such as model-0001.pth is not taken for a hash.
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.[^-/]*$")
NAME_HASH_RULE = "the file name's hash prefix, torch.hub's convention for torchvision's files"


def name_hash_prefix(path_or_url: str) -> Optional[str]:
    """The SHA-256 prefix that a file name carries by torch.hub's convention
    (``resnet18-f37072fd.pth`` -> ``"f37072fd"``; 8 to 64 hex digits), or None."""
    name = os.path.basename(path_or_url.split("?", 1)[0].split("#", 1)[0])
    match = _NAME_HASH.search(name)
    return match.group(1) if match else None


def file_sha256(path: str) -> str:
    """The SHA-256 of the file at ``path``, as 64 lowercase hex digits (``sha256sum``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_packaged_config(filename: str) -> bool:
    """Whether ``filename`` is one of detectron2's own model-zoo configs, inside the installed
    detectron2 package (as trusted as detectron2's code: whoever can change it can change that)."""
    if "://" in filename:
        return False
    root = model_zoo_dir()
    return os.path.commonpath([root, os.path.realpath(filename)]) == root


class _CheckedCfgNode(CfgNode):
    """detectron2's CfgNode reading a ``_BASE_`` chain file by file (fvcore's recursion calls
    ``cls.load_yaml_with_base`` for each base): opened only from local paths and https:// URLs,
    parsed with ``yaml.safe_load``, except detectron2's own packaged model-zoo configs (one of
    which, Base-RetinaNet.yaml, computes its anchor sizes with ``!!python/object/apply:eval``)."""

    key = "--config-file"
    packaged_tags: list = []

    @classmethod
    def _open_cfg(cls, filename):
        check_fetchable(filename, f"{cls.key} (its _BASE_ chain)")
        return super()._open_cfg(filename)

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe: bool = False):
        # Decided per file, whatever the including file was allowed.
        if not is_packaged_config(filename):
            return super().load_yaml_with_base(filename, allow_unsafe=False)
        try:
            return super().load_yaml_with_base(filename, allow_unsafe=False)
        except yaml.constructor.ConstructorError:
            cls.packaged_tags.append(filename)
            return super().load_yaml_with_base(filename, allow_unsafe=True)


def _tag_error(config_file: str, key: str, e: yaml.constructor.ConstructorError) -> str:
    mark = e.problem_mark
    where = f"{mark.name}, line {mark.line + 1}" if mark is not None else config_file
    base = ""
    if mark is not None and os.path.abspath(mark.name) != os.path.abspath(config_file):
        base = f" (in the _BASE_ chain of {config_file!r})"
    return (
        f"{key} {config_file!r}: {where}{base}: {e.problem}. dkd-det reads configs as data "
        "(yaml.safe_load): a python tag (!!python/...) would run code. Replace it with a plain "
        f"value; if you trust the file, set {TRUST_ENV}=1 to read it with yaml.unsafe_load."
    )


def merge_config_file(cfg: CfgNode, config_file: str, key: str = "--config-file") -> None:
    """``cfg.merge_from_file(config_file)`` with every file of the ``_BASE_`` chain parsed as data
    (``yaml.safe_load``; detectron2's default falls back to ``yaml.unsafe_load``) and fetched only
    from local paths or https:// URLs. detectron2's own model-zoo configs, shipped inside the
    installed detectron2, are the one exception (:func:`is_packaged_config`). The chain is read
    once with these checks, then merged by detectron2's own ``merge_from_file`` (version
    upgrades included), which then falls back to ``yaml.unsafe_load`` only where the check
    found a packaged config that needs it.

    Args:
        key: the option or config key ``config_file`` came from (``--config-file``,
            ``MODEL.TEACHER.CONFIG_FILE``), named in errors.

    Raises:
        UnsafeFileError: a python tag (the message names the file and line) or an insecure
            ``_BASE_`` URL.
        ValueError: a file that is not valid YAML (file and line named).
    """
    checked = type("_CheckedCfgNode", (_CheckedCfgNode,), {"key": key, "packaged_tags": []})
    try:
        checked.load_yaml_with_base(config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        if not trusted():
            raise UnsafeFileError(_tag_error(config_file, key, e)) from None
        mark = e.problem_mark
        where = f" for its python tag at {mark.name}, line {mark.line + 1}" if mark else ""
        _warn_trusted(config_file, key, f"yaml.unsafe_load{where}")
        cfg.merge_from_file(config_file, allow_unsafe=True)
        return
    except yaml.YAMLError as e:
        raise ValueError(f"{key} {config_file!r} is not valid YAML: {e}") from None
    # Every file that fails yaml.safe_load is one of detectron2's packaged configs (checked
    # above), so detectron2's fallback to yaml.unsafe_load can only reach those.
    cfg.merge_from_file(config_file, allow_unsafe=bool(checked.packaged_tags))


def load_lazy_config(path: str, key: str, overrides=()) -> Any:
    """``LazyConfig.load(path)`` with ``LazyConfig.apply_overrides(overrides)``, for a LazyConfig
    ``.py`` file, which is Python code that loading runs.

    detectron2's own model-zoo LazyConfigs inside the installed detectron2 package
    (:func:`is_packaged_config`, as trusted as detectron2's code) are loaded as they are; any
    other ``.py`` file is refused unless the user trusts files (``DKD_DET_TRUST_FILES=1``), and
    then loaded with a WARNING that names it.

    Args:
        key: the config key ``path`` came from, named in errors.
        overrides: ``"dotted.key=value"`` strings (detectron2's LazyConfig override syntax).

    Raises:
        UnsafeFileError: ``path`` is not a packaged config and files are not trusted (nothing
            of it was run).
    """
    from detectron2.config import LazyConfig

    if not is_packaged_config(path):
        if not trusted():
            raise UnsafeFileError(
                f"{key} = {path!r}: refused to load: a LazyConfig .py file is Python code, and "
                "loading it runs whatever it contains, on every process. dkd-det runs only "
                "detectron2's own model-zoo LazyConfigs (give the model-zoo name, e.g. "
                "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py) or a yaml config. If you trust "
                f"this file, set {TRUST_ENV}=1 to load it."
            )
        _warn_trusted(path, key, "LazyConfig.load (it runs the file's Python code)")
    return LazyConfig.apply_overrides(LazyConfig.load(path), list(overrides))

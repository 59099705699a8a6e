"""Weight files: resolving paths and URLs (https only, SHA-256 checked), loading as data,
strict loading, atomic saving, sizes."""

import logging
import os
import re
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode as CN
from detectron2.utils.file_io import PathManager

from ..files import open_whole
from .convert import missing_weights_hint
from .safe_load import (
    NAME_HASH_RULE,
    HashMismatchError,
    UnsafeFileError,
    check_fetchable,
    file_sha256,
    is_torchscript_archive,
    load_pickle_file,
    load_torch_file,
    load_weights_file,
    name_hash_prefix,
)

__all__ = [
    "NotACheckpointError",
    "SHA256_KEYS",
    "add_checkpoint_config",
    "describe_weights_file",
    "resolve_weights",
    "StrictCheckpointer",
    "AtomicCheckpointer",
    "checkpoint_size",
]

logger = logging.getLogger(__name__)

# The config key that pins the SHA-256 of each weights key.
SHA256_KEYS = {
    "MODEL.WEIGHTS": "MODEL.WEIGHTS_SHA256",
    "MODEL.TEACHER.WEIGHTS": "MODEL.TEACHER.SHA256",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def add_checkpoint_config(cfg: CN) -> None:
    """Add the weight files' SHA-256 pins to a dkd-det config (in place):
    ``MODEL.WEIGHTS_SHA256`` and, when the config has a teacher, ``MODEL.TEACHER.SHA256``."""
    # The SHA-256 (64 hex digits, as `sha256sum FILE` prints) that MODEL.WEIGHTS must have;
    # "" checks nothing. Not applied to --resume's own checkpoints.
    cfg.MODEL.WEIGHTS_SHA256 = ""
    if "TEACHER" in cfg.MODEL:
        # The SHA-256 that MODEL.TEACHER.WEIGHTS must have; "" checks nothing.
        cfg.MODEL.TEACHER.SHA256 = ""


# torch.save has written zip archives since torch 1.6; a complete one ends with an
# end-of-central-directory record (within the last 64 KiB + 22 bytes), which a file cut short
# by an interrupted download or copy lacks.
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"
_ZIP_END_SEARCH = 65536 + 22
_PICKLE_PROTO = 0x80  # the first byte of a pickle of protocol 2 or higher


class NotACheckpointError(ValueError):
    """A weights file that cannot be read as a checkpoint; the message names the config key,
    the path and what the file looks like."""


def describe_weights_file(path: str, error: Optional[BaseException] = None) -> str:
    """What the file at ``path`` looks like, for an error message: ``"an empty file"``,
    ``"an HTML page ..."``, ``"a text file starting '...'"``, ``"a truncated torch.save (zip)
    file"``, ``"a truncated pickle"`` (when ``error``, the load's exception, says so), ...."""
    size = os.path.getsize(path)
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512)
        f.seek(max(0, size - _ZIP_END_SEARCH))
        tail = f.read()
    if head.startswith(_ZIP_MAGIC):
        if _ZIP_END not in tail:
            return f"a truncated torch.save (zip) file of {size} bytes: its end is missing"
        if is_torchscript_archive(path):
            return f"a TorchScript archive of {size} bytes (torch.jit.save, e.g. a model.ts)"
        return f"a torch.save (zip) file of {size} bytes"
    if head[0] == _PICKLE_PROTO:
        if isinstance(error, EOFError) or "truncated" in str(error):
            return f"a truncated pickle of {size} bytes: its end is missing"
        return f"a pickle of {size} bytes, not a readable checkpoint"
    if b"\x00" not in head:
        text = head.decode("utf-8", errors="replace").strip()
        if text.startswith("<") or "<html" in text.lower():
            return (
                f"an HTML/XML page of {size} bytes (e.g. an error page saved by a failed "
                f"download), starting {text[:80]!r}"
            )
        return f"a text file of {size} bytes, starting {text[:80]!r}"
    return f"{size} bytes of binary data starting {head[:16]!r}, neither torch.save nor a pickle"


def _not_a_checkpoint(path: str) -> Optional[str]:
    # Only what is certain before loading: a pickle of protocol 0 is text, so a text file is
    # left to the load (whose error is then explained by describe_weights_file).
    description = describe_weights_file(path)
    if description.startswith(("an empty file", "an HTML", "a truncated", "a TorchScript")):
        return description
    return None


def _load_naming_the_file(load: Callable[[str], dict], path: str, key: str) -> dict:
    """``load(path)``; an error of reading or unpickling becomes a :class:`NotACheckpointError`
    that names ``key``, ``path`` and what the file looks like."""
    try:
        return load(path)
    except (OSError, MemoryError, UnsafeFileError):  # their own message names the problem
        raise
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError (zip), TypeError, ...
        raise NotACheckpointError(
            f"{key} = {path!r} is not a checkpoint: it is {describe_weights_file(path, e)} "
            f"({type(e).__name__}: {e}). Set {key} to a detectron2 checkpoint (.pth written by "
            "torch.save, or a model-zoo .pkl); re-download it if the download failed."
        ) from e


def _pin(sha256: str, sha256_key: str) -> str:
    pin = (sha256 or "").strip().lower()
    if pin and not _SHA256.fullmatch(pin):
        raise ValueError(
            f"{sha256_key} = {sha256!r} is not a SHA-256: set it to the 64 hexadecimal digits "
            'that `sha256sum FILE` prints for the weights file, or to "" to check nothing.'
        )
    return pin


def _check_hash(
    local: str, path: str, key: str, pin: str, sha256_key: str, downloaded: bool
) -> None:
    """Compare ``local``'s SHA-256 with the pin, else (for a download) with the prefix its name
    carries; a mismatch deletes a downloaded file, never a user's own."""
    prefix = name_hash_prefix(path) if downloaded else None
    if not pin and prefix is None:
        return
    actual = file_sha256(local)
    if pin:
        if actual == pin:
            return
        expected = f"{pin} ({sha256_key})"
    else:
        if actual.startswith(prefix):
            return
        expected = f"one starting {prefix} ({NAME_HASH_RULE})"
    what = describe_weights_file(local)
    if downloaded:
        os.remove(local)
        fate = f"It was downloaded to {local!r} and has been deleted"
    else:
        fate = "The file is left as it is"
    raise HashMismatchError(
        f"{key} = {path!r}: SHA-256 {actual} does not match the expected {expected}. {fate}; it "
        f"is {what}. Fetch the file again from a source you trust; if this file is the one you "
        f"want, set {sha256_key} to its SHA-256."
    )


def resolve_weights(path: str, key: str, sha256: str = "", sha256_key: str = "") -> str:
    """Return a local file for a weights path or URL, checked, or raise an error that says what
    to do.

    Args:
        path: a file path, or an ``https://`` or ``detectron2://`` URL (fetched by detectron2's
            PathManager into its cache); any other scheme is refused before any connection.
        key: the config key that holds ``path``, named in the error.
        sha256: the file's expected SHA-256 (64 hex digits; "" checks nothing). A downloaded
            file whose name carries a hash prefix (torchvision's ``resnet18-f37072fd.pth``) is
            checked against it when no SHA-256 is given.
        sha256_key: the config key that holds ``sha256`` (default: :data:`SHA256_KEYS`).

    Raises:
        UnsafeFileError: a URL of another scheme (``http://``, ``ftp://``, ``file://``, ...).
        HashMismatchError: the SHA-256 differs; a downloaded file is deleted, a local one kept.
        OSError: a URL cannot be fetched (offline).
        FileNotFoundError: no such file; for the converted torchvision backbones the configs
            expect (``R-18-torchvision.pkl``, ...), the message gives the command that makes it.
        NotACheckpointError: the file is certainly not a checkpoint (empty, an HTML page, a
            truncated zip, a TorchScript archive); other bad files are named when loaded.
    """
    sha256_key = sha256_key or SHA256_KEYS.get(key, f"the SHA-256 of {key}")
    pin = _pin(sha256, sha256_key)
    if os.path.isfile(path):
        _check_hash(path, path, key, pin, sha256_key, downloaded=False)
        return _checked(path, key)
    if "://" in path:
        check_fetchable(path, key)
        try:
            local = PathManager.get_local_path(path)
        except Exception as e:  # any download failure: offline, proxy, 404
            raise OSError(
                f"Could not fetch {key} = {path!r} ({type(e).__name__}: {e}). Without internet, "
                f"download it on a machine with internet (detectron2:// stands for "
                f"https://dl.fbaipublicfiles.com/detectron2/), copy the file here and set "
                f"{key} to its local path."
            ) from e
        if os.path.isfile(local):
            # PathManager's cache is never a user's own file: a bad one is deleted, so that the
            # next run fetches it again instead of finding it cached.
            _check_hash(local, path, key, pin, sha256_key, downloaded=local != path)
            return _checked(local, key)
    raise FileNotFoundError(
        f"{key} = {path!r}: no such file. Set {key} to an existing checkpoint file."
        + missing_weights_hint(path)
    )


def _checked(path: str, key: str) -> str:
    problem = _not_a_checkpoint(path)
    if problem:
        raise NotACheckpointError(
            f"{key} = {path!r} is not a checkpoint: it is {problem}. Set {key} to a detectron2 "
            "checkpoint (.pth written by torch.save, or a model-zoo .pkl); re-download it if "
            "the download failed."
        )
    return path


def _detectron2_pkl(data) -> dict:
    # The two .pkl layouts detectron2 reads (DetectionCheckpointer._load_file, which unpickles
    # inline with pickle.load and so cannot be reused): its model zoo's {"model", "__author__"},
    # else Caffe2 / Detectron1 blobs, renamed by detectron2's matching heuristics when loaded.
    if not isinstance(data, dict):
        raise TypeError(f"the pickle holds a {type(data).__name__}, not a dict")
    if "model" in data and "__author__" in data:
        logger.info("Reading a file from '%s'", data["__author__"])
        return data
    blobs = data.get("blobs", data)
    blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
    return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}


def _pycls(data) -> dict:
    # detectron2's reading of pycls's .pyth (ImageNet RegNets), as for the .pkl above.
    if not isinstance(data, dict) or "model_state" not in data:
        raise TypeError("a pycls .pyth checkpoint must contain 'model_state'")
    state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
    return {"model": state, "__author__": "pycls", "matching_heuristics": True}


class _DataCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` that loads every file as data (:mod:`.safe_load`: only
    tensors, numpy arrays, containers and plain values; ``DKD_DET_TRUST_FILES=1`` opts out) and
    fetches only ``https://`` and ``detectron2://`` URLs. A file that is not a checkpoint is a
    :class:`NotACheckpointError` naming the config key (:meth:`_key_for`)."""

    def _key_for(self, filename: str) -> str:
        return "MODEL.WEIGHTS"

    def load(self, path: str, *args, **kwargs):
        if path:
            check_fetchable(path, self._key_for(path))
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        key = self._key_for(filename)
        if filename.endswith(".pkl"):
            load = lambda f: _detectron2_pkl(load_pickle_file(f, key))  # noqa: E731
        elif filename.endswith(".pyth"):
            load = lambda f: _pycls(load_torch_file(f, key))  # noqa: E731
        else:  # detectron2's own reading, whose torch.load is _torch_load below
            self._loading_key = key
            load = super()._load_file
        return _load_naming_the_file(load, filename, key)

    def _torch_load(self, f):
        return load_torch_file(f, getattr(self, "_loading_key", "MODEL.WEIGHTS"))


class StrictCheckpointer(_DataCheckpointer):
    """A checkpointer that refuses any missing, unexpected or mis-shaped key, and loads files as
    data (see :class:`_DataCheckpointer`).

    Used wherever a whole trained model is loaded (the teacher, a trained student for
    evaluation, inference and export): a partly random model would silently teach noise or
    report a wrong AP. Training from ImageNet weights, where only the backbone is expected
    to match, uses the lenient :class:`AtomicCheckpointer`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        key: str = "MODEL.WEIGHTS",
        hint: str = "",
        drop_prefixes: Tuple[str, ...] = (),
        **kwargs,
    ):
        """
        Args:
            key: the config key the weights come from, named in the error.
            hint: what to check, appended to the error.
            drop_prefixes: keys of the file to ignore, e.g. the training-only modules
                (``distill_terms.``) that a training checkpoint holds and the student
                alone does not have.
        """
        super().__init__(model, **kwargs)
        self._key = key
        self._hint = hint
        self._drop = tuple(drop_prefixes)
        self._path = ""

    def _key_for(self, filename: str) -> str:
        return self._key

    def load(self, path: str, *args, **kwargs):
        self._path = path
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        if self._drop:
            model = checkpoint["model"]
            checkpoint["model"] = {k: v for k, v in model.items() if not k.startswith(self._drop)}
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible):
        problems = []
        if incompatible.missing_keys:
            problems.append(f"missing keys {incompatible.missing_keys[:10]}")
        if incompatible.unexpected_keys:
            problems.append(f"unexpected keys {incompatible.unexpected_keys[:10]}")
        if incompatible.incorrect_shapes:
            problems.append(
                "shape mismatches (key, in file, in model) "
                f"{[(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes[:10]]}"
            )
        if problems:
            raise ValueError(
                f"{self._key} = {self._path!r} does not match the model's architecture: "
                + "; ".join(problems)
                + ". "
                + self._hint
            )


class AtomicCheckpointer(_DataCheckpointer):
    """A :class:`DetectionCheckpointer` whose ``last_checkpoint`` is replaced atomically, and
    which loads files as data (see :class:`_DataCheckpointer`).

    fvcore writes ``model_XXXXXXX.pth`` first and tags it in ``last_checkpoint`` after; a
    process killed during the model write leaves ``last_checkpoint`` on the previous, complete
    file. Writing the tag through a temporary file and ``os.replace`` means a kill during the
    tag write cannot leave it empty or truncated either: ``--resume`` always finds a whole file.

    A file that is not a checkpoint (MODEL.WEIGHTS, or the file ``last_checkpoint`` names) is
    a :class:`NotACheckpointError` that names it.
    """

    def _key_for(self, filename: str) -> str:
        if self.has_checkpoint() and os.path.abspath(filename) == os.path.abspath(
            self.get_checkpoint_file()
        ):
            last = os.path.join(self.save_dir, "last_checkpoint")
            return f"--resume (the checkpoint named in {last})"
        return "MODEL.WEIGHTS"

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with open_whole(os.path.join(self.save_dir, "last_checkpoint")) as f:
            f.write(last_filename_basename)


def checkpoint_size(path: str, key: str = "weights") -> Dict[str, float]:
    """Size of the model in a checkpoint file, comparable between files of any kind:
    ``{"params": number of values in its model state (parameters and BN statistics),
    "mb": their size in MB (1e6 bytes), "file_mb": the file's size in MB}``.

    ``mb`` counts the model alone: a training checkpoint (``model_final.pth`` of a training
    run) also holds the optimizer's state and is about twice as large as its model.
    ``key`` names the file in a :class:`NotACheckpointError`.
    """
    data = _load_naming_the_file(lambda f: load_weights_file(f, key), path, key)
    state = data.get("model", data) if isinstance(data, dict) else {}
    params = nbytes = 0
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        if torch.is_tensor(v):
            params, nbytes = params + v.numel(), nbytes + v.numel() * v.element_size()
        else:  # numpy arrays of a .pkl
            v = np.asarray(v)
            params, nbytes = params + v.size, nbytes + v.nbytes
    return {"params": params, "mb": nbytes / 1e6, "file_mb": os.path.getsize(path) / 1e6}

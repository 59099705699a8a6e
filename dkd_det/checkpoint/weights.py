"""Weight files: resolving paths and URLs, strict loading, atomic saving, sizes."""

import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .convert import missing_weights_hint

__all__ = [
    "NotACheckpointError",
    "describe_weights_file",
    "resolve_weights",
    "StrictCheckpointer",
    "AtomicCheckpointer",
    "checkpoint_size",
]

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
    if description.startswith(("an empty file", "an HTML", "a truncated")):
        return description
    return None


def _load_naming_the_file(load: Callable[[str], dict], path: str, key: str) -> dict:
    """``load(path)``; an error of reading or unpickling becomes a :class:`NotACheckpointError`
    that names ``key``, ``path`` and what the file looks like."""
    try:
        return load(path)
    except (OSError, MemoryError):  # permissions, disk: their own message names the problem
        raise
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError (zip), TypeError, ...
        raise NotACheckpointError(
            f"{key} = {path!r} is not a checkpoint: it is {describe_weights_file(path, e)} "
            f"({type(e).__name__}: {e}). Set {key} to a detectron2 checkpoint (.pth written by "
            "torch.save, or a model-zoo .pkl); re-download it if the download failed."
        ) from e


def resolve_weights(path: str, key: str) -> str:
    """Return a local file for a weights path or URL, or raise an error that says what to do.

    Args:
        path: a file path, or a URL that detectron2's PathManager understands
            (``detectron2://``, ``https://``, ``file://``).
        key: the config key that holds ``path``, named in the error.

    Raises:
        OSError: a URL cannot be fetched (offline).
        FileNotFoundError: no such file; for the converted torchvision backbones the configs
            expect (``R-18-torchvision.pkl``, ...), the message gives the command that makes it.
        NotACheckpointError: the file is certainly not a checkpoint (empty, an HTML page, a
            truncated zip); other bad files are named when they are loaded.
    """
    if os.path.isfile(path):
        return _checked(path, key)
    if "://" in path:
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


class StrictCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` that refuses any missing, unexpected or mis-shaped key.

    Used wherever a whole trained model is loaded (the teacher, a trained student for
    evaluation, inference and export): a partly random model would silently teach noise or
    report a wrong AP. Training from ImageNet weights, where only the backbone is expected
    to match, keeps detectron2's lenient :class:`DetectionCheckpointer`.
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
                (``feature_distiller.``) that a training checkpoint holds and the student
                alone does not have.
        """
        super().__init__(model, **kwargs)
        self._key = key
        self._hint = hint
        self._drop = tuple(drop_prefixes)
        self._path = ""

    def load(self, path: str, *args, **kwargs):
        self._path = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        return _load_naming_the_file(super()._load_file, filename, self._key)

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


class AtomicCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` whose ``last_checkpoint`` is replaced atomically.

    fvcore writes ``model_XXXXXXX.pth`` first and tags it in ``last_checkpoint`` after; a
    process killed during the model write leaves ``last_checkpoint`` on the previous, complete
    file. Writing the tag through a temporary file and ``os.replace`` means a kill during the
    tag write cannot leave it empty or truncated either: ``--resume`` always finds a whole file.

    A file that is not a checkpoint (MODEL.WEIGHTS, or the file ``last_checkpoint`` names) is
    a :class:`NotACheckpointError` that names it.
    """

    def _load_file(self, filename):
        key = "MODEL.WEIGHTS"
        if self.has_checkpoint() and os.path.abspath(filename) == os.path.abspath(
            self.get_checkpoint_file()
        ):
            key = f"the checkpoint named in {os.path.join(self.save_dir, 'last_checkpoint')}"
        return _load_naming_the_file(super()._load_file, filename, key)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        tmp = save_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(last_filename_basename)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, save_file)


def checkpoint_size(path: str, key: str = "weights") -> Dict[str, float]:
    """Size of the model in a checkpoint file, comparable between files of any kind:
    ``{"params": number of values in its model state (parameters and BN statistics),
    "mb": their size in MB (1e6 bytes), "file_mb": the file's size in MB}``.

    ``mb`` counts the model alone: a training checkpoint (``model_final.pth`` of a training
    run) also holds the optimizer's state and is about twice as large as its model.
    ``key`` names the file in a :class:`NotACheckpointError`.
    """
    if path.endswith(".pkl"):  # detectron2's model-zoo / converted-backbone format
        data = _load_naming_the_file(DetectionCheckpointer(torch.nn.Module())._load_file, path, key)
    else:
        data = _load_naming_the_file(lambda f: torch.load(f, map_location="cpu"), path, key)
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

"""Weight files: resolving paths and URLs, strict loading, atomic saving, sizes."""

import os
from typing import Dict

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .convert import missing_weights_hint

__all__ = ["resolve_weights", "StrictCheckpointer", "AtomicCheckpointer", "checkpoint_size"]


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
    """
    if os.path.isfile(path):
        return path
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
            return local
    raise FileNotFoundError(
        f"{key} = {path!r}: no such file. Set {key} to an existing checkpoint file."
        + missing_weights_hint(path)
    )


class StrictCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` that refuses any missing, unexpected or mis-shaped key.

    Used wherever a whole trained model is loaded (the teacher, a trained student for
    evaluation, inference and export): a partly random model would silently teach noise or
    report a wrong AP. Training from ImageNet weights, where only the backbone is expected
    to match, keeps detectron2's lenient :class:`DetectionCheckpointer`.
    """

    def __init__(
        self, model: torch.nn.Module, key: str = "MODEL.WEIGHTS", hint: str = "", **kwargs
    ):
        """
        Args:
            key: the config key the weights come from, named in the error.
            hint: what to check, appended to the error.
        """
        super().__init__(model, **kwargs)
        self._key = key
        self._hint = hint
        self._path = ""

    def load(self, path: str, *args, **kwargs):
        self._path = path
        return super().load(path, *args, **kwargs)

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
    """

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        tmp = save_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(last_filename_basename)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, save_file)


def checkpoint_size(path: str) -> Dict[str, float]:
    """Size of a checkpoint file: ``{"mb": file size in MB (1e6 bytes), "params": number of
    values in its model state (parameters and BN statistics)}``."""
    if path.endswith(".pkl"):  # detectron2's model-zoo / converted-backbone format
        data = DetectionCheckpointer(torch.nn.Module())._load_file(path)
    else:
        data = torch.load(path, map_location="cpu")
    state = data.get("model", data) if isinstance(data, dict) else {}
    params = sum(
        v.numel() if torch.is_tensor(v) else np.asarray(v).size
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    )
    return {"mb": os.path.getsize(path) / 1e6, "params": params}

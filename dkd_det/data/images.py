"""Image files: a fast check, before training, that every listed image exists and decodes, and
a :class:`DatasetMapper` that names the file when an image still fails to load later."""

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, Optional, Sequence

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.utils import comm
from PIL import Image

__all__ = ["BrokenImageError", "image_problem", "find_broken_images", "CheckedDatasetMapper"]

logger = logging.getLogger(__name__)

# How many bytes at the end of a file are searched for the format's end marker: some writers
# append padding or metadata after it.
_TAIL_BYTES = 4096
# The marker a complete file of each format ends with (JPEG EOI, PNG IEND chunk). A file cut
# short by an interrupted copy or download lacks it.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
MISSING = "missing"


class BrokenImageError(OSError):
    """An image that is missing or cannot be decoded; the message names the file(s)."""


def image_problem(path: str) -> Optional[str]:
    """What is wrong with the image file ``path``, or None if detectron2 can read it.

    Cheap for the common formats: the header is parsed (format, size) and a JPEG or PNG must
    end with its end marker, which a truncated file lacks; only a file that fails this test,
    or one of another format, is decoded in full as the data loader would (a JPEG or PNG
    without its end marker is reported only if that decode fails too). Damage inside the
    compressed data of a file with an intact header and end is not seen: the data loader
    names such a file when it meets it (:class:`CheckedDatasetMapper`).

    Returns:
        None, ``"missing"``, or a short description such as ``"empty file"`` or
        ``"cannot be decoded (OSError: image file is truncated ...)"``.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return MISSING
    except OSError as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with open(path, "rb") as f:
            with Image.open(f) as image:
                image_format, (width, height) = image.format, image.size
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError, ...
        return f"not an image ({type(e).__name__}: {e})"
    if width <= 0 or height <= 0:
        return f"invalid image size {width}x{height}"
    marker = _END_MARKERS.get(image_format)
    if marker is not None and marker in tail:
        return None
    try:
        utils.read_image(path)
    except Exception as e:  # whatever the loader would meet
        return f"cannot be decoded ({type(e).__name__}: {e})"
    return None


def _check_paths(paths: Sequence[str], num_threads: int) -> Dict[str, str]:
    if num_threads <= 1 or len(paths) < 2:
        problems = map(image_problem, paths)
        return {p: why for p, why in zip(paths, problems) if why is not None}
    # Threads, not processes: the check is mostly file I/O (and PIL's decoder drops the GIL),
    # and threads need no fork of a process that holds a model and a process group.
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        problems = pool.map(image_problem, paths, chunksize=64)
        return {p: why for p, why in zip(paths, problems) if why is not None}


def find_broken_images(paths: Iterable[str], num_threads: int = 8) -> Dict[str, str]:
    """``{path: problem}`` (see :func:`image_problem`) for every broken image of ``paths``,
    in the order of ``paths``.

    With several processes (``detectron2.utils.comm``), each checks its share and the results
    are exchanged with one ``all_gather``: every rank must call this with the same paths (as
    each rank builds the same data loader), and every rank gets the same answer.
    """
    paths = list(dict.fromkeys(paths))  # a file listed twice is checked once
    world, rank = comm.get_world_size(), comm.get_rank()
    found = _check_paths(paths[rank::world], num_threads)
    if world > 1:
        merged = {}
        for part in comm.all_gather(found):
            merged.update(part)
        found = merged
    return {p: found[p] for p in paths if p in found}


class CheckedDatasetMapper(DatasetMapper):
    """detectron2's :class:`DatasetMapper` that names the file when an image cannot be read.

    Whatever the check before training missed (damage inside a file's compressed data, or a
    file that broke during training) otherwise surfaces as a bare ``OSError: image file is
    truncated`` inside a data-loader worker's traceback. Here it is a
    :class:`BrokenImageError` that names ``file_name``; with ``skip_broken`` (training with
    ``DATALOADER.SKIP_BROKEN_IMAGES``), the image is left out with a warning that names it
    instead, and detectron2's ``MapDataset`` draws another one.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        skip_broken: bool = False,
        known_broken: Iterable[str] = (),
        **kwargs,
    ):
        """
        Args:
            skip_broken: leave out an image that cannot be read (with a warning) instead of
                raising. For training only: an evaluation must see every image.
            known_broken: files found broken before training, left out silently (they were
                named then) when ``skip_broken``.
            kwargs: the arguments of :class:`DatasetMapper`.
        """
        super().__init__(is_train, **kwargs)
        self.skip_broken = skip_broken
        self._warned = set(known_broken)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["skip_broken"] = bool(is_train and cfg.DATALOADER.SKIP_BROKEN_IMAGES)
        return ret

    def __call__(self, dataset_dict):
        """As :meth:`DatasetMapper.__call__`; a file that cannot be read is named in the error
        (or, with ``skip_broken``, left out: None)."""
        if self.skip_broken and dataset_dict.get("file_name") in self._warned:
            return None
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL raises OSError for truncated or unidentified files and SyntaxError for some
            # malformed PNG/GIF headers; both come from reading the image.
            path = dataset_dict.get("file_name", "<no file_name>")
            message = f"Image {path!r} could not be loaded: {type(e).__name__}: {e}"
            if not self.skip_broken:
                raise BrokenImageError(
                    message + ". Replace the file, remove it from the annotations, or set "
                    "DATALOADER.SKIP_BROKEN_IMAGES True to train without it."
                ) from e
            if path not in self._warned:  # once per file and loader process
                self._warned.add(path)
                logger.warning("%s; left out (DATALOADER.SKIP_BROKEN_IMAGES).", message)
            return None

"""Files every layer uses: files that appear only whole (written beside their path, then renamed
over it), and detectron2's packaged model-zoo configs."""

import contextlib
import importlib.util
import os
from typing import IO, Iterator


@contextlib.contextmanager
def open_whole(path: str, mode: str = "w") -> Iterator[IO]:
    """``open(path, mode)`` for writing, except that ``path`` changes only once the block ends
    without an exception: the data go to ``path + ".tmp"``, are flushed to disk (fsync) and the
    file is renamed over ``path`` (``os.replace``, atomic on POSIX). A process killed meanwhile
    leaves the old file or none, never part of the new one; an exception removes the temporary
    file and leaves ``path`` as it was.
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def model_zoo_dir() -> str:
    """The folder of detectron2's packaged model-zoo configs (``detectron2/model_zoo/configs``),
    found without importing ``detectron2.model_zoo``: that module imports ``pkg_resources``,
    which setuptools >= 82 no longer has (upstream detectron2 #5494)."""
    (package,) = importlib.util.find_spec("detectron2.model_zoo").submodule_search_locations
    return os.path.realpath(os.path.join(package, "configs"))


def model_zoo_config_file(name: str) -> str:
    """The path of detectron2's model-zoo config ``name`` (e.g.
    ``COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml``), as ``model_zoo.get_config_file`` gives it.

    Raises:
        FileNotFoundError: no such config in the installed detectron2.
    """
    path = os.path.join(model_zoo_dir(), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{name!r} is not a detectron2 model-zoo config ({path} is missing)"
        )
    return path

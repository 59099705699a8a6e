"""Files that appear only whole: written beside their path, then renamed over it."""

import contextlib
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

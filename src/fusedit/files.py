"""File writes that a kill cannot leave half done: the checkpoint pointer, the metrics log, latent-cache
records, images, evaluation results and FID reference statistics all go through ``write_atomic``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file beside it, then rename that over
    ``path`` (``os.replace`` is atomic within one file system): a reader or a kill sees the old file or
    the whole new one, never a part. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o644)  # mkstemp makes the file readable by its owner only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """``write_atomic`` of UTF-8 text."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))

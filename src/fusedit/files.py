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


def check_output_folder(out: str | os.PathLike[str], what: str, earlier: str = "") -> Path:
    """``out`` as a folder to write ``what`` into: new or empty, or (when ``earlier`` names one and the
    caller has recognised it) an earlier output of the same command. Any other folder is refused in one
    line, since writing into it would mix files into a run, a dataset or another export (a run folder that
    gains a ``model_index.json`` samples the export from then on)."""
    out = Path(out)
    if out.is_dir():
        first = min(out.iterdir(), default=None)  # the first name, without sorting a huge listing
        if first is not None:
            also = f", or {earlier}" if earlier else ""
            raise ValueError(
                f"the output folder {str(out)!r} already holds other files (e.g. {first.name!r}); writing "
                f"{what} into it would mix them (allowed: a new or empty folder{also})"
            )
    return out

"""File writes that a kill cannot leave half done: the checkpoint pointer, the metrics log, latent-cache
records, images, evaluation results and FID reference statistics all go through ``write_atomic``.
Checkpoints are also made durable across a power loss or node crash (``sync_tree``, ``durable=True``).
Messages word sizes and counts with ``readable_size`` and ``counted``."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from fusedit.config import ConfigError


def write_atomic(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], durable: bool = False
) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file beside it, then rename that over
    ``path`` (``os.replace`` is atomic within one file system): a reader or a kill sees the old file or
    the whole new one, never a part. Missing parent folders are created. ``durable`` also holds across a
    power loss or a node crash (see ``sync_tree``): the file's bytes reach the disk before the rename, and
    the rename before the return."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # as _TEMPORARY names
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file readable by its owner only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        sync_folder(path.parent)


# The names of write_atomic's temporary files: ".<name>.<mkstemp's 8 random characters>.tmp".
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def temporary_of(name: str) -> str | None:
    """The name of the file whose ``write_atomic`` temporary file ``name`` is; None when it is not one."""
    match = _TEMPORARY.fullmatch(name)
    return match[1] if match else None


def sweep_temporaries(
    folder: str | os.PathLike[str], names: re.Pattern | None = None, recursive: bool = False
) -> int:
    """Delete the temporary files that ``write_atomic`` left in ``folder`` (and its sub-folders with
    ``recursive``) when a kill -9 stopped it mid-write (any other stop deletes its own): those of files
    whose names fully match ``names`` (None: of any file). For a command's own output folders when it
    starts, while nothing else writes there; each kill would otherwise leave one more for good. Returns
    how many were deleted; nothing to do where there is no such folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    swept = 0
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        target = temporary_of(path.name)
        if target is not None and (names is None or names.fullmatch(target)) and path.is_file():
            path.unlink(missing_ok=True)
            swept += 1
    return swept


def check_writable(folder: str | os.PathLike[str], flag: str = "--out") -> None:
    """Refuse in one line a ``folder`` (given as ``flag``) that cannot be written into: a read-only file
    system, or a folder (or, where it does not exist yet, the nearest one above it) without write
    permission. Checked before the slow work, which would otherwise fail only at its first write. A file
    is made there, as permission bits and ``os.access`` do not tell what a network file system, ACLs or a
    read-only mount allow: an unnamed one where the file system can (O_TMPFILE), so that a kill leaves no
    name behind (a named one is deleted at once)."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.is_dir())
    try:
        tempfile.TemporaryFile(dir=existing, prefix=".fusedit-probe.", suffix=".tmp").close()
    except OSError as e:
        where = "" if existing == folder else f" (in {str(existing)!r}, where it would be made)"
        raise ConfigError(
            f"{flag} {str(folder)!r} cannot be written{where}: {e.strerror} (allowed: a folder you may "
            "write to, on a writable disk)"
        ) from None


def as_json_reads_back(record: dict) -> dict:
    """``record`` as it reads back from a JSON file (tuples given from code become lists), so that a record
    computed now compares equal to the same one saved earlier."""
    return json.loads(json.dumps(record))


@contextlib.contextmanager
def readable(path: str | os.PathLike[str], what: str, damaged: tuple[type, ...], remedy: str):
    """A damaged file (cut short, overwritten, edited) named in one line, not its reader's bare traceback
    (json's "Expecting value", PIL's "image file is truncated", safetensors' "header too large"): ``what``
    it is not, the ``damaged`` exceptions its reader raises for that, and ``remedy``, what to do."""
    try:
        yield
    except damaged as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{str(path)!r} is not {what} ({first}; {remedy})") from None


def read_json(path: str | os.PathLike[str], remedy: str):
    """The JSON in ``path``; a damaged one is a ConfigError naming it and ``remedy`` (``readable``)."""
    with readable(path, "readable JSON", (ValueError,), remedy):  # bad JSON, or bytes that are not UTF-8
        return json.loads(Path(path).read_text(encoding="utf-8"))


def readable_by_all(path: str | os.PathLike[str]) -> None:
    """The file ``path``, or every file in the folder ``path``, made readable by every user as the files
    ``write_atomic`` writes are (0o644): safetensors' ``save_file`` (and so diffusers' ``save_pretrained``)
    leaves its files readable by their owner only, and a run folder shared by a team (a cluster's
    shared file system, docs/multi-node.md) must be readable by the teammates who sample or resume it."""
    path = Path(path)
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        mode = file.stat().st_mode
        if mode & 0o444 != 0o444:
            os.chmod(file, mode | 0o444)


def write_text_atomic(path: str | os.PathLike[str], text: str, durable: bool = False) -> None:
    """``write_atomic`` of UTF-8 text."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")), durable)


def _set_aside(folder: Path) -> Path:
    """Rename ``folder`` (where it exists) to a hidden ``.<name>.deleting`` beside it, for deletion; a
    leftover of that name, from a kill while deleting, goes first (os.replace cannot replace a folder)."""
    trash = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    if folder.exists():
        os.replace(folder, trash)
    return trash


def remove_folder(folder: str | os.PathLike[str]) -> None:
    """Delete ``folder``, renamed out of the way first: a kill while deleting it then leaves a hidden
    ``.<name>.deleting`` (which the next removal or replacement of that name clears), not a folder that
    lost some files (a deletion goes in no set order) but still holds the ones that mark it complete.
    Nothing to do where there is no such folder."""
    shutil.rmtree(_set_aside(Path(folder)), ignore_errors=True)


def replace_folder(new: str | os.PathLike[str], folder: str | os.PathLike[str]) -> None:
    """Put the complete folder ``new`` in ``folder``'s place, its files on the disk first (sync_tree). An
    existing ``folder`` first goes aside (_set_aside) and is deleted once ``new`` is in place, so a kill at
    any point never leaves a folder of that name that lost some of its files (a deletion goes in no set
    order): it leaves the old folder or the new one, or, between the two renames, neither and both whole
    beside it. For folders whose content can be made again: a ``.deleting`` left by a kill goes at the
    next replacement, not back into place."""
    new, folder = Path(new), Path(folder)
    sync_tree(new)
    trash = _set_aside(folder)
    os.replace(new, folder)
    sync_folder(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def replacing(folder: str | os.PathLike[str]):
    """Yield a fresh hidden ``.<name>.partial`` folder beside ``folder`` to write its new content in; when
    the block ends without error, that content replaces ``folder`` whole (``replace_folder``). A kill or an
    error leaves only the partial folder, which the next call clears."""
    tmp = partial_folder(folder)
    yield tmp
    replace_folder(tmp, folder)


def partial_folder(folder: str | os.PathLike[str], fresh: bool = True) -> Path:
    """The hidden ``.<name>.partial`` folder beside ``folder``, for its new content before it goes into
    place (``replace_folder``). ``fresh``: made empty, one left by a kill or an error cleared first;
    otherwise only named (another process of the job makes it)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def sync_tree(folder: str | os.PathLike[str]) -> None:
    """fsync every file under ``folder``, then each folder, deepest first. A rename is atomic against a
    kill, but after a power loss or node crash the renamed folder may hold empty or partial files whose
    bytes were still in the page cache: synced before the rename, they are on the disk first."""
    for parent, _, names in os.walk(folder, topdown=False):
        for name in names:
            _fsync(os.path.join(parent, name))
        sync_folder(parent)


def sync_folder(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so that the entries just created or renamed in it survive a crash. Not every
    platform can open a folder for that (Windows cannot): there it is left to the file system."""
    with contextlib.suppress(PermissionError, IsADirectoryError):
        _fsync(folder)


def _fsync(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_digest(root: str | os.PathLike[str], files: Iterable, head_bytes: int = 0) -> str:
    """A sha256 hex digest of ``files`` (under ``root``): each one's path relative to ``root``, its size
    and its first ``head_bytes`` bytes, in path order. It follows the files, not their place: a moved or
    copied folder keeps it; a file added, removed, renamed or resized (or, with ``head_bytes``, rewritten
    at its start) changes it."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in files):
        digest.update(f"{Path(os.path.relpath(path, root))}:{path.stat().st_size}".encode())
        if head_bytes:
            with path.open("rb") as handle:
                digest.update(handle.read(head_bytes))
    return digest.hexdigest()


# Elements of each tensor that go into tensors_fingerprint: enough to tell trained weights apart.
FINGERPRINT_ELEMENTS = 1024


def tensors_fingerprint(folder: str | os.PathLike[str]) -> str | None:
    """A short hash of the weights in the safetensors files directly in ``folder`` (a diffusers model
    folder): each tensor's name, dtype, shape and first FINGERPRINT_ELEMENTS values, in name order. It
    follows the weights, not the files: a copy, a move, or a re-save with another header order, metadata or
    sharding keeps it; other weights of the same shapes (a fine-tuned or fp16-fixed VAE) change it. None
    when the folder holds no safetensors file."""
    import torch
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    tensors = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            tensors.update(dict.fromkeys(f.keys(), path))
    for name in sorted(tensors):
        with safe_open(tensors[name], framework="pt") as f:
            part = f.get_slice(name)
            shape = part.get_shape()
            rows = part[:1] if shape else f.get_tensor(name)  # the first row: a slice reads no more
        values = rows.reshape(-1)[:FINGERPRINT_ELEMENTS].contiguous()
        digest.update(f"{name}:{part.get_dtype()}:{shape}:".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_output_folder(
    out: str | os.PathLike[str], what: str, earlier: str = "", ours: Callable[[Path], bool] | None = None
) -> Path:
    """``out`` as a folder to write ``what`` into: new or empty, or (when ``earlier`` names one and the
    caller has recognised it) an earlier output of the same command; ``ours``, where given, tells each of
    that output's entries (files the command may replace or delete) from any other. A folder holding any
    other entry is refused in one line, since writing into it would mix files into a run, a dataset or
    another export (a run folder that gains a ``model_index.json`` samples the export from then on)."""
    out = Path(out)
    if out.is_dir():
        others = (p for p in out.iterdir() if ours is None or not ours(p))
        first = min(others, default=None)  # the first name, without sorting a huge listing
        if first is not None:
            also = f", or {earlier}" if earlier else ""
            example = f"the folder {first.name!r}" if first.is_dir() else repr(first.name)
            raise ConfigError(
                f"the output folder {str(out)!r} already holds other files (e.g. {example}); writing "
                f"{what} into it would mix them (allowed: a new or empty folder{also})"
            )
    return out


def take_lock(path: Path, doing: str) -> tuple[TextIO | None, str | None, str]:
    """An exclusive advisory lock (``flock``) on ``path`` for one job ``doing`` something into its folder
    ("training", "evaluating"): (the open locked file, None, token) when this process took it; (None, the
    holder's note, "") when another holds it. The kernel releases it when the process ends, however it ends,
    so a killed job leaves no stale lock; the file names its holder for the refusal a second job gets. On a
    system or filesystem without flock (Lustre mounted without ``flock``) the job goes on unlocked, with a
    warning, and the token is still written (training's shared-folder check reads it)."""
    token = secrets.token_hex(8)
    note = (
        f"pid {os.getpid()} on {socket.gethostname()} since "
        f"{datetime.datetime.now().isoformat(sep=' ', timespec='seconds')}, token {token}\n"
    )
    handle = path.open("a+")  # not truncated before the lock is ours: the holder's note is read from it
    try:
        import fcntl

        # A few tries over a second: `fusedit eval` probes a run's lock with a brief shared one (lock_held),
        # which must not turn a starting job away.
        for attempt in range(10):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 9:
                    raise
                time.sleep(0.1)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip().rsplit(", token ", 1)[0] or "a process that wrote no note yet"
        handle.close()
        return None, holder, ""
    except (ImportError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        logging.getLogger(__name__).warning(
            "%s cannot be locked (%s): nothing stops a second job from %s into this folder",
            path,
            reason,
            doing,
        )
    handle.seek(0)
    handle.truncate()
    handle.write(note)
    handle.flush()
    os.fsync(handle.fileno())  # on the server before the other ranks of a training job look for it
    return handle, None, token


def lock_held(path: Path) -> bool:
    """Whether a job holds the lock on ``path`` (take_lock): probed with a brief shared lock, which the
    holder's exclusive one refuses (take_lock retries past such a probe). Unknown (False) where the system
    has no flock."""
    try:
        import fcntl

        handle = path.open()
    except (ImportError, OSError):
        return False
    with handle:  # closing it releases the shared lock taken below
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
    return False


@contextlib.contextmanager
def holding_folder(
    folder: str | os.PathLike[str], lock_file: str, doing: str, flag: str = "--out"
) -> Iterator[None]:
    """While the block runs, this job alone is ``doing`` ("evaluating") into ``folder`` (created): a second
    job started meanwhile is refused in one line naming the holder (take_lock), rather than both writing one
    folder, where the later could replace the record of what the earlier is making."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle, holder, _ = take_lock(folder / lock_file, doing)
    if holder is not None:
        raise ConfigError(
            f"{folder} is being written by another job {doing} into it ({holder}; see {lock_file}): wait for it "
            f"to end, or give another {flag}"
        )
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock; the file stays, naming the last holder


def first_free(folder: Path, names: Iterable[str]) -> Path:
    """``folder / name`` for the first of ``names`` (an endless series, e.g. replaced-1, replaced-2, ...) that
    does not exist there: where a file set aside, or kept beside its replacement, goes."""
    return next(folder / name for name in names if not (folder / name).exists())


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one, with thousands separators (an index of millions of rows):
    "1 sample", "3 times", "1,000 rows" (nouns that add an s)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def readable_size(size: float) -> str:
    """A number of bytes as people read a disk's sizes: in the largest decimal unit (kB, MB, GB, TB, PB; as
    ``df -H`` and disk makers count) it is at least one of, with one decimal; plain bytes below 1 kB."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size):,} bytes"

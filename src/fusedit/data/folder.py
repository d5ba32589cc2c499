"""A folder of images as an index-addressable catalog: sample i is a fixed image, in a stable order.

Two layouts:

* **sidecar** (``data.root`` only): every image under ``root`` (recursive, hidden files and folders
  ignored) sorted by its relative POSIX path, so the order is the same on every machine and file system.
  Captions come from ``<stem>.txt`` (field ``txt``) and/or ``<stem>.json`` (field ``json``, so a caption
  field ``json.caption`` reads its "caption" key) next to the image, each read only when a caption field
  names it; the extension may be in any case (``a.TXT``). Directory symlinks are followed, but no folder
  is listed twice (a link loop adds nothing).
* **index** (``data.index_file``): a ``.jsonl`` (one JSON object per line; ``.json`` and ``.ndjson`` are
  read alike, and a JSON array or an object over many lines is refused) or ``.csv`` (``.tsv``:
  tab-separated) file with one row per image, in file order. ``data.image_field`` names the path column
  (default: the first of ``path``, ``file_name``, ``image``, ``filepath``, ``file`` that the file has);
  relative paths are resolved against ``data.root`` or, without it, the index file's folder. Captions come
  from the row's columns. Rows with integer ``width`` and ``height`` columns let aspect-ratio bucketing
  skip reading image headers.

Index files and sidecars are UTF-8, with or without a byte-order mark (other bytes read as U+FFFD, and are
warned about: an index's lines counted, a sidecar named at the first). Line breaks in captions read as
"\n", whether a sidecar or an index row holds them. Caption files with no image beside them are counted
and named in a warning: the trace of images in a format the scan does not read.

Rows that cannot be used (unparsable line, no path) are counted as "bad-row" skips, not errors: an index
of millions of rows written by a crawler should not stop a run over one bad line.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
from array import array
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fusedit.config import ConfigError
from fusedit.data.packed import PackedStrings, Packer
from fusedit.data.transforms import SkipSample, caption_candidates, decode_text, image_extensions
from fusedit.files import counted

log = logging.getLogger(__name__)

# Tried in this order when data.image_field is unset; "file" is last so that an index that also has one of
# the others keeps the column it was read by before "file" was accepted.
_PATH_COLUMNS = ("path", "file_name", "image", "filepath", "file")

# Index file suffixes (lower case): JSON Lines, and comma- or tab-separated values with a header row.
_JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TABLE_SUFFIXES = (".csv", ".tsv")
_ALLOWED_INDEX = (
    f"{', '.join(_JSON_LINES_SUFFIXES)} with one JSON object per line, or {', '.join(_TABLE_SUFFIXES)} "
    "with a header row"
)

# Caption sidecar extensions (lower case), each the name of the caption field it fills.
_SIDECAR_KINDS = ("txt", "json")

# "utf-8-sig" reads plain UTF-8 and also drops the byte-order mark that Excel ("CSV UTF-8") and Windows
# Notepad put first: with "utf-8" it would become part of the first column name, JSON line or caption.
_TEXT_ENCODING = "utf-8-sig"
# Bytes that are not UTF-8 (a line of another encoding in a crawler's index) are read escaped, counted, and
# then become U+FFFD, as in caption sidecars: one such row must not stop a run (a path so spoilt is then a
# "missing" skip that names it).
_TEXT_ERRORS = "surrogateescape"
_ESCAPED = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as surrogateescape reads it


def scan_images(root: Path, progress: bool = False) -> list[str]:
    """Relative POSIX paths of every image under ``root``, sorted (a stable order across machines)."""
    return _scan(root, progress)[0]


def _scan(root: Path, progress: bool = False) -> tuple[list[str], dict[str, dict[str, str]], list[str]]:
    """The sorted image paths under ``root``; for the images whose caption sidecar is spelled with an
    extension in another case than ``.txt``/``.json`` (``a.TXT`` next to ``a.JPG``, as cameras and Windows
    tools write), that sidecar's file name by kind (``{"txt": "a.TXT"}``); and the sorted paths of the
    sidecars with no image of their stem beside them (the trace of an image in a format not read).

    Directory symlinks are followed (a data folder is often assembled from links to other disks) except
    those into ``root`` itself (its folders are walked under their own names anyway), and a folder reached
    a second time is not listed again: a link back up the tree (``a/up -> ..``) would otherwise list the
    same images again on every turn of the loop. Sub-folders are walked in sorted order, so which of two
    links to one folder is kept is the same on every machine. ``progress`` shows a bar counting the images
    found: listing millions of files on a network file system takes minutes.
    """
    found: list[str] = []
    sidecars: dict[str, dict[str, str]] = {}
    orphans: list[str] = []
    extensions = image_extensions()
    real_root = os.path.realpath(root)
    visited: set[str] = set()
    bar = tqdm(desc="scan images", unit="img", disable=not progress, leave=False)
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # reached again through another link: its images are listed already
            dirs[:] = []
            continue
        visited.add(real)
        # Hidden folders hold editor/OS copies (.ipynb_checkpoints, .thumbnails) that are not data.
        dirs[:] = [
            d
            for d in sorted(dirs)
            if not d.startswith(".")
            and not (
                os.path.islink(os.path.join(folder, d))
                and _is_within(os.path.realpath(os.path.join(folder, d)), real_root)
            )
        ]
        rel = Path(folder).relative_to(root)
        # Sorted so that, of several case spellings of one sidecar (a.TXT, a.Txt), the same one is read
        # everywhere; an exact lower-case ".txt"/".json" wins and needs no entry (record()'s default).
        by_stem: dict[tuple[str, str], str] = {}
        texts: list[tuple[str, str]] = []  # (stem, name) of each visible sidecar, for the orphans below
        for name in sorted(files):
            stem, dot, ext = name.rpartition(".")
            kind = ext.lower()
            if not (dot and kind in _SIDECAR_KINDS):
                continue
            if not name.startswith("."):
                texts.append((stem, name))
            if name == f"{stem}.{kind}" or (stem, kind) not in by_stem:
                by_stem[(stem, kind)] = name
        before = len(found)
        stems = set()
        for name in files:
            stem, dot, ext = name.rpartition(".")
            if not dot or name.startswith(".") or ext.lower() not in extensions:
                continue
            stems.add(stem)
            path = (rel / name).as_posix()
            found.append(path)
            for kind in _SIDECAR_KINDS:
                other = by_stem.get((stem, kind))
                if other is not None and other != f"{stem}.{kind}":
                    sidecars.setdefault(path, {})[kind] = other
        orphans += [(rel / name).as_posix() for stem, name in texts if stem not in stems]
        bar.update(len(found) - before)
    bar.close()
    return sorted(found), sidecars, sorted(orphans)


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_folder_paths(root: str, index_file: str) -> None:
    """That data.root / data.index_file name what a folder source needs; nothing is read."""
    if index_file and Path(index_file).is_dir():
        raise ConfigError(
            f"data.index_file={index_file!r} is a folder (allowed: an index file, {_ALLOWED_INDEX}; "
            "for a folder of images use data.root)"
        )
    if index_file and not Path(index_file).is_file():
        raise ConfigError(f"data.index_file={index_file!r} does not exist")
    if not (root or index_file):
        raise ConfigError("data.source=folder needs data.root (an image folder) or data.index_file")
    if root and not Path(root).is_dir():
        raise ConfigError(f"data.root={root!r} is not a folder")


class FolderCatalog:
    """Images on disk (sidecar captions or an index file); see the module docstring."""

    def __init__(
        self,
        root: str = "",
        index_file: str = "",
        image_field: str = "",
        keep_fields=None,
        progress: bool = False,
    ):
        """``keep_fields``: the caption fields read (data.caption_fields): an index keeps only their columns
        (and width, height), a sample reads only the sidecars they name (``txt``, ``json``); None keeps every
        column and reads every sidecar, for a caller that reads the fields itself."""
        self.skipped: list[tuple[str, str, str]] = []  # (reason, id, detail) found while loading
        self._sidecars: dict[str, dict[str, str]] = {}
        self.caption_fields = () if keep_fields is None else tuple(keep_fields)
        # The fields' heads (json.caption: json), the sidecar kinds and index columns they read; None: all.
        heads = None if keep_fields is None else {f.split(".", 1)[0] for f in keep_fields}
        read = _SIDECAR_KINDS if heads is None else heads
        # A sidecar no caption field names is never opened: its time, and its bytes' not-UTF-8 count, are
        # for captions no batch could train on.
        self.sidecar_kinds = tuple(kind for kind in _SIDECAR_KINDS if kind in read)
        self.sizes_known: np.ndarray | None = None
        self._repeats: dict[int, str] = {}  # an index's sample id by position, where its path repeats
        check_folder_paths(root, index_file)
        if index_file:
            path = Path(index_file)
            self.root_dir = Path(root) if root else path.parent
            self.mode = "index"
            self._load_index(path, image_field, heads)
        else:
            self.root_dir = Path(root)
            self.mode = "sidecar"
            paths, self._sidecars, orphans = _scan(self.root_dir, progress)
            self.paths, self.rows = PackedStrings(paths), None
            if orphans:
                # Said as text or JSON files, not captions: a README.txt or metadata.json is one too.
                one = len(orphans) == 1
                log.warning(
                    "data: %s in %r %s no image of %s name beside %s (e.g. %s; image extensions read: %s)",
                    counted(len(orphans), "text or JSON file"),
                    root,
                    "has" if one else "have",
                    "its" if one else "their",
                    "it" if one else "them",
                    orphans[0],
                    ", ".join(image_extensions()),
                )
        if not self.paths and index_file:
            example = f", e.g. {self.skipped[0][1]}: {self.skipped[0][2]}" if self.skipped else ""
            raise ConfigError(
                f"data.index_file={index_file!r} lists no images ({len(self.skipped)} unusable rows{example})"
            )
        if not self.paths:
            raise ConfigError(f"no images found in {root!r} (looked for: {', '.join(image_extensions())})")

    # ----------------------------------------------------------------------------------------------

    def _read_rows(self, path: Path):
        """(line number, row dict or None) for each data row of a JSON Lines or .csv/.tsv file."""
        suffix = path.suffix.lower()
        if suffix in _JSON_LINES_SUFFIXES:
            with path.open(encoding=_TEXT_ENCODING, errors=_TEXT_ERRORS) as f:
                first = True
                for number, line in enumerate(self._utf8_lines(f), 1):
                    if not line.strip():
                        continue
                    # A JSON Lines row is an object: a file opening with "[" is a JSON array (an export's
                    # list of rows), whose rows, one per line with a comma after, would all but the last be
                    # counted as bad rows.
                    if first and line.lstrip().startswith("["):
                        raise _not_json_lines(path, "array")
                    first = False
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    yield number, row if isinstance(row, dict) else None
        elif suffix in _TABLE_SUFFIXES:
            with path.open(encoding=_TEXT_ENCODING, errors=_TEXT_ERRORS, newline="") as f:
                reader = csv.DictReader(self._utf8_lines(f), delimiter="\t" if suffix == ".tsv" else ",")
                try:
                    for number, row in enumerate(reader, 2):
                        yield number, dict(row)
                except csv.Error as e:
                    # A quote left open takes in every line after it as one field, until the csv module's
                    # field size limit stops it: the file is broken, not one row. The line named is the
                    # end of the last row read (DictReader's count, not yet moved on by the failed row).
                    raise ConfigError(
                        f"data.index_file={str(path)!r} cannot be read after line {reader.line_num}: {e} "
                        "(a quote left open after it?)"
                    ) from None
        else:
            raise ConfigError(f"data.index_file={str(path)!r} ends in {suffix!r} (allowed: {_ALLOWED_INDEX})")

    def _utf8_lines(self, lines):
        """The lines of an index file read with bytes that are not UTF-8 escaped (``_TEXT_ERRORS``), those
        bytes as U+FFFD; the numbers of the lines that held any are kept in ``self.not_utf8``."""
        for number, line in enumerate(lines, 1):
            if _ESCAPED.search(line):
                self.not_utf8.append(number)
                line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            yield line

    def _load_index(self, path: Path, image_field: str, heads: set[str] | None) -> None:
        # Packed as they are read (data/packed.py): millions of rows as lists of str and dicts would be copied
        # into each DataLoader worker as it reads them, and held whole before packing at the load's peak. A
        # row is kept as its JSON text, parsed when its sample is read.
        paths, rows, sizes = Packer(), Packer(), array("q")  # sizes: (width, height) while every row has one
        seen: set[str] = set()
        self.not_utf8: list[int] = []
        column = image_field
        # Keep only the columns something reads: an index of millions of rows with many unused columns
        # would otherwise be copied into every worker process.
        keep = None if heads is None else heads | {"width", "height"}
        for number, row in self._read_rows(path):
            where = f"{path.name}:{number}"
            if row is None:
                self.skipped.append(("bad-row", where, "not a JSON object"))
                continue
            if not column:
                column = next((c for c in _PATH_COLUMNS if c in row), "")
                if not column:
                    raise ConfigError(
                        f"data.index_file={str(path)!r} has none of the path columns {list(_PATH_COLUMNS)}; "
                        f"set data.image_field (its columns: {', '.join(map(str, row))})"
                    )
            value = row.get(column)
            if not isinstance(value, str) or not value:
                self.skipped.append(("bad-row", where, f"no {column!r} path"))
                continue
            kept = {k: _one_newline(v) for k, v in row.items() if keep is None or k in keep}
            # A path listed again (the same image under two captions) is a sample of its own: its id is keyed
            # by its position, as the latent cache keys it, so its skips and its cached twin count once per
            # row. Only the repeats are kept (the catalog is copied into every worker process).
            if value in seen:
                self._repeats[len(paths)] = f"{value}@{len(paths)}"
            seen.add(value)
            if sizes is not None and _is_size(kept.get("width")) and _is_size(kept.get("height")):
                sizes += array("q", (int(kept["width"]), int(kept["height"])))
            else:
                sizes = None
            paths.append(value)
            rows.append(json.dumps(kept, ensure_ascii=False))
        if not paths and path.suffix.lower() in _JSON_LINES_SUFFIXES:
            # No usable line: perhaps one JSON object written over many lines (an array is refused by
            # _read_rows at its opening bracket).
            try:
                document = json.loads(path.read_text(encoding=_TEXT_ENCODING, errors=_TEXT_ERRORS))
            except ValueError:
                document = None
            if isinstance(document, dict):
                raise _not_json_lines(path, "object")
        if self.not_utf8:
            log.warning(
                "data: %s of %r %s not UTF-8: %s bad bytes read as U+FFFD (e.g. line %d; save the index as UTF-8 "
                "to keep every character)",
                counted(len(self.not_utf8), "line"),
                str(path),
                "is" if len(self.not_utf8) == 1 else "are",
                "its" if len(self.not_utf8) == 1 else "their",
                self.not_utf8[0],
            )
        if len(rows) and sizes is not None:
            self.sizes_known = np.frombuffer(sizes, dtype=np.int64).reshape(-1, 2).copy()  # (N, 2)
        self.paths = paths.packed()
        self.rows: PackedStrings | None = rows.packed()

    # ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.paths)

    def sample_id(self, i: int) -> str:
        return self._repeats.get(i, self.paths[i])

    def image_value(self, i: int) -> Path:
        return self.root_dir / self.paths[i]

    def record(self, i: int) -> tuple[dict, Any]:
        """(caption fields, image path) of sample ``i``; the image itself is not opened here, nor a sidecar
        that no caption field names. Raises SkipSample when the only caption source the caption fields read
        is a sidecar that is not JSON, or a ``.txt`` sidecar that is empty."""
        if self.rows is not None:
            return json.loads(self.rows[i]), self.image_value(i)
        image = self.image_value(i)
        names = self._sidecars.get(self.paths[i], {})
        fields: dict[str, Any] = {}
        # An unreadable or unparsable sidecar is an absent caption source: the caption check then counts
        # the sample as "no-caption" instead of the run failing on one file.
        if "txt" in self.sidecar_kinds:
            with contextlib.suppress(OSError):
                fields["txt"] = _sidecar(image, names.get("txt"), "txt")
        # When the caption was to come from a broken JSON sidecar or an empty caption file (a captioning pass
        # that failed on the image), a sample without a caption names that file (the JSON's problem first):
        # a fix to the data, not to data.caption_fields as "none of the fields holds text" suggests.
        problem = None
        try:
            if "json" in self.sidecar_kinds:
                # A JSON string's line breaks are escapes in the file, which become "\r\n" only when parsed.
                fields["json"] = _one_newline(json.loads(_sidecar(image, names.get("json"), "json")))
        except OSError:
            pass
        except ValueError as e:
            if any(f.split(".", 1)[0] == "json" for f in self.caption_fields):
                problem = f"{names.get('json') or image.with_suffix('.json').name} is not valid JSON ({e})"
        text = fields.get("txt")
        if problem is None and text is not None and not text.strip() and "txt" in self.caption_fields:
            problem = f"{names.get('txt') or image.with_suffix('.txt').name} is empty"
        if problem and not caption_candidates(fields, self.caption_fields):
            raise SkipSample("no-caption", problem)
        return fields, image


def _sidecar(image: Path, name: str | None, kind: str) -> str:
    """The text of ``image``'s sidecar of ``kind``: the file ``name`` found by the scan, else ``<stem>.kind``."""
    path = image.with_name(name) if name else image.with_suffix(f".{kind}")
    return _one_newline(decode_text(path.read_bytes(), str(path)))


def _not_json_lines(path: Path, kind: str) -> ConfigError:
    return ConfigError(
        f"data.index_file={str(path)!r} holds one JSON {kind}, not JSON Lines (one JSON object per line; "
        f"allowed: {_ALLOWED_INDEX})"
    )


def _one_newline(value: Any) -> Any:
    """A row's text (or the texts in a list or JSON object) with Windows and old Mac line breaks read as
    "\n", as a sidecar's are (a quoted multi-line CSV field keeps its "\r\n", which would otherwise reach
    the text encoder)."""
    if isinstance(value, str):
        return value.replace("\r\n", "\n").replace("\r", "\n")
    if isinstance(value, list):
        return [_one_newline(v) for v in value]
    if isinstance(value, dict):
        return {k: _one_newline(v) for k, v in value.items()}
    return value


def _is_size(value: Any) -> bool:
    try:
        return int(value) > 0
    except (TypeError, ValueError):
        return False

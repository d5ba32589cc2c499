"""Benchmark prompt data on a user's machine: download from the official sources, or load a local copy.

fusedit ships no third-party prompt files. ``download`` fetches them from where their authors publish them
(with urllib only, so nothing beyond the standard library is needed):

* GenEval (MIT): ``prompts/evaluation_metadata.jsonl`` of github.com/djghosh13/geneval, one JSON object per
  prompt with its ``tag`` (task), ``include``/``exclude`` clauses and ``prompt``.
* DPG-Bench (Apache-2.0): ``dpg_bench/prompts/*.txt`` (1065 prompts, one file each) and
  ``dpg_bench/dpg_bench.csv`` (the questions) of github.com/TencentQQGYLab/ELLA. The prompts folder holds
  more files than GitHub's contents API lists (1000), so the repository archive is streamed instead and
  only those files are kept.
* T2I-CompBench (MIT): ``examples/dataset/<category>_val.txt`` of github.com/Karine-Huang/T2I-CompBench
  (about 300 prompts per category) and the complex category's spatial/action groups.
* MJHQ-30K: ``meta_data.json`` of the Hub dataset playgroundai/MJHQ-30K (30,000 prompts with their
  category) and, with ``images=True``, the reference images of ``mjhq30k_imgs.zip`` unpacked as
  ``mjhq30k_imgs/<category>/<id>.jpg``.

GenEval and DPG-Bench come from pinned upstream commits (``PINNED_REFS``), the files fusedit's loaders and
scorers were checked against, not from a branch that may move; the others from ``main``. Each copy records
where it came from in ``SOURCE.json`` (benchmark, ref, source).

Offline, ``download`` fails with one line that says to pass ``--prompts PATH`` to a local copy; the
loaders accept such a copy (a file or the folder ``download`` writes).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from fusedit.config import ConfigError, is_whole
from fusedit.files import replace_folder

log = logging.getLogger("fusedit")

BENCHMARKS = ("geneval", "dpg", "mjhq", "t2i-compbench")

# Upstream locations; ``{ref}`` is a branch, tag or commit. Module constants so that tests can point them at
# local ``file://`` copies instead of the network.
GENEVAL_URLS = {
    "evaluation_metadata.jsonl": (
        "https://raw.githubusercontent.com/djghosh13/geneval/{ref}/prompts/evaluation_metadata.jsonl"
    ),
    "LICENSE": "https://raw.githubusercontent.com/djghosh13/geneval/{ref}/LICENSE",
}
DPG_ARCHIVE_URL = "https://github.com/TencentQQGYLab/ELLA/archive/{ref}.tar.gz"
# MJHQ-30K on the Hugging Face Hub; {ref} a revision, {name} a file of the dataset repository.
MJHQ_URL = "https://huggingface.co/datasets/playgroundai/MJHQ-30K/resolve/{ref}/{name}"

# The upstream commits downloaded by default: GenEval's prompts and ELLA's DPG-Bench files as fusedit's
# loaders and scorers were checked against them. MJHQ-30K and T2I-CompBench have no pin: "main".
PINNED_REFS = {
    "geneval": "af4902f24d3ca90ebbb446dd9891a59e0f82725f",
    "dpg": "3c228f1dc6c4d3cad0a47493816151a419f14db3",
}
# Where each benchmark's copy comes from, as SOURCE.json records it.
SOURCES = {
    "geneval": "github.com/djghosh13/geneval",
    "dpg": "github.com/TencentQQGYLab/ELLA",
    "mjhq": "huggingface.co/datasets/playgroundai/MJHQ-30K",
    "t2i-compbench": "github.com/Karine-Huang/T2I-CompBench",
}
SOURCE_RECORD = "SOURCE.json"

GENEVAL_METADATA = "evaluation_metadata.jsonl"
DPG_CSV = "dpg_bench.csv"
DPG_PROMPTS = "prompts"
MJHQ_METADATA = "meta_data.json"
MJHQ_IMAGES_ZIP = "mjhq30k_imgs.zip"
MJHQ_IMAGES = "mjhq30k_imgs"


class BenchmarkError(ConfigError):
    """Benchmark data cannot be obtained or read; the message is one line that says what to do instead.

    A ConfigError so that the command line reports it as one line like any other bad input.
    """


def _fetch(url: str, name: str, timeout: float):
    """Open ``url``; network failures become one-line BenchmarkErrors naming the URL and the way out."""
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:  # reached the server: the address (e.g. the ref) is wrong
        raise BenchmarkError(
            f"downloading {name} from {url} failed with HTTP {e.code} {e.reason}; check the ref, or pass "
            f"--prompts PATH to a local copy"
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise BenchmarkError(
            f"cannot download {name} from {url} ({reason}); this machine looks offline: fetch it on a "
            f"connected machine or pass --prompts PATH to a local copy"
        ) from None


def _is_complete(name: str, dest: Path, images: bool = False) -> bool:
    if name == "geneval":
        return (dest / GENEVAL_METADATA).is_file()
    if name == "t2i-compbench":
        from fusedit.eval.compbench import DATASET_FILES

        return all((dest / f).is_file() for f in DATASET_FILES)
    if name == "mjhq":
        unpacked = dest / MJHQ_IMAGES
        return (dest / MJHQ_METADATA).is_file() and (
            not images or unpacked.is_dir() and any(unpacked.iterdir())
        )
    return (dest / DPG_CSV).is_file() and any((dest / DPG_PROMPTS).glob("*.txt"))


def _warn_other_ref(dest: Path, ref: str) -> None:
    """Warn when the complete copy in ``dest``, kept, is not of ``ref``: one made before SOURCE.json was
    written came from a moving branch, and is not deleted unasked."""
    try:
        kept = json.loads((dest / SOURCE_RECORD).read_text(encoding="utf-8")).get("ref")
    except (OSError, ValueError, AttributeError):  # missing, damaged, or not an object
        kept = None
    if kept != ref:
        which = "of unknown ref (no readable SOURCE.json)" if kept is None else f"of ref {kept}"
        log.warning("kept the existing copy in %s %s, not %s; --force fetches that one", dest, which, ref)


def download(
    name: str,
    dest: str | Path,
    *,
    ref: str | None = None,
    force: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
    images: bool = False,
) -> Path:
    """Download benchmark ``name`` ("geneval" or "dpg") into the folder ``dest`` and return ``dest``.

    GenEval gives ``dest/evaluation_metadata.jsonl`` (+ LICENSE); DPG-Bench gives ``dest/prompts/*.txt``,
    ``dest/dpg_bench.csv`` (+ LICENSE); MJHQ-30K gives ``dest/meta_data.json`` and, with ``images``, the
    reference images in ``dest/mjhq30k_imgs/<category>/``. A complete existing copy is kept unless
    ``force``, with a warning when it is not of ``ref``. Files are gathered in a temporary folder and moved
    into place at the end, so an interrupted download never leaves a half-written copy that would later
    pass for a complete one, and a failed one leaves no folder it made. ``ref`` (a branch, tag or commit) defaults to the benchmark's pinned commit
    (``PINNED_REFS``; "main" where none), and ``dest/SOURCE.json`` records it.
    """
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
    ref = PINNED_REFS.get(name, "main") if ref is None else ref
    if images and name != "mjhq":
        raise BenchmarkError(f"images=True applies to mjhq only (its FID reference images), not {name!r}")
    dest = Path(dest)
    if not force and _is_complete(name, dest, images):
        _warn_other_ref(dest, ref)
        return dest
    # The folders made here, deepest first: a failed download (offline, say) takes them away again, so that
    # it leaves no empty folder behind.
    made = [p for p in (dest, *dest.parents) if not p.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp_name:
            tmp = Path(tmp_name)
            if name == "geneval":
                _download_geneval(tmp, ref, timeout)
            elif name == "mjhq":
                _download_mjhq(tmp, ref, timeout, progress, images)
            elif name == "t2i-compbench":
                _download_compbench(tmp, ref, timeout)
            else:
                _download_dpg(tmp, ref, timeout, progress)
            source = {"benchmark": name, "ref": ref, "source": SOURCES[name]}
            (tmp / SOURCE_RECORD).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
            for item in tmp.iterdir():
                target = dest / item.name
                if item.is_dir():  # a kill while an earlier copy is deleted must not leave it half there
                    replace_folder(item, target)
                else:
                    item.replace(target)
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # one that holds something now is kept, with what it holds
                folder.rmdir()
        raise
    return dest


def _download_geneval(tmp: Path, ref: str, timeout: float) -> None:
    for filename, template in GENEVAL_URLS.items():
        _download_to(template.format(ref=ref), "GenEval", tmp / filename, timeout, False, _LOCAL_COPY)
    # Parse before accepting: a proxy's HTML error page must not be stored as the prompt file.
    load_geneval(tmp / GENEVAL_METADATA)


def _download_dpg(tmp: Path, ref: str, timeout: float, progress: bool) -> None:
    url = DPG_ARCHIVE_URL.format(ref=ref)
    prompts = tmp / DPG_PROMPTS
    prompts.mkdir()
    with _fetch(url, "DPG-Bench", timeout) as response:
        size = response.headers.get("Content-Length") if response.headers else None
        with tqdm.wrapattr(
            response,
            "read",
            total=int(size) if size else None,
            desc="DPG-Bench archive",
            disable=not progress,
        ) as stream:
            try:
                # Streaming mode ("r|gz") reads the archive once from the socket without seeking.
                with tarfile.open(fileobj=stream, mode="r|gz") as archive:
                    for member in archive:
                        target = _dpg_member_target(member, prompts, tmp)
                        if target is None:
                            continue
                        source = archive.extractfile(member)
                        if source is not None:
                            target.write_bytes(source.read())
            except (tarfile.TarError, EOFError, OSError) as e:
                raise BenchmarkError(
                    f"the DPG-Bench archive from {url} is unreadable ({e}); retry, or pass --prompts PATH "
                    f"to a local copy"
                ) from None
    if not (tmp / DPG_CSV).is_file() or not any(prompts.glob("*.txt")):
        raise BenchmarkError(
            f"the archive {url} has no dpg_bench/prompts/*.txt and dpg_bench/{DPG_CSV}; check the ref, "
            f"or pass --prompts PATH to a local copy"
        )


_LOCAL_COPY = ", or pass --prompts PATH to a local copy"


def _download_to(url: str, name: str, target: Path, timeout: float, progress: bool, hint: str = "") -> None:
    """Stream ``url`` into the file ``target`` with a progress bar; a dropped connection is one line, ending
    with ``hint`` (what else to do than retry)."""
    with _fetch(url, name, timeout) as response:
        size = response.headers.get("Content-Length") if response.headers else None
        with (
            tqdm.wrapattr(
                response, "read", total=int(size) if size else None, desc=name, disable=not progress
            ) as stream,
            target.open("wb") as handle,
        ):
            try:
                shutil.copyfileobj(stream, handle, 1 << 20)
            # The connection can also drop mid-file; an unbounded read then raises IncompleteRead.
            except (TimeoutError, ConnectionError, http.client.IncompleteRead) as e:
                raise BenchmarkError(f"downloading {name} from {url} broke off ({e}); retry{hint}") from None
            # A connection closed early ends a sized read quietly, as if the file ended there: a cut-short
            # prompt file would still parse, and be kept as a complete copy.
            if size and handle.tell() != int(size):
                raise BenchmarkError(
                    f"downloading {name} from {url} broke off ({handle.tell()} of {size} bytes); retry{hint}"
                )


def _download_compbench(tmp: Path, ref: str, timeout: float) -> None:
    from fusedit.eval.compbench import (
        DATASET_FILES,
        DATASET_URL,
        LICENSE_URL,
        load_compbench,
        load_complex_groups,
    )

    for name in DATASET_FILES:
        _download_to(DATASET_URL.format(ref=ref, name=name), "T2I-CompBench", tmp / name, timeout, False)
    _download_to(LICENSE_URL.format(ref=ref), "T2I-CompBench", tmp / "LICENSE", timeout, False)
    load_compbench(tmp)  # parsed before accepting, as for GenEval
    load_complex_groups(tmp)


def _download_mjhq(tmp: Path, ref: str, timeout: float, progress: bool, images: bool) -> None:
    _download_to(
        MJHQ_URL.format(ref=ref, name=MJHQ_METADATA), "MJHQ-30K metadata", tmp / MJHQ_METADATA, timeout, False
    )
    load_mjhq(tmp / MJHQ_METADATA)  # parsed before accepting, as for GenEval
    if not images:
        return
    url = MJHQ_URL.format(ref=ref, name=MJHQ_IMAGES_ZIP)
    archive = tmp / MJHQ_IMAGES_ZIP
    _download_to(url, "MJHQ-30K images", archive, timeout, progress)
    unpacked = tmp / MJHQ_IMAGES
    try:
        with zipfile.ZipFile(archive) as bundle:
            # 30,000 images, a few GB: minutes on a slow disk, so it shows its progress as the download does.
            members = bundle.infolist()
            for member in tqdm(members, desc="MJHQ-30K images, unpacking", unit="file", disable=not progress):
                parts = PurePosixPath(member.filename).parts
                # <category>/<id>.jpg, under whatever top folder the archive has; built from the last two
                # names only, so no member can write outside the folder.
                if member.is_dir() or len(parts) < 2 or not parts[-1].lower().endswith(".jpg"):
                    continue
                target = unpacked / parts[-2] / parts[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(member) as source, target.open("wb") as handle:
                    shutil.copyfileobj(source, handle, 1 << 20)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise BenchmarkError(f"the MJHQ-30K images from {url} are unreadable ({e}); retry") from None
    archive.unlink()
    if not unpacked.is_dir():
        raise BenchmarkError(f"the archive {url} holds no <category>/<id>.jpg images; check the ref")


def _dpg_member_target(member: tarfile.TarInfo, prompts: Path, tmp: Path) -> Path | None:
    """Where an archive member goes, or None to skip it. Targets are built from the member's base name
    only, so no member name can write outside the temporary folder."""
    if not member.isfile():
        return None
    parts = PurePosixPath(member.name).parts[1:]  # drop the "<repo>-<ref>/" top folder
    if len(parts) == 3 and parts[:2] == ("dpg_bench", "prompts") and parts[2].endswith(".txt"):
        return prompts / parts[2]
    if parts == ("dpg_bench", DPG_CSV):
        return tmp / DPG_CSV
    if parts == ("LICENSE",):
        return tmp / "LICENSE"
    return None


def existing_path(path: str | Path, what: str, bench: str) -> Path:
    """``path`` when it exists; otherwise a one-line error with the command that fetches ``bench``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist; get a copy with `fusedit benchmarks download {bench}` "
            f"(it writes benchmarks-data/{bench}) or give the path of a local copy"
        )
    return path


def read_utf8(path: Path, expected: str) -> str:
    """``path``'s text; a file in another encoding is a one-line error naming it (UnicodeDecodeError's own
    message names only a byte position)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path} is not UTF-8 text ({e.reason}); expected {expected}") from None


def load_geneval(path: str | Path) -> list[dict]:
    """GenEval's prompt metadata, one dict per prompt in file order (the order that numbers the output
    folders). ``path`` is ``evaluation_metadata.jsonl`` or a folder containing it."""
    path = existing_path(path, "GenEval metadata", "geneval")
    if path.is_dir():
        path = existing_path(path / GENEVAL_METADATA, "GenEval metadata", "geneval")
    rows = []
    for number, line in enumerate(read_utf8(path, "one JSON object per line").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(
                f"{path}:{number} is not JSON ({e.msg}); expected one object per line"
            ) from None
        if not (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("tag"), str)
            and isinstance(row.get("include"), list)
            and isinstance(row.get("exclude", []), list)
            # Checked here, not at scoring: a bad clause would otherwise fail after every image was generated.
            and all(_geneval_clause(c) for c in [*row["include"], *row.get("exclude", [])])
        ):
            raise BenchmarkError(
                f"{path}:{number} is not a GenEval prompt; expected keys tag, prompt and include (and "
                f"optionally exclude): lists of {{class: a name, count: a whole number >= 1}}, got {line[:80]!r}"
            )
        rows.append(row)
    if not rows:
        raise BenchmarkError(f"{path} holds no prompts; expected GenEval's evaluation_metadata.jsonl")
    return rows


def _geneval_clause(clause) -> bool:
    """An include/exclude clause the scorer reads: {class: str, count: whole >= 1, color: str (optional)}."""
    return (
        isinstance(clause, dict)
        and isinstance(clause.get("class"), str)
        and is_whole(clause.get("count"))
        and clause["count"] >= 1
        and isinstance(clause.get("color", ""), str)
    )


def name_order(stem: str) -> tuple:
    # DPG-Bench names 299 of its prompts by a number alone: sort those numerically, the others
    # (partiprompts12, ...) after them by name.
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _dpg_folder(path: str | Path) -> Path:
    """The folder of DPG-Bench prompt files ``path`` names: itself, or its ``prompts/`` folder."""
    path = existing_path(path, "DPG-Bench prompts folder", "dpg")
    if not path.is_dir():
        raise BenchmarkError(f"DPG-Bench prompts {str(path)!r} is a file; expected a folder of *.txt files")
    if not any(path.glob("*.txt")) and (path / DPG_PROMPTS).is_dir():
        path = path / DPG_PROMPTS
    return path


def load_dpg(path: str | Path) -> list[tuple[str, str]]:
    """DPG-Bench prompts as (name, prompt) pairs, name = the file stem (the key of the question CSV and
    of the grid image). ``path`` is a folder of ``*.txt`` files or a folder with a ``prompts/`` one."""
    path = _dpg_folder(path)
    files = sorted(path.glob("*.txt"), key=lambda p: name_order(p.stem))
    if not files:
        raise BenchmarkError(f"no *.txt prompt files in {str(path)!r}; expected DPG-Bench's prompts folder")
    return [(f.stem, read_utf8(f, "one DPG-Bench prompt").strip()) for f in files]


# DPG-Bench's prompt files are named by their source and a number (0.txt, partiprompts12.txt,
# COCOval2014000000010363.txt, ...), and each holds one prompt on one line.
DPG_NAME = re.compile(r"[A-Za-z]*\d+")
_DPG_FILES = (
    "allowed: DPG-Bench's prompts/*.txt, named like 0.txt or partiprompts12.txt, one prompt on one line "
    "each; other prompt files with --vqa and a dpg_bench.csv that names them"
)


def check_dpg_files(path: str | Path, prompts: Sequence[tuple[str, str]]) -> None:
    """Refuse ``prompts`` (``load_dpg(path)``) when a file is not laid out as DPG-Bench's (``DPG_NAME``, one
    line), for a run without the question file that names the prompts: any other folder of *.txt files
    (GenEval's 80-line object-name lists) would be generated as prompts, and its grids mixed with DPG's."""
    folder = _dpg_folder(path)
    for name, prompt in prompts:
        file = folder / f"{name}.txt"
        if not DPG_NAME.fullmatch(name):
            raise BenchmarkError(
                f"{file} is not a DPG-Bench prompt file: its name is not a source name and a number "
                f"({_DPG_FILES})"
            )
        lines = len(prompt.splitlines())
        if lines > 1:
            raise BenchmarkError(
                f"{file} holds {lines} lines, not a DPG-Bench prompt of one line ({_DPG_FILES})"
            )


def dpg_csv_path(path: str | Path) -> Path:
    """The DPG-Bench question file: ``path`` itself, or ``dpg_bench.csv`` in the folder ``path`` or in its
    parent (so the prompts folder of a downloaded copy also finds its CSV)."""
    path = existing_path(path, "DPG-Bench question file", "dpg")
    if path.is_file():
        return path
    for candidate in (path / DPG_CSV, path.parent / DPG_CSV):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {DPG_CSV} in {str(path)!r} or its parent; get DPG-Bench with `fusedit benchmarks download dpg` "
        f"(it ships the CSV) or copy ELLA's dpg_bench/{DPG_CSV} into {str(path)!r}"
    )


def load_mjhq(path: str | Path) -> list[dict]:
    """MJHQ-30K's prompts as dicts {id, prompt, category} sorted by id; ``path`` is ``meta_data.json`` or
    a folder holding it."""
    path = existing_path(path, "MJHQ-30K metadata", "mjhq")
    if path.is_dir():
        path = existing_path(path / MJHQ_METADATA, "MJHQ-30K metadata", "mjhq")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"{path} is not JSON ({e}); expected MJHQ-30K's {MJHQ_METADATA}") from None
    if not isinstance(data, dict) or not data:
        raise BenchmarkError(
            f"{path} holds no prompts; expected MJHQ-30K's {MJHQ_METADATA}, an object of "
            '{id: {"prompt": ..., "category": ...}}'
        )
    rows = []
    for key in sorted(data):
        entry = data[key]
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("prompt"), str)
            and isinstance(entry.get("category"), str)
            and entry["category"].strip()
        ):
            raise BenchmarkError(
                f"{path}: entry {key!r} is {json.dumps(entry)[:80]}; expected an object with a string "
                '"prompt" and a non-empty "category"'
            )
        # Ids and categories become file and folder names: a separator would write outside the folder.
        for label, name in (("id", key), ("category", entry["category"])):
            if "/" in name or "\\" in name or name in (".", ".."):
                raise BenchmarkError(f"{path}: {label} {name!r} is not a file name; expected MJHQ-30K's ids")
        rows.append({"id": key, "prompt": entry["prompt"], "category": entry["category"]})
    return rows

"""Benchmark prompt data on a user's machine: download from the official sources, or load a local copy.

fusedit ships no third-party prompt files. ``download`` fetches them from where their authors publish them
(with urllib only, so nothing beyond the standard library is needed):

* GenEval (MIT): ``prompts/evaluation_metadata.jsonl`` of github.com/djghosh13/geneval, one JSON object per
  prompt with its ``tag`` (task), ``include``/``exclude`` clauses and ``prompt``.
* DPG-Bench (Apache-2.0): ``dpg_bench/prompts/*.txt`` (1065 prompts, one file each) and
  ``dpg_bench/dpg_bench.csv`` (the questions) of github.com/TencentQQGYLab/ELLA. The prompts folder holds
  more files than GitHub's contents API lists (1000), so the repository archive is streamed instead and
  only those files are kept.

Offline, ``download`` fails with one line that says to pass ``--prompts PATH`` to a local copy; the
loaders accept such a copy (a file or the folder ``download`` writes).
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from fusedit.config import ConfigError

BENCHMARKS = ("geneval", "dpg")

# Upstream locations; ``{ref}`` is a branch, tag or commit. Module constants so that tests can point them at
# local ``file://`` copies instead of the network.
GENEVAL_URLS = {
    "evaluation_metadata.jsonl": (
        "https://raw.githubusercontent.com/djghosh13/geneval/{ref}/prompts/evaluation_metadata.jsonl"
    ),
    "LICENSE": "https://raw.githubusercontent.com/djghosh13/geneval/{ref}/LICENSE",
}
DPG_ARCHIVE_URL = "https://github.com/TencentQQGYLab/ELLA/archive/{ref}.tar.gz"

GENEVAL_METADATA = "evaluation_metadata.jsonl"
DPG_CSV = "dpg_bench.csv"
DPG_PROMPTS = "prompts"


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


def _is_complete(name: str, dest: Path) -> bool:
    if name == "geneval":
        return (dest / GENEVAL_METADATA).is_file()
    return (dest / DPG_CSV).is_file() and any((dest / DPG_PROMPTS).glob("*.txt"))


def download(
    name: str,
    dest: str | Path,
    *,
    ref: str = "main",
    force: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download benchmark ``name`` ("geneval" or "dpg") into the folder ``dest`` and return ``dest``.

    GenEval gives ``dest/evaluation_metadata.jsonl`` (+ LICENSE); DPG-Bench gives ``dest/prompts/*.txt``,
    ``dest/dpg_bench.csv`` (+ LICENSE). A complete existing copy is kept unless ``force``. Files are
    gathered in a temporary folder and moved into place at the end, so an interrupted download never
    leaves a half-written copy that would later pass for a complete one.
    """
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
    dest = Path(dest)
    if not force and _is_complete(name, dest):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp_name:
        tmp = Path(tmp_name)
        if name == "geneval":
            _download_geneval(tmp, ref, timeout)
        else:
            _download_dpg(tmp, ref, timeout, progress)
        for item in tmp.iterdir():
            target = dest / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    return dest


def _download_geneval(tmp: Path, ref: str, timeout: float) -> None:
    for filename, template in GENEVAL_URLS.items():
        url = template.format(ref=ref)
        with _fetch(url, "GenEval", timeout) as response:
            try:
                data = response.read()
            except (TimeoutError, ConnectionError) as e:  # the connection can also drop mid-file
                raise BenchmarkError(
                    f"downloading GenEval from {url} broke off ({e}); retry, or pass --prompts PATH to a "
                    f"local copy"
                ) from None
        (tmp / filename).write_bytes(data)
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


def _existing(path: str | Path, what: str, bench: str) -> Path:
    """``path`` when it exists; otherwise a one-line error with the command that fetches ``bench``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist; get a copy with `fusedit benchmarks download {bench}` "
            f"(it writes benchmarks-data/{bench}) or give the path of a local copy"
        )
    return path


def load_geneval(path: str | Path) -> list[dict]:
    """GenEval's prompt metadata, one dict per prompt in file order (the order that numbers the output
    folders). ``path`` is ``evaluation_metadata.jsonl`` or a folder containing it."""
    path = _existing(path, "GenEval metadata", "geneval")
    if path.is_dir():
        path = _existing(path / GENEVAL_METADATA, "GenEval metadata", "geneval")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
            and all(isinstance(c, dict) and "class" in c and "count" in c for c in row["include"])
        ):
            raise BenchmarkError(
                f"{path}:{number} is not a GenEval prompt; expected keys tag, prompt and include "
                f"(a list of {{class, count}}), got {line[:80]!r}"
            )
        rows.append(row)
    if not rows:
        raise BenchmarkError(f"{path} holds no prompts; expected GenEval's evaluation_metadata.jsonl")
    return rows


def name_order(stem: str) -> tuple:
    # DPG-Bench names its prompts 0..1064: sort those numerically, anything else after them by name.
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def load_dpg(path: str | Path) -> list[tuple[str, str]]:
    """DPG-Bench prompts as (name, prompt) pairs, name = the file stem (the key of the question CSV and
    of the grid image). ``path`` is a folder of ``*.txt`` files or a folder with a ``prompts/`` one."""
    path = _existing(path, "DPG-Bench prompts folder", "dpg")
    if not path.is_dir():
        raise BenchmarkError(f"DPG-Bench prompts {str(path)!r} is a file; expected a folder of *.txt files")
    if not any(path.glob("*.txt")) and (path / DPG_PROMPTS).is_dir():
        path = path / DPG_PROMPTS
    files = sorted(path.glob("*.txt"), key=lambda p: name_order(p.stem))
    if not files:
        raise BenchmarkError(f"no *.txt prompt files in {str(path)!r}; expected DPG-Bench's prompts folder")
    return [(f.stem, f.read_text(encoding="utf-8").strip()) for f in files]


def dpg_csv_path(path: str | Path) -> Path:
    """The DPG-Bench question file: ``path`` itself, or ``dpg_bench.csv`` in the folder ``path`` or in its
    parent (so the prompts folder of a downloaded copy also finds its CSV)."""
    path = _existing(path, "DPG-Bench question file", "dpg")
    if path.is_file():
        return path
    for candidate in (path / DPG_CSV, path.parent / DPG_CSV):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {DPG_CSV} in {str(path)!r} or its parent; get DPG-Bench with `fusedit benchmarks download dpg` "
        f"(it ships the CSV) or copy ELLA's dpg_bench/{DPG_CSV} into {str(path)!r}"
    )

"""docs/python-api.md runs as written: its Python blocks in order, in one namespace (like a notebook's cells),
in an empty working folder, and every ``fusedit.x.y`` it names, in prose too, exists."""

from __future__ import annotations

import builtins
import importlib
import logging
import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
# A dotted name under fusedit: a module, then attributes (fusedit.sampling.generation.generate,
# fusedit.system.TextToImage).
NAME = re.compile(r"\bfusedit(?:\.[A-Za-z_]\w*)+")
# A bare name in the prose that reads as the library's: a class (`TextConfig`) or a call (`checked(cfg)`).
BARE = re.compile(r"`([A-Z]\w*[a-z]\w*)`|`([A-Za-z_]\w*)\(")


def _blocks() -> list[tuple[int, str]]:
    """(line of the block's first code line, its code) of each ```python block, in order."""
    text = GUIDE.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def _resolves(name: str) -> bool:
    """Whether ``name`` is a module, or an attribute chain on the longest importable module prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as e:
            if e.name is not None and not e.name.startswith("fusedit"):
                raise  # a dependency this machine lacks (diffusers, ...), not a name the guide got wrong
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_python_block_of_the_guide_runs_in_order(tmp_path, monkeypatch, caplog):
    """Each block runs as a notebook cell after the ones above it (its asserts are the values the prose
    promises), from an empty folder, and none logs a warning: the guide's settings are the clean ones."""
    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    assert len(blocks) >= 10, "the guide's ```python blocks were not found"
    namespace: dict = {"__name__": "python_api_guide"}
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        for line, code in blocks:
            # Padded to its place in the file: a failure's traceback names the guide's own line.
            exec(compile("\n" * (line - 1) + code, str(GUIDE), "exec"), namespace)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval",
        "my-config.yaml",
        "photos",
        "runs",
        "samples",
    ]


def test_every_fusedit_name_the_guide_mentions_exists():
    """Dotted names anywhere; bare class and function names of the prose in a module the guide names (or
    Python's builtins), as the prose may say `checked(cfg)` after a block imported it."""
    text = GUIDE.read_text()
    names = sorted(set(NAME.findall(text)))
    assert len(names) >= 20, names
    assert [n for n in names if not _resolves(n)] == []
    modules = [builtins]
    for name in names:
        parts = name.split(".")
        for cut in range(1, len(parts) + 1):
            try:
                modules.append(importlib.import_module(".".join(parts[:cut])))
            except ModuleNotFoundError:
                break
    bare = sorted({a or b for a, b in BARE.findall(BLOCK.sub("", text))})
    assert len(bare) >= 10, bare
    assert [n for n in bare if not any(hasattr(m, n) for m in modules)] == []


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("fusedit.sampling.generation.generate", True),
        ("fusedit.system.TextToImage.encode_prompts", True),
        ("fusedit.train.loop", True),
        ("fusedit.sampling.generation.generat", False),
        ("fusedit.nothing.here", False),
        ("fusedit.train.train", False),
    ],
)
def test_the_name_check_tells_missing_names(name, found):
    assert _resolves(name) is found

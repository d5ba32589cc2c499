"""Imports point one way (CLI -> train/sample/eval -> models -> layers): outside the training package and
the CLI, no module imports ``fusedit.train``, at the top or inside a function, but for the exceptions
below. Reading a checkpoint (sampling, export, evaluation, the diffusers pipeline) goes through
``fusedit.checkpoints``. At the bottom, ``fusedit.layers`` imports only torch, ``transformers.activations``,
the standard library and itself, and the config package nothing of fusedit; nothing but ``__main__.py``
imports the CLI, whose modules import one way too. Every module imports only from its own tier of fusedit's
docstring and those before it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fusedit
from conftest import tiny_config

SRC = Path(fusedit.__file__).parent
SKIPPED = {"train", "cli", "__main__.py"}  # the training package itself, and the CLI package above it all

# (file under src/fusedit, module of fusedit.train) pairs that are allowed, each with its reason.
EXCEPTIONS = {
    # These train: the demo trains a tiny run before it samples, and a study trains each design it compares.
    ("demo.py", "fusedit.train.loop"),
    # The demo refuses to train over a run (fusedit.train.run_folder.refuse_a_run), worded for its options.
    ("demo.py", "fusedit.train.run_folder"),
    ("study/run.py", "fusedit.train.loop"),
    # A study costs a design's training as `fusedit describe` does (each stage's parts and FLOPs), and
    # refuses to run as several torchrun processes (which train() would join).
    ("study/run.py", "fusedit.train.stages"),
    ("study/run.py", "fusedit.train.distributed"),
    # The benchmark times a training step as `fusedit train` takes it: the loop's step functions, the run's
    # optimizers and trained parts, and its EMA.
    ("bench.py", "fusedit.train.loop"),
    ("bench.py", "fusedit.train.stages"),
    ("bench.py", "fusedit.train.ema"),
}


def _imported_modules(tree: ast.Module, package: str):
    """(line, module) for every import in ``tree``, top-level or nested; ``from A import b`` gives A.b
    when A is a package that b may be a module of (``from fusedit.train import loop``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if base in ("fusedit", "fusedit.train") else base


def _is_train(module: str) -> bool:
    return module == "fusedit.train" or module.startswith("fusedit.train.")


def test_only_the_cli_and_the_training_package_import_fusedit_train():
    offending, used = [], set()
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] in SKIPPED:
            continue
        package = ".".join(["fusedit", *rel.parts[:-1]])
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)), package):
            if not _is_train(module):
                continue
            if (rel.as_posix(), module) in EXCEPTIONS:
                used.add((rel.as_posix(), module))
            else:
                offending.append(f"src/fusedit/{rel.as_posix()}:{line} imports {module}")
    assert not offending, "imports of fusedit.train outside train/ and the CLI:\n" + "\n".join(offending)
    assert used == EXCEPTIONS, f"exceptions no longer needed (remove them): {sorted(EXCEPTIONS - used)}"


# Loads a run's model both ways (EMA; raw weights with the stage's LoRA adapters rebuilt and merged) and
# prints the fusedit.train modules that got imported on the way.
_LOAD_AND_LIST = """
import sys
from fusedit.checkpoints import load_model
for use_ema in (True, False):
    model, cfg, ckpt = load_model(sys.argv[1], use_ema=use_ema)
    assert cfg.sample.use_ema is use_ema, (use_ema, cfg.sample.use_ema)
print(sorted(m for m in sys.modules if m == "fusedit.train" or m.startswith("fusedit.train.")))
"""


@pytest.mark.parametrize("train_cfg", [{}, {"dit_lora": {"rank": 2}}], ids=["plain", "dit-lora"])
def test_loading_a_trained_model_imports_nothing_of_fusedit_train(tmp_path, train_cfg):
    """What the import walk above checks statically, at run time: reading a checkpoint (sampling, export,
    evaluation, the diffusers pipeline) never reaches the training package, not even to rebuild and merge
    the LoRA adapters of the stage that wrote it (fusedit.adapters does that). A fresh interpreter, so
    that nothing this test process imported counts."""
    if train_cfg:
        pytest.importorskip("peft")
    from fusedit.train.loop import train

    run = tmp_path / "run"
    train(tiny_config(train={"steps": 2, "checkpoint_every": 2, **train_cfg}), run, progress=False)
    r = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_LIST, str(run)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == "[]", f"loading a model imported {r.stdout.splitlines()[-1]}"


# What fusedit.layers may import besides the standard library (each with its submodules).
LAYERS_MAY_IMPORT = ("torch", "transformers.activations", "fusedit.layers")


def test_layers_import_only_torch_and_each_other():
    """Layers are building blocks with explicit arguments: they never read the config schema (the models
    package picks their variants from it, ``fusedit.models.base``) nor any other fusedit package."""
    offending = []
    for path in sorted((SRC / "layers").rglob("*.py")):
        rel = path.relative_to(SRC)
        package = ".".join(["fusedit", *rel.parts[:-1]])
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)), package):
            allowed = any(module == m or module.startswith(m + ".") for m in LAYERS_MAY_IMPORT)
            if not allowed and module.split(".")[0] not in sys.stdlib_module_names:
                offending.append(f"src/fusedit/{rel.as_posix()}:{line} imports {module}")
    assert not offending, "fusedit.layers imports beyond torch and itself:\n" + "\n".join(offending)


def _is_cli(module: str) -> bool:
    return module == "fusedit.cli" or module.startswith("fusedit.cli.")


def test_nothing_in_the_package_imports_the_cli():
    """The CLI is the top of the package: its subcommands unpack flags and call the library, so nothing below
    may import it (what `fusedit sample`, `serve` and `eval` share, such as loading a model to sample with,
    lives in ``fusedit.sampling.source``). Only ``python -m fusedit`` (__main__.py) runs it."""
    offending, main_imports_it = [], False
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "cli":  # the CLI's own modules: test_the_cli_modules_import_one_way
            continue
        package = ".".join(["fusedit", *rel.parts[:-1]])
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)), package):
            if not _is_cli(module):
                continue
            if rel.as_posix() == "__main__.py":
                main_imports_it = True
            else:
                offending.append(f"src/fusedit/{rel.as_posix()}:{line} imports {module}")
    assert not offending, "imports of fusedit.cli inside the package (only __main__.py may):\n" + "\n".join(
        offending
    )
    assert main_imports_it, "__main__.py no longer imports fusedit.cli: update this test"


# The CLI's subcommand modules, each with its subcommands' parsers; cli/common.py holds what they share.
CLI_SUBCOMMAND_MODULES = ("train", "sample", "eval", "bench", "runs", "describe")


def test_the_cli_modules_import_one_way():
    """Inside the CLI package too: ``fusedit.cli`` (main, the parser) imports the subcommand modules, each
    of which imports only ``fusedit.cli.common``, which imports none of them: no module of it imports
    one above it, so there is no cycle."""
    paths = sorted((SRC / "cli").glob("*.py"))
    assert {p.stem for p in paths} == {"__init__", "common", *CLI_SUBCOMMAND_MODULES}
    modules = {f"fusedit.cli.{p.stem}" for p in paths if p.stem != "__init__"}
    allowed = {"__init__": modules, "common": set()}
    offending, from_init = [], set()
    for path in paths:
        rel = path.relative_to(SRC)
        may = allowed.get(path.stem, {"fusedit.cli.common"})
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)), "fusedit.cli"):
            if not _is_cli(module):
                continue
            if module not in may:
                offending.append(f"src/fusedit/{rel.as_posix()}:{line} imports {module}")
            elif path.stem == "__init__":
                from_init.add(module)
    assert not offending, "imports inside the CLI package that point up or sideways:\n" + "\n".join(offending)
    # The walk sees them: the parser is built from every subcommand module (common holds no subcommand).
    assert from_init == modules - {"fusedit.cli.common"}


@pytest.mark.parametrize("name", ["generation", "source", "folder"])
def test_sample_does_not_import_the_cli(name):
    """``fusedit.sampling.generation`` (generate), ``fusedit.sampling.source`` (load_sampling_model) and
    ``fusedit.sampling.folder`` (write_sample_folder) hold the library side of `fusedit sample`: usable from
    Python without the CLI."""
    path = SRC / "sampling" / f"{name}.py"
    imported = [m for _, m in _imported_modules(ast.parse(path.read_text(), str(path)), "fusedit.sampling")]
    # The walk sees their imports: the last two import fusedit.checkpoints (a model, its fingerprint).
    assert name == "generation" or "fusedit.checkpoints" in imported
    assert not [m for m in imported if _is_cli(m)], f"fusedit.sampling.{name} imports fusedit.cli"


def test_evaluation_imports_neither_training_nor_studies():
    """train, sample and eval are peers under the CLI: scoring images never trains. A design study trains
    and evaluates, so it sits above both (``fusedit.study``) and eval imports neither it nor the training
    package, at the top or inside a function."""
    paths = sorted((SRC / "eval").rglob("*.py"))
    assert "shapes_bench.py" in [p.name for p in paths]
    offending = []
    for path in paths:
        rel = path.relative_to(SRC)
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)), "fusedit.eval"):
            if _is_train(module) or module == "fusedit.study" or module.startswith("fusedit.study."):
                offending.append(f"src/fusedit/{rel.as_posix()}:{line} imports {module}")
    assert not offending, "evaluation imports training or a study:\n" + "\n".join(offending)


# The config package's modules, bottom first: each may import only those before it (imports point one way).
CONFIG_ORDER = ("schema", "paths", "validate", "load")


def test_the_config_schema_imports_nothing_of_fusedit():
    """The config is the bottom layer every package reads: it checks what it can itself (the shapes
    world's kinds are its table, ``config.SHAPES_KINDS``), so no import of it points upward. Each file of
    the config package may import the package itself, never another fusedit package; inside it, a module
    imports only those below it in CONFIG_ORDER."""
    paths = sorted((SRC / "config").rglob("*.py"))
    assert {p.stem for p in paths} == {"__init__", *CONFIG_ORDER}
    offending = []
    for path in paths:
        rel = path.relative_to(SRC)
        imported = list(_imported_modules(ast.parse(path.read_text(), str(path)), "fusedit.config"))
        if path.stem in ("schema", "load"):
            assert "yaml" in [m for _, m in imported]  # the walk sees their imports
        below = CONFIG_ORDER[: CONFIG_ORDER.index(path.stem)] if path.stem in CONFIG_ORDER else CONFIG_ORDER
        allowed = {f"fusedit.config.{m}" for m in below}
        offending += [
            f"src/fusedit/{rel.as_posix()}:{line} imports {m}"
            for line, m in imported
            if m.split(".")[0] == "fusedit" and m not in allowed
        ]
    assert not offending, "imports of the config package that point up or out:\n" + "\n".join(offending)


def _tiers() -> dict[str, int]:
    """Each top-level module or package of fusedit -> its tier, as fusedit's docstring lists them (the
    ``name`` of every module named on a numbered line or its continuation)."""
    import re

    tiers, tier = {}, None
    for line in fusedit.__doc__.splitlines():
        numbered = re.match(r"(\d)\. ", line)
        if numbered:
            tier = int(numbered.group(1))
        elif not line.startswith("   "):
            tier = None
        for name in re.findall(r"``(\w+)``", line) if tier else ():
            if (SRC / f"{name}.py").is_file() or (SRC / name).is_dir():
                tiers[name] = tier
    return tiers


def test_every_module_imports_only_from_its_tier_and_those_before_it():
    """fusedit's docstring sorts the modules into four tiers; an import, top-level or inside a function,
    from a later tier (a model module reaching for sampling, sampling for an app) would be a cycle waiting
    to happen, and every module is in a tier."""
    tiers = _tiers()
    modules = {p.stem for p in SRC.glob("*.py") if not p.name.startswith("_")}
    modules |= {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert modules - tiers.keys() == set(), "modules in no tier of fusedit's docstring"
    offending = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = rel.parts[0].removesuffix(".py")
        if own in ("__init__", "__main__"):
            continue
        package = ".".join(["fusedit", *rel.parts[:-1]])
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)), package):
            parts = module.split(".")
            if parts[0] != "fusedit" or len(parts) < 2 or parts[1] == own:
                continue
            if tiers.get(parts[1], 0) > tiers[own]:
                offending.append(f"src/fusedit/{rel.as_posix()}:{line} (tier {tiers[own]}) imports {module}")
    assert not offending, "imports from a later tier:\n" + "\n".join(offending)

"""fusedit.hub and fusedit.pipeline import each other in one direction only: pipeline -> hub."""

import ast
import importlib
import inspect

from fusedit import hub, pipeline


def imported_modules(module) -> set[str]:
    """Every fusedit module ``module`` imports anywhere in its source, function bodies included."""
    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("fusedit")}


def test_hub_never_imports_the_pipeline():
    assert "fusedit.hub" in imported_modules(pipeline)
    assert not any(n.startswith("fusedit.pipeline") for n in imported_modules(hub))
    # the folder-level helpers moved with the pipeline they build
    for name in ("save_pretrained", "from_pretrained", "export_run"):
        assert callable(getattr(importlib.import_module("fusedit.pipeline"), name))
        assert not hasattr(hub, name)

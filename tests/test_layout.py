"""The package's layout is its architecture: each module imports only from its own floor or below."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

import learnloop

SRC = Path(learnloop.__file__).parent

# Floors, bottom up (README "How it is built"). `data` stands beside the floors: it imports
# only itself and floor 0 (`learnloop.figure`, for show_batch's figure).
FLOORS: dict[str, int] = {
    "learnloop.events": 0,
    "learnloop.errors": 0,
    "learnloop.dist": 0,
    "learnloop.state": 0,
    "learnloop.rng": 0,
    "learnloop.signals": 0,
    "learnloop.preempt": 0,
    "learnloop.midepoch": 0,
    "learnloop.fsdp": 0,
    "learnloop.atomic": 0,
    "learnloop.tensors": 0,
    "learnloop.types": 0,
    "learnloop.models": 0,
    "learnloop.notebook": 0,
    "learnloop.figure": 0,
    "learnloop.callbacks.core": 1,
    "learnloop.dispatch": 1,
    "learnloop.checkpoint_checks": 1,
    "learnloop.checkpoint": 1,
    "learnloop.sharded": 1,
    "learnloop.runs": 1,
    "learnloop.trial": 1,
    "learnloop.callbacks": 2,  # the package and every other callback module
    "learnloop.learner": 3,
    "learnloop.long_runs": 3,
    "learnloop.batches": 3,
    "learnloop.inference": 3,
    "learnloop.cli": 4,
    "learnloop": 4,
}


def floor(module: str) -> int | str:
    """The floor of `module` ('data' for the data package)."""
    if module == "learnloop.data" or module.startswith("learnloop.data."):
        return "data"
    while module not in FLOORS:
        module = module.rpartition(".")[0]
    return FLOORS[module]


def modules() -> list[str]:
    return ["learnloop"] + [
        m.name for m in pkgutil.walk_packages(learnloop.__path__, "learnloop.")
    ]


def source(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    path = SRC / rel
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def runtime_imports(module: str) -> set[str]:
    """The learnloop modules `module` imports when it runs (imports under TYPE_CHECKING excluded)."""
    path = source(module)
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            name = f"{base}.{node.module}" if node.level else node.module
            if node.level and not node.module:
                name = base
            names = [name] + [f"{name}.{a.name}" for a in node.names]
            found |= {n for n in names if n in modules()}
            if name.startswith("learnloop"):
                found.add(name)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("learnloop")}
    return found - {module}


@pytest.mark.parametrize("module", modules())
def test_no_upward_import(module):
    """A module imports only from its own floor or below; data imports only data and floor 0."""
    mine = floor(module)
    for imported in runtime_imports(module):
        theirs = floor(imported)
        if mine == "data":
            assert theirs in ("data", 0), f"{module} (data) imports {imported}"
        elif theirs != "data":
            assert theirs <= mine, (
                f"{module} (floor {mine}) imports {imported} (floor {theirs})"
            )


def test_floors_cover_every_module():
    """Every module is placed on a floor by name, so a new one cannot slip in as 'top'."""
    for module in modules():
        if floor(module) == "data" or module == "learnloop":
            continue
        placed = module
        while placed not in FLOORS:
            placed = placed.rpartition(".")[0]
        assert placed != "learnloop", f"{module} has no floor in FLOORS"


def test_import_checker_sees_imports():
    """The checker finds relative imports, so the layout test can fail."""
    assert "learnloop.dist" in runtime_imports("learnloop.checkpoint")
    assert "learnloop.callbacks.core" in runtime_imports("learnloop.dispatch")
    assert "learnloop.learner" not in runtime_imports(
        "learnloop.state"
    )  # TYPE_CHECKING only

"""The package's __all__ matches its public names, and every module declares __all__."""

from __future__ import annotations

import importlib
import pkgutil

import learnloop


def test_all_matches_public_names():
    """Every public name of learnloop is in __all__, and every name in __all__ exists."""
    public = {n for n in vars(learnloop) if not n.startswith("_")}
    modules = {n for n, v in vars(learnloop).items() if type(v).__name__ == "module"}
    assert set(learnloop.__all__) == public - modules
    assert len(learnloop.__all__) == len(set(learnloop.__all__))


def test_every_module_declares_all():
    """Each module of the package has an __all__ whose names it defines."""
    for info in pkgutil.walk_packages(learnloop.__path__, "learnloop."):
        module = importlib.import_module(info.name)
        assert hasattr(module, "__all__"), f"{info.name} has no __all__"
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name}"


def test_public_objects_documented():
    """Every exported object has a docstring."""
    for name in learnloop.__all__:
        obj = getattr(learnloop, name)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"learnloop.{name} has no docstring"

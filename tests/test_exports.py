"""The package's __all__ matches its public names, and every module declares __all__."""

from __future__ import annotations

import importlib
import pkgutil

import learnloop
from learnloop import Callback, callbacks


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


def _builtin_callback_classes() -> dict[str, type]:
    """Every public Callback subclass defined in a module of learnloop.callbacks."""
    found = {}
    for info in pkgutil.walk_packages(callbacks.__path__, "learnloop.callbacks."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, Callback)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[name] = obj
    return found


def test_every_callback_exported():
    """learnloop.callbacks and learnloop export every built-in callback."""
    classes = _builtin_callback_classes()
    assert len(classes) >= 20
    for name, cls in classes.items():
        assert getattr(callbacks, name, None) is cls and name in callbacks.__all__
        assert getattr(learnloop, name, None) is cls and name in learnloop.__all__


def test_module_all_lists_no_private_helpers():
    """A module's __all__ names no underscore helper."""
    for info in pkgutil.walk_packages(learnloop.__path__, "learnloop."):
        module = importlib.import_module(info.name)
        assert not [n for n in module.__all__ if n.startswith("_")], info.name

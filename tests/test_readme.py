"""Every ```python block of the README runs, in order, in one namespace; its tables match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from learnloop import EVENTS
from learnloop.events import EVENT_CONTEXT

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """The quickstart and every other python example run as written."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    blocks = python_blocks()
    assert blocks
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)  # noqa: S102 - the point
        except Exception as e:  # noqa: BLE001 - report which block failed
            pytest.fail(
                f"README python block {i} failed: {type(e).__name__}: {e}\n{block}"
            )


def test_quickstart_trains(tmp_path, monkeypatch):
    """The quickstart reaches a useful accuracy on the embedded digits."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    exec(python_blocks()[0], namespace)  # noqa: S102 - runs the README quickstart
    assert namespace["learn"].epoch_log["accuracy"] > 0.9


def test_readme_lists_every_event():
    """The README's event table names every event, with its context keys."""
    text = README.read_text()
    rows = [
        line
        for line in text.splitlines()
        if line.startswith(("| `before_", "| `after_"))
    ]
    for event in EVENTS:
        row = next((r for r in rows if f"`{event}`" in r), None)
        assert row is not None, f"{event} missing from the README's event table"
        for key in EVENT_CONTEXT[event]:
            assert f"`{key}`" in row, (
                f"{event}'s context key {key} missing from its README row"
            )


def test_reliability_table_names_real_tests():
    """Every test the README cites as a guarantee's proof exists (file, class and function)."""
    text = README.read_text()
    section = text.split("<!-- SECTION: reliability -->")[1].split("<!-- SECTION:")[0]
    cited = re.findall(r"`((?:tests|benchmarks)/[\w/]+\.py)((?:::\w+)*)`", section)
    assert len(cited) >= 10
    root = README.parent
    for path, names in cited:
        source = (root / path).read_text()
        for name in filter(None, names.split("::")):
            assert re.search(rf"^\s*(class|def) {name}\b", source, re.MULTILINE), (
                f"README cites {path}::{name}, which does not exist"
            )

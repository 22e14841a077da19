"""benchmarks/memory.py: a short run prints its table and exits 0 under its limit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


def test_short_run(monkeypatch, capsys):
    """A 600-step run reports RSS and tracemalloc growth per step, and exits 0 under its limit."""
    module = load_script(SCRIPT, "memory_benchmark")
    argv = ["memory.py", "--steps", "600", "--warmup", "64", "--limit", "1e9"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[-1]) for r in rows] == [("RSS", "ok"), ("tracemalloc", "ok")]

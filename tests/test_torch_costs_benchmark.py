"""benchmarks/torch_costs.py: a short run prints one positive timing for each piece."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_costs.py"


def test_short_run(monkeypatch, capsys):
    """Each piece (torch's, ours, tqdm's) gets a line with a positive time in µs a call."""
    module = load_script(SCRIPT, "torch_costs_benchmark")
    monkeypatch.setattr(
        sys, "argv", ["torch_costs.py", "--number", "5", "--repeat", "1"]
    )
    module.main()
    lines = capsys.readouterr().out.splitlines()[2:]
    owners = [line.split(":")[0] for line in lines]
    assert owners == ["torch", "torch", "torch", "ours", "ours", "ours", "tqdm"]
    assert all(float(line[48:59]) > 0 for line in lines)

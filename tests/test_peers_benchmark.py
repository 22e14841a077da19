"""benchmarks/peers.py: a tiny run gives learnloop's row a ratio and reports a missing peer as skipped."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
WORKLOAD = "linear-784-10-bs64"


def test_tiny_run(capsys):
    """One process per framework, one round on 5 batches, with this interpreter (the project's venv)."""
    argv = ["--rounds", "1", "--repeats", "1", "--batches", "5", "--only", WORKLOAD]
    results = load_script(SCRIPT, "peers_benchmark").main(argv)
    out = capsys.readouterr().out.splitlines()

    row = results["learnloop"]["workloads"][WORKLOAD]
    assert row["ratio"] > 0 and row["hand_s"] > 0 and row["framework_s"] > 0, row
    assert results["learnloop"]["python"] == sys.executable
    assert "learnloop" in results["learnloop"]["versions"]
    table_row = next(line for line in out if line.startswith(WORKLOAD))
    assert f"{row['ratio']:.3f}" in table_row
    for name, module in (("fastai", "fastai"), ("Lightning", "lightning")):
        if importlib.util.find_spec(module) is None:
            assert results[name]["skipped"].startswith(
                "skipped (not installed: pip install"
            )
            assert f"{name}: skipped (not installed: pip install" in "\n".join(out)
        else:
            assert results[name]["workloads"][WORKLOAD]["ratio"] > 0
    missing = sum("skipped" in results[name] for name in ("fastai", "Lightning"))
    assert table_row.split().count("skipped") == missing

"""benchmarks/checkpoint.py: a tiny run prints both tables and returns positive timings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoint.py"
COLUMNS = [
    "model",
    "params",
    "file MB",
    "save ms",
    "MB/s",
    "torch.save ms",
    "ratio",
    "resume ms",
    "bare load ms",
    "ratio",
]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("checkpoint_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run(tmp_path, capsys):
    """A tiny model, one repeat: one row per table, every timing positive, no file left behind."""
    argv = ["--sizes", "tiny", "--repeats", "1", "--batches", "40", "--at", "30"]
    rows = load_benchmark().main([*argv, "--dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    header = out[1]
    assert [c for c in COLUMNS if c in header] == COLUMNS
    assert out[2].split()[0] == "tiny" and len(out[2].split()) == len(COLUMNS)
    assert out[-1].split()[0] == "tiny" and len(out[-1].split()) == 8
    assert [r["model"] for r in rows] == ["tiny"]
    numbers = {k: v for k, v in rows[0].items() if k != "model"}
    assert numbers and all(v > 0 for v in numbers.values()), numbers
    assert f"on {tmp_path}" not in out[0] and str(tmp_path) in out[0]
    assert list(tmp_path.iterdir()) == []

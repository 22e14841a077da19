"""benchmarks/checkpoint.py: a tiny run prints its tables and returns positive timings."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import load_script

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
    return load_script(SCRIPT, "checkpoint_benchmark")


def test_tiny_run(tmp_path, capsys):
    """A tiny model, one repeat: a row per table (medians, fastest, parts), all positive, no file left."""
    argv = ["--sizes", "tiny", "--repeats", "1", "--batches", "40", "--at", "30"]
    rows = load_benchmark().main([*argv, "--dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", out[1].strip()) == COLUMNS
    for medians_then_fastest in (out[2], out[5]):
        assert medians_then_fastest.split()[0] == "tiny"
        assert len(medians_then_fastest.split()) == len(COLUMNS)
    assert out[-1].split()[0] == "tiny" and len(out[-1].split()) == 8
    assert [r["model"] for r in rows] == ["tiny"]
    numbers = {k: v for k, v in rows[0].items() if k != "model"}
    assert numbers and all(v > 0 for v in numbers.values()), numbers
    assert str(tmp_path) in out[0]
    assert list(tmp_path.iterdir()) == []

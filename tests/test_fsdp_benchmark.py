"""benchmarks/fsdp_memory.py: a tiny run under torchrun shows FSDP halving what each process holds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fsdp_memory.py"
COLUMNS = [
    "run",
    "procs",
    "params MB",
    "grads MB",
    "optim MB",
    "total MB",
    "ratio",
    "RSS MB",
    "peak RSS MB",
    "s/step",
]


def load_benchmark():
    return load_script(SCRIPT, "fsdp_memory_benchmark")


def test_tiny_run():
    """200k parameters at 1 and 2 processes: the table's rows, and FSDP's total per process halves.

    One subprocess of the driver, which makes two torchrun launches (about 5 s each); the DDP row
    is left out (`--no-ddp`) to save a third.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    argv = ["--params", "200000", "--worlds", "1", "2", "--steps", "2", "--no-ddp"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert "16 blocks of width 112" in out[0]
    params = int(re.search(r"parameters: ([\d,]+)", out[1]).group(1).replace(",", ""))
    assert 190_000 < params < 220_000
    assert re.split(r"\s{2,}", out[2].strip()) == COLUMNS
    rows = {(r[0], int(r[1])): r for r in (line.split() for line in out[3:])}
    assert list(rows) == [("fsdp", 1), ("fsdp", 2)]
    one, two = rows.values()
    assert [one[-1], two[-1]] == ["ok", "ok"]
    # One process holds every float32 parameter, its gradient and AdamW's two moments.
    assert float(one[2]) == float(one[3]) == round(params * 4 / 1e6, 1)
    assert abs(float(one[4]) - 2 * float(one[2])) <= 0.1
    assert float(one[6]) == 1.0
    # FSDP: half of everything per process, within 10% (the ratio is to the 1-process total).
    assert abs(float(two[6]) - 0.5) <= 0.05, two
    for r in (one, two):
        assert float(r[7]) > 0 and float(r[8]) >= float(r[7])


def test_off_total_fails(capsys):
    """A 2-process total far from half of the 1-process one is flagged OFF and makes the exit status 1."""
    module = load_benchmark()

    def fake(strategy: str, world: int, total: int) -> dict:
        return {
            "strategy": strategy,
            "world": world,
            "params": total // 4,
            "grads": total // 4,
            "optimizer": total // 2,
            "total": total,
            "rss": 1,
            "peak_rss": 1,
            "step_s": 0.1,
            "n_params": 10,
        }

    whole = 4_000_000
    assert (
        module.report([fake("fsdp", 1, whole), fake("fsdp", 2, whole // 2)], 0.1) == 0
    )
    assert (
        module.report([fake("fsdp", 1, whole), fake("fsdp", 2, whole * 6 // 10)], 0.1)
        == 1
    )
    assert module.report([fake("fsdp", 1, whole), fake("ddp", 2, whole)], 0.1) == 0
    flags = [line.split()[-1] for line in capsys.readouterr().out.splitlines()[3::4]]
    assert flags == ["ok", "OFF", "-"]

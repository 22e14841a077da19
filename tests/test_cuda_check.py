"""benchmarks/cuda_check.py: without CUDA it says so and exits 0 (the CUDA checks themselves need a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_check.py"


def test_without_cuda_exits_zero(monkeypatch, capsys):
    """On a machine without CUDA the script prints that CUDA is unavailable and returns 0."""
    module = load_script(SCRIPT, "cuda_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["cuda_check.py"])
    assert module.main() == 0
    assert "CUDA is not available" in capsys.readouterr().out

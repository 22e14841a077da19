"""`import learnloop` costs about what `import torch` costs: the heavy optional parts load on first use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Imported on first use only: the data path, the plots, the notebook bars.
LAZY = ("datasets", "matplotlib", "pandas", "pyarrow", "IPython", "tqdm.notebook")


def imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_learnloop_loads_no_data_plot_or_notebook_library():
    loaded = imported_by("import learnloop")
    assert "learnloop.learner" in loaded  # the check sees what the import did
    assert not [m for m in LAZY if m in loaded]


def test_the_lazy_parts_load_when_used():
    loaded = imported_by(
        "import learnloop\nfrom learnloop.figure import new_figure\nfrom learnloop.data.quiet import import_datasets\nimport_datasets()"
    )
    assert {"matplotlib", "datasets"} <= loaded


def test_the_startup_benchmark_compares_with_torch():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "startup.py"
    out = subprocess.run(
        [sys.executable, str(script), "--rounds", "1", "--also", "no_such_module_xyz"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "no_such_module_xyz: skipped (not installed)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert float(rows["torch"][1]) == 1.0
    assert float(rows["learnloop"][0]) > 0

"""Startup: seconds to `import learnloop` against `import torch`, each in a fresh interpreter.

    python benchmarks/startup.py              # 15 rounds
    python benchmarks/startup.py --rounds 31 --also fastai lightning

Each round starts one fresh interpreter per import, in alternating order, and times the import
inside it (`time.perf_counter` around the statement, so interpreter start-up is not counted);
we report the medians. A module given with `--also` that is not installed is reported as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys

CODE = (
    "import time; t = time.perf_counter(); import {0}; print(time.perf_counter() - t)"
)


def import_seconds(module: str) -> float:
    """Seconds a fresh interpreter takes to import `module`."""
    out = subprocess.run(
        [sys.executable, "-c", CODE.format(module)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--also", nargs="*", default=[], help="other modules to time")
    args = parser.parse_args()
    modules = ["torch", "learnloop"]
    for name in args.also:
        if importlib.util.find_spec(name) is None:
            print(f"{name}: skipped (not installed)")
        else:
            modules.append(name)
    times: dict[str, list[float]] = {m: [] for m in modules}
    for i in range(args.rounds):
        for module in modules if i % 2 == 0 else modules[::-1]:
            times[module].append(import_seconds(module))
    torch_s = statistics.median(times["torch"])
    print(f"{'import':<12} {'median (s)':>10} {'vs torch':>9}   ({args.rounds} rounds)")
    for module, ts in times.items():
        median = statistics.median(ts)
        print(f"{module:<12} {median:>10.3f} {median / torch_s:>9.2f}")


if __name__ == "__main__":
    main()

"""Peers: learnloop's Learner, fastai's Learner and Lightning's Trainer, each against a hand-written loop.

    python benchmarks/peers.py --rounds 9                        # every framework this Python has
    python benchmarks/peers.py --python ~/peers-venv/bin/python
    python benchmarks/peers.py --fastai-python /other/venv/bin/python --only linear-784-10-bs64

The workloads, data and hand-written loop are benchmarks/overhead.py's (imported from it): one epoch
of training and validation on pre-batched Fashion-MNIST-shaped synthetic tensors, torch's SGD at lr
0.01, one torch thread, the epoch's mean train and valid loss kept by every loop. Each framework runs
in a process of its own, alternating round by round with the hand-written loop on the same module
and the same torch optimizer (which goes first alternates too). The parent starts those processes
round-robin over the frameworks (`--repeats` times, the order rotating), so a slow spell on a
shared machine falls on all of them. Each round pairs a framework epoch with the hand-written
epoch next to it; the table gives the median of those paired ratios over all rounds of all
processes, the range of the per-process medians, and the median time added per batch (train and
valid batches together).

How each framework is set up, with what it does by default left on:
- learnloop: `Learner(model, DataLoaders(train, valid), lr=0.01)` with its default callbacks,
  the bars forced on and written to a null stream (as in overhead.py); `learn.fit(1)` per epoch.
- fastai: `Learner(DataLoaders(train, valid), model, loss_func=F.cross_entropy,
  opt_func=partial(OptimWrapper, opt=torch.optim.SGD), lr=0.01)`, ProgressCallback removed and
  the logger a no-op (bars and the printed table off); `learn.fit(1)` per epoch.
- Lightning: a LightningModule whose steps `self.log` the loss per epoch, a
  `Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
  enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)` made once;
  each epoch raises `fit_loop.max_epochs` by one and calls `trainer.fit` again (so the Trainer's
  construction is not counted; its fit set-up is, as learnloop's and fastai's are).
Every framework reads the same plain iterable of (x, y) batches (not a list: Lightning reads a
list as several loaders).

A framework missing from the interpreter that runs it is reported as skipped, not as an error.
Neither fastai nor Lightning is a learnloop dependency; to measure them, in a venv of their own
(torch first, so pip takes the CPU build):

    python3 -m venv ~/peers-venv
    ~/peers-venv/bin/pip install torch==2.13.0
    ~/peers-venv/bin/pip install lightning -e .
    # fastai declares torchvision, whose PyPI build does not load beside torch 2.13.0+cpu; its
    # Learner does not import it, so fastai goes in without its declared dependencies:
    ~/peers-venv/bin/pip install fastai --no-deps
    ~/peers-venv/bin/pip install fastcore fasttransform fastprogress fastdownload \\
        "plum-dispatch<2.10" cloudpickle pandas scipy scikit-learn matplotlib pyyaml pillow requests
    python benchmarks/peers.py --python ~/peers-venv/bin/python --rounds 9

The children import this checkout's learnloop (its src/ goes first on PYTHONPATH), whatever the
interpreter has installed. The parent imports no torch: it only starts the children.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
MARK = "PEERS-RESULT "  # the line of a child's stdout that carries its JSON result

# name: (module the child imports, what to install where it is missing)
FRAMEWORKS = {
    "learnloop": ("learnloop", "pip install -e ."),
    "fastai": ("fastai", "pip install fastai --no-deps; see benchmarks/peers.py"),
    "Lightning": ("lightning", "pip install lightning"),
}
# The workloads of benchmarks/overhead.py, by the names it gives them.
WORKLOAD_NAMES = ("linear-784-10-bs64", "mlp-784-50-10-bs256", "cnn-bs256")


# ----- child: one framework, alternating with the hand-written loop ---------------------------------


class Epoch:
    """One epoch's pre-batched (x, y) tuples as a plain iterable with a length."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _learnloop(model, train: Epoch, valid: Epoch, null) -> tuple[Any, Any]:
    from learnloop import DataLoaders, Learner, ProgressCB

    learn = Learner(
        model, DataLoaders(train, valid), lr=0.01, cbs=[ProgressCB(file=null, bar=True)]
    )
    learn.fit(1)  # warm-up; creates learn.opt
    return lambda: learn.fit(1), learn.opt


def _fastai(model, train: Epoch, valid: Epoch, null) -> tuple[Any, Any]:
    from functools import partial

    import torch
    import torch.nn.functional as F
    from fastai.basics import DataLoaders, Learner, OptimWrapper, noop
    from fastai.callback.progress import ProgressCallback

    learn = Learner(
        DataLoaders(train, valid),
        model,
        loss_func=F.cross_entropy,
        opt_func=partial(OptimWrapper, opt=torch.optim.SGD),
        lr=0.01,
    )
    learn.remove_cb(ProgressCallback)  # no bars
    learn.logger = noop  # no table of epoch values printed
    learn.fit(1)  # warm-up; creates learn.opt
    return lambda: learn.fit(1), learn.opt.opt


def _lightning(model, train: Epoch, valid: Epoch, null) -> tuple[Any, Any]:
    import logging

    import lightning as L
    import torch
    import torch.nn.functional as F

    # Its "GPU available: ..." and "max_epochs reached" lines, every fit.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    class Module(L.LightningModule):
        def __init__(self, model, opt) -> None:
            super().__init__()
            self.model, self.opt = model, opt

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log(
                "train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y)
            )
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("valid_loss", F.cross_entropy(self.model(x), y), batch_size=len(y))

        def configure_optimizers(self):
            return self.opt

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    module = Module(model, opt)
    trainer = L.Trainer(
        max_epochs=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )

    def fit() -> None:
        trainer.fit_loop.max_epochs = trainer.current_epoch + 1
        trainer.fit(module, train_dataloaders=train, val_dataloaders=valid)

    fit()  # warm-up
    return fit, opt


RUNNERS = {"learnloop": _learnloop, "fastai": _fastai, "Lightning": _lightning}


def child(
    framework: str, workloads: list[str], rounds: int, n_batches: int, threads: int
) -> dict:
    """Time `framework` against the hand-written loop on each workload, in this process."""
    module = FRAMEWORKS[framework][0]
    if (
        importlib.util.find_spec(module) is None
    ):  # before torch: a missing framework costs nothing
        return {"missing": f"not installed: {FRAMEWORKS[framework][1]}"}
    import warnings

    import torch
    from overhead import WORKLOADS, batches, hand_epoch

    import learnloop

    warnings.filterwarnings(
        "ignore"
    )  # Lightning's advice on loaders and workers, once per fit
    torch.set_num_threads(threads)
    results = {}
    with open(os.devnull, "w") as null:
        for name in workloads:
            factory, bs, shape, share = WORKLOADS[name][:4]
            n = max(5, int(n_batches * share))
            train, valid = (
                batches(n, bs, shape, 0),
                batches(max(1, n // 5), bs, shape, 1),
            )
            torch.manual_seed(0)
            model = factory()
            fit, opt = RUNNERS[framework](model, Epoch(train), Epoch(valid), null)
            hand_epoch(model, opt, train, valid)  # warm-up
            # The same module and torch optimizer in both loops; which goes first alternates.
            times: dict[str, list[float]] = {"hand": [], "framework": []}
            for i in range(rounds):
                for which in (
                    ("hand", "framework") if i % 2 == 0 else ("framework", "hand")
                ):
                    t = time.perf_counter()
                    if which == "hand":
                        hand_epoch(model, opt, train, valid)
                    else:
                        fit()
                    times[which].append(time.perf_counter() - t)
            results[name] = {**times, "batches": len(train) + len(valid)}
    if framework == "learnloop":
        version = f"{learnloop.__version__} ({Path(learnloop.__file__).parent})"
    else:
        version = importlib.import_module(module).__version__
    versions = {
        framework: version,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    return {
        "workloads": results,
        "versions": versions,
        "threads": torch.get_num_threads(),
    }


# ----- parent: the children, round-robin, and the table ---------------------------------------------


def run_child(python: str, framework: str, args: argparse.Namespace) -> dict:
    """Run one child process with `python`; its result, or a RuntimeError with its stderr."""
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--child",
        framework,
        "--rounds",
        str(args.rounds),
        "--batches",
        str(args.batches),
        "--threads",
        str(args.threads),
        *(["--only", args.only] if args.only else []),
    ]
    path = os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), *([path] if path else [])]),
    }
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{framework} run failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(MARK) :])


def summarize(runs: list[dict]) -> dict:
    """Per workload, over every round of every process: the median of the round's ratio (the
    framework's epoch over the hand-written loop's epoch next to it, in the same process) and of
    the time it added per batch; the range of the per-process medians of that ratio; and the
    median epoch times."""
    out = {}
    for name in runs[0]["workloads"]:
        ratios, added, per_process, hands, fws = [], [], [], [], []
        for run in runs:
            w = run["workloads"][name]
            pairs = list(zip(w["framework"], w["hand"]))
            ratios += [fw / hand for fw, hand in pairs]
            added += [(fw - hand) / w["batches"] * 1e6 for fw, hand in pairs]
            per_process.append(statistics.median(fw / hand for fw, hand in pairs))
            hands += w["hand"]
            fws += w["framework"]
        out[name] = {
            "ratio": statistics.median(ratios),
            "ratio_min": min(per_process),
            "ratio_max": max(per_process),
            "added_us": statistics.median(added),
            "hand_s": statistics.median(hands),
            "framework_s": statistics.median(fws),
        }
    return out


def measure(args: argparse.Namespace) -> dict[str, dict]:
    """{framework: {"skipped": why} or {"workloads": summary, "versions": ..., "python": ...}}."""
    pythons = {
        "learnloop": args.learnloop_python or args.python,
        "fastai": args.fastai_python or args.python,
        "Lightning": args.lightning_python or args.python,
    }
    names = list(FRAMEWORKS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    skipped: dict[str, str] = {}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in skipped:
                continue
            t = time.perf_counter()
            result = run_child(pythons[name], name, args)
            if "missing" in result:
                skipped[name] = f"skipped ({result['missing']})"
                print(f"[peers] {name}: {skipped[name]}", file=sys.stderr, flush=True)
                continue
            if result["threads"] != args.threads:
                raise RuntimeError(
                    f"{name} left torch on {result['threads']} threads, not {args.threads}."
                )
            runs[name].append(result)
            print(
                f"[peers] repeat {r + 1}/{args.repeats}: {name} ({time.perf_counter() - t:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return {
        name: {"skipped": skipped[name], "python": pythons[name]}
        if name in skipped
        else {
            "workloads": summarize(runs[name]),
            "versions": runs[name][-1]["versions"],
            "python": pythons[name],
        }
        for name in names
    }


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    """The workload x framework table of ratios (range) and added microseconds per batch."""
    names = list(FRAMEWORKS)
    workloads = [args.only] if args.only else list(WORKLOAD_NAMES)
    setup = (
        f"{os.cpu_count()} CPU core(s), {args.threads} torch thread(s); each process: "
        f"{args.rounds} rounds alternating with the hand-written loop, {args.repeats} processes "
        f"per framework, round-robin; {args.batches} train + {args.batches // 5} valid batches "
        "(CNN: a tenth)"
    )
    legend = (
        "ratio = framework epoch / the hand-written epoch next to it, median over all rounds "
        "[range of the per-process medians]; +µs = median time added per batch"
    )
    lines = [
        setup,
        legend,
        f"{'workload':<22}" + "".join(f"{name:>30}" for name in names),
    ]
    for w in workloads:
        cells = []
        for name in names:
            res = results[name]
            if "skipped" in res:
                cells.append("skipped")
                continue
            s = res["workloads"][w]
            cell = f"{s['ratio']:.3f} [{s['ratio_min']:.2f}-{s['ratio_max']:.2f}] {s['added_us']:+.0f} µs"
            cells.append(cell)
        lines.append(f"{w:<22}" + "".join(f"{c:>30}" for c in cells))
    for name in names:
        res = results[name]
        if "skipped" in res:
            lines.append(f"{name}: {res['skipped']} ({res['python']})")
        else:
            v = ", ".join(f"{k} {val}" for k, val in res["versions"].items())
            lines.append(f"{name}: {v}; {res['python']}")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds per process")
    parser.add_argument(
        "--repeats", type=int, default=3, help="processes per framework"
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=200,
        help="training batches per epoch (CNN: a tenth)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=WORKLOAD_NAMES, help="run one workload")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter of every child"
    )
    for name in FRAMEWORKS:
        parser.add_argument(
            f"--{name.lower()}-python", help=f"interpreter of {name}'s children"
        )
    parser.add_argument("--child", choices=list(FRAMEWORKS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse(argv)
    if args.child:
        workloads = [args.only] if args.only else list(WORKLOAD_NAMES)
        result = child(args.child, workloads, args.rounds, args.batches, args.threads)
        print(MARK + json.dumps(result), flush=True)
        return result
    results = measure(args)
    print(table(results, args))
    return results


if __name__ == "__main__":
    main()

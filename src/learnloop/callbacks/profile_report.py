"""`ProfileReport`: what `ProfileCB` measured, as a table, a stacked bar, and the one line to act on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PhaseProfile", "ProfileReport"]

# The step's parts that are not a callback's hook, in the order a step runs them.
LOADER = "loader wait"
HOST_TO_DEVICE = "host-to-device (DeviceCB)"
FORWARD = "forward"
LOSS = "loss"
BACKWARD = "backward"
STEP = "optimizer step"
ZERO_GRAD = "zero_grad"
LOOP = "learnloop (events, loop)"
PIECES = (LOADER, HOST_TO_DEVICE, FORWARD, LOSS, BACKWARD, STEP, ZERO_GRAD)
# What to do when a part is the largest that can be acted on.
_LIGHTER = (
    "look at what it does per batch (a host sync such as .item(), float() or .cpu() costs "
    "the most) and do such work once per epoch."
)
_PIN = (
    "pass pin_memory=True to the DataLoader, so the non_blocking copy overlaps compute."
)
_FUSED = "try a foreach or fused optimizer, e.g. opt_func=partial(torch.optim.AdamW, fused=True)."
_LARGER_BATCH = (
    "the model's work is tiny; a larger batch spreads the loop over more samples."
)
_PHASE_NAMES = {"train": "training", "valid": "validation"}
# Below this loader wait per batch, worker processes cost more than they save (moving a batch
# between processes takes about 0.1 to 1 ms).
_WORKER_WORTH_US = 1000.0


@dataclass
class PhaseProfile:
    """One phase's average step: `step_us` measured, `parts_us` (part -> µs) adding up to it."""

    name: str  # "train" or "valid"
    n_batches: int  # batches counted
    warmup: int  # batches run first and not counted
    step_us: float
    samples: float  # mean rows per batch
    parts_us: dict[str, float]
    marks: float = 0.0  # events marked per step (the profiler's own cost)
    timed_hooks: float = 0.0  # hooks timed per step

    @property
    def samples_per_s(self) -> float:
        """Rows per second at the measured step time."""
        return self.samples / self.step_us * 1e6 if self.step_us > 0 else 0.0

    def share(self, part: str) -> float:
        """`part`'s share of the measured step (0 when absent)."""
        return self.parts_us.get(part, 0.0) / self.step_us if self.step_us > 0 else 0.0

    def callbacks(self) -> dict[str, float]:
        """The callbacks' hooks (`Callback.event` -> µs), the device move excluded."""
        return {
            p: us for p, us in self.parts_us.items() if p not in PIECES and p != LOOP
        }

    def ordered(self) -> list[tuple[str, float]]:
        """The parts in the order a step runs them, the callbacks' hooks after the step's pieces."""
        hooks = sorted(self.callbacks().items(), key=lambda kv: -kv[1])
        pieces = [(p, self.parts_us[p]) for p in PIECES if p in self.parts_us]
        loop = [(LOOP, self.parts_us[LOOP])] if LOOP in self.parts_us else []
        return pieces + hooks + loop


@dataclass
class ProfileReport:
    """Per phase ('train', 'valid'), where a step's time goes; prints as a table, `.plot()` draws it.

    `advice` is the one line to act on, read from the training phase (validation if there was
    none). `profiler_us` estimates, per phase, what the profiler's own marks added to each step
    (it is inside the parts, mostly in the learnloop row).
    """

    phases: dict[str, PhaseProfile]
    device: str = "cpu"
    synced: bool = False  # each part boundary waited for the device (CUDA, MPS)
    profiler_us: dict[str, float] = field(default_factory=dict)
    num_workers: int | None = None  # the training loader's, when it has them
    skipped: list[str] = field(default_factory=list)  # callbacks detached for the run

    @property
    def train(self) -> PhaseProfile | None:
        """The training phase's profile (None if no training batch ran)."""
        return self.phases.get("train")

    @property
    def valid(self) -> PhaseProfile | None:
        """The validation phase's profile (None if no validation batch ran)."""
        return self.phases.get("valid")

    @property
    def advice(self) -> str:
        """The one line a user needs: the largest part that can be acted on, and how."""
        phase = self.train or self.valid
        assert phase is not None  # a report has a phase
        step = f"each {_PHASE_NAMES[phase.name]} step"
        loader = phase.share(LOADER)
        if loader >= 0.3:  # whatever else there is: the model waits for the data
            fix = self._loader_fix(phase.parts_us[LOADER])
            return f"the loader takes {loader:.0%} of {step}: {fix}"
        own = phase.parts_us.get(LOOP, 0.0) - self.profiler_us.get(phase.name, 0.0)
        # (share, the least share worth a word, who, what to do): the largest one counts.
        candidates = [
            (
                loader,
                0.15,
                "the loader",
                self._loader_fix(phase.parts_us.get(LOADER, 0.0)),
            ),
            *(
                (us / phase.step_us, 0.1, part, _LIGHTER)
                for part, us in phase.callbacks().items()
            ),
            (
                phase.share(HOST_TO_DEVICE),
                0.15,
                "moving each batch to the device",
                _PIN,
            ),
            (phase.share(STEP), 0.25, "the optimizer step", _FUSED),
            (own / phase.step_us, 0.15, "learnloop's own loop", _LARGER_BATCH),
        ]
        acted = [
            (share, who, fix) for share, least, who, fix in candidates if share >= least
        ]
        if acted:
            share, who, fix = max(acted, key=lambda c: c[0])
            return f"{who} takes {share:.0%} of {step}: {fix}"
        model = sum(phase.share(p) for p in (FORWARD, LOSS, BACKWARD))
        pieces = (
            "forward, loss and backward"
            if phase.name == "train"
            else "forward and loss"
        )
        return (
            f"the model's {pieces} take {model:.0%} of {step}: the loop "
            "and the data keep up; to go faster make the model's work cheaper (a larger batch, "
            "MixedPrecisionCB on a GPU, CompileCB)."
        )

    def _loader_fix(self, wait_us: float) -> str:
        """What to do about a loader that waits `wait_us` a step."""
        batched = (
            "fetch whole batches at once (DataLoaders.from_dd(dd, bs, batched=True), or "
            "index in-memory tensors by batch)"
        )
        if wait_us < _WORKER_WORTH_US:
            # Handing a batch between processes costs about this much: workers do not help.
            if self.num_workers:
                return (
                    f"at {wait_us:,.0f} µs a batch, its {self.num_workers} worker processes "
                    f"cost more than they save: try num_workers=0, {batched}, or use a larger "
                    "batch."
                )
            return (
                f"{batched}, or use a larger batch; at {wait_us:,.0f} µs a batch, worker "
                "processes would cost more than they save."
            )
        if not self.num_workers:
            return f"{batched}, or load in worker processes (DataLoader(..., num_workers=4))."
        return (
            f"its {self.num_workers} workers don't keep up: {batched}, make each item's "
            "transform cheaper, or raise num_workers."
        )

    def table(self) -> str:
        """The report as text: one table per phase, then the advice."""
        lines = [self._title()]
        for phase in self.phases.values():
            lines += ["", *self._phase_lines(phase)]
        return "\n".join([*lines, "", self.advice])

    def _title(self) -> str:
        runs = ", ".join(
            f"{p.n_batches} {_PHASE_NAMES[p.name]} {_plural(p.n_batches, 'batch')}"
            for p in self.phases.values()
        )
        title = f"Profile of {runs} on {self.device}"
        skipped = [
            f"the first {p.warmup} {_PHASE_NAMES[p.name]} {_plural(p.warmup, 'batch')}"
            for p in self.phases.values()
            if p.warmup
        ]
        if skipped:
            title += f" ({' and '.join(skipped)} not counted)"
        if self.synced:
            title += f"; each part waited for the {self.device} device (profiled batches only)"
        if self.skipped:
            title += f"; not run: {', '.join(self.skipped)}"
        return title + "."

    def _phase_lines(self, phase: PhaseProfile) -> list[str]:
        width = max(28, *(len(p) for p in phase.parts_us))
        lines = [
            (
                f"{_PHASE_NAMES[phase.name]} step: {phase.step_us:,.1f} µs, "
                f"{phase.samples_per_s:,.0f} samples/s ({_batch(phase.samples)})"
            ),
            f"  {'part':<{width}} {'µs/step':>10} {'share':>7}",
        ]
        rows = sorted(phase.parts_us.items(), key=lambda kv: -kv[1])
        lines += [
            f"  {part:<{width}} {us:>10,.1f} {us / phase.step_us:>7.1%}"
            for part, us in rows
        ]
        total = sum(phase.parts_us.values())
        lines.append(
            f"  {'sum of parts':<{width}} {total:>10,.1f} {total / phase.step_us:>7.1%}"
        )
        own = self.profiler_us.get(phase.name)
        if own:
            lines.append(
                f"  (profiling itself adds about {own:,.1f} µs a step, included above)"
            )
        return lines

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return self.table()

    def plot(self, figsize: tuple[float, float] = (9, 3.5)) -> Figure:
        """A stacked bar per phase: µs per step, one segment per part, in the order a step runs them."""
        from ..figure import new_figure

        fig = new_figure(figsize=figsize)
        ax = fig.add_subplot()
        phases = list(self.phases.values())
        parts: list[str] = []
        for phase in phases:
            parts += [p for p, _ in phase.ordered() if p not in parts]
        colors = _colors(len(parts))
        labels = [f"{_PHASE_NAMES[p.name]}\n{p.step_us:,.0f} µs" for p in phases]
        # Where each part's segment starts in each phase's bar: the parts before it, summed.
        starts = [_starts(p.ordered()) for p in phases]
        for part, color in zip(parts, colors):
            left = [s.get(part, 0.0) for s in starts]
            widths = [p.parts_us.get(part, 0.0) for p in phases]
            bars = ax.barh(labels, widths, left=left, color=color, label=part)
            for bar, phase, us in zip(bars, phases, widths):
                if us / phase.step_us >= 0.08:
                    ax.text(
                        bar.get_x() + us / 2,
                        bar.get_y() + bar.get_height() / 2,
                        f"{us / phase.step_us:.0%}",
                        ha="center",
                        va="center",
                        fontsize=8,
                    )
        ax.invert_yaxis()
        ax.set_xlabel("µs per step")
        ax.set_title("Where each step's time goes")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        fig.tight_layout()
        return fig


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{word}es" if word.endswith("ch") else f"{word}s"


def _batch(samples: float) -> str:
    """'batch 64', or the mean when the batches differ (a last, smaller one)."""
    if samples == int(samples):
        return f"batch {int(samples)}"
    return f"batch {samples:.1f} on average"


def _starts(ordered: list[tuple[str, float]]) -> dict[str, float]:
    """Each part's start on a bar that stacks `ordered` (part, µs) from 0."""
    starts, total = {}, 0.0
    for part, us in ordered:
        starts[part], total = total, total + us
    return starts


def _colors(n: int) -> list[tuple[float, ...]]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]

"""Mid-epoch checkpoints: a fit stopped inside an epoch and resumed ends bit for bit as if never stopped.

Each exactness test runs the same fit three times from the same seed: uninterrupted (A), stopped
by a `Stop` raised at a batch boundary after a step checkpoint (B), and resumed from B's `last.pt` by a new
learner built with another seed (C). A and C must hold the same weights, optimizer state, metric
rows, recorded losses and learning rates, and CSV rows, and C must run only the batches B had
not done.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import make_data
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from learnloop import (
    BatchSchedCB,
    Callback,
    CheckpointCB,
    CSVLoggerCB,
    DataLoaders,
    DeviceCB,
    GradAccumCB,
    Learner,
    MetricsCB,
    MixedPrecisionCB,
    Recorder,
)
from learnloop.callbacks import tracking
from learnloop.callbacks.core import ORDERS
from learnloop.checkpoint import read_checkpoint

N_TRAIN, BS = 150, 16  # 10 training batches an epoch, the last one of 6 rows
N_BATCHES = math.ceil(N_TRAIN / BS)


class Stop(Exception):
    """Stands for a crash."""


class StopAt(Callback):
    """Raises `Stop` after batch `at` = (epoch, iter) of training (or of validation), once the
    step checkpoint of that batch is written; `save` writes `last.pt` first, as a preemption would."""

    order = ORDERS["CheckpointCB"] + 1

    def __init__(
        self, at: tuple[int, int], training: bool = True, save: bool = False
    ) -> None:
        self.at, self.training, self.save = at, training, save

    def after_batch(self, learn, *args, **kwargs):
        if learn.training != self.training or (learn.epoch, learn.iter) != self.at:
            return
        if self.save:
            next(cb for cb in learn.cbs if isinstance(cb, CheckpointCB)).save_last(
                learn
            )
        raise Stop(f"stopped after batch {self.at}")


class Batches(Callback):
    """Records (epoch, iter) of every training and every validation batch that ran."""

    def __init__(self) -> None:
        self.train: list[tuple[int, int]] = []
        self.valid: list[tuple[int, int]] = []

    def after_batch(self, learn, *args, **kwargs):
        (self.train if learn.training else self.valid).append((learn.epoch, learn.iter))


class Pixels(nn.Module):
    """A dropout classifier of 8x8 uint8 images (as the batched path yields them)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.body(x.float().flatten(1) / 255)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def tabular(
    n: int = N_TRAIN, bs: int = BS, generator: bool = False, **dl_kw
) -> Callable[[int], tuple[nn.Module, DataLoaders]]:
    """A builder of a dropout MLP and shuffled loaders over `make_data(n)`; `dl_kw` go to the training DataLoader."""

    def build(seed: int) -> tuple[nn.Module, DataLoaders]:
        gen = torch.Generator().manual_seed(seed + 1) if generator else None
        train = DataLoader(make_data(n), bs, shuffle=True, generator=gen, **dl_kw)
        return mlp(), DataLoaders(train, DataLoader(make_data(48, seed=1), 32))

    return build


class Counting(Dataset):
    """`make_data(n)` as a map-style dataset that records the index of every item fetched."""

    def __init__(self, n: int) -> None:
        self.data = make_data(n)
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.fetched.append(int(i))
        return self.data[i]


class Rows(IterableDataset):
    """`make_data(n)` as an iterable dataset (sized): a loader over it cannot be skipped into."""

    def __init__(self, n: int) -> None:
        self.data = make_data(n)

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        return iter(self.data)


def make(
    build: Callable[[int], tuple[nn.Module, DataLoaders]],
    seed: int = 0,
    cbs: Callable[[], list[Callback]] = list,
) -> Learner:
    """A learner from `build(seed)` after `torch.manual_seed(seed)`, with Adam, metrics, a Recorder and `cbs()`."""
    torch.manual_seed(seed)
    model, dls = build(seed)
    return Learner(
        model,
        dls,
        lr=1e-2,
        opt_func=torch.optim.Adam,
        default_cbs=False,
        cbs=[DeviceCB("cpu"), MetricsCB(), Recorder(), Batches(), *cbs()],
    )


def fit(learn: Learner, n: int, cbs: list[Callback], resume: Path | None) -> None:
    learn.fit(n, cbs=cbs, resume=resume)


def fit_one_cycle(learn: Learner, n: int, cbs: list[Callback], resume: Path | None):
    learn.fit_one_cycle(n, lr_max=0.05, cbs=cbs, resume=resume)


@dataclass
class Runs:
    """The uninterrupted learner, the resumed one, the checkpoint B stopped at, and the folder."""

    full: Learner
    resumed: Learner
    ck: dict[str, Any]
    tmp: Path


def run_three(
    tmp: Path,
    build: Callable[[int], tuple[nn.Module, DataLoaders]],
    stop: StopAt,
    n_epochs: int = 3,
    every_steps: int | None = 4,
    cbs: Callable[[], list[Callback]] = list,
    fitter: Callable[..., None] = fit,
) -> Runs:
    """Fit uninterrupted into A; fit into B until `stop`; resume B with a learner of another seed."""

    def fit_cbs(name: str) -> list[Callback]:
        return [
            CheckpointCB(tmp / name, every_steps=every_steps),
            CSVLoggerCB(tmp / f"{name}.csv"),
        ]

    full = make(build, cbs=cbs)
    fitter(full, n_epochs, fit_cbs("a"), None)
    stopped = make(build, cbs=cbs)
    with pytest.raises(Stop):
        fitter(stopped, n_epochs, [*fit_cbs("b"), stop], None)
    ck = read_checkpoint(tmp / "b")
    resumed = make(build, seed=123, cbs=cbs)
    fitter(resumed, n_epochs, fit_cbs("b"), tmp / "b")
    return Runs(full, resumed, ck, tmp)


def assert_equal(a: Any, b: Any, where: str = "") -> None:
    """`a` and `b` are equal, their tensors bit for bit (nested dicts, lists and tuples)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def metrics(learn: Learner) -> MetricsCB:
    return next(cb for cb in learn.cbs if isinstance(cb, MetricsCB))


def batches(learn: Learner) -> Batches:
    return next(cb for cb in learn.cbs if isinstance(cb, Batches))


def untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return untimed(list(csv.DictReader(f)))


def assert_same_run(runs: Runs, n_epochs: int = 3) -> None:
    """The resumed learner ends as the uninterrupted one did, and ran only the batches B had not done."""
    full, resumed = runs.full, runs.resumed
    assert_equal(full.model.state_dict(), resumed.model.state_dict(), "model")
    assert_equal(full.opt.state_dict(), resumed.opt.state_dict(), "optimizer")
    history = untimed(metrics(full).history)
    assert [r["epoch"] for r in history] == list(range(n_epochs))
    assert_equal(history, untimed(metrics(resumed).history), "history")
    assert full.recorder.losses == resumed.recorder.losses
    assert full.recorder.lrs == resumed.recorder.lrs
    assert full.recorder.valid_losses == resumed.recorder.valid_losses
    assert csv_rows(runs.tmp / "a.csv") == csv_rows(runs.tmp / "b.csv")
    position = runs.ck["position"]
    done = position["epoch"] * N_BATCHES + position["batches"]
    ran = batches(resumed).train
    assert len(ran) == n_epochs * N_BATCHES - done
    if position["phase"] == "train" and position["batches"] < N_BATCHES:
        assert ran[0] == (position["epoch"], position["batches"])


def where(ck: dict[str, Any]) -> tuple[int, str, int]:
    p = ck["position"]
    return p["epoch"], p["phase"], p["batches"]


class TestExactResume:
    @pytest.mark.parametrize(
        ("stop", "expected"),
        [
            ((0, 5), (0, "train", 4)),
            ((1, 6), (1, "train", 6)),
            ((1, 9), (1, "train", N_BATCHES)),
        ],
        ids=["epoch-0", "epoch-1", "last-batch"],
    )
    def test_shuffled_loader_with_dropout(self, tmp_path, stop, expected):
        """A shuffled loader and dropout, stopped inside epoch 0, inside epoch 1, or after an epoch's last batch."""
        runs = run_three(tmp_path, tabular(), StopAt(stop))
        assert where(runs.ck) == expected
        assert_same_run(runs)

    def test_loader_with_its_own_generator(self, tmp_path):
        """A loader shuffling with `generator=torch.Generator()` continues its order."""
        runs = run_three(tmp_path, tabular(generator=True), StopAt((1, 5)))
        assert where(runs.ck) == (1, "train", 6)
        assert_same_run(runs)

    @pytest.mark.parametrize(
        "dl_kw",
        [{"num_workers": 2}, {"num_workers": 2, "persistent_workers": True}],
        ids=["workers", "persistent-workers"],
    )
    @pytest.mark.parametrize("stop", [(0, 3), (1, 5)], ids=["epoch-0", "epoch-1"])
    def test_worker_processes(self, tmp_path, dl_kw, stop):
        """Loaders with worker processes (persistent or not) continue their order."""
        runs = run_three(tmp_path, tabular(**dl_kw), StopAt(stop))
        assert runs.ck["position"]["batches"] == stop[1] + 1
        assert_same_run(runs)

    def test_batched_hugging_face_loader(self, tmp_path):
        """`DataLoaders.from_dd(dd, bs, batched=True)` (a BatchSampler as sampler) continues its order."""
        datasets = pytest.importorskip("datasets")
        features = datasets.Features(
            {
                "image": datasets.Array2D((8, 8), "uint8"),
                "label": datasets.ClassLabel(names=["a", "b", "c"]),
            }
        )

        def split(n: int, seed: int):
            g = torch.Generator().manual_seed(seed)
            images = torch.randint(0, 255, (n, 8, 8), generator=g, dtype=torch.uint8)
            return datasets.Dataset.from_dict(
                {"image": images.numpy(), "label": [i % 3 for i in range(n)]},
                features=features,
            )

        dd = datasets.DatasetDict(train=split(N_TRAIN, 0), test=split(40, 1))

        def build(seed: int) -> tuple[nn.Module, DataLoaders]:
            return Pixels(), DataLoaders.from_dd(dd, BS, batched=True)

        runs = run_three(tmp_path, build, StopAt((1, 5)))
        assert where(runs.ck) == (1, "train", 6)
        assert_same_run(runs)

    @pytest.mark.parametrize(
        ("fitter", "cbs"),
        [
            (fit_one_cycle, list),
            (
                fit,
                lambda: [
                    BatchSchedCB(
                        partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=12)
                    )
                ],
            ),
        ],
        ids=["fit_one_cycle", "cosine-per-batch"],
    )
    def test_per_batch_schedules(self, tmp_path, fitter, cbs):
        """A learning rate scheduled per batch continues from the batch the checkpoint was written at."""
        runs = run_three(tmp_path, tabular(), StopAt((1, 5)), cbs=cbs, fitter=fitter)
        assert where(runs.ck) == (1, "train", 6)
        assert len(set(runs.full.recorder.lrs)) > N_BATCHES  # the rate did move
        assert_same_run(runs)

    @pytest.mark.parametrize(
        ("stop", "k"), [((0, 3), 4), ((1, 1), 2)], ids=["epoch-0", "epoch-1"]
    )
    def test_gradient_accumulation_mid_group(self, tmp_path, stop, k):
        """GradAccumCB(3) stopped inside a group: its accumulated gradients are saved and go on."""
        runs = run_three(
            tmp_path, tabular(), StopAt(stop), cbs=lambda: [GradAccumCB(3)]
        )
        assert runs.ck["position"]["batches"] == k and k % 3 != 0
        assert runs.ck["grads"], "the group's gradients were not saved"
        assert_same_run(runs)

    def test_bfloat16_autocast(self, tmp_path):
        """MixedPrecisionCB(torch.bfloat16) on CPU resumes bit for bit."""
        runs = run_three(
            tmp_path,
            tabular(),
            StopAt((1, 5)),
            cbs=lambda: [MixedPrecisionCB(torch.bfloat16)],
        )
        assert_same_run(runs)

    def test_checkpoint_during_validation_reruns_it(self, tmp_path):
        """`save_last` during validation: the resumed fit reruns that validation whole, and no training batch of it."""
        runs = run_three(
            tmp_path,
            tabular(),
            StopAt((1, 0), training=False, save=True),
            every_steps=None,
        )
        assert where(runs.ck) == (1, "valid", N_BATCHES)
        seen = batches(runs.resumed)
        assert seen.train[0] == (2, 0)
        assert seen.valid[:2] == [(1, 0), (1, 1)]
        assert_same_run(runs)


def test_resumed_epoch_fetches_only_the_batches_left(tmp_path):
    """The batches done before the checkpoint are skipped in the sampler: none of their items is fetched."""

    class Fetches(Callback):
        """The indices the training dataset fetched in each epoch."""

        def __init__(self) -> None:
            self.by_epoch: dict[int, list[int]] = {}
            self.start = 0

        def before_train(self, learn, *args, **kwargs):
            self.start = len(learn.dls.train.dataset.fetched)

        def after_train(self, learn, *args, **kwargs):
            fetched = learn.dls.train.dataset.fetched[self.start :]
            self.by_epoch[learn.epoch] = fetched

    def build(seed: int) -> tuple[nn.Module, DataLoaders]:
        train = DataLoader(Counting(N_TRAIN), BS, shuffle=True)
        return mlp(), DataLoaders(train, DataLoader(make_data(48, seed=1), 32))

    runs = run_three(tmp_path, build, StopAt((1, 5)), cbs=lambda: [Fetches()])
    k = runs.ck["position"]["batches"]
    assert k == 6
    full = next(cb for cb in runs.full.cbs if isinstance(cb, Fetches)).by_epoch
    resumed = next(cb for cb in runs.resumed.cbs if isinstance(cb, Fetches)).by_epoch
    assert sorted(resumed) == [1, 2]
    skipped = set(full[1][: k * BS])
    assert not skipped & set(resumed[1])
    assert len(resumed[1]) == N_TRAIN - k * BS
    assert resumed[1] == full[1][k * BS :]
    assert resumed[2] == full[2]
    assert_same_run(runs)


def test_start_iter_and_resumed_from(tmp_path):
    """`learn.start_iter` is the checkpoint's batch count in the resumed epoch only; `resumed_from` is the file."""

    class Seen(Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[str, int, int, Path | None]] = []

        def _note(self, event, learn):
            self.rows.append((event, learn.epoch, learn.start_iter, learn.resumed_from))

        def before_fit(self, learn, *args, **kwargs):
            self._note("before_fit", learn)

        def before_epoch(self, learn, *args, **kwargs):
            self._note("before_epoch", learn)

        def before_train(self, learn, *args, **kwargs):
            self._note("before_train", learn)

    build = tabular()
    stopped, fresh = make(build), Seen()
    with pytest.raises(Stop):
        stopped.fit(
            3, cbs=[CheckpointCB(tmp_path, every_steps=4), fresh, StopAt((1, 5))]
        )
    assert {(start, file) for _, _, start, file in fresh.rows} == {(0, None)}
    assert stopped.start_iter == 0 and stopped.resumed_from is None
    seen = Seen()
    learn = make(build, seed=1)
    learn.fit(3, cbs=[CheckpointCB(tmp_path, every_steps=4), seen], resume=tmp_path)
    last = tmp_path / "last.pt"
    assert seen.rows == [
        ("before_fit", 1, 6, last),
        ("before_epoch", 1, 6, last),
        ("before_train", 1, 6, last),
        ("before_epoch", 2, 0, last),
        ("before_train", 2, 0, last),
    ]
    assert learn.start_iter == 0


def test_epoch_level_resume_keeps_the_whole_history(tmp_path):
    """After fit(2) and fit(3, resume=...), MetricsCB and Recorder hold all 3 epochs, as one fit(3) does."""
    full = make(tabular())
    full.fit(3)
    first = make(tabular(), cbs=lambda: [CheckpointCB(tmp_path)])
    first.fit(2)
    assert read_checkpoint(tmp_path).get("position") is None
    resumed = make(tabular(), seed=5, cbs=lambda: [CheckpointCB(tmp_path)])
    resumed.fit(3, resume=tmp_path)
    history = untimed(metrics(resumed).history)
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert history == untimed(metrics(full).history)
    assert resumed.recorder.losses == full.recorder.losses
    assert resumed.recorder.lrs == full.recorder.lrs
    assert len(resumed.recorder.lrs) == 3 * N_BATCHES
    assert resumed.recorder.valid_losses == full.recorder.valid_losses


class TestEveryMinutes:
    def test_timed_write_lands_inside_the_epoch(self, tmp_path, monkeypatch):
        """every_minutes writes last.pt at the first training batch boundary past the interval."""
        clock = SimpleNamespace(now=1000.0)
        monkeypatch.setattr(
            tracking, "time", SimpleNamespace(monotonic=lambda: clock.now)
        )

        class Tick(Callback):
            """Each training batch takes 10 s on the fake clock."""

            order = ORDERS["CheckpointCB"] - 1

            def after_batch(self, learn, *args, **kwargs):
                if learn.training:
                    clock.now += 10.0

        class Look(Callback):
            """Whether last.pt exists after each training batch (and its checkpoint)."""

            order = ORDERS["CheckpointCB"] + 1

            def __init__(self) -> None:
                self.seen: list[bool] = []

            def after_batch(self, learn, *args, **kwargs):
                self.seen.append((tmp_path / "last.pt").exists())

        learn, look = make(tabular()), Look()
        cb = CheckpointCB(tmp_path, every_minutes=0.5)
        with pytest.raises(Stop):
            learn.fit(2, cbs=[cb, Tick(), look, StopAt((0, 4))])
        # 30 s passed after 3 batches; the next write would be due after 6.
        assert look.seen == [False, False, True, True, True]
        assert where(read_checkpoint(tmp_path)) == (0, "train", 3)


class TestRefused:
    @pytest.fixture
    def written(self, tmp_path) -> Path:
        """A folder whose last.pt was written inside epoch 0, after 4 of 10 batches of 16."""
        learn = make(tabular())
        with pytest.raises(Stop):
            learn.fit(3, cbs=[CheckpointCB(tmp_path, every_steps=4), StopAt((0, 3))])
        return tmp_path

    @pytest.mark.parametrize(
        ("loader", "match"),
        [
            (tabular(n=100), "dataset_len 150 then, 100 now"),
            (tabular(bs=10), "batch_size 16 then, 10 now"),
        ],
        ids=["dataset_len", "batch_size"],
    )
    def test_other_training_loader_is_refused(self, written, loader, match):
        """A mid-epoch checkpoint resumed with other training data raises, names the difference, and loads nothing."""
        learn = make(loader, seed=7)
        before = {k: v.clone() for k, v in learn.model.state_dict().items()}
        with pytest.raises(ValueError, match=f"{match}.*Nothing was loaded"):
            learn.fit(3, resume=written)
        assert_equal(before, learn.model.state_dict(), "model")
        assert learn.epochs_done == 0 and learn.resumed_from is None
        assert metrics(learn).history == [] and learn.recorder.losses == []
        assert batches(learn).train == []

    @pytest.mark.parametrize(
        "train",
        [
            lambda: DataLoader(Rows(N_TRAIN), BS),
            lambda: list(DataLoader(make_data(N_TRAIN), BS)),
        ],
        ids=["IterableDataset", "list"],
    )
    def test_unskippable_loader_resumes_at_the_next_epoch(self, tmp_path, train):
        """A training loader that cannot be skipped into: a warning, and the fit goes on at the next epoch."""

        def build(seed: int) -> tuple[nn.Module, DataLoaders]:
            return mlp(), DataLoaders(train(), DataLoader(make_data(48, seed=1), 32))

        with pytest.raises(Stop):
            make(build).fit(
                3, cbs=[CheckpointCB(tmp_path, every_steps=4), StopAt((0, 3))]
            )
        assert where(read_checkpoint(tmp_path)) == (0, "train", 4)
        learn = make(build, seed=7)
        with pytest.warns(UserWarning, match="resumes at the start of epoch 1"):
            learn.fit(3, resume=tmp_path)
        assert batches(learn).train[0] == (1, 0)
        assert [r["epoch"] for r in metrics(learn).history] == [1, 2]
        assert learn.epochs_done == 3

    @pytest.mark.parametrize(
        ("kwargs", "name"),
        [
            ({"every_steps": 0}, "every_steps"),
            ({"every_steps": -3}, "every_steps"),
            ({"every_minutes": -1}, "every_minutes"),
            ({"every_minutes": 0}, "every_minutes"),
            ({"every_minutes": float("nan")}, "every_minutes"),
        ],
        ids=[
            "steps-0",
            "steps-negative",
            "minutes-negative",
            "minutes-0",
            "minutes-nan",
        ],
    )
    def test_bad_intervals_fail_at_construction(self, tmp_path, kwargs, name):
        """A zero, negative or nan interval is refused when the callback is made, naming the argument."""
        with pytest.raises(ValueError, match=f"CheckpointCB {name} must be"):
            CheckpointCB(tmp_path, **kwargs)

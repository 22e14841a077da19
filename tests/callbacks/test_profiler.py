"""Tests for learn.profile / ProfileCB: the parts tile the step, the culprit is named, the learner is kept."""

from __future__ import annotations

import io
import time

import pytest
import torch
from helpers import assert_same, make_data, make_dls, training_loop
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset

from learnloop import (
    ActivationStatsCB,
    Callback,
    CancelBatchException,
    CancelFitException,
    CancelStepException,
    CheckpointCB,
    DataLoaders,
    Learner,
    MixedPrecisionCB,
    PhaseProfile,
    ProfileCB,
    ProfileReport,
    ProgressCB,
    SingleBatchCB,
)
from learnloop.callbacks.profile_report import (
    BACKWARD,
    FORWARD,
    HOST_TO_DEVICE,
    LOADER,
    LOOP,
    LOSS,
    STEP,
    ZERO_GRAD,
)


class SlowForward(nn.Module):
    """A linear layer whose forward also sleeps, so a step takes milliseconds."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.lin, self.seconds = nn.Linear(4, 3), seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.lin(x)


class TimedLoader:
    """Yields `batches` and records when each is handed over: the step, measured outside the loop."""

    def __init__(self, batches):
        self.batches, self.times = batches, []

    def __iter__(self):
        for b in self.batches:
            self.times.append(time.perf_counter())
            yield b

    def __len__(self):
        return len(self.batches)


class SlowItems(Dataset):
    """`make_data` whose items each take `seconds` to fetch."""

    def __init__(self, seconds: float) -> None:
        self.data, self.seconds = make_data(256), seconds

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return self.data[i]


class SlowCB(Callback):
    def after_batch(self, learn, *args, **kwargs):
        time.sleep(0.003)


def batches(n: int, bs: int = 16):
    return list(DataLoader(make_data(n * bs), batch_size=bs))


def test_parts_add_up_to_the_step_measured_outside_the_loop():
    train = TimedLoader(batches(24))
    learn = Learner(SlowForward(0.002), DataLoaders(train, batches(4)), cbs=[SlowCB()])
    report = learn.profile(n_batches=20, warmup=2, valid=False)
    phase = report.train
    assert phase.n_batches == 20 and report.valid is None
    # Counted batches are 2..21: from the hand-over of batch 2 to that of batch 22.
    outside = (train.times[22] - train.times[2]) / 20 * 1e6
    assert phase.step_us == pytest.approx(outside, rel=0.05)
    assert sum(phase.parts_us.values()) == pytest.approx(phase.step_us, rel=0.05)
    # Each sleep lands in its own part (a sleep lasts at least as long as asked), and only there.
    assert (
        phase.parts_us[FORWARD] >= 2000 and phase.parts_us["SlowCB.after_batch"] >= 3000
    )
    rest = (
        phase.step_us - phase.parts_us[FORWARD] - phase.parts_us["SlowCB.after_batch"]
    )
    assert rest < 0.2 * phase.step_us
    assert phase.samples == 16
    assert phase.samples_per_s == pytest.approx(16 / phase.step_us * 1e6)


def test_a_hook_that_cancels_is_counted_once():
    class SlowSkip(Callback):
        def after_pred(self, learn, *args, **kwargs):
            time.sleep(0.003)
            raise CancelBatchException()

    train = TimedLoader(batches(14))
    learn = Learner(nn.Linear(4, 3), DataLoaders(train, batches(2)), cbs=[SlowSkip()])
    phase = learn.profile(n_batches=10, warmup=2, valid=False).train
    outside = (train.times[12] - train.times[2]) / 10 * 1e6
    assert phase.step_us == pytest.approx(outside, rel=0.05)
    assert sum(phase.parts_us.values()) == pytest.approx(phase.step_us, rel=0.05)
    assert phase.share("SlowSkip.after_pred") > 0.8 and BACKWARD not in phase.parts_us


def test_a_fit_stopped_after_one_batch_still_has_its_report():
    profiler = ProfileCB()
    Learner(nn.Linear(4, 3), make_dls()).fit(1, cbs=[profiler, SingleBatchCB()])
    report = profiler.report()
    assert report.train.n_batches == 1 and report.valid is None
    assert "SingleBatchCB.after_batch" in report.train.parts_us


def test_every_piece_of_the_step_has_its_part():
    report = Learner(nn.Linear(4, 3), make_dls(n=640)).profile(n_batches=5)
    train, valid = report.train, report.valid
    for part in (LOADER, HOST_TO_DEVICE, FORWARD, LOSS, BACKWARD, STEP, ZERO_GRAD):
        assert train.parts_us[part] > 0, part
    assert train.parts_us["MetricsCB.after_loss"] > 0
    assert train.parts_us["ProgressCB.after_batch"] > 0
    # Validation has no backward, step or zero_grad; the profiler's own hooks are not listed.
    assert not {BACKWARD, STEP, ZERO_GRAD} & valid.parts_us.keys()
    assert not any(p.startswith("ProfileCB") for p in train.parts_us)
    assert (train.n_batches, valid.n_batches) == (5, 5)


def test_a_slow_dataset_is_the_loaders_share():
    dls = DataLoaders(
        DataLoader(SlowItems(0.0005), batch_size=16), DataLoader(make_data(64), 32)
    )
    report = Learner(nn.Linear(4, 3), dls).profile(n_batches=6, valid=False)
    assert report.train.share(LOADER) > 0.8
    assert report.advice.startswith("the loader takes")
    assert "num_workers=4" in report.advice and "batched=True" in report.advice


def test_a_slow_callback_is_named_first():
    report = Learner(nn.Linear(4, 3), make_dls(n=320), cbs=[SlowCB()]).profile(
        n_batches=6
    )
    first_row = report.table().splitlines()[4].split()
    assert first_row[0] == "SlowCB.after_batch"
    assert report.advice.startswith("SlowCB.after_batch takes")
    assert report.train.share("SlowCB.after_batch") > 0.5


def test_the_report_prints_and_plots():
    report = Learner(nn.Linear(4, 3), make_dls(n=320)).profile(n_batches=4)
    text = str(report)
    assert "training step:" in text and "validation step:" in text
    assert "samples/s" in text and "sum of parts" in text
    assert text.splitlines()[-1] == report.advice
    fig = report.plot()
    assert isinstance(fig, Figure)
    bars = fig.axes[0].patches
    # One segment per part of each phase (a bar per phase for each part, in turn) ...
    assert len(bars) == len({*report.train.parts_us, *report.valid.parts_us}) * 2
    for row, phase in enumerate([report.train, report.valid]):
        segments = sorted(
            (b.get_x(), b.get_width()) for b in bars[row::2] if b.get_width()
        )
        # ... stacked end to end from 0 to the sum of the phase's parts, none overlapping.
        ends = [0.0] + [x + w for x, w in segments]
        assert [x for x, _ in segments] == pytest.approx(ends[:-1])
        assert ends[-1] == pytest.approx(sum(phase.parts_us.values()))


def learner_state(learn: Learner, stats: ActivationStatsCB) -> dict:
    """What a profile must leave as it was, copied."""
    return _copy(
        {
            "model": learn.model.state_dict(),
            "opt": learn.opt.state_dict(),
            "losses": learn.recorder.losses,
            "history": learn.metrics.history,
            "counters": (learn.epoch, learn.epochs_done, learn.n_epochs),
            "means": stats.means,
            "epoch_log": learn.epoch_log,
        }
    )


def test_profile_leaves_the_learner_as_it_was(tmp_path):
    stats = ActivationStatsCB(nn.ReLU)
    learn = Learner(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
        make_dls(n=320),
        opt_func=torch.optim.AdamW,
        cbs=[stats, CheckpointCB(tmp_path / "ckpt")],
    )
    learn.fit(1)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    before = learner_state(learn, stats)
    cbs, table = list(learn.cbs), dict(learn._table)
    report = learn.profile(n_batches=4)
    assert report.skipped == ["CheckpointCB"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == files
    assert_same(before, learner_state(learn, stats))
    assert learn.cbs == cbs and learn._table.keys() == table.keys()
    # The plain table again: an event nobody listens to is absent (one dict lookup).
    assert "after_cancel_step" not in learn._table
    assert all(h == table[e] for e, h in learn._table.items())


def test_profile_restores_after_an_error():
    class Boom(Callback):
        def after_batch(self, learn, iter, **kwargs):
            if iter == 3:
                raise RuntimeError("boom")

    learn = Learner(nn.Linear(4, 3), make_dls(n=320))
    learn.fit(1)
    weights = _copy(learn.model.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        learn.profile(n_batches=10, cbs=Boom())
    assert_same(weights, learn.model.state_dict())
    assert not any(isinstance(cb, (Boom, ProfileCB)) for cb in learn.cbs)


def test_profilecb_times_a_whole_fit():
    profiler = ProfileCB(warmup=1)
    learn = Learner(nn.Linear(4, 3), make_dls(n=160, bs=16))  # 10 + 3 batches
    learn.fit(2, cbs=profiler)
    assert len(learn.recorder.losses) == 20  # nothing stopped
    report = profiler.report()
    assert isinstance(report, ProfileReport)
    assert report.train.n_batches == 19 and report.valid.n_batches == 5
    assert "after_cancel_step" not in learn._table  # instrumented only while attached


def test_the_table_is_instrumented_while_a_profilecb_is_attached():
    learn = Learner(nn.Linear(4, 3), make_dls())
    assert "after_cancel_step" not in learn._table
    profiler = ProfileCB()
    learn.add_cbs(profiler)
    assert len(learn._table["after_cancel_step"]) == 2  # its open and close marks
    learn.remove_cbs(profiler)
    assert "after_cancel_step" not in learn._table


def test_warmup_batches_count_when_a_phase_has_no_other():
    learn = Learner(
        nn.Linear(4, 3), make_dls(n=32, bs=16)
    )  # 2 training batches, 1 valid
    report = learn.profile(n_batches=5, warmup=2)
    assert report.train.n_batches == 2 and report.valid.n_batches == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_batches": 0}, "profile n_batches"),
        ({"warmup": -1}, "ProfileCB warmup"),
        ({"n_batches": 2.5}, "profile n_batches"),
    ],
)
def test_bad_arguments_name_the_culprit(kwargs, match):
    learn = Learner(nn.Linear(4, 3), make_dls())
    with pytest.raises((TypeError, ValueError), match=match):
        learn.profile(**kwargs)


def test_a_report_of_no_batch_says_how_to_get_one():
    with pytest.raises(RuntimeError, match="timed no batch"):
        ProfileCB().report()


def _copy(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_copy(v) for v in x)
    return x


def report_of(parts: dict[str, float], num_workers: int | None = 0) -> ProfileReport:
    """A report of one training phase whose step is the sum of `parts` (µs)."""
    phase = PhaseProfile(
        "train", 10, 2, sum(parts.values()), 64, parts, marks=16, timed_hooks=8
    )
    return ProfileReport({"train": phase}, num_workers=num_workers)


@pytest.mark.parametrize(
    ("parts", "workers", "says"),
    [
        (
            {LOADER: 7000, FORWARD: 3000},
            0,
            "the loader takes 70% of each training step: fetch whole batches at once",
        ),
        (
            {LOADER: 7000, FORWARD: 3000},
            0,
            "or load in worker processes (DataLoader(..., num_workers=4))",
        ),
        ({LOADER: 7000, FORWARD: 3000}, 3, "its 3 workers don't keep up"),
        # An in-memory loader: workers would cost more than its 70 µs.
        (
            {LOADER: 70, FORWARD: 30},
            0,
            "at 70 µs a batch, worker processes would cost more",
        ),
        ({LOADER: 2000, FORWARD: 8000}, None, "the loader takes 20%"),
        (
            {HOST_TO_DEVICE: 30, FORWARD: 70},
            0,
            "moving each batch to the device takes 30%",
        ),
        ({STEP: 40, FORWARD: 30, BACKWARD: 30}, 0, "the optimizer step takes 40%"),
        ({LOOP: 30, FORWARD: 70}, 0, "learnloop's own loop takes 30%"),
        (
            {"MyCB.after_loss": 12, LOADER: 11, FORWARD: 77},
            0,
            "MyCB.after_loss takes 12%",
        ),
        (
            {FORWARD: 40, LOSS: 10, BACKWARD: 40, LOADER: 10},
            0,
            "the model's forward, loss and backward take 90%",
        ),
    ],
)
def test_the_advice_names_the_largest_part_that_can_be_acted_on(parts, workers, says):
    assert says in report_of(parts, workers).advice


def test_show_training_loop_lists_hooks_not_the_profilers_marks(capsys):
    learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[ProfileCB()])
    loop = training_loop(learn, capsys)
    assert loop["after_cancel_step"] == "-"
    assert loop["before_fit"].startswith("ProfileCB, DeviceCB")
    assert loop["after_pred"] == "-"


def test_a_profile_prints_no_epoch_row():
    out = io.StringIO()
    learn = Learner(nn.Linear(4, 3), make_dls(n=320), cbs=[ProgressCB(file=out)])
    learn.profile(n_batches=3)
    assert "train_loss" not in out.getvalue()
    learn.fit(1)
    assert "train_loss" in out.getvalue()  # a fit's row, for contrast


def test_mixed_precision_backward_and_step_count_as_backward_and_step():
    """MixedPrecisionCB (float16 + GradScaler) runs backward and the step in its hooks: they count as those pieces."""
    learn = Learner(
        nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 3)),
        make_dls(n=320),
        cbs=[MixedPrecisionCB(torch.float16)],
    )
    phase = learn.profile(n_batches=4, valid=False).train
    assert phase.parts_us[BACKWARD] > 0 and phase.parts_us[STEP] > 0
    assert "MixedPrecisionCB.before_backward" not in phase.parts_us
    assert "MixedPrecisionCB.before_step" not in phase.parts_us
    assert sum(phase.parts_us.values()) == pytest.approx(phase.step_us, rel=1e-6)


def test_the_title_says_which_batches_were_not_counted():
    learn = Learner(
        nn.Linear(4, 3), make_dls(n=32, bs=16)
    )  # 2 training batches, 1 valid
    title = str(learn.profile(n_batches=5, warmup=2)).splitlines()[0]
    # Too few batches to leave any out: all counted, and the title does not say otherwise.
    assert title.startswith("Profile of 2 training batches, 1 validation batch on cpu.")
    title = str(
        Learner(nn.Linear(4, 3), make_dls(n=320)).profile(n_batches=1)
    ).splitlines()[0]
    assert (
        "(the first 2 training batches and the first 2 validation batches not counted)"
        in title
    )


def test_a_profilecb_left_attached_reports_a_later_evaluation_alone():
    profiler = ProfileCB(warmup=0)
    learn = Learner(
        nn.Linear(4, 3), make_dls(n=160, bs=16), cbs=[profiler]
    )  # 10 + 3 batches
    learn.fit(1)
    assert profiler.report().valid.n_batches == 3
    learn.get_preds()
    report = profiler.report()
    assert report.train is None and report.valid.n_batches == 3


def test_lr_find_and_profile_keep_a_loaded_mid_epoch_position(tmp_path):
    class SaveAt3(Callback):
        def after_batch(self, learn, **kwargs):
            if learn.training and learn.iter == 2:
                learn.save(tmp_path / "mid.pt")
                raise CancelFitException()

    Learner(nn.Linear(4, 3), make_dls(n=320), cbs=[SaveAt3()]).fit(1)
    learn = Learner(nn.Linear(4, 3), make_dls(n=320))
    learn.load(tmp_path / "mid.pt")
    position = (learn._resume_at, learn.start_iter)
    assert position[0] is not None
    learn.profile(n_batches=2)
    learn.lr_find(num_it=5)
    assert (learn._resume_at, learn.start_iter) == position


def test_an_evaluation_inside_a_fit_joins_its_report():
    class FinalEval(Callback):
        order = ProfileCB.order + 1

        def after_fit(self, learn, *args, **kwargs):
            learn.validate()

    profiler = ProfileCB(warmup=0)
    learn = Learner(
        nn.Linear(4, 3), make_dls(n=160, bs=16), cbs=[profiler, FinalEval()]
    )
    learn.fit(1)
    report = profiler.report()
    assert (
        report.train.n_batches == 10 and report.valid.n_batches == 6
    )  # 3 + the final 3


def test_a_callback_that_skips_the_step_keeps_its_time():
    class SlowSkip(Callback):
        def before_step(self, learn, *args, **kwargs):
            time.sleep(0.002)
            raise CancelStepException()

    learn = Learner(nn.Linear(4, 3), make_dls(n=320), cbs=[SlowSkip()])
    phase = learn.profile(n_batches=4, valid=False).train
    assert phase.parts_us["SlowSkip.before_step"] >= 2000
    assert phase.parts_us.get(STEP, 0.0) < 100  # the step never ran


def test_the_advice_for_workers_that_cost_more_than_they_save():
    advice = report_of({LOADER: 600, FORWARD: 400}, num_workers=2).advice
    assert (
        "its 2 worker processes cost more than they save: try num_workers=0" in advice
    )


def test_a_validation_report_has_no_backward_in_its_advice():
    phase = PhaseProfile("valid", 10, 2, 100.0, 64, {FORWARD: 90.0, LOSS: 10.0})
    advice = ProfileReport({"valid": phase}).advice
    assert "the model's forward and loss take 100% of each validation step" in advice

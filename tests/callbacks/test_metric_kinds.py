"""MetricsCB with metrics as users write them: functions, metrics of one class, dicts, per-class values.

Each fit is a tiny real one (a linear model, data made here) whose values are checked against a
computation by hand on the same model; the per-class columns go through every reader of the row
(table, CSV, TensorBoard, early stopping, checkpoints).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io

import numpy as np
import pytest
import torch
from helpers import count_host_reads, make_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnloop import (
    Accuracy,
    CheckpointCB,
    CSVLoggerCB,
    DataLoaders,
    EarlyStoppingCB,
    Learner,
    MetricsCB,
    ProgressCB,
    TensorBoardCB,
)

N_CLASSES = 3


def uneven_dls() -> DataLoaders:
    """10 rows in batches of 4, 4 and 2, so a mean of batch values is not the mean over rows."""
    return DataLoaders(
        DataLoader(make_data(10), batch_size=4),
        DataLoader(make_data(10, seed=1), batch_size=4),
    )


def fit(*metrics, cbs=(), epochs=1, **named) -> tuple[Learner, MetricsCB]:
    torch.manual_seed(0)
    cb = MetricsCB(*metrics, **named)
    learn = Learner(nn.Linear(4, N_CLASSES), uneven_dls(), cbs=[cb, *cbs])
    learn.fit(epochs)
    return learn, cb


def valid_outputs(learn: Learner) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained model's outputs on the whole validation set, and its targets."""
    x, y = make_data(10, seed=1).tensors
    with torch.no_grad():
        return learn.model(x), y


def accuracy(inp, targ, axis=-1):
    """fastai's `accuracy` (metrics.py), as fastai users pass it."""
    return (inp.argmax(dim=axis) == targ).float().mean()


def first_prob(preds, targets):
    """A value that differs between batches (the mean probability of class 0)."""
    return preds.softmax(-1)[:, 0].mean()


class TopK:
    """Share of rows whose target is among the `k` highest predictions."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.reset()

    def reset(self):
        self.hits, self.n = 0, 0

    def update(self, preds, targets):
        top = preds.topk(self.k, dim=-1).indices
        self.hits += (top == targets[:, None]).any(-1).sum()
        self.n += len(targets)

    def compute(self):
        return self.hits / self.n


class PerClassAccuracy:
    """Accuracy of each class (a tensor of N_CLASSES values), as torchmetrics' average=None gives."""

    def reset(self):
        self.correct = torch.zeros(N_CLASSES)
        self.count = torch.zeros(N_CLASSES)

    def update(self, preds, targets):
        hit = (preds.argmax(-1) == targets).float()
        self.correct += torch.bincount(targets, hit, minlength=N_CLASSES)
        self.count += torch.bincount(targets, minlength=N_CLASSES)

    def compute(self):
        return self.correct / self.count.clamp(min=1)


class Constant:
    """A metric whose compute() returns `value` whatever it saw (a dict, a tensor, ...)."""

    def __init__(self, value):
        self.value = value

    def reset(self):
        pass

    def update(self, preds, targets):
        pass

    def compute(self):
        return self.value


def per_class_by_hand(learn: Learner) -> list[float]:
    out, y = valid_outputs(learn)
    hit = out.argmax(-1) == y
    return [
        hit[y == c].float().mean().item() if (y == c).any() else 0.0 for c in range(3)
    ]


class TestFunctionMetrics:
    def test_weighted_by_batch_size(self):
        """A function's batch values are averaged over rows (batches of 4, 4, 2), not over batches."""
        learn, cb = fit(first_prob)
        out, y = valid_outputs(learn)
        by_batch = [first_prob(out[i : i + 4], y[i : i + 4]) for i in (0, 4, 8)]
        by_rows = sum(v * n for v, n in zip(by_batch, (4, 4, 2))) / 10
        assert cb.history[0]["first_prob"] == pytest.approx(by_rows.item(), rel=1e-6)
        # The data is uneven enough for the test to tell the two means apart.
        assert by_rows != pytest.approx(torch.stack(by_batch).mean().item(), rel=1e-4)

    def test_fastai_accuracy_equals_accuracy_object(self):
        """fastai's accuracy(inp, targ) as a function gives what Accuracy() gives; the two columns stay apart."""
        _, cb = fit(Accuracy(), accuracy)
        row = cb.history[0]
        assert row["accuracy_2"] == pytest.approx(row["accuracy"], rel=1e-6)

    @pytest.mark.parametrize(
        "value",
        [lambda t: t.item(), lambda t: np.float32(t.item()), lambda t: t.double()],
        ids=["float", "numpy", "float64"],
    )
    def test_python_numpy_and_float64_values(self, value):
        """A function may return a Python number, a numpy scalar or a float64 tensor; the cell is a float."""
        learn, cb = fit(m=lambda p, y: value(first_prob(p, y)))
        expected = first_prob(*valid_outputs(learn)).item()
        assert type(cb.history[0]["m"]) is float
        assert cb.history[0]["m"] == pytest.approx(expected, rel=1e-5)

    def test_several_targets_passed_as_arguments(self):
        """With (x, y, w) batches a function metric is called as f(preds, y, w), as the loss is."""
        x, y = make_data(10).tensors
        rows = TensorDataset(x, y, torch.arange(10.0))
        dls = DataLoaders(
            DataLoader(rows, batch_size=4), DataLoader(rows, batch_size=4)
        )
        cb = MetricsCB(mean_w=lambda p, y, w: w.mean())
        learn = Learner(
            nn.Linear(4, 3),
            dls,
            loss_func=lambda p, y, w: nn.functional.cross_entropy(p, y),
            cbs=[cb],
        )
        learn.fit(1)
        assert cb.history[0]["mean_w"] == pytest.approx(4.5)

    def test_several_values_refused_with_name_and_shape(self):
        """A function that returns one value per class is refused, naming it and the shape."""

        def per_class(p, y):
            return p.mean(0)

        with pytest.raises(
            ValueError, match=r"'per_class' returned a Tensor of shape \(3,\)"
        ):
            fit(per_class)

    def test_no_host_sync_per_batch(self, monkeypatch):
        """Tensor values are summed on their device: 200 batches read few values to the host."""
        calls = count_host_reads(monkeypatch)
        dls = DataLoaders(
            DataLoader(make_data(400), batch_size=4),
            DataLoader(make_data(400, seed=1), batch_size=4),
        )
        cb = MetricsCB(accuracy, first_prob)
        Learner(nn.Linear(4, 3), dls, cbs=[cb, ProgressCB(bar=False)]).fit(
            1, train=False
        )
        assert len(calls) <= 6  # a per-batch sync would show as hundreds

    def test_metric_objects_before_functions(self):
        """An object with update/compute/reset is a metric object even if callable (as torchmetrics metrics are)."""

        class CallableTopK(TopK):
            def __call__(self, preds, targets):
                raise AssertionError("called as a function")

        _, cb = fit(CallableTopK(1), Accuracy())
        assert cb.history[0]["callable_top_k"] == pytest.approx(
            cb.history[0]["accuracy"]
        )


class TestNames:
    @pytest.mark.parametrize(
        "metric, name",
        [
            (accuracy, "accuracy"),
            (functools.partial(accuracy, axis=-1), "accuracy"),
            (functools.partial(functools.partial(accuracy), axis=-1), "accuracy"),
            (lambda p, y: 0.0, "lambda"),
            (nn.L1Loss(), "l1_loss"),
            (PerClassAccuracy(), "per_class_accuracy"),
            (TopK(1), "top_k"),
        ],
    )
    def test_default_name(self, metric, name):
        """A function is named by __name__ (a partial's function's, 'lambda' for a lambda); an object by its class."""
        assert list(MetricsCB(metric).metrics) == [name]

    def test_two_of_one_class_give_two_columns(self):
        """Two metrics of one class give two columns, each with its own value."""
        learn, cb = fit(TopK(1), TopK(2))
        out, y = valid_outputs(learn)
        top = out.topk(2, dim=-1).indices
        assert cb.history[0]["top_k"] == pytest.approx(
            (top[:, 0] == y).float().mean().item()
        )
        assert cb.history[0]["top_k_2"] == pytest.approx(
            (top == y[:, None]).any(-1).float().mean().item()
        )

    def test_two_functions_of_one_name(self):
        """Two partials of one function are 'first_k', 'first_k_2' ... in the order given."""

        def first_k(p, y, k):
            return p.softmax(-1)[:, k].mean()

        cb = MetricsCB(*(functools.partial(first_k, k=k) for k in range(3)))
        assert list(cb.metrics) == ["first_k", "first_k_2", "first_k_3"]

    def test_keyword_keeps_its_name(self):
        """A keyword name is kept; a positional metric of the same name is suffixed, and each keeps its value."""
        _, cb = fit(TopK(1), top_k=TopK(3))
        assert list(cb.metrics) == ["top_k_2", "top_k"]
        assert cb.history[0]["top_k"] == 1.0  # the top 3 of 3 classes hold every target
        assert cb.history[0]["top_k_2"] < 1.0

    def test_keyword_beats_a_spread_column(self):
        """A keyword named like a per-class column keeps its name; the spread one is suffixed."""
        learn, cb = fit(PerClassAccuracy(), per_class_accuracy_0=Accuracy())
        row = cb.history[0]
        preds, targets = valid_outputs(learn)
        overall = (preds.argmax(-1) == targets).float().mean().item()
        assert row["per_class_accuracy_0"] == pytest.approx(overall)
        by_hand = per_class_by_hand(learn)
        assert row["per_class_accuracy_0_2"] == pytest.approx(by_hand[0])
        assert row["per_class_accuracy_1"] == pytest.approx(by_hand[1])

    @pytest.mark.parametrize("key", ["epoch", "train_loss", "valid_loss", "time"])
    def test_row_keys_refused(self, key):
        """A metric named like one of the row's own columns is refused, by keyword or by its name."""
        with pytest.raises(ValueError, match=f"'{key}'.*another keyword name"):
            MetricsCB(**{key: Accuracy()})

        def fn(p, y):
            return 0.0

        fn.__name__ = key
        with pytest.raises(ValueError, match=f"'{key}'.*MetricsCB\\(my_{key}="):
            MetricsCB(fn)

    @pytest.mark.parametrize("how", ["positional", "keyword"])
    def test_class_instead_of_instance(self, how):
        """A class passed instead of an instance says to pass an instance."""
        with pytest.raises(TypeError, match=r"pass Accuracy\(\) instead"):
            MetricsCB(Accuracy) if how == "positional" else MetricsCB(acc=Accuracy)

    @pytest.mark.parametrize(
        "metric, match",
        [(0.5, "lacks update, compute, reset"), ("accuracy", "not its name")],
    )
    def test_neither_metric_nor_function(self, metric, match):
        """Something neither a metric object nor a callable is refused; the message mentions functions."""
        with pytest.raises(TypeError, match=match) as info:
            MetricsCB(metric)
        assert "or a function f(preds, targets)" in str(info.value)


class TestValues:
    def test_dict_gives_a_column_per_key(self):
        """A compute() that returns a dict (MetricCollection) gives its keys as columns, nested values flattened."""

        class Collection:
            def __init__(self):
                self.acc, self.per_class = Accuracy(), PerClassAccuracy()

            def reset(self):
                self.acc.reset(), self.per_class.reset()

            def update(self, preds, targets):
                self.acc.update(preds, targets), self.per_class.update(preds, targets)

            def compute(self):
                return {
                    "acc": self.acc.compute(),
                    "scores": {"cls": self.per_class.compute()},
                }

        learn, cb = fit(Collection(), Accuracy())
        row = cb.history[0]
        assert list(row)[3:-1] == [
            "acc",
            "scores_cls_0",
            "scores_cls_1",
            "scores_cls_2",
            "accuracy",
        ]
        assert row["acc"] == row["accuracy"]
        assert [row[f"scores_cls_{c}"] for c in range(3)] == pytest.approx(
            per_class_by_hand(learn)
        )

    @pytest.mark.parametrize("dict_first", [True, False])
    def test_dict_key_taken_is_suffixed(self, caplog, dict_first):
        """A dict key that names another column is suffixed and logged; the other keeps its name, in either order."""

        clash = Constant({"valid_loss": -1.0, "accuracy": -2.0})
        _, cb = fit(*((clash, Accuracy()) if dict_first else (Accuracy(), clash)))
        row = cb.history[0]
        assert (row["valid_loss_2"], row["accuracy_2"]) == (-1.0, -2.0)
        assert row["valid_loss"] > 0 and 0 <= row["accuracy"] <= 1
        assert "'valid_loss' that is already taken" in caplog.text

    @pytest.mark.parametrize(
        "value, cells",
        [
            (torch.tensor(0.25), {"v": 0.25}),
            (torch.tensor([0.5]), {"v": 0.5}),
            (np.float32(0.5), {"v": 0.5}),
            ([1.0, 2.0], {"v_0": 1.0, "v_1": 2.0}),
            (np.array([1.0, 2.0]), {"v_0": 1.0, "v_1": 2.0}),
            (torch.eye(2), {"v_0_0": 1.0, "v_0_1": 0.0, "v_1_0": 0.0, "v_1_1": 1.0}),
        ],
    )
    def test_values_become_plain_numbers(self, value, cells):
        """Scalars become floats; several values become one column per value, `v_0`, `v_1`, ... (`v_0_1` for 2-d)."""

        _, cb = fit(v=Constant(value))
        got = {k: v for k, v in cb.history[0].items() if k.startswith("v_") or k == "v"}
        assert got == cells and all(type(v) is float for v in got.values())

    def test_per_class_reaches_every_reader(self, tmp_path):
        """Per-class columns reach the table, the CSV file, TensorBoard, an early-stopping monitor and checkpoints."""
        out = io.StringIO()
        stop = EarlyStoppingCB(monitor="per_class_accuracy_2", mode="max", patience=5)
        cbs = [
            ProgressCB(file=out),
            CSVLoggerCB(tmp_path / "history.csv"),
            stop,
            CheckpointCB(tmp_path / "ck", monitor="per_class_accuracy_1", mode="max"),
        ]
        tensorboard = importlib.util.find_spec("tensorboard") is not None
        if tensorboard:  # in the dev extra
            cbs.append(TensorBoardCB(tmp_path / "tb"))
        learn, cb = fit(PerClassAccuracy(), cbs=cbs, epochs=2)
        columns = [f"per_class_accuracy_{c}" for c in range(3)]
        assert [cb.history[-1][c] for c in columns] == pytest.approx(
            per_class_by_hand(learn)
        )

        table = out.getvalue().splitlines()
        assert table[0].split() == [
            "epoch",
            "train_loss",
            "valid_loss",
            *columns,
            "time",
        ]
        assert len(table) == 3
        with open(tmp_path / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [float(rows[e][c]) for e in (0, 1) for c in columns] == pytest.approx(
            [r[c] for r in cb.history for c in columns]
        )
        assert stop.best == max(r["per_class_accuracy_2"] for r in cb.history)

        if tensorboard:
            from tensorboard.backend.event_processing.event_accumulator import (
                EventAccumulator,
            )

            events = EventAccumulator(str(tmp_path / "tb"))
            events.Reload()
            got = [e.value for e in events.Scalars("epoch/per_class_accuracy_0")]
            expected = [r["per_class_accuracy_0"] for r in cb.history]
            assert got == pytest.approx(expected)

        # A resumed fit gets the history back from the checkpoint and goes on with the same columns.
        again = MetricsCB(PerClassAccuracy())
        Learner(nn.Linear(4, 3), uneven_dls(), cbs=[again]).fit(
            3, resume=tmp_path / "ck"
        )
        assert again.history[:2] == cb.history
        assert list(again.history[2]) == list(cb.history[0])

"""DistributedCB: real 2-process gloo runs under torchrun on CPU, and the single-process pieces.

The torchrun runs are compared with single-process runs in this process: same weights after
one epoch with the same global batch, same validation metrics on a set of odd size, same
predictions in dataset order. Each launch costs a few seconds (every process imports torch).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_data
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    WeightedRandomSampler,
)

from learnloop import (
    Accuracy,
    CheckpointCB,
    CSVLoggerCB,
    DataLoaders,
    DistributedCB,
    Learner,
    MetricsCB,
    ProgressCB,
)
from learnloop.callbacks.distributed import check_restart_store
from learnloop.dist import (
    is_main_process,
    rank,
    shard_loader,
    world_size,
)

SRC = Path(__file__).resolve().parents[2] / "src"
TESTS = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], cwd: Path) -> dict[int, str]:
    """Run `args` under `torchrun --standalone --nproc_per_node=2` (free port); return each rank's stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]),
        "OMP_NUM_THREADS": "1",
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    logs = cwd / "logs"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        *args,
    ]
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    errors = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{errors}"
    return {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """tests/callbacks/ddp_script.py run on 2 processes: what each rank saved, and what each printed."""
    tmp = tmp_path_factory.mktemp("ddp")
    stdout = torchrun([str(Path(__file__).with_name("ddp_script.py")), str(tmp)], tmp)
    return {
        "stdout": stdout,
        "out": tmp,
        **{r: torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)},
    }


@pytest.fixture(scope="module")
def single_run() -> dict:
    """The same work in one process, with the global batch (2 x 8 rows)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    valid = DataLoader(make_data(45, seed=1), batch_size=16)
    dls = DataLoaders(DataLoader(make_data(96), batch_size=16), valid)
    learn = Learner(
        model, dls, lr=0.5, cbs=[MetricsCB(Accuracy()), ProgressCB(file=io.StringIO())]
    )
    learn.fit(1)
    log = dict(learn.epoch_log)
    preds, targets = learn.get_preds()
    return {
        "state": model.state_dict(),
        "epoch_log": log,
        "preds": preds,
        "targets": targets,
        "odd_preds": learn.get_preds(DataLoader(make_data(7, seed=2), batch_size=2))[0],
    }


class TestUnderTorchrun:
    def test_weights_match_single_process(self, ddp_run, single_run):
        """After one epoch every rank holds the weights of a single-process run with the global batch."""
        assert ddp_run[0]["world_size"] == 2
        for r in (0, 1):
            for k, v in single_run["state"].items():
                torch.testing.assert_close(ddp_run[r]["state"][k], v)

    def test_metrics_match_single_process(self, ddp_run, single_run):
        """Losses and accuracy are reduced over ranks as sums and counts; the odd row is not counted twice."""
        for r in (0, 1):
            log = ddp_run[r]["epoch_log"]
            for key in ("train_loss", "valid_loss", "accuracy"):
                assert log[key] == pytest.approx(
                    single_run["epoch_log"][key], rel=1e-5
                ), key
            valid_loss = single_run["epoch_log"]["valid_loss"]
            assert ddp_run[r]["validate"]["valid_loss"] == pytest.approx(
                valid_loss, rel=1e-5
            )

    def test_function_metrics_match_single_process(self, ddp_run, single_run):
        """A function metric is the mean over the rows of every process, as in one process."""
        expected = single_run["preds"].softmax(-1)[:, 0].mean().item()
        for r in (0, 1):
            log = ddp_run[r]["fn_validate"]
            assert log["first_prob"] == pytest.approx(expected, rel=1e-5)
            assert log["accuracy_2"] == pytest.approx(log["accuracy"], rel=1e-6)
            assert log["accuracy"] == pytest.approx(
                single_run["epoch_log"]["accuracy"], rel=1e-6
            )

    def test_get_preds_in_dataset_order(self, ddp_run, single_run):
        """get_preds returns every prediction in dataset order: the fit's loader, a new one, a shuffled one."""
        for r in (0, 1):
            torch.testing.assert_close(ddp_run[r]["preds"], single_run["preds"])
            assert torch.equal(ddp_run[r]["targets"], single_run["targets"])
            torch.testing.assert_close(ddp_run[r]["odd_preds"], single_run["odd_preds"])
            torch.testing.assert_close(
                ddp_run[r]["shuffled_odd_preds"], single_run["odd_preds"]
            )

    def test_get_preds_several_targets_in_order(self, ddp_run):
        """With (x, y, w) batches, get_preds returns every target tensor in dataset order."""
        for r in (0, 1):
            assert torch.equal(ddp_run[r]["row_index"], torch.arange(7.0))

    def test_accumulation_matches_big_batch_without_extra_syncs(
        self, ddp_run, single_run
    ):
        """GradAccumCB(2) under DDP gives the single-process weights; only stepping batches all-reduce."""
        for r in (0, 1):
            for k, v in single_run["state"].items():
                torch.testing.assert_close(ddp_run[r]["acc_state"][k], v)
            assert ddp_run[r]["acc_synced"] == [False, True] * 6

    def test_model_and_loaders_restored(self, ddp_run):
        """After fit, learn.model is the user's module again and learn.dls the user's loaders."""
        assert ddp_run[0]["restored"] and ddp_run[1]["restored"]

    def test_profile_runs_on_every_rank_and_keeps_the_learner(self, ddp_run):
        """learn.profile under DDP: the limited batches on each rank, the weights kept, no files written."""
        for r in (0, 1):
            assert ddp_run[r]["profile"] == {
                "counted": (1, 1),
                "kept": True,
                "skipped": ["CSVLoggerCB", "CheckpointCB"],
            }

    def test_shuffle_differs_per_epoch_and_rank(self, ddp_run):
        """With shuffle=True the ranks read disjoint halves, and each epoch in a new order."""
        seen0, seen1 = ddp_run[0]["seen"], ddp_run[1]["seen"]
        for epoch in (0, 1):
            assert sorted(seen0[epoch] + seen1[epoch]) == list(range(40))
        assert seen0[0] != seen0[1] and seen1[0] != seen1[1]

    def test_only_rank0_prints(self, ddp_run):
        """Rank 0 prints the metrics table; rank 1 writes nothing to stdout."""
        assert "valid_loss" in ddp_run["stdout"][0]
        assert ddp_run["stdout"][1] == ""

    def test_checkpoint_and_log_written_once_loaded_everywhere(self, ddp_run):
        """Rank 0 alone writes the CSV log and checkpoint; every rank resumes from it to the same weights."""
        lines = (ddp_run["out"] / "history.csv").read_text().splitlines()
        # A header and one epoch, written once.
        assert len(lines) == 2 and lines[0].startswith("epoch,")
        assert (ddp_run["out"] / "ck" / "last.pt").is_file()
        assert (
            ddp_run[0]["resumed_epochs_done"] == ddp_run[1]["resumed_epochs_done"] == 2
        )
        for k, v in ddp_run[0]["resumed_state"].items():
            assert torch.equal(v, ddp_run[1]["resumed_state"][k])

    def test_earlier_run_refused_on_every_rank(self, ddp_run):
        """An earlier run only rank 0 can see makes every rank refuse the fit (none is left waiting)."""
        assert "already holds an earlier run" in ddp_run[0]["refused"]
        assert "another process found an earlier run" in ddp_run[1]["refused"]

    def test_train_command_writes_on_rank0_only(self, tmp_path):
        """`learnloop train` runs unchanged under torchrun; only rank 0 prints and writes its files."""
        for r in (0, 1):
            (tmp_path / f"r{r}").mkdir()
        python = f"{sys.executable} -m learnloop.cli train --epochs 1 --model linear --out run"
        stdout = torchrun(
            ["--no-python", "sh", "-c", f"cd r$LOCAL_RANK && exec {python}"], tmp_path
        )
        assert sorted(p.name for p in (tmp_path / "r0" / "run").iterdir()) == [
            "loss.png",
            "model.pt",
        ]
        assert list((tmp_path / "r1").iterdir()) == []
        assert "final validation accuracy" in stdout[0] and stdout[1] == ""

    def test_example_runs_on_rank0_only(self, tmp_path):
        """examples/custom_callback.py runs unchanged under torchrun; rank 1 prints nothing."""
        example = (
            Path(__file__).resolve().parents[2] / "examples" / "custom_callback.py"
        )
        stdout = torchrun([str(example), "--epochs", "1"], tmp_path)
        assert "training batches" in stdout[0] and stdout[1] == ""


class TestRankHelpers:
    def test_single_process(self, monkeypatch):
        """Outside torchrun: rank 0 of 1, the main process."""
        for var in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(var, raising=False)
        assert (rank(), world_size(), is_main_process()) == (0, 1, True)

    def test_from_torchrun_env(self, monkeypatch):
        """Before the process group starts, rank and world size come from torchrun's variables."""
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert (rank(), world_size(), is_main_process()) == (1, 2, False)


class TestDistributedCB:
    def test_attached_when_world_size_above_one(self, monkeypatch, model, dls):
        """A Learner built in a torchrun process (WORLD_SIZE > 1) gets a DistributedCB by default."""
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert any(isinstance(cb, DistributedCB) for cb in Learner(model, dls).cbs)
        monkeypatch.setenv("WORLD_SIZE", "1")
        assert not any(isinstance(cb, DistributedCB) for cb in Learner(model, dls).cbs)

    def test_needs_torchrun(self, monkeypatch, model, dls):
        """Without torchrun's variables or a process group, fit says how to launch."""
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        learn = Learner(model, dls, cbs=[DistributedCB()], default_cbs=False)
        with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
            learn.fit(1)

    def test_no_files_off_rank0(self, monkeypatch, tmp_path, model, dls):
        """On a rank other than 0, CheckpointCB, CSVLoggerCB and learn.save write no file."""
        monkeypatch.setenv("RANK", "1")
        cbs = [
            CheckpointCB(tmp_path / "ck"),
            CSVLoggerCB(tmp_path / "history.csv"),
            ProgressCB(bar=False),
        ]
        learn = Learner(model, dls, cbs=cbs)
        learn.fit(2)
        learn.save(tmp_path / "model.pt")
        assert list(tmp_path.iterdir()) == []

    def test_progress_silent_off_rank0(self, monkeypatch, capsys, model, dls):
        """ProgressCB prints nothing on a rank other than 0."""
        monkeypatch.setenv("RANK", "1")
        Learner(model, dls, cbs=[ProgressCB(bar=False)]).fit(1)
        assert capsys.readouterr().out == ""


class TestShardLoader:
    def test_keeps_settings(self):
        """The shard keeps batch size, drop_last, collate_fn, workers and the shuffle setting."""
        collate = torch.utils.data.default_collate
        dl = DataLoader(
            make_data(10),
            batch_size=3,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
        )
        shard = shard_loader(dl, training=True, num_replicas=2, rank=1)
        kept = (shard.batch_size, shard.drop_last, shard.collate_fn, shard.num_workers)
        assert kept == (3, True, collate, 0)
        assert shard.sampler.shuffle and len(shard.sampler) == 5

    @pytest.mark.parametrize("training, sizes", [(True, [4, 4]), (False, [4, 3])])
    def test_padding_only_for_training(self, training, sizes):
        """Training shards are padded to equal length; evaluation shards cover each row exactly once."""
        dl = DataLoader(make_data(7), batch_size=2)
        shards = [
            list(shard_loader(dl, training, num_replicas=2, rank=r).sampler)
            for r in (0, 1)
        ]
        assert [len(s) for s in shards] == sizes
        if not training:
            assert sorted(shards[0] + shards[1]) == list(range(7))

    def test_whole_batch_sampler(self):
        """A loader fed whole batches (a BatchSampler as its sampler) is sharded batch-wise."""
        ds = make_data(12)
        dl = DataLoader(
            ds,
            batch_size=None,
            sampler=BatchSampler(RandomSampler(ds), 4, drop_last=False),
        )
        shard = shard_loader(dl, training=False, num_replicas=2, rank=0)
        assert shard.batch_size is None and [len(b) for b in shard.sampler] == [4, 2]

    @pytest.mark.parametrize(
        "dl, culprit",
        [
            (
                DataLoader(make_data(8), sampler=WeightedRandomSampler([1.0] * 8, 8)),
                "WeightedRandomSampler",
            ),
            ([(torch.zeros(1), torch.zeros(1))], "list"),
        ],
    )
    def test_unshardable(self, dl, culprit):
        """A loader it cannot shard is named, with the fix (give it a DistributedSampler)."""
        with pytest.raises(TypeError, match=f"{culprit}.*DistributedSampler yourself"):
            shard_loader(dl, training=True, num_replicas=2, rank=0)


class TestRestartStoreWarning:
    """torchrun restarts over the agent's shared store fail or hang (pytorch#135712): say how to avoid it."""

    def _env(self, monkeypatch, shared: str, restarts: str) -> None:
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", restarts)
        monkeypatch.delenv("RANK", raising=False)

    def test_restarts_over_a_shared_store_warn(self, monkeypatch):
        self._env(monkeypatch, "True", "1")
        with pytest.warns(UserWarning, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
            check_restart_store()

    @pytest.mark.parametrize(("shared", "restarts"), [("False", "3"), ("True", "0")])
    def test_no_warning_without_restarts_or_shared_store(
        self, monkeypatch, recwarn, shared, restarts
    ):
        self._env(monkeypatch, shared, restarts)
        check_restart_store()
        assert not [w for w in recwarn if "135712" in str(w.message)]

"""Hook and Hooks remove themselves; ActivationStatsCB records training activations and plots them."""

from __future__ import annotations

import pytest
import torch
from helpers import make_dls
from matplotlib.figure import Figure
from torch import nn

from learnloop import ActivationStatsCB, Callback, Hook, Hooks, Learner, SingleBatchCB


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def hooked(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class TestHook:
    def test_calls_func_with_output_until_the_block_ends(self):
        """Inside `with`, each forward calls func(hook, module, inputs, output); after it, nothing does."""
        lin, outs = nn.Linear(2, 3), []
        with Hook(lin, lambda h, m, i, o: outs.append((h, o.shape))) as h:
            lin(torch.zeros(5, 2))
        lin(torch.zeros(1, 2))
        assert outs == [(h, torch.Size([5, 3]))]
        assert h.removed and hooked(lin) == 0

    def test_removed_after_an_exception(self):
        """An exception inside the block still removes the hook."""
        lin = nn.Linear(2, 3)
        with pytest.raises(RuntimeError, match="boom"), Hook(lin, lambda *a: None):
            raise RuntimeError("boom")
        assert hooked(lin) == 0


class TestHooks:
    def test_one_hook_per_module_all_removed_after_an_exception(self):
        """Hooks hooks every module given, and an exception in the block removes them all."""
        model, seen = mlp(), []
        relus = [m for m in model if isinstance(m, nn.ReLU)]
        with (
            pytest.raises(ValueError, match="bad"),
            Hooks(relus, lambda h, m, i, o: seen.append(m)) as hooks,
        ):
            assert len(hooks) == 2 and hooks[0].module is relus[0]
            model(torch.zeros(1, 4))
            raise ValueError("bad")
        assert seen == relus
        assert hooked(model) == 0


class FailAt(Callback):
    """Raises inside the fit at one training batch."""

    def before_batch(self, learn, iter, **kwargs):
        if learn.epoch == 1 and iter == 2:
            raise RuntimeError("data went bad")


class TestActivationStatsCB:
    def test_records_training_batches_of_the_chosen_layers(self):
        """One mean/std/histogram per training batch (not validation) for each ReLU; hooks gone after fit."""
        model, stats = mlp(), ActivationStatsCB(nn.ReLU)
        Learner(model, make_dls(), lr=0.1, default_cbs=False, cbs=[stats]).fit(2)
        assert stats.names == ["1 ReLU", "3 ReLU"]
        # 6 train batches x 2 epochs.
        assert stats.means.shape == stats.stds.shape == (2, 12)
        assert stats.hists.shape == (2, 12, 40)
        assert (stats.means >= 0).all()  # ReLU outputs
        assert ((stats.dead > 0) & (stats.dead <= 1)).all()
        assert hooked(model) == 0

    def test_values_match_a_direct_computation(self):
        """The recorded mean, std and dead share equal those computed from the layer's output directly."""
        model = mlp()
        stats = ActivationStatsCB(lambda m: m is model[1])
        x = next(iter(make_dls().train))[0]
        with torch.no_grad():
            acts = model[1](model[0](x))
        Learner(model, make_dls(), default_cbs=False, cbs=[stats]).fit(
            1, cbs=[SingleBatchCB()]
        )
        assert stats.means.shape == (1, 1)
        assert torch.allclose(stats.means[0, 0], acts.mean())
        assert torch.allclose(stats.stds[0, 0], acts.std())
        assert torch.allclose(stats.dead[0, 0], (acts.abs() < 0.25).float().mean())

    def test_hooks_removed_after_an_exception(self):
        """A fit that fails mid-epoch leaves no hooks on the model."""
        model = mlp()
        learn = Learner(
            model,
            make_dls(),
            default_cbs=False,
            cbs=[ActivationStatsCB(nn.ReLU), FailAt()],
        )
        with pytest.raises(RuntimeError, match="data went bad"):
            learn.fit(3)
        assert hooked(model) == 0

    def test_plots_are_figures(self, tmp_path):
        """plot_stats, color_dim and dead_chart return matplotlib Figures that save as PNG."""
        stats = ActivationStatsCB(nn.ReLU)
        Learner(mlp(), make_dls(), lr=0.1, default_cbs=False, cbs=[stats]).fit(2)
        for name in ("plot_stats", "color_dim", "dead_chart"):
            fig = getattr(stats, name)()
            assert isinstance(fig, Figure)
            fig.savefig(tmp_path / f"{name}.png")
            assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert len(stats.plot_stats().axes[0].lines) == 2

    def test_filter_matching_nothing_is_an_error(self):
        """A mod_filter that picks no module names the module kinds the model has."""
        learn = Learner(
            mlp(), make_dls(), default_cbs=False, cbs=[ActivationStatsCB(nn.Conv2d)]
        )
        with pytest.raises(
            ValueError,
            match=r"picked none of the model's modules \(\['Linear', 'ReLU', 'Sequential'\]\)",
        ):
            learn.fit(1)

    def test_reading_before_fit_is_an_error(self):
        """Reading statistics before any fit says to fit first."""
        with pytest.raises(ValueError, match="fit with it attached first"):
            _ = ActivationStatsCB().means

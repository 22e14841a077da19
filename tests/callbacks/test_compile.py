"""Tests for learnloop.callbacks.compile: CompileCB and check_compile."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_dls
from torch import nn

from learnloop import CompileCB, Learner
from learnloop.callbacks.compile import _probe, check_compile


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


class CountingBackend:
    """A torch.compile backend that records each graph and runs it as traced (fast, no C++)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


class TestCompileCB:
    def test_model_is_compiled_in_place(self):
        """The forward goes through torch.compile; learn.model and its state_dict keys stay as they were."""
        backend = CountingBackend()
        model = mlp()
        keys = list(model.state_dict())
        learn = Learner(
            model, make_dls(), cbs=[CompileCB(backend=backend)], default_cbs=False
        )
        learn.fit(1)
        assert backend.graphs >= 1
        assert learn.model is model and list(model.state_dict()) == keys

    def test_compiled_outputs_match_eager(self):
        """Predictions of the compiled model equal those of an eager copy with the same weights."""
        model = mlp()
        eager = copy.deepcopy(model)
        learn = Learner(
            model,
            make_dls(),
            cbs=[CompileCB(backend=CountingBackend())],
            default_cbs=False,
        )
        preds, _ = learn.get_preds()
        x = torch.cat([xb for xb, _ in make_dls().valid])
        torch.testing.assert_close(preds, eager(x).detach(), rtol=0, atol=0)

    def test_bad_backend_is_a_clear_error(self):
        """A backend that cannot compile fails at fit start, naming the backend and what to do."""
        learn = Learner(
            mlp(),
            make_dls(),
            cbs=[CompileCB(backend="no_such_backend")],
            default_cbs=False,
        )
        with pytest.raises(
            RuntimeError,
            match=r"backend='no_such_backend'\) does not work on cpu.*\n- help",
        ):
            learn.fit(1)

    @pytest.mark.slow
    def test_missing_cxx_compiler_is_a_clear_error(self):
        """Without a working C++ compiler, inductor fails with a message that says to install one."""
        import torch._inductor.config as inductor_config

        _probe.cache_clear()
        torch._dynamo.reset()
        try:
            with (
                inductor_config.patch(
                    {"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}
                ),
                pytest.raises(RuntimeError, match="install gcc or clang"),
            ):
                check_compile("cpu")
        finally:
            _probe.cache_clear()
            torch._dynamo.reset()

    @pytest.mark.slow
    def test_inductor_on_cpu_matches_eager(self):
        """With the default inductor backend (needs gcc), training runs and outputs match eager."""
        model = mlp()
        learn = Learner(model, make_dls(), lr=0.1, cbs=[CompileCB()], default_cbs=False)
        learn.fit(1)
        x = torch.randn(32, 4)
        # forward() bypasses the compiled call.
        torch.testing.assert_close(model(x), model.forward(x))


@pytest.mark.parametrize("trial", ["lr_find", "profile"])
def test_a_trial_fit_first_compiles_the_model_once(monkeypatch, trial):
    """lr_find or profile as the first call compiles the model; the fit after it does not again."""
    calls = []
    real = nn.Module.compile

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", counted)
    learn = Learner(mlp(), make_dls(), cbs=[CompileCB(backend="eager", check=False)])
    if trial == "lr_find":
        learn.lr_find(num_it=5)
    else:
        learn.profile(n_batches=1)
    learn.fit(1)
    assert len(calls) == 1

"""strategy="auto" measures: never runs a candidate predicted over the budget, keeps the fastest that fits,
caches its choice, and a resumed fit keeps the checkpoint's choice."""

import pytest
import torch
from fixtures import TINY, config
from test_maml_engine import _mlp_case

from fmaml import auto_strategy
from fmaml.cli import main
from fmaml.strategy_choice import StrategyChoice


@pytest.fixture
def sinusoid():
    model, tasks, loss = _mlp_case()
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    return params, tasks, dict(model=model, loss=loss, steps=1, lr=0.01)


def fake_probe(peaks_mb: dict[str, float], seconds: dict[str, float]):
    def probe(params, buffers, tasks, strategy, memory, config, device):
        return int(peaks_mb[strategy] * 2**20), seconds.get(strategy, 0.0)

    return probe


def test_candidates_over_the_budget_never_run_at_full_size(sinusoid, monkeypatch, tmp_path):
    params, tasks, config_ = sinusoid
    monkeypatch.setattr(auto_strategy, "free_memory_bytes", lambda device: 100 * 2**20)  # budget 50 MB
    monkeypatch.setattr(auto_strategy, "probe", fake_probe({"loop": 10, "vmap": 80, "chunked:2": 30}, {}))
    full_runs = []
    real = auto_strategy._meta_gradient

    def spy(params, buffers, tasks, strategy, memory, config):
        full_runs.append((strategy, memory))
        return real(params, buffers, tasks, strategy, memory, config)

    monkeypatch.setattr(auto_strategy, "_meta_gradient", spy)
    choice = auto_strategy.choose(params, {}, tasks, memories=("store",), cache=False, **config_)
    assert ("vmap", "store") not in full_runs  # predicted 80 MB > 50 MB: never run on the meta-batch
    assert {c["strategy"]: c["skipped"] for c in choice.candidates}["vmap"].startswith(
        "skipped: predicted over"
    )
    assert choice.strategy in ("loop", "chunked:2")
    ran = {c["strategy"]: c["seconds"] for c in choice.candidates if c["seconds"] is not None}
    assert choice.strategy == min(ran, key=ran.get)
    assert "strategy=auto chose" in choice.summary()


def test_nothing_fits_is_a_clear_error(sinusoid, monkeypatch):
    params, tasks, config_ = sinusoid
    monkeypatch.setattr(auto_strategy, "free_memory_bytes", lambda device: 2**20)
    monkeypatch.setattr(auto_strategy, "probe", fake_probe({"loop": 10, "vmap": 80, "chunked:2": 30}, {}))
    with pytest.raises(MemoryError, match=r"no strategy fits .* the smallest, loop .* data\.meta_batch_size"):
        auto_strategy.choose(params, {}, tasks, memories=("store",), cache=False, **config_)


def test_the_choice_is_cached_per_setting(sinusoid, monkeypatch):
    params, tasks, config_ = sinusoid
    first = auto_strategy.choose(params, {}, tasks, **config_)
    assert not first.cached and len(first.candidates) == 6  # loop, vmap, chunked:2; store and recompute

    def no_probe(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(auto_strategy, "probe", no_probe)
    again = auto_strategy.choose(params, {}, tasks, **config_)
    assert again.cached and (again.strategy, again.memory) == (first.strategy, first.memory)
    # Another setting (more inner steps) is measured anew.
    with pytest.raises(AssertionError, match="measured again"):
        auto_strategy.choose(params, {}, tasks, **(config_ | {"steps": 2}))


def test_a_resumed_fit_keeps_the_checkpoints_choice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", config("sinusoid.yaml"), "--trainer.limit_val_batches=0", *TINY]
    first = main([*fit, "--trainer.max_steps=2"])
    chosen = first.model.strategy_choice.choice
    assert chosen["strategy"] in ("loop", "vmap") and chosen["memory"] in ("store", "recompute")
    checkpoint = torch.load("logs/fmaml/version_0/checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["fmaml_auto_choice"] == chosen
    assert chosen["device"] == "cpu" and chosen["precision"] == "32-true"

    def no_measuring(self, module, tasks, inner, refresh=False):
        raise AssertionError("a resume measured again")

    monkeypatch.setattr(StrategyChoice, "_measure", no_measuring)
    resumed = main([*fit, "--trainer.max_steps=4", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 4 and resumed.model.strategy_choice.choice == chosen

"""strategy="auto" never runs on stale state: it measures under the settings that run (and again when
they change), a cached choice is checked against the budget and the run's own step times, and a
checkpoint's choice is restored only where it still applies."""

import json

import pytest
import torch
from fixtures import TINY, config
from test_maml_engine import _mlp_case

from fmaml import auto_strategy
from fmaml.cli import main
from fmaml.models import MLP
from fmaml.module import MAML
from fmaml.settings import grouped

FIT = ["fit", "--config", config("sinusoid.yaml"), "--trainer.limit_val_batches=0", *TINY]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A cache of this test's own (the session's is shared by every test)."""
    monkeypatch.setenv(auto_strategy.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "auto_strategy.json"


@pytest.fixture
def sinusoid():
    model, tasks, loss = _mlp_case()
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    return params, tasks, dict(model=model, loss=loss, steps=2, lr=0.01)


def measured(monkeypatch) -> list[dict]:
    """The inner-loop settings of every measurement (cache hits included) from now on."""
    calls, real = [], auto_strategy.choose

    def spy(*args, **kwargs):
        calls.append(
            {"second_order": not kwargs.get("first_order"), "multi_step_loss": "step_weights" in kwargs}
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(auto_strategy, "choose", spy)
    return calls


def probes(monkeypatch) -> list[str]:
    """The candidates probed from now on (none on a cache hit)."""
    seen, real = [], auto_strategy.probe

    def spy(params, buffers, tasks, strategy, memory, config, device):
        seen.append(strategy)
        return real(params, buffers, tasks, strategy, memory, config, device)

    monkeypatch.setattr(auto_strategy, "probe", spy)
    return seen


def edit_cache(path, edit) -> None:
    entries = json.loads(path.read_text())
    for entry in entries.values():
        edit(entry)
    path.write_text(json.dumps(entries))


# ---------------------------------------------------------------------------------- 1. what is measured


def test_each_cost_changing_phase_of_a_run_is_measured(tmp_path, monkeypatch, cache, capsys):
    """MAML++'s schedule: the multi-step loss until step 1, first order until step 2, then second order."""
    monkeypatch.chdir(tmp_path)
    calls = measured(monkeypatch)
    cli = main(
        [
            *FIT,
            "--trainer.max_steps=4",
            "--model.inner_loop.steps=2",
            "--model.meta_objective.multi_step_loss=true",
            "--model.meta_objective.msl_anneal_steps=1",
            "--model.inner_loop.second_order_from_step=2",
        ]
    )
    first, last = {"second_order": False}, {"second_order": True, "multi_step_loss": False}
    assert calls == [first | {"multi_step_loss": True}, first | {"multi_step_loss": False}, last]
    assert cli.model.strategy_choice.choice["phase"] == last
    out = capsys.readouterr().out
    assert "measured under first order, last step's loss; step 2 runs second order, last step's loss" in out
    assert "under second order, last step's loss" in out  # the summary says what it measured


def test_compile_with_auto_is_refused_at_start_up():
    with pytest.raises(
        ValueError,
        match=r"model\.execution\.compile=true with model\.execution\.strategy=auto.*--model\.execution\.strategy=vmap",
    ):
        MAML(network=MLP, **grouped(compile=True))
    MAML(network=MLP, **grouped(compile=True, strategy="vmap"))  # a fixed strategy compiles what runs


def test_values_that_change_every_step_do_not_miss_the_cache(sinusoid, cache, monkeypatch):
    """The multi-step loss's weights (and learned rates) change every meta-step, not the cost: a run
    resumed at another step finds its measurement."""
    params, tasks, config_ = sinusoid
    auto_strategy.choose(params, {}, tasks, step_weights=[0.5, 0.5], **config_)
    seen = probes(monkeypatch)
    again = auto_strategy.choose(params, {}, tasks, step_weights=[0.4, 0.6], **config_)
    assert again.cached and seen == []
    assert "under second order, multi-step loss" in again.summary()


# --------------------------------------------------------------------------------------------- 2. cache


def test_a_lower_memory_share_is_not_answered_from_the_cache(sinusoid, cache, monkeypatch):
    """After running out of memory, a lower model.execution.auto_memory_share must take effect, and be printed."""
    params, tasks, config_ = sinusoid
    monkeypatch.setattr(auto_strategy, "free_memory_bytes", lambda device: 1000 * 2**20)
    first = auto_strategy.choose(params, {}, tasks, **config_)  # budget 500 MB
    chosen = (first.strategy, first.memory)

    def predict_100_mb_for_the_choice(entry):
        for row in entry["candidates"]:
            if (row["strategy"], row["memory"]) == chosen:
                row["predicted_bytes"] = 100 * 2**20

    edit_cache(cache, predict_100_mb_for_the_choice)
    same = auto_strategy.choose(params, {}, tasks, memory_share=0.4, **config_)  # 400 MB: it still fits
    assert same.cached and "budget now 400 MB" in same.summary()
    seen = probes(monkeypatch)
    lower = auto_strategy.choose(params, {}, tasks, memory_share=0.05, **config_)  # 50 MB
    assert not lower.cached and seen, "a choice predicted over today's budget was reused"
    assert "budget now 50 MB" in lower.summary()
    assert f"{chosen[0]} with memory={chosen[1]} (predicted 100 MB) no longer fits" in lower.summary()


def test_a_cached_choice_the_first_steps_contradict_is_measured_again(tmp_path, monkeypatch, cache, capsys):
    """A cache entry whose prediction is far off (as one made on a loaded machine): the run's first
    steps disagree with it, so it is measured again and the entry overwritten. The log says when the
    entry was written."""
    monkeypatch.chdir(tmp_path)
    main([*FIT, "--trainer.max_steps=1"])

    def predict_a_nanosecond(entry):
        for row in entry["candidates"]:
            row["seconds"] = row["seconds"] and 1e-9

    edit_cache(cache, predict_a_nanosecond)
    capsys.readouterr()
    calls = measured(monkeypatch)
    seen = probes(monkeypatch)
    main([*FIT, "--trainer.max_steps=7"])  # a new run (a resume would take its checkpoint's choice)
    out = capsys.readouterr().out
    assert "(cached, measured 20" in out and " UTC, under second order" in out
    assert "where the cached measurement predicted 0.0 ms" in out and "measuring again" in out
    assert len(calls) == 2 and seen
    (entry,) = json.loads(cache.read_text()).values()
    assert all(row["seconds"] is None or row["seconds"] > 1e-6 for row in entry["candidates"])
    assert entry["written"].endswith("UTC")


@pytest.mark.parametrize(
    ("observed_ms", "verdict"),
    [
        ([900, 11, 12, 9, 10, 500], ""),  # the first step's one-off costs and one outlier: agrees
        ([20, 20, 20, 20, 20, 20], "2.00x"),  # twice the prediction
        ([4, 4, 4, 4, 4, 4], "0.40x"),  # far faster than predicted: the measurement was made under load
    ],
)
def test_the_step_check_takes_the_median_after_a_first_step(monkeypatch, observed_ms, verdict):
    clock = iter([t for ms in observed_ms for t in (0.0, ms / 1e3)])
    monkeypatch.setattr(auto_strategy.time, "perf_counter", lambda: next(clock))
    check = auto_strategy.StepCheck(0.010, torch.device("cpu"))
    verdicts = []
    for _ in observed_ms:
        check.start()
        verdicts.append(check.stop())
    assert verdicts[:-1] == [None] * (len(observed_ms) - 1)
    assert verdicts[-1] == "" if not verdict else verdict in verdicts[-1]


# -------------------------------------------------------------------------------- 3. checkpoint's choice


@pytest.fixture
def recompute_checkpoint(tmp_path, monkeypatch, cache) -> str:
    """A 2-step fit whose checkpoint holds a choice with memory=recompute."""
    monkeypatch.chdir(tmp_path)
    cli = main([*FIT, "--trainer.max_steps=2", "--model.execution.memory=recompute"])
    assert cli.model.strategy_choice.choice["memory"] == "recompute"
    return "logs/fmaml/version_0/checkpoints/last.ckpt"


def test_a_resume_with_memory_store_runs_store(recompute_checkpoint, capsys):
    resumed = main([*FIT, "--trainer.max_steps=3", "--model.execution.memory=store", "--ckpt_path=last"])
    assert resumed.model.strategy_choice.choice["memory"] == "store"
    assert (
        "is not used: it runs memory=recompute, which this run's model.execution.memory"
        in capsys.readouterr().out
    )


def test_testing_with_adapt_only_does_not_fail_on_the_checkpoints_choice(recompute_checkpoint, capsys):
    main(
        [
            "test",
            "--config",
            config("sinusoid.yaml"),
            *TINY,
            "--model.inner_loop.adapt_only=[layers.4]",
            "--ckpt_path=last",
        ]
    )
    out = capsys.readouterr().out
    assert "is not used: it runs memory=recompute" in out
    assert "Evaluating with the fixed rule (fmaml.maml.resolve_strategy): strategy=vmap, memory=store." in out
    assert "test loss over 6 tasks" in out


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"device": "cuda:NVIDIA H200"}, "it was measured on cuda:NVIDIA H200, this run is on cpu"),
        ({"precision": "bf16-mixed"}, "it was measured at precision bf16-mixed, this run is at 32-true"),
        (
            {"device": None, "precision": None},
            "the checkpoint does not record the device and precision",
        ),  # older fmaml
        ({"predicted_bytes": 2**60}, "its predicted peak, 1099511627776 MB, is over today's budget"),
    ],
)
def test_a_choice_from_elsewhere_is_measured_again(recompute_checkpoint, monkeypatch, capsys, edit, reason):
    checkpoint = torch.load(recompute_checkpoint, weights_only=False)
    saved = checkpoint["fmaml_auto_choice"] | edit
    checkpoint["fmaml_auto_choice"] = {k: v for k, v in saved.items() if v is not None}
    torch.save(checkpoint, recompute_checkpoint)
    capsys.readouterr()
    calls = measured(monkeypatch)
    resumed = main([*FIT, "--trainer.max_steps=3", "--model.execution.memory=recompute", "--ckpt_path=last"])
    out = capsys.readouterr().out
    assert "the checkpoint's choice (" in out and f"is not used: {reason}" in out
    assert len(calls) == 1 and resumed.model.strategy_choice.choice["device"] == "cpu"


def test_a_choice_that_still_applies_is_kept(recompute_checkpoint, monkeypatch):
    saved = torch.load(recompute_checkpoint, weights_only=False)["fmaml_auto_choice"]
    calls = measured(monkeypatch)
    resumed = main([*FIT, "--trainer.max_steps=3", "--ckpt_path=last"])  # memory=auto allows recompute
    assert calls == [] and resumed.model.strategy_choice.choice == saved


def test_evaluating_at_another_precision_runs_the_fixed_rule_for_it(recompute_checkpoint, capsys):
    """A choice measured in float32 does not describe a bf16 run: evaluation runs the fixed rule (vmap on
    the sinusoid MLP, in bf16 by explicit casts)."""
    test = ["test", "--config", config("sinusoid.yaml"), *TINY, "--ckpt_path=last"]
    main([*test, "--trainer.precision=bf16-mixed"])
    out = capsys.readouterr().out
    assert "is not used: it was measured at precision 32-true, this run is at bf16-mixed" in out
    assert "(fmaml.maml.resolve_strategy): strategy=vmap, memory=store." in out

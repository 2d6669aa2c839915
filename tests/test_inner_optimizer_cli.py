"""Issue 20: the inner optimizer by config (`--model.inner_loop.optimizer`, a class_path), end to end through
`fmaml.cli.command_line` (what `python -m fmaml` runs) and `main`, on the sinusoid: the seed project's own
config lines train; the learned rates of a stateful optimizer are trained, checkpointed and evaluated; an
unusable optimizer is refused at start-up in one line; torch's implementation flags warn; the old setting
names point to the new ones; a checkpoint written before the change still evaluates."""

import os

import pytest
import torch
from fixtures import TINY, config, error_lines

from fmaml import inner_optimizers
from fmaml.cli import command_line, main
from fmaml.settings_check import IgnoredSettingWarning

SINUSOID = config("sinusoid.yaml")
# Written by fmaml 075ee8a, the last commit with model.inner_lr / model.learn_inner_lr (22 KB):
#   python -m fmaml fit --config configs/sinusoid.yaml --model.learn_inner_lr=per_parameter
#     --model.network.hidden=[8,8] --model.strategy=loop --trainer.max_steps=3 --trainer.limit_val_batches=0
#     --trainer.accelerator=cpu --data.meta_batch_size=2 --data.num_val_tasks=2 --data.num_test_tasks=4
OLD_METASGD_CKPT = os.path.join(os.path.dirname(__file__), "data", "sinusoid_metasgd_075ee8a.ckpt")
LEARNED_ADAM = [
    "--model.inner_loop.optimizer=fmaml.inner_optimizers.Adam",
    "--model.inner_loop.optimizer.lr=0.01",
    "--model.inner_loop.optimizer.learn_lr=per_layer_per_step",
    "--model.inner_loop.steps=2",
    "--model.network.hidden=[16,16]",
    "--model.execution.strategy=vmap",
]
STARTUP_HINT = "(FMAML_DEBUG=1 shows the traceback)"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logs/ go here
    monkeypatch.delenv("FMAML_DEBUG", raising=False)


def last_checkpoint(version: int = 0) -> str:
    return os.path.join("logs", "fmaml", f"version_{version}", "checkpoints", "last.ckpt")


def metrics(cli) -> dict[str, float]:
    return {name: float(value) for name, value in cli.trainer.callback_metrics.items()}


# ----------------------------------------------------------------------- the seed's lines train


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_the_seed_config_lines_train_on_the_sinusoid(name, tmp_path):
    """`class_path: torch.optim.SGD` / `torch.optim.Adam`, `init_args: {lr: 0.01}`, as the seed writes them.
    60 meta-steps of 10 tasks at a meta rate of 0.005 (about 20 s per optimizer on 2 busy cores)."""
    lines = f"model:\n  inner_loop:\n    optimizer:\n      class_path: torch.optim.{name}\n      init_args:\n        lr: 0.01\n"
    (tmp_path / "inner.yaml").write_text(lines)
    common = ["--config", SINUSOID, "--config", "inner.yaml", "--model.execution.strategy=vmap", *TINY]
    fit = ["--trainer.max_steps=60", "--trainer.limit_val_batches=0", "--data.meta_batch_size=10"]
    assert command_line(["fit", *common, *fit, "--model.optimizer.lr=0.005"]) == 0
    # The same 50 test tasks (fixed by data.seed) before and after training, adapted by the configured
    # optimizer for 1 step, as in training: a paired comparison, not two noisy meta-batches. (Measured: the
    # loss falls by about 20%, and adaptation takes 5% (SGD) to 9% (Adam) off the loss before it.)
    test = ["test", *common, "--data.evaluation.num_test_tasks=50", "--model.inner_loop.eval_steps=1"]
    initial = main([*test, "--ckpt_path=initial"])
    trained = main([*test, f"--ckpt_path={last_checkpoint()}"])
    optimizer = trained.model.inner_loop.optimizer
    assert type(optimizer) is getattr(inner_optimizers, name) and optimizer.lr == 0.01
    before, after = metrics(initial), metrics(trained)
    assert after["test/loss_mean"] < 0.9 * before["test/loss_mean"], (before, after)
    # The inner loop adapts: after adaptation the query loss is below the one before it (a no-op inner loop
    # would leave them equal).
    assert after["test/loss"] < 0.99 * after["test/loss_before"], after


# ------------------------------------------------------------- learned rates of a stateful optimizer


def test_learned_rates_of_an_adam_inner_loop_are_trained_checkpointed_and_evaluated(tmp_path):
    fit = main(["fit", "--config", SINUSOID, *LEARNED_ADAM, *TINY, "--trainer.max_steps=3"])
    module = fit.model
    assert type(module.inner_loop.optimizer) is inner_optimizers.Adam
    rates = {key: rate.detach().clone() for key, rate in module.inner_lrs.items()}
    assert rates and all(rate.shape == (2,) for rate in rates.values())  # one rate per inner step
    assert any(not torch.all(rate == 0.01) for rate in rates.values()), rates  # meta-trained
    checkpoint = torch.load(last_checkpoint(), weights_only=False)
    for key, rate in rates.items():
        torch.testing.assert_close(checkpoint["state_dict"][f"inner_lrs.{key}"], rate)

    # Evaluation runs 4 steps (the last trained rate beyond the 2 trained ones) with the checkpoint's rates.
    test = ["test", "--config", SINUSOID, *LEARNED_ADAM, *TINY, "--model.inner_loop.eval_steps=4"]
    trained = main([*test, f"--ckpt_path={last_checkpoint()}"])
    assert trained.model.eval_inner["steps"] == 4
    for key, rate in rates.items():
        torch.testing.assert_close(trained.model.inner_lrs[key], rate)
    adapted = metrics(trained)
    assert adapted["test/loss"] < adapted["test/loss_before"], adapted
    # By effect: the same checkpoint with its learned rates set to 0 does not adapt at all, although the
    # configured lr is 0.01: the rates come from the checkpoint.
    for key in rates:
        checkpoint["state_dict"][f"inner_lrs.{key}"].zero_()
    torch.save(checkpoint, tmp_path / "zero_rates.ckpt")
    frozen = metrics(main([*test, f"--ckpt_path={tmp_path / 'zero_rates.ckpt'}"]))
    assert frozen["test/loss"] == pytest.approx(frozen["test/loss_before"], rel=1e-6)
    assert frozen["test/loss_before"] == pytest.approx(adapted["test/loss_before"], rel=1e-6)

    # The learned rates are the network's: evaluating them with another rate, or without them, is refused.
    with pytest.raises(ValueError, match=r"model\.inner_loop\.eval_lr=0\.05 .*drop eval_lr"):
        main([*test, "--model.inner_loop.eval_lr=0.05", f"--ckpt_path={last_checkpoint()}"])
    plain = ["--model.inner_loop.optimizer=torch.optim.Adam", f"--ckpt_path={last_checkpoint()}"]
    network_change = (
        r"in the network:\n  model\.inner_loop\.optimizer\.init_args\.learn_lr: 'off' here, 'per_layer"
    )
    with pytest.raises(ValueError, match=network_change):
        main([*test, *plain])


def test_evaluation_takes_its_own_inner_rate_and_steps():
    """eval_lr and eval_steps reach the evaluation's inner loop (the untrained weights serve)."""
    test = [
        "test",
        "--config",
        SINUSOID,
        "--model.inner_loop.optimizer=torch.optim.Adam",
        "--model.execution.strategy=vmap",
    ]
    test += [*TINY, "--model.inner_loop.eval_steps=3", "--ckpt_path=initial"]
    adapted = main([*test, "--model.inner_loop.eval_lr=0.05"])
    inner = adapted.model.eval_inner
    assert (inner["steps"], inner["lr"], type(inner["inner_optimizer"])) == (3, 0.05, inner_optimizers.Adam)
    assert adapted.model.train_inner["lr"] == 0.01  # the config's, for training only
    by_lr = metrics(adapted)
    # Adam's step is about lr whatever the gradient's scale: at 0.05 the untrained network's loss moves far
    # (up: 0.05 per weight is too much for it), at 1e-9 it stays as it was.
    assert abs(by_lr["test/loss"] - by_lr["test/loss_before"]) > 0.2 * by_lr["test/loss_before"], by_lr
    still = metrics(main([*test, "--model.inner_loop.eval_lr=1e-9"]))
    assert still["test/loss"] == pytest.approx(still["test/loss_before"], rel=1e-5)
    assert still["test/loss_before"] == pytest.approx(by_lr["test/loss_before"], rel=1e-6)


# ------------------------------------------------------------------------------------ bad input


def _fit_omniglot_without_data(tmp_path, *override: str) -> int:
    """Omniglot with no data and no download: an error about the data would mean it was looked at first."""
    no_data = [f"--data.root={tmp_path / 'nodata'}", "--data.dataset.init_args.download=false"]
    return command_line(["fit", "--config", config("omniglot.yaml"), *override, *no_data, *TINY])


@pytest.mark.parametrize(
    ("override", "error"),
    [
        pytest.param(
            ["--model.inner_loop.optimizer=torch.optim.LBFGS"],
            "error: model.inner_loop.optimizer: torch.optim.lbfgs.LBFGS has no differentiable functional equivalent "
            "in fmaml. Supported: torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, "
            "torch.optim.Adagrad (or fmaml.inner_optimizers.<the same name>, which also takes learn_lr)",
            id="unsupported",
        ),
        pytest.param(
            ["--model.inner_loop.optimizer.momentum=-1"],
            "error: model.inner_loop.optimizer: Invalid momentum value: -1.0",
            id="bad-argument",
        ),
        pytest.param(
            [
                "--model.inner_loop.optimizer=fmaml.inner_optimizers.SGD",
                "--model.inner_loop.optimizer.momentum=-1",
            ],
            "error: model.inner_loop.optimizer (SGD): Invalid momentum value: -1.0",
            id="fmaml-class",
        ),
    ],
)
def test_an_unusable_inner_optimizer_is_one_line_at_start_up(override, error, tmp_path, capsys):
    assert _fit_omniglot_without_data(tmp_path, *override) == 1
    (line, hint) = error_lines(capsys)
    assert line.startswith(error), line
    assert hint == STARTUP_HINT
    assert not (tmp_path / "nodata").exists()


def test_a_torch_implementation_flag_warns_that_it_has_no_effect():
    flag = r"model\.inner_loop\.optimizer\.init_args\.foreach=True has no effect"
    with pytest.warns(IgnoredSettingWarning, match=flag):
        main(
            [
                "fit",
                "--config",
                SINUSOID,
                "--model.inner_loop.optimizer.foreach=true",
                "--trainer.fast_dev_run=true",
            ]
        )


@pytest.mark.parametrize(
    ("old", "error", "hint"),
    [
        (
            ["--model.inner_lr=0.1"],
            "error: unrecognized arguments: --model.inner_lr=0.1",
            "(model.inner_lr is now model.inner_loop.optimizer.init_args.lr (the inner optimizer: `class_path: "
            "torch.optim.SGD`, `init_args: {lr: 0.4}`))",
        ),
        (
            ["--config", "old.yaml"],
            "error: Subcommand 'fit' does not accept option 'model.learn_inner_lr'",
            "(model.learn_inner_lr is now model.inner_loop.optimizer.init_args.learn_lr, with `class_path: "
            "fmaml.inner_optimizers.SGD` (or Adam, ...))",
        ),
    ],
    ids=["command line", "yaml"],
)
def test_the_old_names_point_to_the_new_ones(old, error, hint, tmp_path, capsys):
    (tmp_path / "old.yaml").write_text("model:\n  learn_inner_lr: per_parameter\n")
    assert command_line(["fit", "--config", SINUSOID, *old, *TINY]) == 2
    assert error_lines(capsys) == [error, hint]


# ------------------------------------------------------------------------------- old checkpoints


def test_a_checkpoint_from_before_the_inner_optimizer_evaluates_with_the_new_config(capsys):
    checkpoint = torch.load(OLD_METASGD_CKPT, weights_only=False)
    assert checkpoint["hyper_parameters"]["learn_inner_lr"] == "per_parameter"  # the old names, indeed
    test = ["test", "--config", SINUSOID, "--model.network.hidden=[8,8]", f"--ckpt_path={OLD_METASGD_CKPT}"]
    test += TINY
    metasgd = [
        "--model.inner_loop.optimizer=fmaml.inner_optimizers.SGD",
        "--model.inner_loop.optimizer.learn_lr=per_parameter",
    ]
    cli = main([*test, *metasgd])
    assert set(cli.model.inner_lrs) == {
        k.removeprefix("inner_lrs.") for k in checkpoint["state_dict"] if "lrs" in k
    }
    for key, rate in cli.model.inner_lrs.items():
        torch.testing.assert_close(rate, checkpoint["state_dict"][f"inner_lrs.{key}"])
    evaluated = metrics(cli)
    assert evaluated["test/loss"] < evaluated["test/loss_before"], evaluated
    # Without learned rates in the config, the checkpoint's rate tensors have nowhere to go: refused before
    # loading, naming today's setting (the run's old `learn_inner_lr` read as `learn_lr`).
    assert command_line(test) == 1
    (line, setting) = error_lines(capsys)
    assert line.startswith("error: --ckpt_path=") and line.endswith("in the network:"), line
    assert (
        setting == "  model.inner_loop.optimizer.init_args.learn_lr: 'off' here, 'per_parameter' in the run"
    )

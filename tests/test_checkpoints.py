"""Checkpoints and evaluation that never mislead: the final step saved whatever stops a fit, resume of the
right run with the right settings, test of trained weights only, and its numbers recomputed."""

import csv
import functools
import math
import os
import signal
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from fixtures import TINY, config
from lightning.pytorch.callbacks import EarlyStopping

import fmaml.module
from fmaml import callbacks
from fmaml.cli import main
from fmaml.finite_guard import FiniteGuard
from fmaml.module import MAML
from fmaml.schedules import CosineAnnealingToMaxSteps

SINUSOID = config("sinusoid.yaml")
# Checkpoints every 5 steps: the runs below stop off that interval.
FIT = [
    "fit",
    "--config",
    SINUSOID,
    "--checkpoint.every_n_train_steps=5",
    "--trainer.limit_val_batches=0",
    *TINY,
]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def last_ckpt(name="fmaml", version=0):
    return os.path.join("logs", name, f"version_{version}", "checkpoints", "last.ckpt")


def load(path):
    return torch.load(path, weights_only=False)


def assert_holds(path, module, step):
    """The checkpoint holds `step` and exactly the module's weights."""
    checkpoint = load(path)
    assert checkpoint["global_step"] == step
    state = module.state_dict()
    assert checkpoint["state_dict"].keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(checkpoint["state_dict"][name], tensor), name


def stop_at(monkeypatch, step, action):
    """Run `action(module)` after meta-step `step`; returns a list that receives the module."""
    seen = []

    def on_train_batch_end(self, *args):
        seen[:] = [self]
        if self.global_step == step:
            action(self)

    monkeypatch.setattr(MAML, "on_train_batch_end", on_train_batch_end, raising=False)
    return seen


# ------------------------------------------------------------------ 1. last.ckpt holds the final step


def test_max_steps_off_the_interval_saves_the_final_step():
    cli = main([*FIT, "--trainer.max_steps=7"])
    assert_holds(last_ckpt(), cli.model, 7)


def test_max_time_saves_the_final_step():
    cli = main([*FIT, "--trainer.max_steps=-1", "--trainer.max_time=00:00:00:03"])
    step = cli.trainer.global_step
    assert step > 0
    assert_holds(last_ckpt(), cli.model, step)


def test_early_stopping_saves_the_final_step():
    # stopping_threshold far above any loss: EarlyStopping stops at the first validation, step 3.
    cli = main(
        [
            *FIT,
            "--trainer.limit_val_batches=null",
            "--trainer.val_check_interval=3",
            "--trainer.max_steps=20",
            "--trainer.callbacks=lightning.pytorch.callbacks.EarlyStopping",
            "--trainer.callbacks.monitor=val/loss",
            "--trainer.callbacks.stopping_threshold=1e9",
        ]
    )
    assert any(isinstance(c, EarlyStopping) for c in cli.trainer.callbacks)
    assert_holds(last_ckpt(), cli.model, 3)


def test_sigterm_saves_the_final_step(monkeypatch):
    seen = stop_at(monkeypatch, 7, lambda module: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit):
        main([*FIT, "--trainer.max_steps=20"])
    assert_holds(last_ckpt(), seen[0], 7)


def test_ctrl_c_stops_after_the_meta_step_and_saves_it(monkeypatch, capsys):
    stop_at(monkeypatch, 7, lambda module: os.kill(os.getpid(), signal.SIGINT))
    sigint_before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a pytest-xdist worker
    cli = main([*FIT, "--trainer.max_steps=20"])
    assert cli.trainer.global_step == 7
    assert_holds(last_ckpt(), cli.model, 7)
    assert signal.getsignal(signal.SIGINT) is sigint_before  # put back after the fit


def callbacks_clock(monkeypatch) -> list[float]:
    """fmaml.callbacks' monotonic clock, moved by the test only (now[0] += seconds): the time between two
    SIGINTs is then what the test says however busy the machine (a real 0.2 s sleep can last a second)."""
    now = [time.monotonic()]
    clock = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    clock.monotonic = lambda: now[0]
    monkeypatch.setattr(callbacks, "time", clock)
    return now


def test_the_same_ctrl_c_delivered_twice_still_saves(monkeypatch):
    """`uv run` without a terminal forwards SIGINT to its child 200 ms after the process group got it."""
    now = callbacks_clock(monkeypatch)

    def ctrl_c_twice(module):
        os.kill(os.getpid(), signal.SIGINT)
        now[0] += 0.2
        os.kill(os.getpid(), signal.SIGINT)

    stop_at(monkeypatch, 7, ctrl_c_twice)
    cli = main([*FIT, "--trainer.max_steps=20"])
    assert cli.trainer.global_step == 7
    assert_holds(last_ckpt(), cli.model, 7)


def test_a_second_ctrl_c_a_moment_later_aborts_without_saving(monkeypatch, capsys):
    now = callbacks_clock(monkeypatch)

    def ctrl_c_then_again(module):
        os.kill(os.getpid(), signal.SIGINT)
        now[0] += 1.2
        os.kill(os.getpid(), signal.SIGINT)

    stop_at(monkeypatch, 7, ctrl_c_then_again)
    sigint_before = signal.getsignal(signal.SIGINT)
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        main([*FIT, "--trainer.max_steps=20"])
    assert load(last_ckpt())["global_step"] == 5  # step 7 was interrupted: not saved
    assert signal.getsignal(signal.SIGINT) is sigint_before


# ------------------------------------------------------------------ 2. resume the right run


def test_last_resumes_the_newest_run_of_its_own_experiment():
    main([*FIT, "--trainer.max_steps=3", "--trainer.logger.init_args.name=a"])
    main([*FIT, "--trainer.max_steps=4", "--trainer.logger.init_args.name=b"])  # newer, other experiment
    config_a, config_b = (open(f"logs/{n}/version_0/config.yaml").read() for n in "ab")
    b_before = load(last_ckpt("b"))

    resumed = main([*FIT, "--trainer.max_steps=6", "--trainer.logger.init_args.name=a", "--ckpt_path=last"])
    assert_holds(last_ckpt("a"), resumed.model, 6)
    assert open("logs/a/version_0/config.yaml").read() == config_a  # the run's own config, untouched
    assert "max_steps: 6" in open("logs/a/version_0/config-1.yaml").read()  # the resume's, beside it
    assert not os.path.exists("logs/a/version_1")  # curves continue in the run's folder
    assert open("logs/b/version_0/config.yaml").read() == config_b
    assert load(last_ckpt("b"))["global_step"] == b_before["global_step"] == 4

    # b resumes from b's step 4, not a's 6.
    resumed_b = main([*FIT, "--trainer.max_steps=5", "--trainer.logger.init_args.name=b", "--ckpt_path=last"])
    assert_holds(last_ckpt("b"), resumed_b.model, 5)


def test_last_with_a_checkpoint_folder_resumes_that_folder(tmp_path):
    folder = ["--checkpoint.dirpath=ckpts/a"]
    main([*FIT, "--trainer.max_steps=3", *folder])
    main([*FIT, "--trainer.max_steps=4"])  # a newer run elsewhere
    with pytest.raises(FileExistsError, match=r"--checkpoint\.dirpath=ckpts/a already holds"):
        main([*FIT, "--trainer.max_steps=3", *folder])  # a new run would overwrite a's files
    resumed = main([*FIT, "--trainer.max_steps=6", "--ckpt_path=last", *folder])
    assert_holds("ckpts/a/last.ckpt", resumed.model, 6)
    assert resumed.trainer.log_dir.endswith("version_0")  # the run's own log folder, not a new one
    assert load(last_ckpt(version=1))["global_step"] == 4


def test_resume_with_other_training_settings_is_refused_listing_every_conflict():
    main([*FIT, "--trainer.max_steps=3"])
    with pytest.raises(ValueError) as error:
        main(
            [
                *FIT,
                "--ckpt_path=last",
                "--model.inner_loop.optimizer.lr=0.1",
                "--data.meta_batch_size=5",
                "--model.optimizer.lr=0.01",
            ]
        )
    message = str(error.value)
    assert "differs from the run" in message
    for key in (
        "model.inner_loop.optimizer.init_args.lr: 0.1 here, 0.01",
        "data.meta_batch_size: 5 here, 2",
        "model.optimizer.init_args.lr",
    ):
        assert key in message, message
    # The same run by its path is checked the same way.
    with pytest.raises(ValueError, match=r"model\.inner_loop\.steps: 2 here, 1 in the run"):
        main([*FIT, f"--ckpt_path={last_ckpt()}", "--model.inner_loop.steps=2"])
    # What only changes how training goes on is allowed.
    resumed = main(
        [
            *FIT,
            "--ckpt_path=last",
            "--trainer.max_steps=4",
            "--checkpoint.every_n_train_steps=2",
            "--model.inner_loop.eval_steps=3",
            "--model.execution.strategy=loop",
        ]
    )
    assert_holds(last_ckpt(), resumed.model, 4)


# ------------------------------------------------------------------ 3, 4. test what was trained, as asked


@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_evaluation_without_a_checkpoint_is_refused(subcommand):
    with pytest.raises(ValueError, match=rf"{subcommand} needs --ckpt_path.*--ckpt_path=initial"):
        main([subcommand, "--config", SINUSOID, *TINY])


def test_initial_weights_only_on_purpose(capsys):
    main(["test", "--config", SINUSOID, "--ckpt_path=initial", *TINY])
    assert "the untrained initial weights" in capsys.readouterr().out


def test_test_honours_the_command_and_names_the_checkpoint(capsys):
    main([*FIT, "--trainer.max_steps=7"])
    test = ["test", "--config", SINUSOID, "--ckpt_path=last", "--data.evaluation.num_test_tasks=10", *TINY]
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        at_training_rate = main(test).trainer.callback_metrics["test/loss_mean"]
    out = capsys.readouterr().out
    assert f"checkpoint {last_ckpt()} (step 7)" in out
    # The evaluation logs into a new folder; no warning about the run's checkpoint folder follows it there.
    assert not [w for w in caught if "dirpath has changed" in str(w.message)], [
        str(w.message) for w in caught
    ]
    # Another inner rate (eval_inner_lr is unset, so the inner optimizer's lr decides) gives another result,
    # with a warning.
    with pytest.warns(
        UserWarning, match=r"model\.inner_loop\.optimizer\.init_args\.lr: 0\.1 here, 0\.01 in the run"
    ):
        faster = main([*test, "--model.inner_loop.optimizer.lr=0.1"]).trainer.callback_metrics[
            "test/loss_mean"
        ]
    assert not torch.isclose(faster, at_training_rate)
    main([*test, "--model.inner_loop.eval_steps=2"])
    assert "after 2 inner steps" in capsys.readouterr().out
    # A different network is refused, by key.
    with pytest.raises(ValueError, match=r"in the network:\n  model\.network\.init_args\.hidden: \[20, 20\]"):
        main([*test, "--model.network.hidden=[20,20]"])


def test_test_mean_and_ci_equal_a_recomputation_from_the_per_task_values():
    main([*FIT, "--trainer.max_steps=3"])
    cli = main(["test", "--config", SINUSOID, "--ckpt_path=last", "--per_task_csv.path=out/tasks.csv", *TINY])
    with open("out/tasks.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["task"]) for r in rows] == list(range(6))  # TINY: 6 test tasks
    losses = [float(r["loss"]) for r in rows]
    mean = sum(losses) / len(losses)
    std = math.sqrt(sum((v - mean) ** 2 for v in losses) / (len(losses) - 1))
    metrics = cli.trainer.callback_metrics
    assert metrics["test/loss_mean"].item() == pytest.approx(mean, rel=1e-6)
    assert metrics["test/loss_ci95"].item() == pytest.approx(1.96 * std / math.sqrt(len(losses)), rel=1e-6)
    assert metrics["test/num_tasks"].item() == 6


# ------------------------------------------------------------------ 5. no logger


def test_fit_without_a_logger_runs_and_checkpoints():
    cli = main([*FIT, "--trainer.max_steps=3", "--trainer.logger=false"])
    assert_holds(os.path.join("checkpoints", "last.ckpt"), cli.model, 3)


# ------------------------------------------------------------------ 6. the network takes the data's inputs


def test_network_input_shape_must_match_the_data(tmp_path):
    # No Omniglot files at this root: the shape error must come before any data preparation.
    args = ["fit", "--config", config("omniglot.yaml"), f"--data.root={tmp_path}/none", *TINY]
    with pytest.raises(ValueError) as error:
        main([*args, "--data.dataset.init_args.image_size=84"])
    message = str(error.value)
    assert "expects inputs [1, 28, 28], but the data gives [1, 84, 84]" in message
    assert "image_size=28" in message and "image_size=84" in message
    with pytest.raises(ValueError, match=r"expects inputs \[3, 28, 28\]"):
        main([*args, "--model.network.init_args.in_channels=3"])


# ------------------------------------------------------------------ 7. the cosine schedule follows max_steps


def cosine(t, total, lr0=1e-3, eta_min=1e-4):
    return eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * min(t, total) / total)) / 2


def test_cosine_schedule_follows_max_steps_across_a_resume(monkeypatch):
    schedule = [
        "--model.lr_scheduler=fmaml.schedules.CosineAnnealingToMaxSteps",
        "--model.lr_scheduler.eta_min=0.0001",
    ]
    stop_at(monkeypatch, 3, lambda module: setattr(module.trainer, "should_stop", True))
    first = main([*FIT, *schedule, "--trainer.max_steps=8"])
    assert first.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(cosine(3, 8), rel=1e-12)

    stop_at(monkeypatch, 5, lambda module: setattr(module.trainer, "should_stop", True))
    resumed = main([*FIT, *schedule, "--trainer.max_steps=16", "--ckpt_path=last"])
    scheduler = resumed.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, CosineAnnealingToMaxSteps) and scheduler.total_steps == 16
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(cosine(5, 16), rel=1e-12)


def test_cosine_schedule_never_rises_past_its_end():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = CosineAnnealingToMaxSteps(optimizer, eta_min=0.1, total_steps=4)
    rates = []
    for _ in range(8):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([cosine(t, 4, 1.0, 0.1) for t in range(1, 9)], rel=1e-12)
    assert rates[3:] == pytest.approx([0.1] * 5)


def test_cosine_schedule_without_a_length_fails_at_start_up():
    with pytest.raises(ValueError, match=r"trainer\.max_steps=-1: .*max_time"):
        main(
            [*FIT, "--model.lr_scheduler=fmaml.schedules.CosineAnnealingToMaxSteps", "--trainer.max_steps=-1"]
        )


def test_torch_cosine_shorter_than_the_run_warns():
    with pytest.warns(UserWarning, match="rises again"):
        main(
            [
                *FIT,
                "--trainer.max_steps=2",
                "--model.lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR",
                "--model.lr_scheduler.T_max=1",
            ]
        )


# ------------------------------------------------------------------ 8. a non-finite meta-loss, both checks


def poison_step(monkeypatch, step):
    """The meta-loss of meta-step `step` becomes NaN."""
    original = MAML._meta_loss

    def meta_loss(self, tasks, params, **inner):
        value, metrics = original(self, tasks, params, **inner)
        return (value * float("nan") if self.global_step == step else value), metrics

    monkeypatch.setattr(MAML, "_meta_loss", meta_loss)


def test_a_nan_meta_loss_never_reaches_weights_or_checkpoints(monkeypatch, tmp_path):
    poison_step(monkeypatch, 3)
    seen = stop_at(monkeypatch, -1, lambda module: None)
    args = [
        *FIT,
        "--trainer.max_steps=20",
        "--checkpoint.every_n_train_steps=2",
        "--trainer.log_every_n_steps=5",
    ]
    kept = {}
    for deferred in (False, True):
        monkeypatch.setattr(fmaml.module, "FiniteGuard", functools.partial(FiniteGuard, defer=deferred))
        monkeypatch.chdir(tmp_path / "deferred" if deferred else tmp_path)
        with pytest.raises(FloatingPointError, match="at step 3"):
            main(args)
        kept[deferred] = seen[0]
        folder = os.path.dirname(last_ckpt())
        for name in os.listdir(folder):
            checkpoint = load(os.path.join(folder, name))
            assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values()), name
            for state in checkpoint["optimizer_states"][0]["state"].values():
                assert all(torch.isfinite(t).all() for t in state.values()), name
        os.makedirs(tmp_path / "deferred", exist_ok=True)
    # Immediate check (CPU): stopped before the update of step 3, saved by the exception checkpoint.
    assert_holds(os.path.join(tmp_path, last_ckpt()), kept[False], 3)
    # Deferred (accelerators): the update of step 3 was undone on the device, the check at the step-4
    # checkpoint stopped the run without writing it, and the weights in memory are bit-identical to the
    # immediate check's.
    assert load(os.path.join(tmp_path, "deferred", last_ckpt()))["global_step"] == 2
    for (name, a), b in zip(kept[False].state_dict().items(), kept[True].state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_deferred_update_is_skipped_on_the_device_from_the_first_bad_loss(monkeypatch):
    module = MAML(lambda outputs: torch.nn.Linear(2, outputs), num_outputs=1, loss="mse")
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    weight = module.network.weight
    module.manual_backward = lambda value: value.backward()
    steps = iter(range(10))
    monkeypatch.setattr(MAML, "global_step", property(lambda self: next(steps)), raising=False)

    def loss(scale):
        optimizer.zero_grad()
        return (weight.sum() - 1) ** 2 * scale

    initial = weight.detach().clone()
    guard = module.finite_guard
    guard._guarded_update(module, optimizer, loss(1.0))  # step 0: applied
    after_good = weight.detach().clone()
    assert not torch.equal(after_good, initial)
    moments = {k: v.clone() for k, v in optimizer.state[weight].items()}
    guard._guarded_update(module, optimizer, loss(float("inf")))  # step 1: skipped, weights and moments kept
    guard._guarded_update(module, optimizer, loss(1.0))  # step 2: finite, but after a bad one: skipped too
    assert torch.equal(weight, after_good)
    for key, value in optimizer.state[weight].items():
        assert torch.equal(value, moments[key]), key
    assert not guard.is_finite()
    with pytest.raises(FloatingPointError, match="at step 1"):
        guard.raise_if_not_finite(module.global_step)

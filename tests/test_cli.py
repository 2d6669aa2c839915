"""`python -m fmaml` end to end: fit -> validate -> test on tiny offline fixtures, configs, bad input."""

import csv
import glob
import os
import shutil
import sys
import warnings

import pytest
import torch
from fixtures import TINY, config, real_omniglot_root, tiny_omniglot_root, write_miniimagenet
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmaml.cli import command_line, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def run(*args: str):
    return main([*args])


@pytest.fixture
def omniglot_root(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logs/ and checkpoints go here
    return tiny_omniglot_root(tmp_path_factory)


def test_fit_validate_test_on_tiny_omniglot(omniglot_root, tmp_path, capsys):
    common = [
        "--config",
        config("omniglot.yaml"),
        f"--data.root={omniglot_root}",
        "--model.network.filters=8",
        *TINY,
    ]
    fit = run(
        "fit",
        *common,
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=2",
    )
    version = tmp_path / "logs" / "fmaml" / "version_0"
    assert glob.glob(str(version / "events.out.tfevents.*")), "no TensorBoard event file"
    # The "before adaptation" metrics are computed on exactly the steps whose metrics are written.
    events = EventAccumulator(str(version))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in ("train/loss", "train/accuracy_before")}
    assert steps["train/loss"] == steps["train/accuracy_before"] == [1, 3], steps
    last = version / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, weights_only=False)["global_step"] == 4
    metrics = fit.trainer.callback_metrics
    for name in (
        "train/loss",
        "train/accuracy_before",
        "val/accuracy",
        "val/accuracy_before",
        "val/loss_before",
    ):
        assert name in metrics, name
    # Evaluation adapts for real: 3 inner steps on the support set lower the query loss.
    assert metrics["val/loss"] < metrics["val/loss_before"]

    validate = run("validate", *common, f"--ckpt_path={last}")
    assert (
        validate.trainer.callback_metrics["val/loss"] < validate.trainer.callback_metrics["val/loss_before"]
    )

    capsys.readouterr()
    test = run("test", *common, f"--ckpt_path={last}", "--per_task_csv.path=tasks.csv")
    out = capsys.readouterr().out
    assert "test accuracy over 6 tasks after 3 inner steps" in out and "(95% CI)" in out
    assert f"checkpoint {last} (step 4)" in out
    metrics = test.trainer.callback_metrics
    assert metrics["test/num_tasks"] == 6
    # The mean is over tasks, each an accuracy over its 5 ways x 15 queries.
    with open("tasks.csv") as f:
        per_task = [float(row["accuracy"]) for row in csv.DictReader(f)]
    assert len(per_task) == 6 and all(abs(a * 75 - round(a * 75)) < 1e-4 for a in per_task)
    assert metrics["test/accuracy_mean"].item() == pytest.approx(sum(per_task) / 6, rel=1e-6)


def test_ways_are_linked_from_data_to_the_network(omniglot_root):
    cli = run(
        "fit",
        "--config",
        config("omniglot_5w1s.yaml"),
        f"--data.root={omniglot_root}",
        "--data.ways=3",
        "--trainer.fast_dev_run=true",
        "--model.network.filters=4",
        *TINY,
    )
    assert cli.model.network.head.out_features == 3


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_prints(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "  inner_loop:\n" in out and "meta_batch_size" in out and "class_path" in out


@pytest.mark.parametrize(
    "name", ["omniglot.yaml", "omniglot_5w1s.yaml", "omniglot_20w1s.yaml", "omniglot_20w5s.yaml"]
)
def test_omniglot_configs_fast_dev_run(name, omniglot_root):
    # The tiny fixture has 8 characters per split, x4 rotations: enough for 20 ways.
    cli = run(
        "fit",
        "--config",
        config(name),
        f"--data.root={omniglot_root}",
        "--trainer.fast_dev_run=true",
        "--model.network.filters=4",
        *TINY,
    )
    assert cli.trainer.global_step == 1
    assert cli.model.network.head.out_features == cli.datamodule.ways


def test_sinusoid_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run("fit", "--config", config("sinusoid.yaml"), "--trainer.fast_dev_run=true", *TINY)
    assert cli.model.network.layers[-1].out_features == 1
    assert cli.model.loss == "mse"
    assert "train/loss" in cli.trainer.callback_metrics


def test_called_from_python_the_interpreters_own_argv_is_left_alone(tmp_path, monkeypatch):
    """In a notebook, sys.argv is the kernel's (`-f kernel.json`): main(args) parses args only, and
    Lightning's warning about giving both stays out of the user's cell output."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run("fit", "--config", config("sinusoid.yaml"), "--trainer.fast_dev_run=true", *TINY)
    assert cli.trainer.global_step == 1
    assert not [w for w in caught if "args parameter" in str(w.message)], [str(w.message) for w in caught]


def test_evaluation_settings_given_with_a_checkpoint_are_used(tmp_path, monkeypatch):
    """Lightning rebuilds the model from the checkpoint's hyperparameters; the evaluation settings given
    on the command line must still win (the paper's protocol tests one model after 1, 5 and 10 steps)."""
    monkeypatch.chdir(tmp_path)
    run(
        "fit",
        "--config",
        config("sinusoid.yaml"),
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=0",
        *TINY,
    )
    last = str(tmp_path / "logs" / "fmaml" / "version_0" / "checkpoints" / "last.ckpt")
    losses = {}
    for steps in (1, 10):
        test = run(
            "test",
            "--config",
            config("sinusoid.yaml"),
            f"--ckpt_path={last}",
            f"--model.inner_loop.eval_steps={steps}",
            *TINY,
        )
        assert test.model.eval_inner["steps"] == steps
        losses[steps] = float(test.trainer.callback_metrics["test/loss_mean"])
    assert losses[10] < losses[1], losses  # more adaptation steps, lower query MSE


def test_miniimagenet_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_miniimagenet(tmp_path / "data")
    cli = run(
        "fit",
        "--config",
        config("miniimagenet.yaml"),
        f"--data.root={tmp_path / 'data'}",
        "--trainer.fast_dev_run=true",
        "--model.inner_loop.steps=1",
        "--model.inner_loop.eval_steps=1",
        "--model.execution.strategy=loop",  # auto's timing probe would be most of this test at 84x84
        *TINY,
    )
    assert cli.model.network.features[0][0].in_channels == 3


def test_only_the_named_subcommand_is_built_and_a_typo_lists_every_one(tmp_path, monkeypatch, capsys):
    """`python -m fmaml fit ...` builds the fit parser alone (fmaml.cli.MAMLCLI: the other three took most
    of the CLI's start-up); a command line that names none, or a misspelt one, gets all four, so that its
    usage lists them."""
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["validate", "--config", config("sinusoid.yaml"), "--ckpt_path=initial", *TINY], exit_on_error=False
    )
    assert cli.subcommand == "validate" and list(cli.subcommands()) == ["validate"]
    assert command_line(["fitt"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fitt' (choose from 'fit', 'validate', 'test', 'predict')" in err, err


def test_module_entry_point_runs(tmp_path, monkeypatch, capsys):
    """What `python -m fmaml` runs (fmaml/__main__.py: `sys.exit(command_line())`), here in-process: the
    interpreter's own start and exit status are run in subprocesses by test_ddp (exit 0) and
    test_startup_errors (exit 1)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        command_line(["fit", "--config", config("sinusoid.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    inner_optimizer = (
        "    optimizer:\n      class_path: torch.optim.SGD\n      init_args:\n        lr: 0.01\n"
    )
    assert "MLP" in out and inner_optimizer in out


# ------------------------------------------------------------------------------------- bad input


def test_missing_data_offline_names_files_and_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception) as error:
        run(
            "fit",
            "--config",
            config("omniglot.yaml"),
            f"--data.root={tmp_path / 'empty'}",
            "--data.dataset.init_args.download=false",  # no network here; elsewhere it would download
            *TINY,
        )
    message = str(error.value)
    assert "images_background.zip" in message and "images_evaluation.zip" in message
    assert str(tmp_path / "empty" / "omniglot") in message


def test_corrupt_zip_is_named(tmp_path, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path)
    source = os.path.join(tiny_omniglot_root(tmp_path_factory), "omniglot")
    folder = tmp_path / "data" / "omniglot"
    folder.mkdir(parents=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        shutil.copy(os.path.join(source, name), folder / name)
    data = (folder / "images_evaluation.zip").read_bytes()
    (folder / "images_evaluation.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as error:
        run("fit", "--config", config("omniglot.yaml"), f"--data.root={tmp_path / 'data'}", *TINY)
    assert "images_evaluation.zip" in str(error.value)


def test_too_many_ways_fails_before_training(omniglot_root):
    with pytest.raises(ValueError, match=r"data\.ways=200"):
        run(
            "fit",
            "--config",
            config("omniglot.yaml"),
            f"--data.root={omniglot_root}",
            "--data.ways=200",
            *TINY,
        )


@pytest.mark.parametrize(
    ("key", "typo"),
    [("    optimizer:", "    optimiser:"), ("        lr: 0.4", "        lrr: 0.4")],
    ids=["model key", "inner optimizer argument"],
)
def test_typo_in_config_key_is_rejected(key, typo, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text = open(config("omniglot.yaml")).read()
    assert text.count(key) == 1
    bad.write_text(text.replace(key, typo))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code != 0
    assert typo.split(":")[0].strip() in capsys.readouterr().err


# ------------------------------------------------------------------------------------- real Omniglot


@pytest.fixture
def real_root(tmp_path_factory, tmp_path, monkeypatch):
    root = real_omniglot_root(tmp_path_factory)  # skips unless FMAML_OMNIGLOT_ZIPS is set
    monkeypatch.chdir(tmp_path)
    return root


@pytest.mark.real_data
def test_real_omniglot_fast_dev_run(real_root):
    cli = run(
        "fit",
        "--config",
        config("omniglot.yaml"),
        f"--data.root={real_root}",
        "--trainer.fast_dev_run=true",
        *TINY,
    )
    assert cli.trainer.global_step == 1


@pytest.mark.real_data
@pytest.mark.slow
def test_real_omniglot_5w1s_learns(real_root):
    """A few dozen meta-steps: adaptation must beat the unadapted model on the validation tasks."""
    cli = run(
        "fit",
        "--config",
        config("omniglot_5w1s.yaml"),
        f"--data.root={real_root}",
        "--trainer.max_steps=30",
        "--trainer.val_check_interval=30",
        "--model.network.filters=32",
        "--data.meta_batch_size=4",  # 0.52 vs 0.19 here (8 tasks: 0.55 vs 0.20, in 1.6x the time)
        "--data.evaluation.num_val_tasks=40",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    )
    metrics = cli.trainer.callback_metrics
    assert metrics["val/accuracy"] > metrics["val/accuracy_before"] + 0.2, metrics

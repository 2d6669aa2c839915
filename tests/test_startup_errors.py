"""Issue 19, item 8: `python -m fmaml` prints a start-up error (a bad setting, missing data, a command line
jsonargparse rejects) as its message alone, with a non-zero exit; FMAML_DEBUG=1 shows the traceback. An
error once work has begun, and Ctrl-C, are not start-up errors and go on as before."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from fixtures import TINY, config

from fmaml.cli import MAMLCLI, command_line
from fmaml.module import MAML

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DATA = ["--data.dataset.init_args.download=false"]  # no network here; elsewhere it would download


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err, err
    return [line for line in err.splitlines() if line.startswith(("error:", "("))]


def test_unknown_key_is_one_line_without_usage(in_tmp, capsys):
    code = command_line(["fit", "--config", config("omniglot.yaml"), "--model.nosuch=1"])
    assert code == 2
    assert error_lines(capsys) == [
        "error: unrecognized arguments: --model.nosuch=1",
        "(--help lists every setting)",
    ]


def test_bad_value_is_its_message(in_tmp, capsys):
    code = command_line(
        ["fit", "--config", config("omniglot.yaml"), "--model.inner_loop.optimizer.lr=-1", *TINY]
    )
    assert code == 1
    lines = error_lines(capsys)
    assert lines[0] == "error: model.inner_loop.optimizer: Invalid learning rate: -1.0", lines
    assert lines[1:] == ["(FMAML_DEBUG=1 shows the traceback)"]


def test_missing_data_is_its_message(in_tmp, capsys):
    root = in_tmp / "nodata"
    code = command_line(["fit", "--config", config("omniglot.yaml"), f"--data.root={root}", *NO_DATA, *TINY])
    assert code == 1
    lines = error_lines(capsys)
    assert lines[0].startswith("error: Omniglot not found") and str(root / "omniglot") in lines[0], lines


def test_debug_env_raises_as_before(in_tmp, monkeypatch):
    monkeypatch.setenv("FMAML_DEBUG", "1")
    with pytest.raises(ValueError, match=r"model\.inner_loop\.optimizer: Invalid learning rate: -1\.0"):
        command_line(
            ["fit", "--config", config("omniglot.yaml"), "--model.inner_loop.optimizer.lr=-1", *TINY]
        )


def test_error_once_training_runs_keeps_its_traceback(in_tmp, monkeypatch):
    """A ValueError from inside a meta-step may be a bug: it is raised, not reduced to its message."""

    def broken_step(self, tasks, batch_idx):
        raise ValueError("a bug inside the meta-step")

    monkeypatch.setattr(MAML, "training_step", broken_step)
    with pytest.raises(ValueError, match="a bug inside the meta-step"):
        command_line(
            [
                "fit",
                "--config",
                config("sinusoid.yaml"),
                "--trainer.fast_dev_run=true",
                "--model.execution.strategy=loop",
            ]
            + TINY
        )


def test_ctrl_c_at_start_up_is_not_caught(in_tmp, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(MAMLCLI, "before_instantiate_classes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        command_line(["fit", "--config", config("sinusoid.yaml"), *TINY])


def test_ctrl_c_during_training_still_stops_and_saves(in_tmp, monkeypatch):
    """fmaml.callbacks turns Ctrl-C into a stop after the meta-step, and the command line exits 0."""

    def ctrl_c_after_step_3(self, *args):
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MAML, "on_train_batch_end", ctrl_c_after_step_3, raising=False)
    fit = [
        "fit",
        "--config",
        config("sinusoid.yaml"),
        "--trainer.max_steps=20",
        "--model.execution.strategy=loop",
    ]
    assert command_line([*fit, "--trainer.limit_val_batches=0", *TINY]) == 0
    last = in_tmp / "logs" / "fmaml" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3


@pytest.mark.slow
def test_python_m_fmaml_without_data(tmp_path, monkeypatch):
    """As a user meets it: the first run without data. Then the same with FMAML_DEBUG=1 (in-process: its
    exception, raised out of `command_line`, is what the interpreter prints as the traceback)."""
    command = [sys.executable, "-m", "fmaml", "fit", "--config", config("omniglot.yaml")]
    command += [f"--data.root={tmp_path / 'nodata'}", *NO_DATA, "--trainer.max_steps=1"]
    env = {k: v for k, v in os.environ.items() if k != "FMAML_DEBUG"} | {"PYTHONPATH": REPO}
    plain = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert plain.returncode == 1, plain.stderr
    assert "Traceback" not in plain.stderr, plain.stderr
    assert len(plain.stderr.splitlines()) <= 8, plain.stderr
    assert plain.stderr.splitlines()[-2].startswith("error: Omniglot not found"), plain.stderr
    assert plain.stderr.splitlines()[-1] == "(FMAML_DEBUG=1 shows the traceback)"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FMAML_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="^Omniglot not found"):
        command_line(command[3:])


@pytest.mark.parametrize(
    "algorithm, option", [("norm", "meta_objective.clip_norm"), ("value", "meta_objective.clip_value")]
)
def test_lightning_gradient_clipping_points_to_the_meta_gradient_option(in_tmp, capsys, algorithm, option):
    """Lightning refuses to clip under manual optimization (with its own traceback); fmaml names its option."""
    args = ["--trainer.gradient_clip_val=10", f"--trainer.gradient_clip_algorithm={algorithm}", *TINY]
    code = command_line(["fit", "--config", config("sinusoid.yaml"), *args])
    assert code == 1
    assert error_lines(capsys)[0] == (
        "error: trainer.gradient_clip_val=10.0: Lightning cannot clip fmaml's manual meta-optimization; "
        f"use --model.{option}=10.0 instead"
    )

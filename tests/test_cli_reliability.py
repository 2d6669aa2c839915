"""Bad input caught before training, and resuming with `--ckpt_path last`."""

import os

import pytest
import torch

from fmaml.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINUSOID = os.path.join(REPO, "configs", "sinusoid.yaml")
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.evaluation.num_val_tasks=4",
]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_missing_checkpoint_file_is_named():
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path=nowhere\.ckpt: no such checkpoint"):
        main(["test", "--config", SINUSOID, "--ckpt_path=nowhere.ckpt", *QUIET])


def test_resume_last_without_a_previous_run_is_explained():
    with pytest.raises(FileNotFoundError, match="--ckpt_path=last: no checkpoint matches"):
        main(["fit", "--config", SINUSOID, "--ckpt_path=last", *QUIET])


def test_resume_last_continues_the_newest_run(tmp_path):
    first = main(
        ["fit", "--config", SINUSOID, "--trainer.max_steps=3", "--trainer.val_check_interval=3", *QUIET]
    )
    assert first.trainer.global_step == 3
    resumed = main(
        [
            "fit",
            "--config",
            SINUSOID,
            "--ckpt_path=last",
            "--trainer.max_steps=5",
            "--trainer.val_check_interval=5",
        ]
        + QUIET
    )
    assert resumed.trainer.global_step == 5
    # Same version folder: the TensorBoard curves continue instead of starting a new run.
    last = tmp_path / "logs" / "fmaml" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 5
    assert not (tmp_path / "logs" / "fmaml" / "version_1").exists()


def test_nan_meta_loss_stops_at_once_with_the_step():
    with pytest.raises(
        FloatingPointError, match=r"at step 0.*model\.inner_loop\.optimizer's lr \(now 1e\+30\)"
    ):
        main(
            [
                "fit",
                "--config",
                SINUSOID,
                "--model.inner_loop.optimizer.lr=1e30",
                "--trainer.max_steps=3",
                *QUIET,
            ]
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.inner_loop.steps=0", r"model\.inner_loop\.steps=0"),
        ("--model.inner_loop.eval_steps=-2", r"model\.inner_loop\.eval_steps=-2"),
        (
            "--model.inner_loop.optimizer.lr=-0.1",
            r"model\.inner_loop\.optimizer: Invalid learning rate: -0\.1",
        ),
        ("--model.inner_loop.eval_lr=0", r"model\.inner_loop\.eval_lr=0"),
        ("--model.execution.strategy=pmap", r"model\.execution\.strategy='pmap'"),
    ],
)
def test_bad_inner_loop_settings_fail_at_start_up(override, message):
    with pytest.raises(ValueError, match=message):
        main(["fit", "--config", SINUSOID, override, *QUIET])


def test_wrong_class_path_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", SINUSOID, "--model.network=fmaml.models.NoSuchNet"])
    assert exit_info.value.code != 0
    assert "NoSuchNet" in capsys.readouterr().err


def test_checkpoint_of_another_model_shape_is_rejected(tmp_path):
    main(["fit", "--config", SINUSOID, "--trainer.max_steps=1", "--trainer.val_check_interval=1", *QUIET])
    last = tmp_path / "logs" / "fmaml" / "version_0" / "checkpoints" / "last.ckpt"
    # The run's stored config names the conflicting setting ...
    with pytest.raises(ValueError, match=r"in the network:\n  model\.network\.init_args\.hidden"):
        main(["test", "--config", SINUSOID, "--model.network.hidden=[20,20]", f"--ckpt_path={last}", *QUIET])
    # ... and a checkpoint without one (written before fmaml stored it) still fails on the shapes.
    checkpoint = torch.load(last, weights_only=False)
    del checkpoint["fmaml_run"]
    torch.save(checkpoint, tmp_path / "bare.ckpt")
    (tmp_path / "logs" / "fmaml" / "version_0" / "config.yaml").unlink()
    with pytest.warns(UserWarning, match="cannot check the settings against its run"):
        with pytest.raises(ValueError, match="checkpoint holds a network of another shape"):
            main(
                [
                    "test",
                    "--config",
                    SINUSOID,
                    "--model.network.hidden=[20,20]",
                    f"--ckpt_path={tmp_path}/bare.ckpt",
                    *QUIET,
                ]
            )


def test_output_size_cannot_be_set_apart_from_ways(capsys):
    """The number of outputs is linked from data.ways; typing it for the model is refused, not ignored."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", SINUSOID, "--model.num_outputs=3"])
    assert exit_info.value.code != 0
    assert "num_outputs" in capsys.readouterr().err

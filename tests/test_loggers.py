"""Loggers by config: TensorBoard by default, wandb (offline) and MLflow (a real SQLite tracking database)
beside it, the resolved config logged to each, and `--trainer.default_root_dir` honoured."""

import glob
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmaml.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINUSOID = [
    "--config", os.path.join(REPO, "configs", "sinusoid.yaml"), "--data.meta_batch_size=2",
    "--data.evaluation.num_val_tasks=2", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]  # fmt: skip


def logger_config(name: str) -> list[str]:
    return ["--config", os.path.join(REPO, "configs", "loggers", f"{name}.yaml")]


def tensorboard_scalars(version_dir) -> dict[str, list]:
    events = EventAccumulator(str(version_dir))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_default_root_dir_holds_logs_and_checkpoints_and_last_resumes_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "experiments"
    main(["fit", *SINUSOID, f"--trainer.default_root_dir={root}"])
    version = root / "logs" / "fmaml" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert (version / "config.yaml").is_file()
    assert "val/loss" in tensorboard_scalars(version)
    assert not (tmp_path / "logs").exists(), "nothing may go to ./logs when default_root_dir is given"
    resumed = main(
        ["fit", *SINUSOID, f"--trainer.default_root_dir={root}", "--ckpt_path=last", "--trainer.max_steps=6"]
    )
    assert resumed.trainer.global_step == 6
    assert torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_tensorboard_gets_the_resolved_config_as_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *SINUSOID, "--model.inner_loop.optimizer.lr=0.0123"])
    events = EventAccumulator(str(tmp_path / "logs" / "fmaml" / "version_0"))
    events.Reload()
    (text,) = [e for e in events.Tensors("config/text_summary")]
    config = text.tensor_proto.string_val[0].decode()
    assert "inner_loop:" in config and "lr: 0.0123" in config and "class_path: fmaml.MLP" in config


def test_wandb_offline_writes_a_run_beside_tensorboard(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is an optional extra (in the dev group)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    main(["fit", *SINUSOID, *logger_config("wandb"), "--model.inner_loop.optimizer.lr=0.0123"])
    wandb.finish()
    # finish() returns before wandb's service process has written the run's file (a race the test lost on
    # a busy machine, and on an idle one too); teardown waits for the service to exit, as a script's end does.
    wandb.teardown()
    (run,) = glob.glob(str(tmp_path / "logs" / "wandb" / "offline-run-*"))
    (log,) = glob.glob(os.path.join(run, "run-*.wandb"))
    written = open(log, "rb").read()
    for key in (b"val/loss", b"train/loss", b"model.inner_loop.optimizer.init_args.lr"):
        assert key in written, key
    # TensorBoard is still the first logger: it holds the run's folders, checkpoints and curves.
    version = tmp_path / "logs" / "fmaml" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").is_file() and "val/loss" in tensorboard_scalars(version)


@pytest.mark.slow
def test_mlflow_logs_metrics_and_config_to_a_sqlite_database(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra (in the dev group)")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    main(["fit", *SINUSOID, *logger_config("mlflow"), "--model.inner_loop.optimizer.lr=0.0123"])
    database = tmp_path / "logs" / "mlflow.db"
    assert database.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    (run,) = client.search_runs([client.get_experiment_by_name("fmaml").experiment_id])
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in history] == [1, 3]
    # The same values as TensorBoard's, read back from the database.
    tensorboard = tensorboard_scalars(tmp_path / "logs" / "fmaml" / "version_0")["val/loss"]
    assert [m.value for m in history] == pytest.approx([e.value for e in tensorboard])
    assert run.data.params["model.inner_loop.optimizer.init_args.lr"] == "0.0123"

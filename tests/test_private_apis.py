"""Every private API listed in fmaml/private_apis.py, exercised against the installed Lightning and torch:
an upgrade that removes or changes one fails here, by name, instead of deep inside a run. Also the public
reconstruction of Lightning's private `should_update_logs` that fmaml.module uses instead of it."""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from fmaml.callbacks import config_dict
from fmaml.module import MAML
from fmaml.private_apis import (
    PrivateAPIError,
    attached_trainer,
    logging_step,
    subcommand_parser,
    uses_distributed_sampler,
)


class RecordingLogger(Logger):
    """Keeps every (metrics, step) Lightning writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[tuple[dict, int]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.written.append((dict(metrics), step))


class OneStepPerBatch(LightningModule):
    """Trains as fmaml.module.MAML does (manual optimization, one optimizer step per training_step) and
    records, at each step, fmaml's rule for logging this step next to Lightning's."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.automatic_optimization = False
        self.logs_this_step: list[tuple[bool, bool]] = []

    def training_step(self, batch, batch_idx):
        fmaml_rule = MAML._logs_this_step(self)  # uses only self.trainer
        self.logs_this_step.append((fmaml_rule, self.trainer._logger_connector.should_update_logs))
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.layer(batch).pow(2).mean()
        self.manual_backward(loss)
        optimizer.step()
        self.log("loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.randn(64, 2), batch_size=2)


class StepsAtBatchEnd(Callback):
    """Records `logging_step` where fmaml.callbacks.TrainingTime reads it; stops the fit at `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.at_batch_end: list[int] = []
        self.at_train_end: int | None = None
        self.stop_at = stop_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.stop_at:  # as a Ctrl-C or a time budget does, before the step's training_step
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.at_batch_end.append(logging_step(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        self.at_train_end = logging_step(trainer)


def fit(max_steps: int, log_every_n_steps: int, stop_at: int | None = None):
    logger, steps, module = RecordingLogger(), StepsAtBatchEnd(stop_at), OneStepPerBatch()
    trainer = Trainer(
        max_steps=max_steps,
        log_every_n_steps=log_every_n_steps,
        logger=logger,
        callbacks=[steps],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return logger, steps, module


def test_logging_step_is_the_step_lightning_writes_the_modules_logs_at():
    logger, steps, _ = fit(max_steps=5, log_every_n_steps=1)
    written = [step for metrics, step in logger.written if "loss" in metrics]
    assert written == [0, 1, 2, 3, 4]
    assert steps.at_batch_end == written  # TrainingTime's points land on the module's steps
    assert steps.at_train_end - 1 == written[-1]  # TrainingTime's last point, at on_train_end


@pytest.mark.parametrize(
    "max_steps, log_every_n_steps, stop_at",
    [(7, 3, None), (7, 0, None), (9, 4, 5)],
    ids=["every-3", "never", "stopped-early"],
)
def test_fmamls_public_rule_for_logging_a_step_is_lightnings(max_steps, log_every_n_steps, stop_at):
    _, _, module = fit(max_steps, log_every_n_steps, stop_at)
    ours, lightnings = zip(*module.logs_this_step, strict=True)
    assert ours == lightnings
    assert any(ours) == (log_every_n_steps > 0)  # the cases are not all trivially False


def test_uses_distributed_sampler_is_the_trainers_argument():
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    assert uses_distributed_sampler(Trainer(**quiet)) is True
    assert uses_distributed_sampler(Trainer(use_distributed_sampler=False, **quiet)) is False


class Stop(Exception):
    pass


class ParserProbe(LightningCLI):
    def before_instantiate_classes(self) -> None:
        raise Stop(subcommand_parser(self, self.subcommand), self.config[self.subcommand])


def test_subcommand_parser_dumps_the_subcommands_config(monkeypatch):
    monkeypatch.setattr("sys.argv", ["probe"])  # the command line is `args`
    with pytest.raises(Stop) as stop:
        ParserProbe(BoringModel, args=["fit", "--trainer.max_steps=3"])
    dumped = config_dict(*stop.value.args)  # as fmaml.cli compares a resume's settings with its run's
    assert dumped["trainer"]["max_steps"] == 3
    assert "ckpt_path" in dumped and "fit" not in dumped  # the fit subcommand's config, not the whole


# What fmaml.callbacks.Checkpoint overrides, calls and sets on ModelCheckpoint, with the parameters it uses.
CHECKPOINT_METHODS = {
    "_save_checkpoint": ["self", "trainer", "filepath"],
    "_save_last_checkpoint": ["self", "trainer", "monitor_candidates"],
    "_should_skip_saving_checkpoint": ["self", "trainer"],
    "_monitor_candidates": ["self", "trainer"],
}
CHECKPOINT_ATTRIBUTES = ("_last_global_step_saved", "_last_checkpoint_saved")


@pytest.mark.parametrize("name", CHECKPOINT_METHODS)
def test_model_checkpoint_still_has_the_methods_fmamls_checkpoint_uses(name):
    method = getattr(ModelCheckpoint, name, None)
    assert callable(method), (
        f"Lightning's ModelCheckpoint has no {name} any more: fmaml.callbacks.Checkpoint uses it"
    )
    parameters = list(inspect.signature(method).parameters)
    assert parameters == CHECKPOINT_METHODS[name], (
        f"ModelCheckpoint.{name}{inspect.signature(method)} changed: fmaml.callbacks.Checkpoint calls it as "
        f"{name}({', '.join(CHECKPOINT_METHODS[name])})"
    )


def test_model_checkpoint_still_keeps_the_state_fmamls_checkpoint_sets():
    checkpoint = ModelCheckpoint()
    missing = [name for name in CHECKPOINT_ATTRIBUTES if not hasattr(checkpoint, name)]
    assert not missing, f"ModelCheckpoint no longer keeps {missing}: fmaml.callbacks.Checkpoint sets them"


def test_torch_private_pytree_round_trips_what_fmaml_maml_gives_it():
    from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

    tree = {"w": torch.ones(2), "b": (torch.zeros(1), [torch.full((1,), 3.0)])}
    leaves, spec = tree_flatten(tree)
    assert len(leaves) == 3
    doubled = tree_unflatten([2 * leaf for leaf in leaves], spec)
    assert torch.equal(doubled["b"][1][0], torch.tensor([6.0]))
    assert torch.equal(tree_map(lambda x: x + 1, tree)["w"], torch.full((2,), 2.0))


def test_a_missing_private_api_is_named_with_where_to_look():
    with pytest.raises(
        PrivateAPIError, match=r"fit_loop\.epoch_loop\._batches_that_stepped.*private_apis\.py"
    ):
        logging_step(object())


def test_attached_trainer_is_none_until_a_trainer_holds_the_module():
    module = BoringModel()
    assert attached_trainer(module) is None
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert attached_trainer(module) is trainer


# Private members of Lightning, Optuna and LightningCLI that fmaml once read in place: read only through
# fmaml/private_apis.py now (ModelCheckpoint's, which fmaml.callbacks.Checkpoint subclasses, are tested above).
PRIVATE_NAMES = {
    "_logger_connector",
    "_accelerator_connector",
    "_batches_that_stepped",
    "_storage",
    "_backend",
    "_trial_id",
    "_study_id",
    "_parser",
    "_trainer",
}


def test_fmaml_reads_private_members_only_through_private_apis():
    package = pathlib.Path(__file__).resolve().parents[1] / "fmaml"
    found = [
        f"{path.relative_to(package.parent)}:{node.lineno}: .{node.attr}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "private_apis.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES
    ]
    assert not found, "private members read outside fmaml/private_apis.py:\n" + "\n".join(found)

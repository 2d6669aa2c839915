"""The private (underscored) APIs of Lightning and torch that fmaml relies on, each because no public one
gives the same thing in the installed versions. tests/test_private_apis.py exercises every one of them
against the installed packages, so that an upgrade which moves one fails there, by name, rather than deep
inside a run.

Read through this module's accessors (an upgrade that breaks one raises `PrivateAPIError`, naming it):
- `logging_step(trainer)`: Lightning's `trainer.fit_loop.epoch_loop._batches_that_stepped`, the step at
  which the module's `self.log` calls are written. `fmaml.callbacks.TrainingTime` writes its own scalar at
  that step, so that its points line up with the module's; Lightning's LearningRateMonitor and
  DeviceStatsMonitor read the same attribute for the same reason.
- `uses_distributed_sampler(trainer)`: the Trainer's `use_distributed_sampler` argument, which Lightning
  keeps only on `trainer._accelerator_connector`. `fmaml.data.MetaDataModule` gives each DDP process its own
  tasks, and must refuse a Trainer that would also wrap its loaders in a DistributedSampler.
- `subcommand_parser(cli, subcommand)`: `LightningCLI._parser(subcommand)`, the parser of one subcommand,
  which turns that subcommand's config into what config.yaml holds (`fmaml.cli` compares a resumed run's
  settings with those stored in its checkpoint).

Also here, though public: `attached_trainer(module)`, the module's Trainer or None, for code that also runs
without one. Lightning's public `module.trainer` raises when no Trainer is attached; fmaml.module read the
private `module._trainer` instead.

Used where they are, because they cannot move (a subclass overrides its base class's members; an import
names its module), and named here so that this list is complete:
- `fmaml.callbacks.Checkpoint` subclasses Lightning's ModelCheckpoint: it overrides `_save_checkpoint` (to
  write each file whole or not at all), calls `_save_last_checkpoint`, `_should_skip_saving_checkpoint` and
  `_monitor_candidates` (to save on a wall-clock interval and at the end of every fit), and sets
  `_last_global_step_saved` and `_last_checkpoint_saved` as the base class's own save does.
- `fmaml.maml` imports `tree_flatten`, `tree_map` and `tree_unflatten` from `torch.utils._pytree`: the
  installed torch has no public pytree module (no `torch.utils.pytree`); torch.func uses the same functions.
- `fmaml.data.torchmeta_compat` puts back torchvision's private `_get_confirm_token` and
  `_save_response_content`, which torchvision removed and torchmeta still imports.
"""

from __future__ import annotations

import functools


class PrivateAPIError(RuntimeError):
    """A private API fmaml relies on is gone from the installed version of its package."""


def _read(obj, path: str, package: str):
    """`obj.<path>` (a dotted attribute path), or a PrivateAPIError naming what is missing and where."""
    try:
        return functools.reduce(getattr, path.split("."), obj)
    except AttributeError as error:
        raise PrivateAPIError(
            f"the installed {package} has no `{type(obj).__name__}.{path}` ({error}), a private API fmaml "
            "relies on: see fmaml/private_apis.py for why, and what to use instead in this version"
        ) from None


def logging_step(trainer) -> int:
    """The step that Lightning writes the module's `self.log` values at, now (Lightning's logger connector
    and its own monitors use it). During a fit it lags `trainer.global_step` by the meta-step in progress."""
    return _read(trainer, "fit_loop.epoch_loop._batches_that_stepped", "Lightning")


def uses_distributed_sampler(trainer) -> bool:
    """Whether the Trainer wraps the loaders in a DistributedSampler (its `use_distributed_sampler`)."""
    return _read(trainer, "_accelerator_connector.use_distributed_sampler", "Lightning")


def subcommand_parser(cli, subcommand: str | None):
    """LightningCLI's parser of `subcommand` (the main parser without subcommands)."""
    return _read(cli, "_parser", "Lightning")(subcommand)


def attached_trainer(module):
    """The LightningModule's Trainer, or None when it has none (its `trainer` property raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None

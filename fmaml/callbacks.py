"""The CLI's always-on callbacks: checkpoints that hold the final step, the saved run config, the LR monitor.

- `Checkpoint`: Lightning's ModelCheckpoint writes `last.ckpt` at the end of training only if it never saved
  before, so a run that stops between two step intervals (max_steps off the interval, max_time, early
  stopping) kept an older last.ckpt, and later tests measured older weights. This one always saves the final
  step, and turns Ctrl-C into a stop at the end of the current meta-step (a KeyboardInterrupt in the middle
  of `optimizer.step()` would leave half-updated weights to checkpoint). SIGTERM already stops at a step
  boundary (Lightning's signal handler) and saves through `save_on_exception`.
- `SaveRunConfig`: the run's config in its log folder and inside every checkpoint, so a resume or a test
  can be checked against the settings that trained it (fmaml.runs). It never overwrites a config.yaml: a
  resumed run's command is saved beside it as config-1.yaml, config-2.yaml, ...
- `LearningRateMonitor`: Lightning's, except that without a logger (`--trainer.logger=false`) it does nothing
  instead of refusing to start.
"""

from __future__ import annotations

import os
import signal
import threading

import yaml
from lightning.pytorch import callbacks
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

# Where a checkpoint keeps the config of the command that wrote it and its log folder (fmaml.runs reads it).
RUN_KEY = "fmaml_run"


class Checkpoint(callbacks.ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` always holds the final step of a fit (see the module docstring)."""

    @property
    def state_key(self) -> str:
        # Lightning keys the state by the save intervals, so a resume with another interval lost
        # `last_model_path` and wrote last-v1.ckpt beside the run's last.ckpt, which `--ckpt_path last`
        # would then miss. The CLI has one Checkpoint: one key.
        return "fmaml.Checkpoint"

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._previous_sigint = None
        self.stopped_by_sigint = False
        # Under DDP every process gets the signal at its own time; Lightning's own handling stays.
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():

            def stop_after_this_step(signum, frame):
                if self.stopped_by_sigint:  # a second Ctrl-C: stop now, as Python would
                    raise KeyboardInterrupt
                self.stopped_by_sigint = True
                trainer.should_stop = True
                rank_zero_info(
                    "\nCtrl-C: stopping after this meta-step and saving last.ckpt (press again to abort now)"
                )

            self._previous_sigint = signal.signal(signal.SIGINT, stop_after_this_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_sigint()
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.stopped_by_sigint:
            rank_zero_info(f"Stopped by Ctrl-C at step {trainer.global_step}; saved {self.last_model_path}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, KeyboardInterrupt) and getattr(self, "stopped_by_sigint", False):
            rank_zero_warn(
                "aborted by a second Ctrl-C: no checkpoint written (the interrupted meta-step may have "
                f"half-updated the weights); the last one is {self.last_model_path or 'none'}"
            )
            return
        if not getattr(pl_module, "state_is_finite", lambda: True)():
            rank_zero_warn(
                "no checkpoint written on this exception: the weights or optimizer state are not finite; "
                f"the last good one is {self.last_model_path or 'none'}"
            )
            return
        super().on_exception(trainer, pl_module, exception)

    def _restore_sigint(self) -> None:
        if getattr(self, "_previous_sigint", None) is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


class SaveRunConfig(SaveConfigCallback):
    """Saves the config as config.yaml in the log folder (config-N.yaml if one is there) and in checkpoints."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = None if self.already_saved else trainer.log_dir  # a collective call: on every process
        if log_dir is None:
            return super().setup(trainer, pl_module, stage)
        # A resume logs into its run's folder: keep that run's config.yaml, add this command's beside it.
        if trainer.is_global_zero:
            stem, suffix = os.path.splitext(self.config_filename)
            name, number = self.config_filename, 0
            while os.path.exists(os.path.join(log_dir, name)):
                number += 1
                name = f"{stem}-{number}{suffix}"
            self.config_filename = name
        self.config_filename = trainer.strategy.broadcast(self.config_filename)
        super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RUN_KEY] = {"config": config_dict(self.parser, self.config), "log_dir": trainer.log_dir}


def config_dict(parser, config) -> dict:
    """A parsed config as plain data, as config.yaml holds it."""
    return yaml.safe_load(parser.dump(config, skip_none=False))


class LearningRateMonitor(callbacks.LearningRateMonitor):
    """Lightning's LearningRateMonitor, idle when the Trainer has no logger instead of raising."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)

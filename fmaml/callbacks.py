"""The CLI's always-on callbacks: checkpoints that hold the final step, the saved run config, the LR monitor.

- `Checkpoint`: Lightning's ModelCheckpoint writes `last.ckpt` at the end of training only if it never saved
  before, so a run that stops between two step intervals (max_steps off the interval, max_time, early
  stopping) kept an older last.ckpt, and later tests measured older weights. This one always saves the final
  step, and turns Ctrl-C into a stop at the end of the current meta-step (a KeyboardInterrupt in the middle
  of `optimizer.step()` would leave half-updated weights to checkpoint). SIGTERM already stops at a step
  boundary (Lightning's signal handler) and saves through `save_on_exception`. A kill -9 cannot be caught,
  so every file is written whole or not at all (a temporary file in the checkpoint's own folder, then
  `os.replace`: Lightning's save writes the file in place), and last.ckpt is also saved every
  `every_n_minutes` (steps *and* time, which ModelCheckpoint offers only one at a time), so a killed long
  CPU run loses minutes, not hundreds of steps.
- `TrainingTime`: the seconds spent training (validation excluded), logged as `time/train_seconds` and kept
  in checkpoints, with an optional budget (`--training_time.budget_minutes`) that stops the fit at a step
  boundary: the same training time for every recipe of a comparison, whatever their validation costs.
- `SaveRunConfig`: the run's config in its log folder and inside every checkpoint, so a resume or a test
  can be checked against the settings that trained it (fmaml.runs). It never overwrites a config.yaml: a
  resumed run's command is saved beside it as config-1.yaml, config-2.yaml, ...
- `PerTaskCSV`: `test` also writes every test task's metrics to `--per_task_csv.path` (one row per task, in
  task order, from every DDP process), to compare two models task by task.
- `LearningRateMonitor`: Lightning's, except that without a logger (`--trainer.logger=false`) it does nothing
  instead of refusing to start.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from weakref import proxy

import yaml
from lightning.pytorch import callbacks
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from fmaml.private_apis import logging_step
from fmaml.runs import RUN_KEY, flatten
from fmaml.task_metrics import write_csv
from fmaml.trial_attrs import PRUNED_AT, RUN_LOG_DIR

# A SIGINT this soon after the first is the same Ctrl-C delivered again, not a second press: without a
# terminal, `uv run` forwards SIGINT to its child 200 ms after the signal to the whole process group (which
# `timeout -s INT`, job schedulers and IDE stop buttons send) has already reached it.
SAME_CTRL_C_SECONDS = 1.0


class Checkpoint(callbacks.ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` always holds the final step of a fit, is also saved every
    `every_n_minutes` of wall-clock time (None: steps only), and whose files are never half-written (see the
    module docstring). Other arguments: Lightning's ModelCheckpoint."""

    def __init__(self, *args, every_n_minutes: float | None = 10.0, **kwargs) -> None:
        if every_n_minutes is not None and not every_n_minutes > 0:
            raise ValueError(
                f"checkpoint.every_n_minutes={every_n_minutes!r}: give a positive number of minutes, or null to "
                "save by steps only"
            )
        super().__init__(*args, **kwargs)
        self.every_n_minutes = every_n_minutes
        self._last_save_time = time.monotonic()

    @property
    def state_key(self) -> str:
        # Lightning keys the state by the save intervals, so a resume with another interval lost
        # `last_model_path` and wrote last-v1.ckpt beside the run's last.ckpt, which `--ckpt_path last`
        # would then miss. The CLI has one Checkpoint: one key.
        return "fmaml.Checkpoint"

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._evaluating = stage != "fit"

    def load_state_dict(self, state_dict: dict) -> None:
        # test/validate save nothing, and log into a folder of their own: restoring the run's checkpoint
        # state would only make Lightning warn, on every evaluation, that the folder has changed.
        if not getattr(self, "_evaluating", False):
            super().load_state_dict(state_dict)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time = time.monotonic()
        self._previous_sigint = None
        self.stopped_by_sigint = False
        # Under DDP every process gets the signal at its own time; Lightning's own handling stays.
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():

            def stop_after_this_step(signum, frame):
                if self.stopped_by_sigint:
                    if time.monotonic() - self._sigint_time < SAME_CTRL_C_SECONDS:
                        return  # the same Ctrl-C delivered twice (see SAME_CTRL_C_SECONDS)
                    raise KeyboardInterrupt  # a second Ctrl-C: stop now, as Python would
                self.stopped_by_sigint, self._sigint_time = True, time.monotonic()
                trainer.should_stop = True
                rank_zero_info(
                    "\nCtrl-C: stopping after this meta-step and saving last.ckpt (press it again, a second "
                    "later, to abort now)"
                )

            self._previous_sigint = signal.signal(signal.SIGINT, stop_after_this_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.every_n_minutes is None or not self.save_last:
            return
        due = time.monotonic() - self._last_save_time >= 60 * self.every_n_minutes
        if trainer.world_size > 1:  # one decision for all processes: saving is collective
            due = trainer.strategy.broadcast(due)
        if due and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # Written whole or not at all: to a temporary file in the same folder (a rename across
        # filesystems would be a copy), synced, then renamed over the old file.
        folder, name = os.path.split(filepath)
        partial = os.path.join(folder, f".{name}.partial")
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            with open(partial, "rb") as written:
                os.fsync(written.fileno())
            os.replace(partial, filepath)
        trainer.strategy.barrier("fmaml.Checkpoint")
        self._last_save_time = time.monotonic()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_sigint()
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.stopped_by_sigint:
            rank_zero_info(f"Stopped by Ctrl-C at step {trainer.global_step}; saved {self.last_model_path}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, KeyboardInterrupt) and getattr(self, "stopped_by_sigint", False):
            last = (
                f"the last one is {self.last_model_path}" if self.last_model_path else "none was saved before"
            )
            rank_zero_warn(
                "aborted by a second Ctrl-C: no checkpoint written (the interrupted meta-step may have "
                f"half-updated the weights); {last}"
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
        if not trainer.loggers:
            # No logger, no run folder: Lightning would write config.yaml into the working directory
            # (and a resume there config-1.yaml, ...); the config still goes into checkpoints.
            self.already_saved = True
            return None
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

    def save_config(self, trainer, pl_module, stage: str) -> None:
        """The resolved config, as config.yaml holds it, to every logger: TensorBoard as a text panel
        ("config"; the hyperparameters are already in its HPARAMS tab), the others (wandb, MLflow) as their
        run's parameters, keyed by the dotted names of the command line."""
        from lightning.pytorch.loggers import TensorBoardLogger

        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("config", "```yaml\n" + text + "\n```", global_step=0)
            else:
                logger.log_hyperparams(flatten(yaml.safe_load(text)))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RUN_KEY] = {"config": config_dict(self.parser, self.config), "log_dir": trainer.log_dir}


def config_dict(parser, config) -> dict:
    """A parsed config as plain data, as config.yaml holds it."""
    return yaml.safe_load(parser.dump(config, skip_none=False))


class PerTaskCSV(callbacks.Callback):
    """path: the CSV `test` writes its per-task metrics to (None: none). The module's `test_tasks` holds
    them, gathered over the processes, once its test epoch ends."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    def on_test_end(self, trainer, pl_module) -> None:
        if self.path and trainer.is_global_zero:
            write_csv(self.path, pl_module.test_tasks)


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


class TrainingTime(callbacks.Callback):
    """Counts the seconds spent in training steps (validation, checkpoints and start-up excluded), logs them
    as `time/train_seconds` (so curves can be drawn against training time) and keeps the count in
    checkpoints, so a resumed run goes on counting. With `budget_minutes`, the fit stops at the first step
    boundary past that much training time, which makes a same-budget comparison fair to recipes that
    validate more slowly. Lightning's `max_time` counts everything, validation included."""

    def __init__(self, budget_minutes: float | None = None) -> None:
        if budget_minutes is not None and not budget_minutes > 0:
            raise ValueError(
                f"training_time.budget_minutes={budget_minutes!r}: give a positive number of minutes, or null "
                "for no budget"
            )
        self.budget_minutes = budget_minutes
        self.seconds = 0.0
        self._step_started: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step_started is None:
            return
        self.seconds += time.perf_counter() - self._step_started
        self._step_started = None
        step = trainer.global_step
        if trainer.loggers and step % trainer.log_every_n_steps == 0:
            self._log(trainer)
        if self.budget_minutes is not None:
            spent = self.seconds >= 60 * self.budget_minutes
            if trainer.world_size > 1:
                spent = trainer.strategy.broadcast(spent)
            if spent and not trainer.should_stop:
                trainer.should_stop = True
                rank_zero_info(
                    f"training_time.budget_minutes={self.budget_minutes} reached at step {step} "
                    f"({self.seconds:.0f} s of training)"
                )

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.loggers and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._log(trainer)  # the x of this validation's points on a time axis

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.loggers:
            self._log(trainer, logging_step(trainer) - 1)

    def _log(self, trainer, step: int | None = None) -> None:
        # The step Lightning gives `self.log` calls at this point of the loop, so the values line up.
        step = logging_step(trainer) if step is None else step
        if trainer.is_global_zero and step >= 0:
            for logger in trainer.loggers:
                logger.log_metrics({"time/train_seconds": self.seconds}, step=step)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = state_dict["seconds"]


class ReportToOptuna(callbacks.Callback):
    """Inside a trial's run: records the folder the run logs to in its Optuna trial (the sweep reads the
    metrics there: only the run knows it, after `--trainer.default_root_dir` and the config files), reports
    `metric` after every validation, by global_step (fmaml trains in one endless epoch), and with `prune`
    stops the fit at a step boundary when the median pruner says so, recording the step in the trial (the
    sweep then marks it pruned)."""

    def __init__(
        self,
        storage: str,
        study: str,
        trial_id: int,
        metric: str,
        prune: bool = False,
        startup_trials: int = 5,
    ):
        self.storage, self.study_name, self.trial_id = storage, study, trial_id
        self.metric, self.prune, self.startup_trials = metric, prune, startup_trials
        self._trial = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        import optuna  # only a sweep's trials need it

        if trainer.is_global_zero:
            pruner = optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials)
            study = optuna.load_study(study_name=self.study_name, storage=self.storage, pruner=pruner)
            self._trial = optuna.trial.Trial(study, self.trial_id)
            self._trial.set_user_attr(RUN_LOG_DIR, os.path.abspath(trainer.log_dir))

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or self._trial is None or value is None:
            return
        self._trial.report(float(value), step=trainer.global_step)
        if self.prune and self._trial.should_prune():
            self._trial.set_user_attr(PRUNED_AT, trainer.global_step)
            trainer.should_stop = True
            print(
                f"pruned at step {trainer.global_step}: {self.metric}={float(value):.4g} is behind the median"
            )

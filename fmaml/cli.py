"""`python -m fmaml {fit,validate,test} --config configs/omniglot.yaml`: LightningCLI over MAML and the data.

Defaults that differ from Lightning's, and why:
- inference_mode=False: evaluation adapts with inner gradients, which inference tensors forbid;
- a TensorBoard logger under ./logs, and `last.ckpt` every 500 steps, every 10 minutes and at the final
  step, whatever stopped the run (max_steps, max_time, a training-time budget, early stopping, Ctrl-C,
  SIGTERM, an exception), each written whole or not at all (a kill -9 mid-write leaves the previous one):
  fmaml.callbacks;
- use_distributed_sampler=False: under DDP the DataModule gives each process its own share of the tasks
  (Lightning's sampler would shuffle the endless training stream and pad the fixed evaluation tasks);
- the data decides the model's number of outputs (the ways) and its loss, through argument links, and the
  network's input shape is checked against the data's before anything is prepared;
- checkpoints are never used blindly (fmaml.runs): `test`/`validate` need `--ckpt_path` (`initial` for the
  untrained weights, on purpose); `--ckpt_path last` resumes the newest run of this logger name (or of
  `--checkpoint.dirpath`); a resume must keep what defines training, and an evaluation the network, with
  every conflict listed by key. The command's settings are the ones that run: Lightning's re-parsing of
  the checkpoint's hyperparameters over the config, which silently replaced them, is off;
- a start-up error (a bad setting, missing data) prints its message alone, without a traceback
  (`command_line`; FMAML_DEBUG=1 shows it), and a setting that would have no effect warns
  (fmaml.settings_check).
"""

from __future__ import annotations

import os
import re
import sys
import warnings

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from fmaml import runs
from fmaml.callbacks import (
    Checkpoint,
    LearningRateMonitor,
    PerTaskCSV,
    SaveRunConfig,
    TrainingTime,
    config_dict,
)
from fmaml.data import MetaDataModule
from fmaml.module import MAML
from fmaml.private_apis import subcommand_parser
from fmaml.schedules import check_max_steps_for_schedule
from fmaml.settings_check import warn_ignored_run_settings

TRAINER_DEFAULTS = {
    "inference_mode": False,
    "use_distributed_sampler": False,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "fmaml"},
    },
}
# `--ckpt_path initial`: evaluate the untrained initial weights, on purpose.
INITIAL_WEIGHTS = "initial"

# Lightning warns that with manual optimization a step checkpoint holds the weights *after* the step;
# that is exactly what resuming needs, so the warning only adds noise to every run.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class MAMLCLI(LightningCLI):
    def __init__(self, *args, subcommand: str | None = None, **kwargs) -> None:
        """LightningCLI's arguments; `subcommand`: the one the command line names (`fit`), whose parser alone
        is built. Each subcommand's parser reads the signature of every class it can configure: with all four
        built, `fit --print_config` took 0.43 s here (warm, in-process), and 0.14 s with one."""
        self.named_subcommand = subcommand
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        every = LightningCLI.subcommands()
        if self.named_subcommand in every:
            return {self.named_subcommand: every[self.named_subcommand]}
        return every  # none named (`--help`, a typo): all, so that the usage lists them

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_outputs", "model.num_outputs", apply_on="instantiate")
        parser.link_arguments("data.loss", "model.loss", apply_on="instantiate")
        # Always-on callbacks, each configurable (`--checkpoint.every_n_train_steps=100`).
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 500,
                "checkpoint.save_on_exception": True,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(TrainingTime, "training_time")
        parser.add_lightning_class_args(PerTaskCSV, "per_task_csv")

    def _parse_ckpt_path(self) -> None:
        """Off: the command's settings run, checked against the checkpoint's in before_instantiate_classes."""

    def before_instantiate_classes(self) -> None:
        """Check `--ckpt_path` and the settings against its run, before any long work."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None:
            return
        _put_logs_under_root_dir(config)
        if self.subcommand == "fit":
            _check_lr_schedule(config)
        _check_gradient_clipping(config)
        warn_ignored_run_settings(self.subcommand, config)
        if self.subcommand in ("test", "validate") and config.get("ckpt_path") is None:
            raise ValueError(
                f"{self.subcommand} needs --ckpt_path: the path of a .ckpt written by fit (e.g. "
                "logs/fmaml/version_0/checkpoints/last.ckpt), or `last` for the newest run's. Without one it "
                f"would evaluate random weights; --ckpt_path={INITIAL_WEIGHTS} does that on purpose."
            )
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            if self.subcommand == "fit":
                runs.check_fresh_checkpoint_folder(config.checkpoint.dirpath)
            return
        if ckpt_path == INITIAL_WEIGHTS and self.subcommand != "fit":
            config.ckpt_path = None
            rank_zero_info(
                f"{self.subcommand}: evaluating the untrained initial weights (--ckpt_path=initial)"
            )
            return
        if ckpt_path == "last":
            config.ckpt_path = self._find_last(config)
        elif ckpt_path in ("best", "hpc", "registry"):
            return
        elif not os.path.isfile(ckpt_path):
            raise FileNotFoundError(
                f"--ckpt_path={ckpt_path}: no such checkpoint file. Give the path of a .ckpt written by "
                "fit (e.g. logs/fmaml/version_0/checkpoints/last.ckpt), or `last` for the newest run's."
            )
        self._check_against_run(config)

    def _find_last(self, config) -> str:
        # Lightning looks for "last" only in the *new* run's version folder, which is always empty; take the
        # newest run of this logger name (or --checkpoint.dirpath), and let a fit keep logging into its
        # version folder so its curves continue.
        init_args = _main_logger_args(config)
        save_dir = init_args.get("save_dir") if init_args is not None else None
        name = init_args.get("name") if init_args is not None else None
        path, version = runs.newest_last_checkpoint(save_dir, name, config.checkpoint.dirpath)
        if self.subcommand == "fit" and version is not None:
            init_args.version = version
        rank_zero_info(f"--ckpt_path=last: {path}")
        return path

    def _check_against_run(self, config) -> None:
        run, source = runs.run_config(config.ckpt_path)
        if run is None:
            rank_zero_warn(
                f"--ckpt_path={config.ckpt_path}: cannot check the settings against its run: {source}"
            )
            return
        command = runs.flatten(config_dict(subcommand_parser(self, self.subcommand), config))
        if self.subcommand == "fit":
            conflicts = runs.differences(command, run, runs.defines_training)
            what = "what defines training (network, inner loop, optimizer, scheduler, tasks)"
        else:
            conflicts = runs.differences(command, run, runs.defines_network)
            what = "the network"
        if conflicts:
            raise ValueError(
                f"--ckpt_path={config.ckpt_path}: this command differs from the run that wrote it ({source}) "
                f"in {what}:\n{runs.describe(conflicts)}\nUse the run's settings, or start a new fit "
                "without --ckpt_path."
            )
        if self.subcommand != "fit":
            changed = runs.differences(command, run, runs.defines_training)
            if changed:
                rank_zero_warn(
                    f"{self.subcommand}: evaluating {config.ckpt_path} with this command's settings, which differ "
                    f"from its run's ({source}):\n{runs.describe(changed)}"
                )

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand is not None:
            check_input_shape(self.model.network, self.datamodule.input_shape, self.config[self.subcommand])


def _loggers(config) -> list[Namespace]:
    logger = config.trainer.get("logger")
    loggers = logger if isinstance(logger, list) else [logger]
    return [one for one in loggers if isinstance(one, Namespace) and one.get("init_args") is not None]


def _main_logger_args(config) -> Namespace | None:
    """The init_args of the logger whose folders hold the run (Lightning's `trainer.log_dir` is the first
    logger's): the first of the list, as Lightning takes it."""
    loggers = _loggers(config)
    return loggers[0].init_args if loggers else None


def _put_logs_under_root_dir(config) -> None:
    """`--trainer.default_root_dir DIR` puts logs and checkpoints under DIR, as Lightning users expect: a
    logger's relative save_dir (the default `logs`) is taken inside DIR. Lightning itself uses
    default_root_dir only for the loggers it builds, never for a logger given in the config."""
    root = config.trainer.get("default_root_dir")
    if not root:
        return
    for logger in _loggers(config):
        save_dir = logger.init_args.get("save_dir")
        if isinstance(save_dir, str) and not os.path.isabs(save_dir) and "://" not in save_dir:
            logger.init_args.save_dir = os.path.join(root, save_dir)


def check_input_shape(network: torch.nn.Module, data_shape: tuple[int, ...], config) -> None:
    """The network must take the data's inputs: a ConvNet built for 28x28 fed 84x84 images would fail
    deep in the first step (or, for some sizes, run on the wrong geometry). Checked before data preparation."""
    expected = getattr(network, "input_shape", None)
    if expected is None or not data_shape or tuple(expected) == tuple(data_shape):
        return
    network_args = config.model.network.get("init_args") or {}
    dataset = config.data.dataset
    data_args = dataset.get("init_args") or {}
    raise ValueError(
        f"the network expects inputs {list(expected)}, but the data gives {list(data_shape)}: "
        f"model.network ({config.model.network.class_path}: {_settings(network_args)}) against data.dataset "
        f"({dataset.class_path}: {_settings(data_args)}). Make them agree, e.g. "
        f"--model.network.init_args.image_size or --data.dataset.init_args.image_size"
    )


def _settings(init_args) -> str:
    items = dict(init_args).items() if init_args else ()
    shown = {k: v for k, v in items if k in ("in_channels", "image_size", "in_features", "input_shape")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"


def _check_gradient_clipping(config) -> None:
    """Lightning cannot clip under manual optimization (fmaml's meta-step): point to the option that can."""
    value = config.trainer.get("gradient_clip_val")
    if value:
        by = "value" if config.trainer.get("gradient_clip_algorithm") == "value" else "norm"
        raise ValueError(
            f"trainer.gradient_clip_val={value}: Lightning cannot clip fmaml's manual meta-optimization; "
            f"use --model.meta_objective.clip_{by}={value} instead"
        )


def _check_lr_schedule(config) -> None:
    """A cosine schedule must know the run's length: fail now, not after data preparation."""
    scheduler = config.model.get("lr_scheduler")
    if not isinstance(scheduler, Namespace):
        return
    init_args = scheduler.get("init_args") or Namespace()
    max_steps = config.trainer.get("max_steps")
    if scheduler.class_path.endswith("CosineAnnealingToMaxSteps") and init_args.get("total_steps") is None:
        check_max_steps_for_schedule(max_steps)
    elif (
        scheduler.class_path.endswith("CosineAnnealingLR")
        and max_steps
        and max_steps > init_args.get("T_max", 0)
    ):
        rank_zero_warn(
            f"model.lr_scheduler CosineAnnealingLR has T_max={init_args.get('T_max')} < trainer.max_steps="
            f"{max_steps}: past T_max the meta learning rate rises again. Use "
            "fmaml.schedules.CosineAnnealingToMaxSteps, which anneals over max_steps."
        )


DEBUG_ENV = "FMAML_DEBUG"
DESCRIPTION = (
    "fmaml: MAML on torch.func. A start-up error (a bad setting, missing data) prints its message alone; "
    f"set {DEBUG_ENV}=1 to see its traceback."
)
# What fmaml raises for bad settings and for missing or unusable data, with messages written to be read
# alone (the setting, the value, the fix), and jsonargparse's errors on the command line itself.
STARTUP_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ArgumentError)


class FirstBatch(Callback):
    """Marks where start-up ends: when the first batch (training, sanity check, validation or test) reaches
    the model. Everything before, parsing, checks, building the model and the data, preparing and reading
    the files, building the loaders, loading the first batch, is start-up; from then on an error may be
    a bug in the work itself, and keeps its traceback."""

    def __init__(self) -> None:
        self.reached = False

    def _reached(self, *args, **kwargs) -> None:
        self.reached = True

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _reached


def main(
    args: list[str] | None = None, *, callbacks: list[Callback] | None = None, exit_on_error: bool = True
) -> MAMLCLI:
    """`python -m fmaml` from Python (a notebook, a script) with the same arguments as a list; errors are
    raised (the command line prints start-up errors briefly: `command_line`). `callbacks`: added to the
    Trainer's; `exit_on_error=False`: a command line jsonargparse rejects raises ArgumentError instead of
    printing the usage and exiting."""
    with warnings.catch_warnings():
        if args is not None:
            # The interpreter's own argv (a Jupyter kernel's `-f kernel.json`) is not meant for fmaml here, so
            # Lightning's warning against giving both would only be noise in every notebook.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        given = sys.argv[1:] if args is None else args
        return MAMLCLI(
            MAML,
            MetaDataModule,
            trainer_defaults=TRAINER_DEFAULTS | ({"callbacks": callbacks} if callbacks else {}),
            seed_everything_default=0,
            save_config_callback=SaveRunConfig,
            parser_kwargs={"description": DESCRIPTION, "exit_on_error": exit_on_error},
            args=args,
            subcommand=given[0] if given else None,
        )


# What a renamed setting also needs, beyond its new name.
RENAMED_ALSO = {
    "model.inner_lr": " (the inner optimizer: `class_path: torch.optim.SGD`, `init_args: {lr: 0.4}`)",
    "model.learn_inner_lr": ", with `class_path: fmaml.inner_optimizers.SGD` (or Adam, ...)",
}


def _renamed_setting(message: str) -> tuple[str, str] | None:
    """A setting an older fmaml took, named in a rejected command line or config, and the hint to its name
    today: ("model.inner_steps", "model.inner_steps is now model.inner_loop.steps")."""
    for old, new in runs.RENAMED.items():
        parent, _, name = old.rpartition(".")
        named = re.search(rf"(?<![\w.]){re.escape(old)}\b|nested key '{old.removeprefix('model.')}'", message)
        # A setting of a class_path object (the network): jsonargparse names the object and the option apart.
        in_object = (
            f'Parser key "{parent.removesuffix(".init_args")}"' in message
            and f"'{name}' is not accepted" in message
        )
        if named or in_object:
            return old, f"{old} is now {new}{RENAMED_ALSO.get(old, '')}"
    return None


def _own_message(message: str) -> str:
    """fmaml's own line out of jsonargparse's report on a union-typed setting (`--model.inner_loop.optimizer`,
    InnerOptimizer | OptimizerCallable; `--model.meta_objective.meta_gradient`, MetaGradient | None: it lists why each type
    refused the value), else `message`."""
    if own := re.search(r"model\.inner_loop\.optimizer \(\w+\): [^\n]*", message):
        return own[0]
    if own := re.search(r"(?<![\w.])meta_gradient\.\w+=[^\n]*", message):
        return "model.meta_objective." + own[0]
    return message


def command_line(args: list[str] | None = None) -> int:
    """`python -m fmaml`: `main`, with a start-up error printed as `error: <message>` alone on stderr (exit
    status 2 for a command line jsonargparse rejects, 1 otherwise) instead of a traceback of some 40 lines
    (or, from jsonargparse, 100 lines of usage). `FMAML_DEBUG=1`: errors exactly as `main` raises them.

    Only the errors in STARTUP_ERRORS, and only before the first batch (FirstBatch), are start-up errors.
    Anything else, and any error once work has begun (a ValueError mid-training may be a bug), keeps its
    traceback; Ctrl-C and SIGTERM (KeyboardInterrupt, SystemExit, Lightning's SIGTERMException: none of
    them Exceptions of these types) go on to fmaml.callbacks and Lightning as before."""
    if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
        main(args)
        return 0
    first_batch = FirstBatch()
    try:
        main(args, callbacks=[first_batch], exit_on_error=False)
    except STARTUP_ERRORS as error:
        if first_batch.reached:
            raise
        message = _own_message(str(error))
        # A value fmaml refused, wrapped by jsonargparse, is no usage error: the same as from torch.optim.
        usage = isinstance(error, ArgumentError) and message == str(error)
        hint = "--help lists every setting" if usage else f"{DEBUG_ENV}=1 shows the traceback"
        if usage and (renamed := _renamed_setting(message)):
            old, hint = renamed
            if "\n" in message:  # jsonargparse's report on the network's class_path object, many lines
                message = f"{old} is no longer a setting"
        print(f"error: {message}", file=sys.stderr)
        print(f"({hint})", file=sys.stderr)
        return 2 if usage else 1
    return 0

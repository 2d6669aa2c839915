"""`python -m fmaml {fit,validate,test} --config configs/omniglot.yaml`: LightningCLI over MAML and the data.

Defaults that differ from Lightning's, and why:
- inference_mode=False: evaluation adapts with inner gradients, which inference tensors forbid;
- a TensorBoard logger under ./logs, a checkpoint of the last step (plus one on any exception), so an
  interrupted run resumes with `--ckpt_path last` and loses nothing;
- use_distributed_sampler=False: under DDP the DataModule gives each process its own share of the tasks
  (Lightning's sampler would shuffle the endless training stream and pad the fixed evaluation tasks);
- the data decides the model's number of outputs (the ways) and its loss, through argument links;
- with `--ckpt_path`, Lightning rebuilds the model from the checkpoint's hyperparameters, which would
  silently override the evaluation settings given in the config or on the command line: those
  (`EVALUATION_KEYS`) stay the user's, so `test --ckpt_path ... --model.eval_inner_steps=10` does that.
"""

from __future__ import annotations

import glob
import os
import warnings

from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from fmaml.data import MetaDataModule
from fmaml.module import MAML

TRAINER_DEFAULTS = {
    "inference_mode": False,
    "use_distributed_sampler": False,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "fmaml"},
    },
}


# Settings that only decide how a trained model is evaluated (or run): the user's, not the checkpoint's.
EVALUATION_KEYS = ("eval_inner_steps", "eval_inner_lr", "strategy", "compile")

# Lightning warns that with manual optimization a step checkpoint holds the weights *after* the step;
# that is exactly what resuming needs, so the warning only adds noise to every run.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class MAMLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_outputs", "model.num_outputs", apply_on="instantiate")
        parser.link_arguments("data.loss", "model.loss", apply_on="instantiate")
        # Always-on callbacks, each configurable (`--checkpoint.every_n_train_steps=100`).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 500,
                "checkpoint.save_on_exception": True,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return super()._parse_ckpt_path()
        model = self.config[subcommand].model
        given = {key: model.get(key) for key in EVALUATION_KEYS}
        super()._parse_ckpt_path()
        model = self.config[subcommand].model
        for key, value in given.items():
            model[key] = value

    def before_instantiate_classes(self) -> None:
        """Check `--ckpt_path` before any long work, and make `--ckpt_path last` resume the newest run."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None or config.get("ckpt_path") is None:
            return
        if config.ckpt_path == "last":
            config.ckpt_path = self._resume_last(config)
        elif config.ckpt_path not in ("best", "hpc", "registry") and not os.path.isfile(config.ckpt_path):
            raise FileNotFoundError(
                f"--ckpt_path={config.ckpt_path}: no such checkpoint file. Give the path of a .ckpt written by "
                "fit (e.g. logs/fmaml/version_0/checkpoints/last.ckpt), or `last` for the newest run's."
            )

    @staticmethod
    def _resume_last(config) -> str:
        # Lightning looks for "last" only in the *new* run's version folder, which is always empty; resume the
        # newest run's last.ckpt instead, and keep logging into that run's version so its curves continue.
        logger = config.trainer.logger
        init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init_args is None or "save_dir" not in init_args:
            raise ValueError(
                "--ckpt_path=last needs a logger with a save_dir; give the checkpoint's path instead"
            )
        pattern = os.path.join(
            init_args.save_dir, init_args.name or "", "version_*", "checkpoints", "last.ckpt"
        )
        found = sorted(glob.glob(pattern), key=os.path.getmtime)
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path=last: no checkpoint matches {pattern}. Start a fit without --ckpt_path first, "
                "or give the path of a .ckpt."
            )
        version = os.path.basename(os.path.dirname(os.path.dirname(found[-1])))
        init_args.version = version
        return found[-1]


def main(args: list[str] | None = None) -> MAMLCLI:
    return MAMLCLI(
        MAML,
        MetaDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )

"""`python -m fmaml {fit,validate,test} --config configs/omniglot.yaml`: LightningCLI over MAML and the data.

Defaults that differ from Lightning's, and why:
- inference_mode=False: evaluation adapts with inner gradients, which inference tensors forbid;
- a TensorBoard logger under ./logs, a checkpoint of the last step (plus one on any exception), so an
  interrupted run resumes with `--ckpt_path last` and loses nothing;
- the data decides the model's number of outputs (the ways) and its loss, through argument links.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from fmaml.data import MetaDataModule
from fmaml.module import MAML

TRAINER_DEFAULTS = {
    "inference_mode": False,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "fmaml"},
    },
}


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


def main(args: list[str] | None = None) -> MAMLCLI:
    return MAMLCLI(
        MAML,
        MetaDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )

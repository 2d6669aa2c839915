"""Settings that are accepted but would have no effect in this run: each gets one warning line naming it.

A setting left at its default never warns: only a value someone chose can be a mistake. Defaults are read
from the signature of the class that takes the setting, so they are written once, where they are used.

Not warned, on purpose: settings of another command in a config that fit, validate and test share
(`eval_inner_*` and `data.evaluation.num_test_tasks` in a fit, the training options in a test): one config serves
every command, and they take effect in the commands they are for.
"""

from __future__ import annotations

import inspect
import os
import warnings

from lightning.pytorch.utilities import rank_zero_only

from fmaml.maml import STORED_STEPS


class IgnoredSettingWarning(UserWarning):
    """A setting was given that has no effect in this run (the message says which, and why)."""


@rank_zero_only
def warn_ignored(setting: str, value, why: str) -> None:
    # Attributed to no source file, so that Python prints the one line, without a line of code under it.
    warnings.warn_explicit(f"{setting}={value!r} {why}", IgnoredSettingWarning, filename="fmaml", lineno=0)


def _changed(owner: type, settings: dict, name: str) -> bool:
    """`settings[name]` differs from its default: that of the first `__init__` in `owner`'s MRO that
    takes `name` (a subclass may take **kwargs and pass them on)."""
    for klass in owner.__mro__:
        parameter = inspect.signature(klass.__init__).parameters.get(name)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return settings[name] != parameter.default
    return True


def warn_ignored_model_settings(module) -> None:
    """fmaml.module.MAML's settings that contradict one another; called from its __init__."""
    inner, objective, execution = module.inner_loop, module.meta_objective, module.execution
    if _changed(type(objective), vars(objective), "msl_anneal_steps") and not objective.multi_step_loss:
        warn_ignored(
            "model.meta_objective.msl_anneal_steps",
            objective.msl_anneal_steps,
            "has no effect: model.meta_objective.multi_step_loss is false (set it to true to anneal the "
            "multi-step loss)",
        )
    if objective.multi_step_loss and inner.steps == 1:
        warn_ignored(
            "model.meta_objective.multi_step_loss",
            True,
            "has no effect with model.inner_loop.steps=1: the loss after the only inner step is the loss MAML "
            "trains on anyway",
        )
    if _changed(type(execution), vars(execution), "auto_memory_share") and execution.strategy != "auto":
        warn_ignored(
            "model.execution.auto_memory_share",
            execution.auto_memory_share,
            "has no effect: only model.execution.strategy=auto measures against a memory budget, and the "
            f"strategy is fixed ({execution.strategy})",
        )
    if execution.memory == "recompute" and inner.steps <= STORED_STEPS:
        warn_ignored(
            "model.execution.memory",
            "recompute",
            f"has no effect with model.inner_loop.steps={inner.steps}: recompute keeps the graph of the last "
            f"{STORED_STEPS} inner step(s) anyway, so there is nothing to recompute and the memory is store's",
        )
    for flag, value in inner.optimizer.ignored_flags.items():
        warn_ignored(
            f"model.inner_loop.optimizer.init_args.{flag}",
            value,
            "has no effect: it chooses how torch.optim computes its in-place step, and fmaml's functional "
            "step is always differentiable, with one implementation",
        )
    if inner.second_order_from_step == 0:
        warn_ignored(
            "model.inner_loop.second_order_from_step",
            0,
            "has no effect: second order from meta-step 0 is plain second-order MAML (leave it unset)",
        )


def warn_ignored_run_settings(subcommand: str, config) -> None:
    """Settings that do nothing in this command (the CLI's config, before anything is built)."""
    path = (config.get("per_task_csv") or {}).get("path")
    if path and subcommand != "test":
        warn_ignored(
            "per_task_csv.path",
            path,
            f"has no effect: only `test` writes per-task metrics, and this is `{subcommand}`",
        )
    inner_loop = config.model.get("inner_loop") or {}
    step, max_steps = inner_loop.get("second_order_from_step"), config.trainer.get("max_steps")
    if subcommand == "fit" and step and max_steps is not None and 0 <= max_steps <= step:
        warn_ignored(
            "model.inner_loop.second_order_from_step",
            step,
            f"has no effect: the fit ends at trainer.max_steps={max_steps}, before that meta-step, so "
            "every step is first order",
        )


def warn_ignored_data_settings(data) -> None:
    """fmaml.data.MetaDataModule's settings that its dataset or sampler does not use; from its __init__."""
    hp, dataset = data.hparams, data.dataset
    # ways=1 is what a regression config says (configs/sinusoid.yaml: one output), so it is not a mistake.
    if dataset.task_type == "regression" and hp.ways != 1 and _changed(type(data), hp, "ways"):
        warn_ignored(
            "data.ways",
            hp.ways,
            f"has no effect: {dataset.name} tasks are regression, with data.shots support and "
            "data.query_shots query points each, and no classes",
        )
    if data.loading.num_workers and data.sampler == "tensor":
        warn_ignored(
            "data.loading.num_workers",
            data.loading.num_workers,
            "has no effect on training: the tensor sampler (data.loading.sampler) draws training tasks in the main "
            "process; the workers load validation and test tasks only",
        )
    if hp.root is not None and (unused_by := _root_unused_by(dataset)):
        warn_ignored("data.root", hp.root, f"has no effect: {unused_by}")
    _warn_ignored_dataset_settings(dataset)


def _root_unused_by(dataset) -> str | None:
    """Why `dataset` reads nothing under data.root, or None if it does."""
    # Imported here: fmaml.data's package import reaches this module (from the DataModule) first.
    from fmaml.data.specs import ImageFolder, Sinusoid, TorchmetaDataset

    if isinstance(dataset, Sinusoid):
        return "the Sinusoid needs no files"
    if isinstance(dataset, ImageFolder):
        return "ImageFolder reads data.dataset.path"
    if isinstance(dataset, TorchmetaDataset) and dataset.task_type == "regression":
        return f"regression datasets ({dataset.name}) are built without a root folder"
    return None


def _warn_ignored_dataset_settings(dataset) -> None:
    from fmaml.data.specs import SPLIT_FOLDERS, ImageFolder, TorchmetaDataset

    settings = vars(dataset)
    if isinstance(dataset, TorchmetaDataset) and dataset.task_type == "regression" and dataset.image_size:
        warn_ignored(
            "data.dataset.image_size",
            dataset.image_size,
            "has no effect: images are resized for classification datasets only, and task_type is regression",
        )
    if isinstance(dataset, ImageFolder):
        present = [s for s in SPLIT_FOLDERS if os.path.isdir(os.path.join(dataset.path, s))]
        if not present:
            return
        for name in ("split_seed", "split_fractions"):
            if _changed(ImageFolder, settings, name):
                warn_ignored(
                    f"data.dataset.{name}",
                    settings[name],
                    f"has no effect: {dataset.path} has its own split folders (train/, val/, test/)",
                )

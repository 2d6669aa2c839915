"""The run behind a checkpoint: finding the newest one to resume, and what a command may change of it.

Every checkpoint carries the config of the command that wrote it (fmaml.callbacks.SaveRunConfig; older
ones fall back to the config.yaml of their log folder). Before a resume or an evaluation, the command's
settings are compared with it, key by key, so that nothing is silently replaced:
- a resumed `fit` must keep everything that defines what is trained (`defines_training`): the network,
  the inner loop, the meta-optimizer and its scheduler, the tasks. What only changes how training goes on
  (max_steps, max_time, logging, checkpoint intervals, workers, the execution strategy) may change;
- `test`/`validate` run with the command's settings (inner steps and rates, strategy, tasks, shots), and
  print those that differ from the checkpoint's run; only a different network is refused.
"""

from __future__ import annotations

import functools
import glob
import os

import torch
import yaml

from fmaml.models import BATCH_NORM
from fmaml.settings import FLAT_NAMES

# Where a checkpoint keeps the config of the command that wrote it and its log folder
# (fmaml.callbacks.SaveRunConfig writes it).
RUN_KEY = "fmaml_run"

# Settings that change how a model is run or evaluated, never what is trained.
EXECUTION_ONLY = (
    "model.inner_loop.eval_steps",
    "model.inner_loop.eval_lr",
    "model.execution",
    "data.loading.num_workers",
    "data.root",
    "data.evaluation",
)
# The checkpoint's tensors are these settings' network: an evaluation cannot change them.
NETWORK = ("model.network", "model.inner_loop.optimizer.init_args.learn_lr", "data.ways")


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"network": {"init_args": {"filters": 64}}}} -> {"model.network.init_args.filters": 64}."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def defines_training(key: str) -> bool:
    """Whether a resumed fit must keep this setting: the model (network, inner loop, optimizer, scheduler)
    and the tasks, but not what only changes evaluation or execution."""
    return _under(key, ("model", "data")) and not _under(key, EXECUTION_ONLY)


def defines_network(key: str) -> bool:
    return _under(key, NETWORK)


def run_config(ckpt_path: str) -> tuple[dict | None, str]:
    """The config that trained `ckpt_path` (flattened), and where it was read: the checkpoint's own copy,
    else its log folder's config.yaml (checkpoints written before fmaml stored it), else (None, reason)."""
    run = _stored_run(ckpt_path)
    if run is not None:
        return flatten(run["config"]), f"the config stored in {ckpt_path}"
    saved = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))), "config.yaml")
    if os.path.isfile(saved):
        with open(saved) as f:
            return flatten(yaml.safe_load(f)), saved
    return None, f"{ckpt_path} stores no config and has no config.yaml two folders up"


INNER = "model.inner_loop.optimizer"

# Settings of runs written before today's names: before fmaml's inner optimizers (the first two), and
# before MAML's, ConvNet's BatchNorm and the data's settings were grouped (fmaml.settings,
# fmaml.models.BatchNormSettings, fmaml.data.EvaluationTasks and Loading), by their flat name (a key, or a
# prefix of keys).
RENAMED = {
    "model.inner_lr": f"{INNER}.init_args.lr",
    "model.learn_inner_lr": f"{INNER}.init_args.learn_lr",
    "model.per_task_csv": "per_task_csv.path",
    **{f"model.{old}": f"model.{group}.{name}" for old, (group, name) in FLAT_NAMES.items()},
    "model.network.init_args.per_step_batch_norm": f"{BATCH_NORM}.per_step",
    "model.network.init_args.per_step_running_stats": f"{BATCH_NORM}.running_stats",
    **{f"data.{name}": f"data.evaluation.{name}" for name in ("num_val_tasks", "num_test_tasks", "seed")},
    **{f"data.{name}": f"data.loading.{name}" for name in ("sampler", "num_workers")},
}


def renamed(key: str) -> str:
    """A setting's name today: `model.inner_steps` -> `model.inner_loop.steps`,
    `model.inner_optimizer.init_args.lr` -> `model.inner_loop.optimizer.init_args.lr`."""
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def comparable(flat: dict) -> dict:
    """`flat` with equal settings spelled alike: old names renamed (`renamed`; an old run's inner loop was plain SGD),
    torch.optim's class paths as fmaml's equivalents (the ones that run), and no learn_lr as "off"."""
    flat = {renamed(key): value for key, value in flat.items()}
    if f"{INNER}.init_args.lr" in flat:
        path = str(flat.get(f"{INNER}.class_path", "fmaml.inner_optimizers.SGD"))
        flat[f"{INNER}.class_path"] = "fmaml.inner_optimizers." + path.rsplit(".", 1)[-1]
        flat.setdefault(f"{INNER}.init_args.learn_lr", "off")
    return flat


def differences(command: dict, run: dict, keep) -> list[tuple[str, object, object]]:
    """(key, command's value, run's value) for every key where `keep(key)` and the two differ.

    A key the run does not store is a setting added to fmaml after the run was written: the run knew
    only its default, so it is not held against the command (a network it changes is still refused by
    the checkpoint's tensor shapes, `MAML.on_load_checkpoint`). Unless the run stores a value above it:
    `model.lr_scheduler: null` in the run against the command's `model.lr_scheduler.class_path` differ."""
    command, run = comparable(command), comparable(run)
    keys = sorted(k for k in command.keys() | run.keys() if keep(k) and (k in run or _stored_above(k, run)))
    return [(k, command.get(k), run.get(k)) for k in keys if command.get(k) != run.get(k)]


def _stored_above(key: str, run: dict) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in run for i in range(1, len(parts)))


def describe(diffs: list[tuple[str, object, object]]) -> str:
    return "\n".join(f"  {key}: {mine!r} here, {theirs!r} in the run" for key, mine, theirs in diffs)


def newest_last_checkpoint(
    save_dir: str | None, name: str | None, dirpath: str | None
) -> tuple[str, str | None]:
    """The last.ckpt that `--ckpt_path last` resumes, and the logger version whose curves it continues.

    With `--checkpoint.dirpath` that folder's last.ckpt (its version is the log folder stored in the
    checkpoint, when that is under the same save_dir and name); otherwise the newest
    `<save_dir>/<name>/version_*/checkpoints/last.ckpt`: the newest run *of this logger name*.
    """
    if dirpath is not None:
        path = os.path.join(dirpath, "last.ckpt")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--ckpt_path=last: no last.ckpt in --checkpoint.dirpath={dirpath}. Start a fit without "
                "--ckpt_path first, or give the path of a .ckpt."
            )
        return path, _logged_version(path, save_dir, name)
    if save_dir is None:
        raise ValueError(
            "--ckpt_path=last needs a logger with a save_dir (the default TensorBoard logger) or "
            "--checkpoint.dirpath; give the checkpoint's path instead"
        )
    pattern = os.path.join(save_dir, name or "", "version_*", "checkpoints", "last.ckpt")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path=last: no checkpoint matches {pattern} (the runs of logger name {name!r}). Start a "
            "fit without --ckpt_path first, set --trainer.logger.init_args.name to the run's, or give the "
            "path of a .ckpt."
        )
    return found[-1], os.path.basename(os.path.dirname(os.path.dirname(found[-1])))


def check_fresh_checkpoint_folder(dirpath: str | None) -> None:
    """A new fit must not write into a `--checkpoint.dirpath` that holds another run's last.ckpt."""
    if dirpath is not None and os.path.isfile(os.path.join(dirpath, "last.ckpt")):
        raise FileExistsError(
            f"--checkpoint.dirpath={dirpath} already holds another run's last.ckpt: resume that run with "
            "--ckpt_path last, or give this run a folder of its own"
        )


def _stored_run(ckpt_path: str) -> dict | None:
    # Start-up asks twice (the version to log into, then the settings): read the file once.
    return _load_run(os.path.abspath(ckpt_path), os.path.getmtime(ckpt_path))


@functools.lru_cache(maxsize=4)
def _load_run(path: str, mtime: float) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False).get(RUN_KEY)


def _logged_version(ckpt_path: str, save_dir: str | None, name: str | None) -> str | None:
    """The version folder the checkpoint's run logged into, if it is one of <save_dir>/<name>/."""
    run = _stored_run(ckpt_path)
    if run is None or run.get("log_dir") is None or save_dir is None:
        return None
    log_dir = os.path.abspath(run["log_dir"])
    if os.path.dirname(log_dir) != os.path.abspath(os.path.join(save_dir, name or "")):
        return None
    return os.path.basename(log_dir)

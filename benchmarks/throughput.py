"""End-to-end throughput: does `fit` keep up with the bare meta-step, and how long does a meta-batch take
to sample, torchmeta path against tensor path?

    FMAML_DATA_ROOT=/path/with/omniglot uv run python benchmarks/throughput.py \
        --configs configs/sinusoid.yaml configs/omniglot.yaml --steps 50 --warmup 5 --device cpu --json out.json

Per config, in one process, with the model and data the config file builds (through the CLI):
(a) sampling: one meta-batch from the training loader, torchmeta path (in this process, no workers)
    against tensor path (on --device), median of --steps;
(b) bare: the engine's meta-step (meta_loss, finite check, backward, Adam step: what training_step does)
    on the tensor path's first batches, already on the device, which are the batches `fit` sees;
(c) fit: meta-steps/s of `fit --data.loading.sampler=torchmeta|tensor` (no validation), timed by a callback
    between on_train_batch_start of step --warmup and of step --warmup + --steps;
(d) Lightning's cost per step: fit step time - bare step time; for the sinusoid also with the progress
    bar off, and with log_every_n_steps large too, to see where it goes.
"""

import argparse
import json
import os
import shlex
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch

from fmaml.cli import MAMLCLI, TRAINER_DEFAULTS
from fmaml.data import MetaDataModule
from fmaml.maml import meta_loss
from fmaml.module import MAML


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time at every on_train_batch_start (after the batch is fetched and moved to the device)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def on_train_batch_start(self, *args) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())


def build(config: str, args: list[str], logs: str, callbacks=(), fit: bool = False) -> MAMLCLI:
    """The config as `python -m fmaml fit` builds it (and runs it, if `fit`)."""
    return MAMLCLI(
        MAML,
        MetaDataModule,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": list(callbacks)},
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=(["fit"] if fit else [])
        + ["--config", config, f"--trainer.logger.init_args.save_dir={logs}", *args],
        run=fit,
    )


def sample_times(cli: MAMLCLI, n: int) -> tuple[list[float], list[dict], float]:
    """(seconds per meta-batch, the batches, seconds to load the tensor sampler's data, if any)."""
    dm = cli.datamodule
    dm.trainer = cli.trainer  # the device, rank and step the loader is made for, as in `fit`
    device, load_s = cli.trainer.strategy.root_device, 0.0
    if dm.sampler == "tensor":
        start = time.perf_counter()
        dm._tensor_episodes()
        load_s = time.perf_counter() - start
    loader = iter(dm.train_dataloader())
    times, batches = [], []
    for _ in range(n):
        start = time.perf_counter()
        batches.append(next(loader))
        sync(device)
        times.append(time.perf_counter() - start)
    return times, batches, load_s


def bare_step_times(cli: MAMLCLI, batches: list[dict], warmup: int) -> list[float]:
    """Seconds per engine meta-step on `batches`, as MAML.training_step does it, without Lightning."""
    module, device = cli.model, cli.trainer.strategy.root_device
    network = module.network.to(device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    params, buffers = dict(network.named_parameters()), dict(network.named_buffers())
    times = []
    for batch in batches:
        start = time.perf_counter()
        optimizer.zero_grad()
        loss, _ = meta_loss(
            params,
            buffers,
            batch,
            model=network,
            loss=module.loss,
            strategy=module.execution.strategy,
            metrics_before=False,  # as training_step on the steps that write no logs
            **module.train_inner,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError("the meta-loss is not finite")
        loss.backward()
        optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def fit_step_time(config: str, args: list[str], logs: str, device, warmup: int, steps: int) -> float:
    """Mean seconds per meta-step of `fit`, over `steps` steps after `warmup`."""
    timer = StepTimer(device)
    run = ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]
    build(config, [*args, *run, f"--trainer.max_steps={warmup + steps + 1}"], logs, [timer], fit=True)
    return (timer.times[warmup + steps] - timer.times[warmup]) / steps


def measure(config: str, args: argparse.Namespace, logs: str) -> list[dict]:
    name = os.path.basename(config).removesuffix(".yaml")
    device = torch.device(args.device)
    common = [
        f"--trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "--trainer.devices=1",
        "--trainer.enable_model_summary=false",
    ]
    if args.data_root:
        common.append(f"--data.root={args.data_root}")
    common += shlex.split(args.cli_args)
    records = []

    def record(**fields) -> dict:
        records.append({"config": name, "device": str(device), **fields})
        return records[-1]

    for sampler in ("torchmeta", "tensor"):
        cli = build(config, [*common, f"--data.loading.sampler={sampler}"], logs)
        # The tensor path's first batches are the very batches `fit --data.loading.sampler=tensor` trains on.
        times, batches, load_s = sample_times(cli, args.steps + (args.warmup if sampler == "tensor" else 0))
        record(what="sample", sampler=sampler, median_ms=1e3 * statistics.median(times), load_s=load_s)
    bare = statistics.mean(bare_step_times(cli, batches, args.warmup))  # cli, batches: the tensor path's
    record(what="bare", sampler="tensor", variant="engine only", step_ms=1e3 * bare, steps_per_s=1 / bare)
    variants = [("torchmeta", "config's logging", []), ("tensor", "config's logging", [])]
    if name == "sinusoid":
        no_bar = ["--trainer.enable_progress_bar=false"]
        variants += [
            ("tensor", "no progress bar", no_bar),
            (
                "tensor",
                "no progress bar, log_every_n_steps=1e6",
                [*no_bar, "--trainer.log_every_n_steps=1000000"],
            ),
        ]
    for sampler, variant, extra in variants:
        step = fit_step_time(
            config,
            [*common, f"--data.loading.sampler={sampler}", *extra],
            logs,
            device,
            args.warmup,
            args.steps,
        )
        record(
            what="fit",
            sampler=sampler,
            variant=variant,
            step_ms=1e3 * step,
            steps_per_s=1 / step,
            vs_bare=bare / step,
            lightning_ms=1e3 * (step - bare),
        )
    return records


def tables(records: list[dict]) -> str:
    lines = [
        "| config | device | torchmeta ms/meta-batch | tensor ms/meta-batch | speed-up | tensor load s |"
    ]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for config in dict.fromkeys(r["config"] for r in records):
        s = {r["sampler"]: r for r in records if r["config"] == config and r["what"] == "sample"}
        t, m = s["tensor"], s["torchmeta"]
        lines.append(
            f"| {config} | {t['device']} | {m['median_ms']:.2f} | {t['median_ms']:.3f} | "
            f"{m['median_ms'] / t['median_ms']:.0f}x | {t['load_s']:.1f} |"
        )
    lines += ["", "| config | run | sampler | ms/step | steps/s | vs bare | Lightning ms/step |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        if r["what"] in ("bare", "fit"):
            run = "bare engine" if r["what"] == "bare" else f"fit, {r['variant']}"
            vs, extra = (
                (f"{r['vs_bare']:.0%}", f"{r['lightning_ms']:.2f}") if r["what"] == "fit" else ("", "")
            )
            lines.append(
                f"| {r['config']} | {run} | {r['sampler']} | {r['step_ms']:.2f} | {r['steps_per_s']:.1f} | "
                f"{vs} | {extra} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # this script's own argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/sinusoid.yaml", "configs/omniglot.yaml"])
    parser.add_argument("--steps", type=int, default=50, help="timed meta-steps (and sampled meta-batches)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed meta-steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=os.environ.get("FMAML_DATA_ROOT"), help="holds omniglot/")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--cli-args", default="", help='more CLI arguments, e.g. --cli-args="--data.ways=20"')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logs:  # TensorBoard logs and checkpoints of the fits
        records = [r for config in args.configs for r in measure(config, args, logs)]
    print(tables(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)

"""The MAML LightningModule: a thin shell that feeds batches to the pure core and steps the meta-optimizer.

Everything MAML-specific is in `fmaml.maml`; this file only decides *when* to call it (train, validate,
test), with which inner-loop settings, and what to log.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from fmaml import auto_strategy
from fmaml.inner_optimizers import (
    SGD,
    InnerLR,
    InnerOptimizer,
    from_config,
    learned_rate_tensors,
    rates_as_lr,
)
from fmaml.maml import (
    LossName,
    check_lr,
    check_memory,
    check_steps,
    check_strategy,
    meta_loss,
    msl_weights,
    resolve_strategy,
)
from fmaml.meta_gradients import MetaGradient
from fmaml.per_step_batch_norm import statistics_layers, update_running_statistics
from fmaml.private_apis import attached_trainer
from fmaml.schedules import CosineAnnealingToMaxSteps, check_max_steps_for_schedule
from fmaml.settings_check import warn_ignored_model_settings

# The paper's inner loop, SGD at 0.4 (Omniglot); lazy, so that LightningCLI shows it as a class_path.
PAPER_INNER_OPTIMIZER = lazy_instance(SGD, lr=0.4)
# Lightning's mixed precisions, run by the engine as explicit casts (fmaml.maml.forward's compute_dtype).
MIXED_PRECISION = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class MAML(L.LightningModule):
    """Meta-trains `network` with MAML.

    network: builds the model given its number of outputs, e.g. `fmaml.models.ConvNet`; the data module
        sets `num_outputs` (the number of ways) and `loss` through argument links, so nobody types them twice.
    inner_steps: the inner steps while meta-training (the paper: 1 step on Omniglot 5-way).
    inner_optimizer: the inner loop's optimizer and its rate (the paper: SGD at 0.4): `class_path:
        torch.optim.SGD` (or Adam, AdamW, RMSprop, Adagrad) with torch's `init_args`, run as its
        differentiable functional equivalent in `fmaml.inner_optimizers`, whose classes of the same names
        also take `learn_lr` (below). Its state starts fresh for every task.
    eval_inner_steps, eval_inner_lr: the inner loop at validation and test (None: same as training).
    first_order: FOMAML, detach the inner gradients.
    strategy: how tasks are run, see `fmaml.maml.meta_loss` ("auto", "vmap", "loop", "chunked:N").
    compile: run the meta-loss through `torch.compile` (a one-off compile of tens of seconds; see the
        benchmarks/README.md for when it pays).
    optimizer, lr_scheduler: the meta-optimizer (Adam 1e-3 by default) and an optional scheduler,
        stepped once per meta-step (MAML++'s cosine annealing over the run's max_steps:
        `fmaml.schedules.CosineAnnealingToMaxSteps`, configs/omniglot_mamlpp.yaml).

    The MAML++ / Meta-SGD / ANIL options, each off by default:
    inner_optimizer's learn_lr (`class_path: fmaml.inner_optimizers.SGD`, any of its optimizers): meta-learn
        the inner rates, initialised to its lr: "per_parameter" (Meta-SGD, a rate tensor shaped like each
        parameter, used at every step) or "per_layer_per_step" (MAML++ LSLR, a scalar per parameter tensor
        per inner step). They live in `inner_lrs` (checkpointed, updated by the meta-optimizer, any sign
        allowed, mean logged as train/inner_lr_mean). Evaluation uses them too; with per-step rates,
        evaluation steps beyond `inner_steps` reuse the last step's rate.
    multi_step_loss, msl_anneal_steps: MAML++'s multi-step loss, the query loss after every inner step
        weighted by `fmaml.maml.msl_weights` (uniform at first, annealed toward the last step over
        `msl_anneal_steps` meta-steps, 10 epochs of 500 in MAML++), then the last step's loss only, as
        in MAML++. Training only: evaluation reports the last step's loss.
    second_order_from_step: derivative-order annealing (MAML++): first order for meta-steps
        0 .. N-1, second order from meta-step N (needs first_order: false).
    adapt_only: ANIL, adapt only the parameters under these name prefixes (e.g. ["head"]); the others are
        meta-learned but left as they are by the inner loop, whose gradient skips them.
    strategy="auto" measures: on the first training meta-batch, `fmaml.auto_strategy.choose` times the
        strategies (with each memory mode, unless `memory` fixes one) on the real shapes and device, and
        keeps the fastest whose predicted peak fits `auto_memory_share` of the free memory. It measures
        again whenever the settings that change a meta-step's cost change (derivative order, the
        multi-step loss: MAML++'s phases); `compile` is refused with it (auto times the eager meta-loss).
        The choice is logged and cached per device, model, shapes and those settings; a cached one is
        reused only while it fits the current budget and the first real meta-steps take the time it
        predicted. It is saved in checkpoints with its device and precision, and restored only where it
        still applies (memory mode allowed, same device and precision, within budget), else measured
        again, saying why. Evaluation, which computes no meta-gradient, uses it too (or, with no valid
        choice, the engine's fixed rule).
    meta_gradient: None (MAML: the meta-gradient through the inner steps), or one not taken through them:
        `fmaml.meta_gradients.Implicit` (iMAML: λ, CG iterations; evaluation adapts with its proximal term
        too) or `fmaml.meta_gradients.Reptile` (θ - φ handed to the meta-optimizer). See that module.
    memory: "store" keeps every inner step's graph for the meta-gradient; "recompute" keeps only the
        inner iterates and recomputes one step at a time (memory flat in the inner steps, the same exact
        meta-gradient; see `fmaml.maml.meta_loss`); "auto": chosen with strategy="auto", else "store".
    meta_grad_clip_value, meta_grad_clip_norm: clip the meta-gradient (of the network and of learned inner
        rates) before each meta-optimizer step: every entry to [-value, value], then the total norm over all
        of them to at most `norm` (None: off). Lightning's `trainer.gradient_clip_val` does not apply to
        manual optimization. The reference code clips MiniImageNet's by value (configs/paper/).
    per_task_csv: `test` also writes every test task's metrics to this CSV (one row per task, in task
        order), to compare two models task by task.

    A non-finite meta-loss never reaches the weights. On the CPU, where checking it costs nothing, training
    stops at once, before the update. On an accelerator, a host check every meta-step would stall the
    queue of device work, so the update is applied or skipped on the device (`_guarded_update`) and the
    host looks at the outcome only where it synchronises anyway: on steps that write logs, before every
    checkpoint, and at the end. Training then stops, naming the first bad step, with the weights and the
    optimizer state as they were before it; no checkpoint is ever written from a non-finite state.
    """

    # None: defer the finite check on accelerators only (see the class docstring); tests force either way.
    defer_finite_check: bool | None = None
    # The deferred finite check's state, on the device: the meta-step counter and the first non-finite
    # step (-1 while every meta-loss was finite). Counted there, not copied from the host every step.
    _device_step: Tensor | None = None
    _first_nonfinite_step: Tensor | None = None
    # strategy="auto": {"strategy": ..., "memory": ...} measured on the first meta-batch (or restored).
    auto_choice: dict[str, str] | None = None
    checkpoint_step: int | None = None  # the global step of the checkpoint loaded, if any

    def __init__(
        self,
        network: Callable[[int], nn.Module],
        num_outputs: int = 5,
        loss: LossName = "cross_entropy",
        inner_steps: int = 1,
        inner_optimizer: InnerOptimizer | OptimizerCallable = PAPER_INNER_OPTIMIZER,
        eval_inner_steps: int | None = None,
        eval_inner_lr: float | None = None,
        first_order: bool = False,
        strategy: str = "auto",
        compile: bool = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        multi_step_loss: bool = False,
        msl_anneal_steps: int = 5000,
        second_order_from_step: int | None = None,
        adapt_only: list[str] | None = None,
        per_task_csv: str | None = None,
        memory: Literal["auto", "store", "recompute"] = "auto",
        auto_memory_share: float = 0.5,
        meta_grad_clip_value: float | None = None,
        meta_grad_clip_norm: float | None = None,
        meta_gradient: MetaGradient | None = None,
    ):
        super().__init__()
        self.inner_optimizer = from_config(inner_optimizer)
        # Fail at start-up, not after data preparation, on settings the engine would reject at step 0.
        _check_settings(
            inner_steps=inner_steps, eval_inner_steps=eval_inner_steps, eval_inner_lr=eval_inner_lr,
            strategy=strategy, memory=memory, adapt_only=adapt_only, auto_memory_share=auto_memory_share,
            meta_grad_clip_value=meta_grad_clip_value, meta_grad_clip_norm=meta_grad_clip_norm,
        )  # fmt: skip
        _check_options(self.inner_optimizer.learn_lr, eval_inner_lr, msl_anneal_steps, second_order_from_step, first_order)  # fmt: skip
        self.save_hyperparameters(ignore=["network", "inner_optimizer", "optimizer", "lr_scheduler", "meta_gradient"])  # fmt: skip
        warn_ignored_model_settings(self)
        self.automatic_optimization = False
        self.network = network(num_outputs)
        self.loss, self.strategy = loss, strategy
        self.meta_loss = torch.compile(meta_loss) if compile else meta_loss
        self.adapt_only = _adapted_names(self.network, adapt_only)
        if meta_gradient is not None:  # after the network (cheap to build), whose per-step layers it refuses
            first_order_anywhere = first_order or second_order_from_step is not None
            _check_meta_gradient(meta_gradient, self, first_order_anywhere, multi_step_loss, memory)
        inner = dict(adapt_only=self.adapt_only, inner_optimizer=self.inner_optimizer, meta_gradient=meta_gradient)  # fmt: skip
        self.train_inner = inner | dict(steps=inner_steps, lr=self.inner_optimizer.lr, first_order=first_order)  # fmt: skip
        # Evaluation: its own steps and rate where given; the meta_gradient for iMAML's proximal term.
        self.eval_inner = inner | dict(
            steps=inner_steps if eval_inner_steps is None else eval_inner_steps,
            lr=self.inner_optimizer.lr if eval_inner_lr is None else eval_inner_lr,
        )
        self.memory, self.auto_memory_share = memory, auto_memory_share
        self._auto = auto_strategy.AutoRun.for_settings(strategy, compile)  # refuses compile with auto
        self.multi_step_loss, self.msl_anneal_steps = multi_step_loss, msl_anneal_steps
        self.second_order_from_step = second_order_from_step
        self._rate_keys, self.inner_lrs = _learned_inner_lrs(self.network, self.adapt_only, self.inner_optimizer, inner_steps)  # fmt: skip
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.per_task_csv = per_task_csv
        self.meta_grad_clip = dict(value=meta_grad_clip_value, norm=meta_grad_clip_norm)
        self._task_metrics: list[dict[str, Tensor]] = []  # this evaluation epoch's, batch by batch

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.checkpoint_step = checkpoint.get("global_step")
        if self.strategy == "auto" and "fmaml_auto_choice" in checkpoint:
            self._auto.restored = checkpoint["fmaml_auto_choice"]  # used where it still applies
        # Lightning's own error lists every mismatched tensor; say first what went wrong and what to do.
        mine = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        theirs = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items()}
        if mine != theirs:
            differ = sorted(n for n in mine.keys() | theirs.keys() if mine.get(n) != theirs.get(n))
            raise ValueError(
                f"--ckpt_path: the checkpoint holds a network of another shape ({len(differ)} tensors differ, "
                f"e.g. {differ[0]}: checkpoint {theirs.get(differ[0])}, this config {mine.get(differ[0])}). "
                "Use the config it was trained with: config.yaml in its log folder."
            )

    def configure_optimizers(self):
        parameters = list(self.network.parameters())
        if self.inner_lrs is not None:
            parameters += list(self.inner_lrs.parameters())
        optimizer = self.optimizer_factory(parameters)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def _meta_loss(self, tasks, params, **inner) -> tuple[Tensor, dict[str, Tensor]]:
        buffers = dict(self.network.named_buffers())
        execution = self._execution()
        return self.meta_loss(
            params, buffers, tasks, model=self.network, loss=self.loss, **execution, **inner
        )

    def _execution(self) -> dict[str, str]:
        """The concrete strategy and memory mode (the measured choice, for strategy="auto")."""
        if self._auto.restored is not None:
            self._restore_auto_choice()
        if self.auto_choice is not None:
            return {"strategy": self.auto_choice["strategy"], "memory": self.auto_choice["memory"]}
        memory = "store" if self.memory == "auto" else self.memory
        return {"strategy": self.strategy} | ({"memory": memory} if memory != "store" else {})

    def _auto_memories(self) -> tuple[str, ...]:
        if self.adapt_only is not None or self.train_inner["meta_gradient"] is not None:
            return ("store",)  # recompute supports neither ANIL nor iMAML/Reptile (flat already)
        return ("store", "recompute") if self.memory == "auto" else (self.memory,)

    def _precision(self) -> str | None:
        return str(self.trainer.precision) if attached_trainer(self) is not None else None

    def _mixed_precision(self) -> dict:
        """Lightning's bf16-mixed / 16-mixed as the engine's explicit casts (`compute_dtype`, for every
        strategy); Lightning's autocast is switched off around the engine (`_no_autocast`), as it fails
        inside vmap in this torch."""
        dtype = MIXED_PRECISION.get(self._precision())
        return {} if dtype is None else {"compute_dtype": dtype}

    def _no_autocast(self):
        return torch.autocast(self.device.type, enabled=False)

    def _auto_print(self, text: str) -> None:
        if attached_trainer(self) is None or self.trainer.is_global_zero:
            print(text)

    def _restore_auto_choice(self) -> None:
        """A checkpoint's choice, checked once: kept where it still applies to this run, else dropped with
        one line saying why (training then measures again; evaluation runs the engine's fixed rule)."""
        saved, self._auto.restored = self._auto.restored, None
        why = auto_strategy.restored_problem(
            saved,
            memories=self._auto_memories(),
            device=self.device,
            precision=self._precision(),
            memory_share=self.auto_memory_share,
        )
        if attached_trainer(self) is not None:
            why = self.trainer.strategy.broadcast(why)  # free memory differs by process: rank 0 decides
        if not why:
            self.auto_choice = saved
            return
        fitting = attached_trainer(self) is not None and self.trainer.state.fn == "fit"
        fixed = self._execution()  # the fixed rule, with neither a restored nor a measured choice
        self._auto_print(
            f"strategy=auto: the checkpoint's choice ({saved.get('strategy')}, memory={saved.get('memory')}) "
            f"is not used: {why}. "
            + (
                "Measuring again on the next training meta-batch."
                if fitting
                else "Evaluating with the fixed rule (fmaml.maml.resolve_strategy): strategy="
                f"{resolve_strategy(fixed['strategy'], self.network, self.device)}, "
                f"memory={fixed.get('memory', 'store')}."
            )
        )

    def _auto_prepare(self, tasks, inner: dict) -> None:
        """strategy="auto", before a training meta-step: measure where no choice holds for this step's
        cost-changing settings (the first step; a checkpoint's choice that does not apply; a change of
        derivative order or multi-step loss since the choice), and time the step if a cached choice is
        being checked."""
        if self._auto.restored is not None:
            self._restore_auto_choice()
        settings = auto_strategy.phase(inner)
        if self.auto_choice is not None and self.auto_choice["phase"] != settings:
            self._auto_print(
                "strategy=auto: the choice was measured under "
                f"{auto_strategy.describe_phase(self.auto_choice['phase'])}; step {self.global_step} runs "
                f"{auto_strategy.describe_phase(settings)}, which costs differently: measuring again"
            )
            self.auto_choice = None
        if self.auto_choice is None:
            self._choose_strategy(tasks, inner)
        if self._auto.check is not None:
            self._auto.check.start()

    def _choose_strategy(self, tasks, inner: dict, refresh: bool = False) -> None:
        """strategy="auto": measure on this meta-batch (or take the cache's choice, then checked against the
        first real meta-steps); under DDP rank 0's choice for all."""
        choice = auto_strategy.choose(
            dict(self.network.named_parameters()),
            dict(self.network.named_buffers()),
            tasks,
            model=self.network,
            loss=self.loss,
            memories=self._auto_memories(),
            memory_share=self.auto_memory_share,
            refresh=refresh,
            **inner,
        )
        self._auto_print(choice.summary())
        chosen = {
            "strategy": choice.strategy,
            "memory": choice.memory,
            "device": auto_strategy.device_name(self.device),
            "precision": self._precision(),
            "predicted_bytes": choice.chosen["predicted_bytes"],
            "phase": auto_strategy.phase(inner),
            "check_seconds": choice.chosen["seconds"] if choice.cached else None,
        }
        if attached_trainer(self) is not None:
            chosen = self.trainer.strategy.broadcast(chosen)
        self._auto.watch(chosen.pop("check_seconds"), self.device)
        self.auto_choice = chosen

    def on_train_batch_end(self, outputs, tasks, batch_idx) -> None:
        """strategy="auto": a cached choice's check, on its first real meta-steps only."""
        if self._auto.check is None:
            return
        why = self._auto.check.stop()
        if why is None:
            return
        self._auto.check = None
        if attached_trainer(self) is not None:
            why = self.trainer.strategy.broadcast(why)  # every process measures again, or none
        if why:
            self._auto_print(f"strategy=auto: {why}")
            self._choose_strategy(tasks, self._train_inner(), refresh=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_not_finite()
        if self.auto_choice is not None:
            checkpoint["fmaml_auto_choice"] = self.auto_choice

    def _log_metrics(self, stage: str, metrics: dict[str, Tensor], **kwargs) -> None:
        batch_size = next(iter(metrics.values())).shape[0]
        for name, values in metrics.items():
            # Per process, to keep the meta-step free of an extra collective (evaluation: `_log_task_means`).
            self.log(f"{stage}/{name}", values.mean(), batch_size=batch_size, **kwargs)

    def _learned_lr(self, steps: int, detach: bool = False) -> InnerLR:
        """The learned rates as the engine's `lr`: per-parameter tensors (Meta-SGD), or one dict of scalars
        per step (LSLR), where steps beyond the trained ones (evaluation) reuse the last step's rate."""
        rates = {name: self.inner_lrs[key] for name, key in self._rate_keys.items()}
        if detach:
            rates = {name: rate.detach() for name, rate in rates.items()}
        return rates_as_lr(rates, self.inner_optimizer.learn_lr, steps, self.train_inner["steps"])

    def _train_inner(self) -> dict:
        """This meta-step's inner-loop settings: the fixed ones, plus the options that depend on the step."""
        inner, step = self.train_inner | self._mixed_precision(), self.global_step
        if self.inner_lrs is not None:
            inner = inner | {"lr": self._learned_lr(inner["steps"])}
        if self.second_order_from_step is not None:
            inner = inner | {"first_order": step < self.second_order_from_step}
        if self.multi_step_loss and step < self.msl_anneal_steps:
            weights = msl_weights(inner["steps"], step, self.msl_anneal_steps)
            inner = inner | {"step_weights": weights}
        return inner

    def training_step(self, tasks, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        # Lightning writes training metrics to the logger only every log_every_n_steps, and each self.log
        # costs about 1.6 ms of Lightning bookkeeping (a sinusoid meta-step is ~8 ms): so the metrics are
        # logged on those steps only, and the "before adaptation" metrics, one more query forward per task
        # (about a sixth of a ConvNet meta-step), are only computed then. The progress bar updates then too.
        logs = self._logs_this_step()
        inner = self._train_inner()
        with self._no_autocast():
            if self.strategy == "auto":
                self._auto_prepare(tasks, inner)
            value, metrics = self._meta_loss(
                tasks, dict(self.network.named_parameters()), metrics_before=logs, **inner
            )
            # MAML++'s per-step running statistics (a no-op without them): those of the inner trajectories
            # this meta-step used, so before the update; outside the meta-gradient's computation.
            update_running_statistics(self.network, tasks, strategy=self._execution()["strategy"], **inner)
        if self._defers_finite_check(value):
            self._guarded_update(optimizer, value)
        else:
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"the meta-loss became {value.item()} at step {self.global_step}: training stopped before "
                    f"updating on it. {self._nonfinite_hint()}"
                )
            self.manual_backward(value)
            optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if logs:
            self.raise_if_not_finite()
            self._log_metrics("train", metrics, prog_bar=True)
            if self.inner_lrs is not None:
                rates = torch.cat([rate.detach().flatten() for rate in self.inner_lrs.values()])
                self.log("train/inner_lr_mean", rates.mean())
        return value

    def on_before_optimizer_step(self, optimizer) -> None:
        # Inside the meta-optimizer's step, after Lightning has taken 16-mixed's loss scale off the
        # gradients: so the bound applies to the true meta-gradient, under every precision.
        _clip_meta_gradient(optimizer, **self.meta_grad_clip)

    def _nonfinite_hint(self) -> str:
        return f"Lower model.inner_optimizer's lr (now {self.inner_optimizer.lr}) or the meta learning rate."

    def _defers_finite_check(self, value: Tensor) -> bool:
        return value.device.type != "cpu" if self.defer_finite_check is None else self.defer_finite_check

    def _guarded_update(self, optimizer, value: Tensor) -> None:
        """backward and optimizer.step(), kept on the device only while every meta-loss so far was finite:
        from the first non-finite one on, each weight and optimizer-state tensor is put back as it was."""
        if self._device_step is None:  # once per fit (or resume): the only host-to-device copy
            self._device_step = torch.tensor(self.global_step, device=value.device)
            self._first_nonfinite_step = torch.full_like(self._device_step, -1)
        step = self._device_step
        healthy = self._first_nonfinite_step < 0
        finite = torch.isfinite(value.detach())
        keep = healthy & finite
        self._first_nonfinite_step = torch.where(healthy & ~finite, step, self._first_nonfinite_step)
        self.manual_backward(value)
        before = {id(t): t.detach().clone() for t in _update_tensors(optimizer, keep.device)}
        optimizer.step()
        with torch.no_grad():
            for t in _update_tensors(optimizer, keep.device):
                # State the first step creates (Adam's moments) goes back to "absent", i.e. zeros.
                old = before.get(id(t))
                t.copy_(torch.where(keep, t, torch.zeros_like(t) if old is None else old))
        self._device_step = step + 1

    def state_is_finite(self) -> bool:
        """False once a deferred check has seen a non-finite meta-loss (a host sync; not per step)."""
        return self._first_nonfinite_step is None or int(self._first_nonfinite_step) < 0

    def raise_if_not_finite(self) -> None:
        if self.state_is_finite():
            return
        raise FloatingPointError(
            f"the meta-loss became non-finite at step {int(self._first_nonfinite_step)} (seen at step "
            f"{self.global_step}: on an accelerator it is checked where the host waits anyway): training "
            "stopped. No update was applied from that step on, and no checkpoint holds that state. "
            + self._nonfinite_hint()
        )

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1 and statistics_layers(self.network):
            # Each process would fold only its own tasks' statistics, and the processes' running statistics
            # would drift apart (the functional forward never goes through DDP's buffer broadcast).
            raise ValueError(
                "model.network.init_args.per_step_running_stats=true is not supported with more than one "
                f"process (world size {self.trainer.world_size}) yet: train it on one device, or turn it off"
            )

    def on_train_start(self) -> None:
        # After a resume has restored the scheduler's state, which carries the old run's length.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, CosineAnnealingToMaxSteps) and scheduler.follows_max_steps:
                scheduler.total_steps = check_max_steps_for_schedule(self.trainer.max_steps)

    def on_train_end(self) -> None:
        self.raise_if_not_finite()

    def _logs_this_step(self) -> bool:
        # Lightning's rule (its logger connector's private should_update_logs), from public attributes: the
        # metrics of every log_every_n_steps-th step, and of the last. Its step count is global_step here,
        # since every training_step takes exactly one optimizer step (tests/test_private_apis.py).
        trainer = self.trainer
        every = trainer.log_every_n_steps
        due = every > 0 and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)
        return bool(trainer.fast_dev_run) or due

    def _evaluate(self, tasks) -> dict[str, Tensor]:
        # Detached params: evaluation adapts (inner gradients) but needs no meta-gradient. Grad mode is
        # switched on anyway, so that no adaptation can silently turn into a no-op under no_grad.
        params = {name: p.detach() for name, p in self.network.named_parameters()}
        inner = self.eval_inner | self._mixed_precision()
        if self.inner_lrs is not None:
            inner = inner | {"lr": self._learned_lr(inner["steps"], detach=True)}
        with torch.enable_grad(), self._no_autocast():
            _, metrics = self._meta_loss(tasks, params, **inner)
        return metrics

    def validation_step(self, tasks, batch_idx):
        self._task_metrics.append(self._evaluate(tasks))

    def test_step(self, tasks, batch_idx):
        self._task_metrics.append(self._evaluate(tasks))

    def on_validation_epoch_start(self) -> None:
        self._task_metrics = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._log_task_means("val", self._all_tasks(), prog_bar=True)

    def _all_tasks(self) -> dict[str, Tensor]:
        """This evaluation epoch's per-task metrics, of every DDP process, in task order."""
        metrics = self._task_metrics
        return self._gather_per_task({k: torch.cat([m[k] for m in metrics]) for k in metrics[0]})

    def _log_task_means(self, stage: str, per_task: dict[str, Tensor], **kwargs) -> None:
        # From every process's tasks, gathered, so the same on all. Not sync_dist: Lightning divides by the
        # processes' mean task count as an integer, truncated (5 tasks on 2 processes: 2, not 2.5).
        for name, values in per_task.items():
            self.log(f"{stage}/{name}", values.mean(), **kwargs)

    def on_test_epoch_end(self) -> None:
        """The paper's protocol: mean over all test tasks with a 95% confidence interval."""
        per_task = self._all_tasks()
        self._log_task_means("test", per_task)
        main = "accuracy" if "accuracy" in per_task else "loss"
        values = per_task[main].double()
        mean, ci95 = values.mean().item(), ci95_half_width(values)
        self.log(f"test/{main}_mean", mean)
        self.log(f"test/{main}_ci95", ci95)
        self.log("test/num_tasks", float(values.numel()))
        if not self.trainer.is_global_zero:
            return
        if self.per_task_csv:
            _write_csv(self.per_task_csv, per_task)
        if main == "accuracy":
            shown = f"{mean * 100:.2f}% ± {ci95 * 100:.2f}%"
        else:  # a loss of any scale (the sinusoid's MSE is ~0.1): three significant digits
            shown = f"{mean:.3g} ± {ci95:.3g}"
        ckpt = self.trainer.ckpt_path
        weights = (
            f"checkpoint {ckpt} (step {self.checkpoint_step})" if ckpt else "the untrained initial weights"
        )
        print(
            f"test {main} over {values.numel()} tasks after {self.eval_inner['steps']} inner steps: "
            f"{shown} (95% CI), {weights}"
        )

    def _gather_per_task(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every process's per-task values, in task order.

        Process r holds tasks r, r + W, r + 2W, ... (fmaml.data's sharding), and the shares may differ in
        length by one while all_gather needs equal shapes: pad to the longest, then interleave."""
        if self.trainer.world_size == 1:
            return metrics
        any_values = next(iter(metrics.values()))
        counts = self.all_gather(torch.tensor(any_values.numel(), device=any_values.device)).reshape(-1)
        world, longest = len(counts), int(counts.max())
        owner = torch.arange(longest * world).remainder(world)  # task t lives on process t % W, at t // W
        present = torch.arange(longest * world) < int(counts.sum())
        ordered = {}
        for name, values in metrics.items():
            padded = values.new_zeros(longest)
            padded[: values.numel()] = values
            shares = self.all_gather(padded).reshape(world, longest)
            tasks = torch.arange(longest * world)
            ordered[name] = shares[owner, tasks // world][present]
        return ordered


def ci95_half_width(values: Tensor) -> float:
    """Half-width of the normal 95% confidence interval of the mean (NaN for a single value)."""
    n = values.numel()
    return 1.96 * values.double().std().item() / math.sqrt(n) if n > 1 else float("nan")


def _write_csv(path: str, per_task: dict[str, Tensor]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    names = list(per_task)
    columns = [per_task[name].double().cpu().tolist() for name in names]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", *names])
        for task, row in enumerate(zip(*columns, strict=True)):
            writer.writerow([task, *(repr(v) for v in row)])


def _check_options(
    learn_inner_lr, eval_inner_lr, msl_anneal_steps, second_order_from_step, first_order
) -> None:
    """The MAML++ / Meta-SGD options, checked at start-up with the parameter, its value and the fix."""
    if learn_inner_lr != "off" and eval_inner_lr is not None:
        raise ValueError(
            f"model.eval_inner_lr={eval_inner_lr} with model.inner_optimizer's learn_lr={learn_inner_lr}: "
            "evaluation uses the learned rates; drop eval_inner_lr (or set learn_lr: off)"
        )
    if isinstance(msl_anneal_steps, bool) or not isinstance(msl_anneal_steps, int) or msl_anneal_steps < 1:
        raise ValueError(
            f"model.msl_anneal_steps={msl_anneal_steps!r}: the meta-steps over which the multi-step loss "
            "weights anneal must be an integer >= 1, e.g. 5000"
        )
    if second_order_from_step is None:
        return
    step = second_order_from_step
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(
            f"model.second_order_from_step={step!r}: the meta-step from which training is second order "
            "must be an integer >= 0 (meta-steps before it are first order)"
        )
    if first_order:
        raise ValueError(
            f"model.second_order_from_step={second_order_from_step} switches to second order at that "
            "meta-step, but model.first_order=true keeps every step first order: set first_order: false "
            "(or drop second_order_from_step)"
        )


def _check_clip(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(
            f"{name}={value!r}: a meta-gradient clipping threshold must be a positive finite number, e.g. "
            "10.0; leave it unset (null) for no clipping"
        )


def _check_meta_gradient(
    meta_gradient: MetaGradient, module: MAML, first_order: bool, multi_step_loss: bool, memory: str
) -> None:
    """iMAML/Reptile refuse what they cannot honour, the module's ANIL, learned rates and per-step network
    among it."""
    meta_gradient.check(
        first_order=first_order, multi_step_loss=multi_step_loss, memory=memory, adapt_only=module.adapt_only,
        learned_lr=module.inner_optimizer.learn_lr != "off",
        per_step_network=getattr(module.network, "takes_inner_step", False), prefix="model.",
    )  # fmt: skip


def _check_settings(
    *,
    inner_steps,
    eval_inner_steps,
    eval_inner_lr,
    strategy,
    memory,
    adapt_only,
    auto_memory_share,
    meta_grad_clip_value,
    meta_grad_clip_norm,
) -> None:
    """The settings the engine would reject at its first step, named as the config names them."""
    _check_clip("model.meta_grad_clip_value", meta_grad_clip_value)
    _check_clip("model.meta_grad_clip_norm", meta_grad_clip_norm)
    check_steps(inner_steps, "model.inner_steps")
    if eval_inner_steps is not None:
        check_steps(eval_inner_steps, "model.eval_inner_steps")
    if eval_inner_lr is not None:
        check_lr(eval_inner_lr, "model.eval_inner_lr")
    check_strategy(strategy, "model.strategy")
    if memory != "auto":
        check_memory(memory, adapt_only, "model.memory")
    if not isinstance(auto_memory_share, int | float) or not 0 < auto_memory_share <= 1:
        raise ValueError(
            f"model.auto_memory_share={auto_memory_share!r}: the share of free memory strategy=auto may "
            "use must be in (0, 1], e.g. 0.5"
        )


def _learned_inner_lrs(
    network: nn.Module, adapt_only: list[str] | None, inner_optimizer, inner_steps: int
) -> tuple[dict[str, str], nn.ParameterDict | None]:
    """The learned inner rates, for the adapted parameters only: ({param name: its key}, the rates by key,
    or None when the inner optimizer learns none). ParameterDict keys cannot hold dots."""
    parameters = dict(network.named_parameters())
    keys = {name: name.replace(".", "-") for name in parameters if adapt_only is None or name in adapt_only}
    if inner_optimizer.learn_lr == "off":
        return keys, None
    rates = learned_rate_tensors(inner_optimizer, {name: parameters[name] for name in keys}, inner_steps)
    return keys, nn.ParameterDict({keys[name]: nn.Parameter(rate) for name, rate in rates.items()})


def _clip_meta_gradient(optimizer: torch.optim.Optimizer, value: float | None, norm: float | None) -> None:
    """Clip the meta-gradient of everything the meta-optimizer updates, learned inner rates included.
    Without a host sync, so that the deferred finite check keeps the device queue full."""
    if value is None and norm is None:
        return
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if value is not None:
        torch.nn.utils.clip_grad_value_(parameters, value)
    if norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, norm)


def _adapted_names(network: nn.Module, prefixes: list[str] | None) -> list[str] | None:
    """The parameter names under `prefixes` (ANIL's `adapt_only`: "head" selects head.weight, head.bias)."""
    if prefixes is None:
        return None
    names = [name for name, _ in network.named_parameters()]

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    if isinstance(prefixes, str) or not prefixes:
        raise ValueError(
            f"model.adapt_only={prefixes!r}: give a list of parameter name prefixes, e.g. [head]"
        )
    if unknown := [prefix for prefix in prefixes if not any(under(name, prefix) for name in names)]:
        raise ValueError(
            f"model.adapt_only={prefixes!r}: {unknown} match no parameter of the network. Give module or "
            f"parameter names, e.g. [head]; the network's parameters are {names}"
        )
    return [name for name in names if any(under(name, prefix) for prefix in prefixes)]


def _update_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> list[Tensor]:
    """What optimizer.step() changes on `device`: the parameters and their state tensors (moments, step)."""
    tensors = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            tensors.append(p)
            tensors += [v for v in optimizer.state.get(p, {}).values() if isinstance(v, Tensor)]
    return [t for t in tensors if t.device == device]

"""The MAML LightningModule: a thin shell that feeds batches to the pure core and steps the meta-optimizer.

Everything MAML-specific is in `fmaml.maml`; this file only decides *when* to call it (train, validate,
test), with which inner-loop settings, and what to log. Its settings come in groups (fmaml.settings), and
the units it calls hold the rest: the strategy each step runs with (fmaml.strategy_choice), the guard that
keeps a non-finite meta-loss from the weights (fmaml.finite_guard), and evaluation's per-task metrics
over DDP processes (fmaml.task_metrics).
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from fmaml import task_metrics
from fmaml.finite_guard import FiniteGuard
from fmaml.inner_optimizers import InnerLR, learned_rate_tensors, rates_as_lr
from fmaml.maml import LossName, check_memory, meta_loss, msl_weights
from fmaml.per_step_batch_norm import statistics_layers, update_running_statistics
from fmaml.private_apis import attached_trainer
from fmaml.schedules import CosineAnnealingToMaxSteps, check_max_steps_for_schedule
from fmaml.settings import (
    EXECUTION,
    FLAT_NAMES,
    INNER_LOOP,
    META_OBJECTIVE,
    Execution,
    InnerLoop,
    MetaObjective,
    grouped,
)
from fmaml.settings_check import warn_ignored_model_settings
from fmaml.strategy_choice import StrategyChoice

# Lightning's mixed precisions, run by the engine as explicit casts (fmaml.maml.forward's compute_dtype).
MIXED_PRECISION = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# The defaults: the paper's inner loop (1 step of SGD at 0.4), MAML's meta-objective, strategy=auto.
PAPER_INNER_LOOP, MAML_OBJECTIVE, AUTO_EXECUTION = InnerLoop(), MetaObjective(), Execution()


class MAML(L.LightningModule):
    """Meta-trains `network` with MAML.

    network: builds the model given its number of outputs, e.g. `fmaml.models.ConvNet`; the data module
        sets `num_outputs` (the number of ways) and `loss` through argument links, so nobody types them twice.
    inner_loop: `fmaml.settings.InnerLoop`: the inner steps and optimizer (the paper: 1 step of SGD at 0.4
        on Omniglot 5-way), first order, MAML++'s derivative-order annealing, ANIL's adapt_only, and the
        inner loop of validation and test.
    meta_objective: `fmaml.settings.MetaObjective`: MAML++'s multi-step loss, iMAML/Reptile's meta-gradient,
        meta-gradient clipping.
    execution: `fmaml.settings.Execution`: the strategy ("auto" measures), memory mode, compile.
    optimizer, lr_scheduler: the meta-optimizer (Adam 1e-3 by default) and an optional scheduler,
        stepped once per meta-step (MAML++'s cosine annealing over the run's max_steps:
        `fmaml.schedules.CosineAnnealingToMaxSteps`, configs/omniglot_mamlpp.yaml).

    Learned inner rates (inner_loop.optimizer's learn_lr: Meta-SGD's "per_parameter" or MAML++'s
    "per_layer_per_step", initialised to its lr) live in `inner_lrs`: checkpointed, updated by the
    meta-optimizer, any sign allowed, their mean logged as train/inner_lr_mean. Evaluation uses them too;
    with per-step rates, evaluation steps beyond the trained ones reuse the last step's rate.
    """

    checkpoint_step: int | None = None  # the global step of the checkpoint loaded, if any

    def __init__(
        self,
        network: Callable[[int], nn.Module],
        num_outputs: int = 5,
        loss: LossName = "cross_entropy",
        inner_loop: InnerLoop = PAPER_INNER_LOOP,
        meta_objective: MetaObjective = MAML_OBJECTIVE,
        execution: Execution = AUTO_EXECUTION,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["network", "optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.inner_loop, self.meta_objective, self.execution = inner_loop, meta_objective, execution
        self.network, self.loss = network(num_outputs), loss
        self.adapt_only = _adapted_names(self.network, inner_loop.adapt_only)
        _check_across_groups(self)  # after the network (cheap to build), whose per-step layers iMAML refuses
        warn_ignored_model_settings(self)
        self.meta_loss = torch.compile(meta_loss) if execution.compile else meta_loss
        self.strategy_choice = StrategyChoice(execution, self._memories())
        self.finite_guard = FiniteGuard(
            f"Lower {INNER_LOOP}.optimizer's lr (now {inner_loop.optimizer.lr}) or the meta learning rate."
        )
        inner = dict(adapt_only=self.adapt_only, inner_optimizer=inner_loop.optimizer, meta_gradient=meta_objective.meta_gradient)  # fmt: skip
        self.train_inner = inner | dict(steps=inner_loop.steps, lr=inner_loop.optimizer.lr, first_order=inner_loop.first_order)  # fmt: skip
        # Evaluation: its own steps and rate where given; the meta_gradient for iMAML's proximal term.
        self.eval_inner = inner | dict(
            steps=inner_loop.steps if inner_loop.eval_steps is None else inner_loop.eval_steps,
            lr=inner_loop.optimizer.lr if inner_loop.eval_lr is None else inner_loop.eval_lr,
        )
        self._rate_keys, self.inner_lrs = _learned_inner_lrs(self.network, self.adapt_only, inner_loop)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._task_metrics: list[dict[str, Tensor]] = []  # this evaluation epoch's, batch by batch
        self.test_tasks: dict[str, Tensor] = {}  # the last test's per-task metrics, of every process

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, and for a checkpoint written before the settings were grouped too: its flat
        hyperparameters (inner_steps, strategy, ...) become the groups (fmaml.settings.grouped); `kwargs`
        (e.g. `network`, which no checkpoint holds) are passed on in either case."""
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        hparams = checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
        if not FLAT_NAMES.keys() & hparams.keys():
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        # per_task_csv is a callback's setting now (fmaml.callbacks.PerTaskCSV), not the module's.
        flat = {k: v for k, v in hparams.items() if not k.startswith("_") and k != "per_task_csv"}
        module = cls(**(grouped(**flat) | kwargs))
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
        return module

    def _memories(self) -> tuple[str, ...]:
        """The memory modes this run allows: recompute supports neither ANIL nor iMAML/Reptile (flat
        already)."""
        if self.adapt_only is not None or self.meta_objective.meta_gradient is not None:
            return ("store",)
        return ("store", "recompute") if self.execution.memory == "auto" else (self.execution.memory,)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.checkpoint_step = checkpoint.get("global_step")
        self.strategy_choice.load(checkpoint)
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
        execution = self.strategy_choice.current(self)
        return self.meta_loss(
            params, buffers, tasks, model=self.network, loss=self.loss, **execution, **inner
        )

    def _mixed_precision(self) -> dict:
        """Lightning's bf16-mixed / 16-mixed as the engine's explicit casts (`compute_dtype`, for every
        strategy); Lightning's autocast is switched off around the engine (`_no_autocast`), as it fails
        inside vmap in this torch."""
        trainer = attached_trainer(self)
        dtype = MIXED_PRECISION.get(str(trainer.precision)) if trainer is not None else None
        return {} if dtype is None else {"compute_dtype": dtype}

    def _no_autocast(self):
        return torch.autocast(self.device.type, enabled=False)

    def on_train_batch_end(self, outputs, tasks, batch_idx) -> None:
        self.strategy_choice.after_training_step(self, tasks, self._train_inner())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.finite_guard.raise_if_not_finite(self.global_step)
        self.strategy_choice.save(checkpoint)

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
        return rates_as_lr(rates, self.inner_loop.optimizer.learn_lr, steps, self.inner_loop.steps)

    def _train_inner(self) -> dict:
        """This meta-step's inner-loop settings: the fixed ones, plus the options that depend on the step."""
        inner, step = self.train_inner | self._mixed_precision(), self.global_step
        second_order_from, objective = self.inner_loop.second_order_from_step, self.meta_objective
        if self.inner_lrs is not None:
            inner = inner | {"lr": self._learned_lr(inner["steps"])}
        if second_order_from is not None:
            inner = inner | {"first_order": step < second_order_from}
        if objective.multi_step_loss and step < objective.msl_anneal_steps:
            weights = msl_weights(inner["steps"], step, objective.msl_anneal_steps)
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
            self.strategy_choice.before_training_step(self, tasks, inner)
            value, metrics = self._meta_loss(
                tasks, dict(self.network.named_parameters()), metrics_before=logs, **inner
            )
            # MAML++'s per-step running statistics (a no-op without them): those of the inner trajectories
            # this meta-step used, so before the update; outside the meta-gradient's computation.
            strategy = self.strategy_choice.current(self)["strategy"]
            update_running_statistics(self.network, tasks, strategy=strategy, **inner)
        self.finite_guard.step(self, optimizer, value)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if logs:
            self.finite_guard.raise_if_not_finite(self.global_step)
            self._log_metrics("train", metrics, prog_bar=True)
            if self.inner_lrs is not None:
                rates = torch.cat([rate.detach().flatten() for rate in self.inner_lrs.values()])
                self.log("train/inner_lr_mean", rates.mean())
        return value

    def on_before_optimizer_step(self, optimizer) -> None:
        # Inside the meta-optimizer's step, after Lightning has taken 16-mixed's loss scale off the
        # gradients: so the bound applies to the true meta-gradient, under every precision.
        _clip_meta_gradient(optimizer, self.meta_objective.clip_value, self.meta_objective.clip_norm)

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1 and statistics_layers(self.network):
            # Each process would fold only its own tasks' statistics, and the processes' running statistics
            # would drift apart (the functional forward never goes through DDP's buffer broadcast).
            raise ValueError(
                "model.network.init_args.batch_norm.running_stats=true is not supported with more than one "
                f"process (world size {self.trainer.world_size}) yet: train it on one device, or turn it off"
            )

    def on_train_start(self) -> None:
        # After a resume has restored the scheduler's state, which carries the old run's length.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, CosineAnnealingToMaxSteps) and scheduler.follows_max_steps:
                scheduler.total_steps = check_max_steps_for_schedule(self.trainer.max_steps)

    def on_train_end(self) -> None:
        self.finite_guard.raise_if_not_finite(self.global_step)

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
        return task_metrics.gathered(self, task_metrics.concatenated(self._task_metrics))

    def _log_task_means(self, stage: str, per_task: dict[str, Tensor], **kwargs) -> None:
        for name, values in per_task.items():
            self.log(f"{stage}/{name}", values.mean(), **kwargs)

    def on_test_epoch_end(self) -> None:
        """The paper's protocol: mean over all test tasks with a 95% confidence interval."""
        self.test_tasks = per_task = self._all_tasks()
        self._log_task_means("test", per_task)
        main, mean, ci95, shown = task_metrics.summary(per_task)
        self.log(f"test/{main}_mean", mean)
        self.log(f"test/{main}_ci95", ci95)
        self.log("test/num_tasks", float(per_task[main].numel()))
        if not self.trainer.is_global_zero:
            return
        ckpt = self.trainer.ckpt_path
        weights = (
            f"checkpoint {ckpt} (step {self.checkpoint_step})" if ckpt else "the untrained initial weights"
        )
        print(
            f"test {main} over {per_task[main].numel()} tasks after {self.eval_inner['steps']} inner steps: "
            f"{shown} (95% CI), {weights}"
        )


def _check_across_groups(module: MAML) -> None:
    """The rules that join two settings groups; each group checks its own (fmaml.settings)."""
    memory, meta_gradient = module.execution.memory, module.meta_objective.meta_gradient
    if memory != "auto":
        check_memory(memory, module.inner_loop.adapt_only, f"{EXECUTION}.memory")
    if meta_gradient is not None:
        # iMAML/Reptile refuse what they cannot honour, ANIL, learned rates and a per-step network among it.
        meta_gradient.check(
            first_order=module.inner_loop.first_order_anywhere,
            multi_step_loss=module.meta_objective.multi_step_loss, memory=memory,
            adapt_only=module.adapt_only, learned_lr=module.inner_loop.optimizer.learn_lr != "off",
            per_step_network=getattr(module.network, "takes_inner_step", False), prefix=f"{META_OBJECTIVE}.",
        )  # fmt: skip


def _learned_inner_lrs(
    network: nn.Module, adapt_only: list[str] | None, inner_loop: InnerLoop
) -> tuple[dict[str, str], nn.ParameterDict | None]:
    """The learned inner rates, for the adapted parameters only: ({param name: its key}, the rates by key,
    or None when the inner optimizer learns none). ParameterDict keys cannot hold dots."""
    parameters = dict(network.named_parameters())
    keys = {name: name.replace(".", "-") for name in parameters if adapt_only is None or name in adapt_only}
    optimizer = inner_loop.optimizer
    if optimizer.learn_lr == "off":
        return keys, None
    rates = learned_rate_tensors(optimizer, {name: parameters[name] for name in keys}, inner_loop.steps)
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

    if unknown := [prefix for prefix in prefixes if not any(under(name, prefix) for name in names)]:
        raise ValueError(
            f"{INNER_LOOP}.adapt_only={prefixes!r}: {unknown} match no parameter of the network. Give module or "
            f"parameter names, e.g. [head]; the network's parameters are {names}"
        )
    return [name for name in names if any(under(name, prefix) for prefix in prefixes)]

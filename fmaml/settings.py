"""fmaml.module.MAML's settings, in three groups: the inner loop, the meta-objective, and execution.

Each group is a small frozen dataclass. LightningCLI configures it as nested keys (`model.inner_loop.steps`,
`--model.execution.strategy=vmap`), and Python builds it directly
(`MAML(network, inner_loop=InnerLoop(steps=5))`). Each checks its own settings when built, so a bad value
fails at start-up, before any data is prepared, with the setting's full name, the value and the fix. The
rules that join two groups (ANIL with recompute, iMAML with what it cannot honour) are checked by the module,
which holds both.

Runs written before the groups existed used flat names (`model.inner_steps`); fmaml.runs.RENAMED maps
each to its place here, so that their checkpoints still resume and evaluate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from jsonargparse import lazy_instance
from lightning.pytorch.cli import OptimizerCallable

from fmaml.auto_strategy import check_compile
from fmaml.inner_optimizers import SGD, InnerOptimizer, from_config
from fmaml.maml import check_lr, check_steps, check_strategy
from fmaml.meta_gradients import MetaGradient

INNER_LOOP, META_OBJECTIVE, EXECUTION = "model.inner_loop", "model.meta_objective", "model.execution"


def _paper_inner_optimizer():
    # The paper's inner loop, SGD at 0.4 (Omniglot); lazy, so that LightningCLI shows it as a class_path.
    return lazy_instance(SGD, lr=0.4)


@dataclass(frozen=True)
class InnerLoop:
    """The inner loop: how the network adapts to each task.

    steps: the inner steps while meta-training (the paper: 1 step on Omniglot 5-way).
    optimizer: the inner optimizer and its rate (the paper: SGD at 0.4): `class_path: torch.optim.SGD` (or
        Adam, AdamW, RMSprop, Adagrad) with torch's `init_args`, run as its differentiable functional
        equivalent in `fmaml.inner_optimizers`, whose classes of the same names also take `learn_lr`
        (Meta-SGD's per-parameter rates, MAML++'s per-layer per-step rates). Its state starts fresh for
        every task.
    first_order: FOMAML, the inner gradients detached.
    second_order_from_step: derivative-order annealing (MAML++): first order for meta-steps 0 .. N-1, second
        order from meta-step N (needs first_order: false).
    adapt_only: ANIL, adapt only the parameters under these name prefixes (e.g. [head]); the others are
        meta-learned but left as they are by the inner loop, whose gradient skips them.
    eval_steps, eval_lr: the inner loop at validation and test (None: the same as training's).
    """

    steps: int = 1
    optimizer: InnerOptimizer | OptimizerCallable = field(default_factory=_paper_inner_optimizer)
    first_order: bool = False
    second_order_from_step: int | None = None
    adapt_only: list[str] | None = None
    eval_steps: int | None = None
    eval_lr: float | None = None

    def __post_init__(self) -> None:
        # torch.optim's class paths become fmaml's functional equivalents here, checked once.
        object.__setattr__(self, "optimizer", from_config(self.optimizer, f"{INNER_LOOP}.optimizer"))
        check_steps(self.steps, f"{INNER_LOOP}.steps")
        if self.eval_steps is not None:
            check_steps(self.eval_steps, f"{INNER_LOOP}.eval_steps")
        if self.eval_lr is not None:
            check_lr(self.eval_lr, f"{INNER_LOOP}.eval_lr")
            if self.optimizer.learn_lr != "off":
                raise ValueError(
                    f"{INNER_LOOP}.eval_lr={self.eval_lr} with {INNER_LOOP}.optimizer's learn_lr="
                    f"{self.optimizer.learn_lr}: evaluation uses the learned rates; drop eval_lr (or set "
                    "learn_lr: off)"
                )
        if self.adapt_only is not None and (isinstance(self.adapt_only, str) or not self.adapt_only):
            raise ValueError(
                f"{INNER_LOOP}.adapt_only={self.adapt_only!r}: give a list of parameter name prefixes, e.g. [head]"
            )
        self._check_second_order_from_step()

    def _check_second_order_from_step(self) -> None:
        step = self.second_order_from_step
        if step is None:
            return
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"{INNER_LOOP}.second_order_from_step={step!r}: the meta-step from which training is second "
                "order must be an integer >= 0 (meta-steps before it are first order)"
            )
        if self.first_order:
            raise ValueError(
                f"{INNER_LOOP}.second_order_from_step={step} switches to second order at that meta-step, but "
                f"{INNER_LOOP}.first_order=true keeps every step first order: set first_order: false (or drop "
                "second_order_from_step)"
            )

    @property
    def first_order_anywhere(self) -> bool:
        """Some meta-step of the run is first order."""
        return self.first_order or self.second_order_from_step is not None


@dataclass(frozen=True)
class MetaObjective:
    """What the meta-optimizer minimises, and how its gradient is taken and bounded.

    multi_step_loss, msl_anneal_steps: MAML++'s multi-step loss, the query loss after every inner step
        weighted by `fmaml.maml.msl_weights` (uniform at first, annealed toward the last step over
        `msl_anneal_steps` meta-steps, 10 epochs of 500 in MAML++), then the last step's loss only, as in
        MAML++. Training only: evaluation reports the last step's loss.
    meta_gradient: None (MAML: the meta-gradient through the inner steps), or one not taken through them:
        `fmaml.meta_gradients.Implicit` (iMAML: λ, CG iterations; evaluation adapts with its proximal term
        too) or `fmaml.meta_gradients.Reptile` (θ - φ handed to the meta-optimizer). See that module.
    clip_value, clip_norm: clip the meta-gradient (of the network and of learned inner rates) before each
        meta-optimizer step: every entry to [-value, value], then the total norm over all of them to at
        most `norm` (None: off). Lightning's `trainer.gradient_clip_val` does not apply to manual
        optimization. The reference code clips MiniImageNet's by value (configs/paper/).
    """

    multi_step_loss: bool = False
    msl_anneal_steps: int = 5000
    meta_gradient: MetaGradient | None = None
    clip_value: float | None = None
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        steps = self.msl_anneal_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"{META_OBJECTIVE}.msl_anneal_steps={steps!r}: the meta-steps over which the multi-step loss "
                "weights anneal must be an integer >= 1, e.g. 5000"
            )
        for name in ("clip_value", "clip_norm"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf
            ):
                raise ValueError(
                    f"{META_OBJECTIVE}.{name}={value!r}: a meta-gradient clipping threshold must be a positive "
                    "finite number, e.g. 10.0; leave it unset (null) for no clipping"
                )


@dataclass(frozen=True)
class Execution:
    """How the meta-batch is computed: never what is trained, so a resumed fit may change it.

    strategy: how tasks are run, see `fmaml.maml.meta_loss` ("auto", "vmap", "loop", "chunked:N"). "auto"
        measures: on the first training meta-batch, `fmaml.auto_strategy.choose` times the strategies (with
        each memory mode, unless `memory` fixes one) on the real shapes and device, and keeps the fastest
        whose predicted peak fits `auto_memory_share` of the free memory (fmaml.strategy_choice
        keeps that choice valid for the run in front of it).
    memory: "store" keeps every inner step's graph for the meta-gradient; "recompute" keeps only the inner
        iterates and recomputes one step at a time (memory flat in the inner steps, the same exact
        meta-gradient; see `fmaml.maml.meta_loss`); "auto": chosen with strategy=auto, else "store".
    compile: run the meta-loss through `torch.compile` (a one-off compile of tens of seconds; see
        benchmarks/README.md for when it pays). Not with strategy=auto, which times the eager meta-loss.
    auto_memory_share: the share of free memory strategy=auto may use.
    """

    strategy: str = "auto"
    memory: Literal["auto", "store", "recompute"] = "auto"
    compile: bool = False
    auto_memory_share: float = 0.5

    def __post_init__(self) -> None:
        check_strategy(self.strategy, f"{EXECUTION}.strategy")
        if self.memory not in ("auto", "store", "recompute"):
            raise ValueError(
                f"{EXECUTION}.memory={self.memory!r} is unknown: use one of auto, store, recompute"
            )
        share = self.auto_memory_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ValueError(
                f"{EXECUTION}.auto_memory_share={share!r}: the share of free memory strategy=auto may use must "
                "be in (0, 1], e.g. 0.5"
            )
        check_compile(self.strategy, self.compile, f"{EXECUTION}.")


# An older fmaml's MAML keywords, flat, and where each lives now: (group, name in the group).
FLAT_NAMES = {
    "inner_steps": ("inner_loop", "steps"),
    "inner_optimizer": ("inner_loop", "optimizer"),
    "first_order": ("inner_loop", "first_order"),
    "second_order_from_step": ("inner_loop", "second_order_from_step"),
    "adapt_only": ("inner_loop", "adapt_only"),
    "eval_inner_steps": ("inner_loop", "eval_steps"),
    "eval_inner_lr": ("inner_loop", "eval_lr"),
    "multi_step_loss": ("meta_objective", "multi_step_loss"),
    "msl_anneal_steps": ("meta_objective", "msl_anneal_steps"),
    "meta_gradient": ("meta_objective", "meta_gradient"),
    "meta_grad_clip_value": ("meta_objective", "clip_value"),
    "meta_grad_clip_norm": ("meta_objective", "clip_norm"),
    "strategy": ("execution", "strategy"),
    "memory": ("execution", "memory"),
    "compile": ("execution", "compile"),
    "auto_memory_share": ("execution", "auto_memory_share"),
}
GROUPS = {"inner_loop": InnerLoop, "meta_objective": MetaObjective, "execution": Execution}


def grouped(**flat) -> dict:
    """MAML's keyword arguments from settings named as an older fmaml's MAML took them, flat:
    grouped(inner_steps=5, strategy="vmap", num_outputs=1) == {"inner_loop": InnerLoop(steps=5),
    "execution": Execution(strategy="vmap"), "num_outputs": 1}. What a checkpoint written before the
    groups holds as its hyperparameters (fmaml.module.MAML.load_from_checkpoint)."""
    fields: dict[str, dict] = {}
    rest = {}
    for name, value in flat.items():
        if name in FLAT_NAMES:
            group, field_name = FLAT_NAMES[name]
            fields.setdefault(group, {})[field_name] = value
        else:
            rest[name] = value
    return rest | {group: GROUPS[group](**values) for group, values in fields.items()}

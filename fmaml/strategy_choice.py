"""The strategy and memory mode each meta-step runs with: the fixed ones, or strategy=auto's choice, kept
valid for the run in front of it.

fmaml.auto_strategy measures; this unit holds the outcome over one run of the app (fmaml.module.MAML): it
measures on the first training meta-batch, measures again when the settings that change a meta-step's
cost change (MAML++'s phases), checks a cached choice against the first real meta-steps, and checks a
checkpoint's choice against this run's device, precision, memory modes and budget before using it. Under
DDP, rank 0's measurement and verdicts hold for every process. The module calls it before and after each
training meta-step and around checkpoints; `current` is what the engine runs.
"""

from __future__ import annotations

from fmaml import auto_strategy
from fmaml.maml import resolve_strategy
from fmaml.private_apis import attached_trainer
from fmaml.settings import Execution

# Where a checkpoint keeps the choice, with the device and precision it was measured on.
CHECKPOINT_KEY = "fmaml_auto_choice"


class StrategyChoice:
    """execution: the run's settings (strategy, memory, auto_memory_share); memories: the memory modes the
    run allows (recompute supports neither ANIL nor iMAML/Reptile, which are flat already)."""

    def __init__(self, execution: Execution, memories: tuple[str, ...]):
        self.execution, self.memories = execution, memories
        self.choice: dict | None = None  # strategy=auto: measured (or restored) {"strategy", "memory", ...}
        self.restored: dict | None = None  # a checkpoint's choice, not yet checked against this run
        self.check: auto_strategy.StepCheck | None = None  # a cached choice against the first real steps

    @property
    def is_auto(self) -> bool:
        return self.execution.strategy == "auto"

    def current(self, module) -> dict[str, str]:
        """The engine's `strategy` (and `memory`, where not "store") for the next meta-loss."""
        if self.restored is not None:
            self._restore(module)
        if self.choice is not None:
            return {"strategy": self.choice["strategy"], "memory": self.choice["memory"]}
        return self._fixed()

    def _fixed(self) -> dict[str, str]:
        memory = "store" if self.execution.memory == "auto" else self.execution.memory
        return {"strategy": self.execution.strategy} | ({"memory": memory} if memory != "store" else {})

    def load(self, checkpoint: dict) -> None:
        if self.is_auto and CHECKPOINT_KEY in checkpoint:
            self.restored = checkpoint[CHECKPOINT_KEY]  # used where it still applies

    def save(self, checkpoint: dict) -> None:
        if self.choice is not None:
            checkpoint[CHECKPOINT_KEY] = self.choice

    def before_training_step(self, module, tasks, inner: dict) -> None:
        """Measure where no choice holds for this step's cost-changing settings (the first step; a
        checkpoint's choice that does not apply; a change of derivative order or multi-step loss since the
        choice), and time the step if a cached choice is being checked."""
        if not self.is_auto:
            return
        if self.restored is not None:
            self._restore(module)
        settings = auto_strategy.phase(inner)
        if self.choice is not None and self.choice["phase"] != settings:
            _print(
                module,
                "strategy=auto: the choice was measured under "
                f"{auto_strategy.describe_phase(self.choice['phase'])}; step {module.global_step} runs "
                f"{auto_strategy.describe_phase(settings)}, which costs differently: measuring again",
            )
            self.choice = None
        if self.choice is None:
            self._measure(module, tasks, inner)
        if self.check is not None:
            self.check.start()

    def after_training_step(self, module, tasks, inner: dict) -> None:
        """A cached choice's check, on its first real meta-steps only."""
        if self.check is None:
            return
        why = self.check.stop()
        if why is None:
            return
        self.check = None
        why = _broadcast(module, why)  # every process measures again, or none
        if why:
            _print(module, f"strategy=auto: {why}")
            self._measure(module, tasks, inner, refresh=True)

    def _measure(self, module, tasks, inner: dict, refresh: bool = False) -> None:
        """Measure on this meta-batch (or take the cache's choice, then checked against the first real
        meta-steps); under DDP rank 0's choice for all."""
        network = module.network
        choice = auto_strategy.choose(
            dict(network.named_parameters()), dict(network.named_buffers()), tasks, model=network,
            loss=module.loss, memories=self.memories, memory_share=self.execution.auto_memory_share,
            refresh=refresh, **inner,
        )  # fmt: skip
        _print(module, choice.summary())
        chosen = {
            "strategy": choice.strategy,
            "memory": choice.memory,
            "device": auto_strategy.device_name(module.device),
            "precision": _precision(module),
            "predicted_bytes": choice.chosen["predicted_bytes"],
            "phase": auto_strategy.phase(inner),
            "check_seconds": choice.chosen["seconds"] if choice.cached else None,
        }
        chosen = _broadcast(module, chosen)
        predicted = chosen.pop("check_seconds")
        self.check = None if predicted is None else auto_strategy.StepCheck(predicted, module.device)
        self.choice = chosen

    def _restore(self, module) -> None:
        """A checkpoint's choice, checked once: kept where it still applies to this run, else dropped with
        one line saying why (training then measures again; evaluation runs the engine's fixed rule)."""
        saved, self.restored = self.restored, None
        why = auto_strategy.restored_problem(
            saved, memories=self.memories, device=module.device, precision=_precision(module),
            memory_share=self.execution.auto_memory_share,
        )  # fmt: skip
        why = _broadcast(module, why)  # free memory differs by process: rank 0 decides
        if not why:
            self.choice = saved
            return
        trainer = attached_trainer(module)
        fixed = self._fixed()
        if trainer is not None and trainer.state.fn == "fit":
            then = "Measuring again on the next training meta-batch."
        else:
            strategy = resolve_strategy(fixed["strategy"], module.network, module.device)
            then = (
                "Evaluating with the fixed rule (fmaml.maml.resolve_strategy): strategy="
                f"{strategy}, memory={fixed.get('memory', 'store')}."
            )
        _print(
            module,
            f"strategy=auto: the checkpoint's choice ({saved.get('strategy')}, memory={saved.get('memory')}) "
            f"is not used: {why}. {then}",
        )


def _precision(module) -> str | None:
    trainer = attached_trainer(module)
    return str(trainer.precision) if trainer is not None else None


def _broadcast(module, value):
    trainer = attached_trainer(module)
    return value if trainer is None else trainer.strategy.broadcast(value)


def _print(module, text: str) -> None:
    trainer = attached_trainer(module)
    if trainer is None or trainer.is_global_zero:
        print(text)

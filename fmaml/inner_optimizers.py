"""Differentiable inner optimizers: torch.optim's update rules as pure functions, in optax's shape.

    state = optimizer.init(params)                                     fresh for every task
    params, state = optimizer.update(grads, state, params, lr, step)  one inner step, step = 0, 1, ...

params, grads: dict name -> Tensor, one task's (no task dimension; `vmap` adds it). state: dict name ->
dict of Tensors (Adam: {"exp_avg": ..., "exp_avg_sq": ...}; plain SGD: empty). Nothing is mutated, so
`torch.func.grad`, `vmap`, the loop and the recompute recursion (fmaml.maml) differentiate through any of
them alike, to every order.

lr is passed in, not held: it is the hyperparameter that may be meta-learned (Meta-SGD's per-parameter
rates, MAML++'s per-layer per-step rates, see `InnerLR`), so it must be an explicit input the meta-gradient
reaches. The optimizer's own `lr` is only the value the module starts from (or uses, when not learned).
The other hyperparameters (momentum, betas, eps, ...) are fixed numbers. `step` is a Python int: the state
starts fresh for each task, as in `higher.innerloop_ctx`, so step counts and bias corrections are constants.

The rules are torch.optim's (torch 2.x, single-tensor code path), with its argument names and defaults, and
`from_config` maps a `class_path: torch.optim.X` config onto them. One deliberate difference from `higher`:
its Adam adds eps to sqrt(v) before the bias correction (lr*sqrt(bc2)/bc1 * m/(sqrt(v)+eps)), today's torch
after it (lr/bc1 * m/(sqrt(v)/sqrt(bc2)+eps)); the configs name torch.optim.Adam, so fmaml follows torch.

Zero gradient entries (dead ReLUs, unused classes) are the normal case: Adam's v, RMSprop's square average
and Adagrad's sum are then 0, where d sqrt(v)/dv is infinite and autograd's 0 * inf gives a NaN
meta-gradient. The true derivative of sqrt(sum of g^2) at g = 0 is 0 (it is |g| there). `higher` registers
a hook that zeroes the gradient flowing into v where v == 0; fmaml computes sqrt through `_sqrt_zero_safe`,
whose derivative is 0 where its argument is 0: the same values, with no hooks (which vmap and grad ignore).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

Params = dict[str, Tensor]
State = dict[str, dict[str, Tensor]]
# The inner learning rate: one float; a dict of per-parameter rates (Meta-SGD: a float or a tensor shaped
# like the parameter); or a sequence of either, one per inner step (MAML++ per-step rates). Tensors that
# require grad are learned: the meta-gradient reaches them too.
InnerLR = (
    float | Tensor | Mapping[str, float | Tensor] | Sequence[float | Tensor | Mapping[str, float | Tensor]]
)
LearnLR = Literal["off", "per_parameter", "per_layer_per_step"]
# torch.optim arguments that choose how torch computes (kernels, CUDA graphs, autograd through its own
# in-place step), never what: a functional step is always differentiable and has one implementation.
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def lr_for(lr: InnerLR, step: int, name: str) -> float | Tensor:
    """The rate of parameter `name` at inner step `step`, out of any form of `InnerLR`."""
    if isinstance(lr, Sequence) and not isinstance(lr, str):
        lr = lr[step]
    if isinstance(lr, Mapping):
        lr = lr[name]
    return lr


def _sqrt_zero_safe(x: Tensor) -> Tensor:
    """sqrt(x) for x >= 0 whose derivative is 0 (not inf) where x == 0 (see the module docstring)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


class InnerOptimizer:
    """An inner-loop optimizer: `init` and `update` over dicts of tensors (see the module docstring).

    lr: the inner learning rate the module starts from, or uses when it is not learned.
    learn_lr: meta-learn the rate, starting from `lr`: "per_parameter" (Meta-SGD: a rate tensor shaped like
        each parameter) or "per_layer_per_step" (MAML++ LSLR: a scalar per parameter tensor and inner step).
        Any optimizer's rate can be learned, momentum's and Adam's too.
    Subclasses implement `_init_one` and `_update_one` for one parameter tensor.
    """

    torch_class: type[torch.optim.Optimizer]

    def __init__(self, lr: float, learn_lr: LearnLR = "off", **hyper):
        # Numbers as floats, so that torch's int defaults (weight_decay=0) and fmaml's (0.0) compare equal.
        hyper = {k: float(v) if type(v) is int else v for k, v in hyper.items()}
        self.lr, self.learn_lr, self.hyper = float(lr) if type(lr) is int else lr, learn_lr, hyper
        # torch's IMPLEMENTATION_FLAGS a `class_path: torch.optim.X` config set away from their defaults.
        self.ignored_flags: dict[str, object] = {}
        self._check(lr, learn_lr, hyper)

    def init(self, params: Params) -> State:
        return {name: self._init_one(p) for name, p in params.items()}

    def update(
        self, grads: Params, state: State, params: Params, lr: InnerLR, step: int
    ) -> tuple[Params, State]:
        new_params, new_state = {}, {}
        for name, p in params.items():
            new_params[name], new_state[name] = self._update_one(
                grads[name], state[name], p, lr_for(lr, step, name), step
            )
        return new_params, new_state

    def _init_one(self, p: Tensor) -> dict[str, Tensor]:
        return {}

    def _update_one(self, g: Tensor, s: dict[str, Tensor], p: Tensor, lr, step: int):
        raise NotImplementedError

    @property
    def is_stateless(self) -> bool:
        """True when the step keeps no state: plain SGD, the paper's inner loop."""
        return not self._init_one(torch.zeros(1))

    def __repr__(self) -> str:
        args = {"lr": self.lr} | self.hyper | ({"learn_lr": self.learn_lr} if self.learn_lr != "off" else {})
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))

    def _check(self, lr, learn_lr, hyper) -> None:
        """torch's own checks of the same arguments (momentum in [0, 1), betas, eps, ...), plus a rate > 0."""
        where = f"model.inner_loop.optimizer ({type(self).__name__})"
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{where}: lr={lr!r}: the inner learning rate must be a finite number > 0")
        if learn_lr not in ("off", "per_parameter", "per_layer_per_step"):
            raise ValueError(
                f"{where}: learn_lr={learn_lr!r} is unknown: use off, per_parameter (Meta-SGD) or "
                "per_layer_per_step (MAML++ LSLR)"
            )
        try:
            self.torch_class([torch.zeros(1, requires_grad=True)], lr=lr, **hyper)
        except (ValueError, RuntimeError) as error:
            raise ValueError(
                f"{where}: {error} (arguments {hyper}): give a value torch.optim.{self.torch_class.__name__} "
                "accepts (its documentation lists each argument's range)"
            ) from None


class SGD(InnerOptimizer):
    """torch.optim.SGD: momentum (the first step's buffer is the gradient itself), dampening, Nesterov,
    weight decay (added to the gradient), maximize. With none of them, the step is θ - lr * g and keeps
    no state: MAML's inner loop, exactly as fast as a hand-written one."""

    torch_class = torch.optim.SGD

    def __init__(
        self,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        learn_lr: LearnLR = "off",
    ):
        super().__init__(
            lr, learn_lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize,
        )  # fmt: skip

    def _init_one(self, p: Tensor) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros_like(p)} if self.hyper["momentum"] else {}

    def _update_one(self, g, s, p, lr, step):
        h = self.hyper
        g = -g if h["maximize"] else g
        if h["weight_decay"]:
            g = g + h["weight_decay"] * p
        if h["momentum"]:
            buf = g if step == 0 else h["momentum"] * s["momentum_buffer"] + (1 - h["dampening"]) * g
            g = g + h["momentum"] * buf if h["nesterov"] else buf
            s = {"momentum_buffer": buf}
        return p - lr * g, s


class Adam(InnerOptimizer):
    """torch.optim.Adam: p - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), bc_i = 1 - beta_i^t; weight decay
    added to the gradient, or decoupled (p * (1 - lr*wd), AdamW) with `decoupled_weight_decay`; amsgrad
    divides by the running maximum of v."""

    torch_class = torch.optim.Adam

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        learn_lr: LearnLR = "off",
    ):
        super().__init__(
            lr, learn_lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, **self._decoupled(decoupled_weight_decay),
        )  # fmt: skip

    def _decoupled(self, decoupled: bool) -> dict:
        return {"decoupled_weight_decay": decoupled}

    def _init_one(self, p: Tensor) -> dict[str, Tensor]:
        moments = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        return moments | ({"max_exp_avg_sq": torch.zeros_like(p)} if self.hyper["amsgrad"] else {})

    def _update_one(self, g, s, p, lr, step):
        h = self.hyper
        beta1, beta2 = h["betas"]
        g = -g if h["maximize"] else g
        if h["weight_decay"] and self._is_decoupled:
            p = p * (1 - lr * h["weight_decay"])
        elif h["weight_decay"]:
            g = g + h["weight_decay"] * p
        m = beta1 * s["exp_avg"] + (1 - beta1) * g
        v = beta2 * s["exp_avg_sq"] + (1 - beta2) * g * g
        new = {"exp_avg": m, "exp_avg_sq": v}
        if h["amsgrad"]:
            v = new["max_exp_avg_sq"] = torch.maximum(s["max_exp_avg_sq"], v)
        t = step + 1
        denom = _sqrt_zero_safe(v) / math.sqrt(1 - beta2**t) + h["eps"]
        return p - lr / (1 - beta1**t) * m / denom, new

    @property
    def _is_decoupled(self) -> bool:
        return self.hyper.get("decoupled_weight_decay", True)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay, 1e-2 by default."""

    torch_class = torch.optim.AdamW

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        learn_lr: LearnLR = "off",
    ):
        super().__init__(lr, betas, eps, weight_decay, amsgrad, maximize, True, learn_lr)

    def _decoupled(self, decoupled: bool) -> dict:
        return {}  # always decoupled: torch.optim.AdamW has no such argument


class RMSprop(InnerOptimizer):
    """torch.optim.RMSprop: divides by sqrt(square average) + eps; `centered` subtracts the squared mean
    gradient first; `momentum` keeps a buffer of the scaled steps."""

    torch_class = torch.optim.RMSprop

    def __init__(
        self,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        maximize: bool = False,
        learn_lr: LearnLR = "off",
    ):
        super().__init__(
            lr, learn_lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, maximize=maximize,
        )  # fmt: skip

    def _init_one(self, p: Tensor) -> dict[str, Tensor]:
        state = {"square_avg": torch.zeros_like(p)}
        state |= {"grad_avg": torch.zeros_like(p)} if self.hyper["centered"] else {}
        return state | ({"momentum_buffer": torch.zeros_like(p)} if self.hyper["momentum"] else {})

    def _update_one(self, g, s, p, lr, step):
        h = self.hyper
        alpha = h["alpha"]
        g = -g if h["maximize"] else g
        if h["weight_decay"]:
            g = g + h["weight_decay"] * p
        square_avg = alpha * s["square_avg"] + (1 - alpha) * g * g
        new = {"square_avg": square_avg}
        if h["centered"]:
            grad_avg = new["grad_avg"] = alpha * s["grad_avg"] + (1 - alpha) * g
            avg = _sqrt_zero_safe(square_avg - grad_avg * grad_avg) + h["eps"]
        else:
            avg = _sqrt_zero_safe(square_avg) + h["eps"]
        if h["momentum"]:
            buf = new["momentum_buffer"] = h["momentum"] * s["momentum_buffer"] + g / avg
            return p - lr * buf, new
        return p - lr * g / avg, new


class Adagrad(InnerOptimizer):
    """torch.optim.Adagrad: divides by sqrt(sum of squared gradients) + eps, the rate decayed as
    lr / (1 + step * lr_decay)."""

    torch_class = torch.optim.Adagrad

    def __init__(
        self,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        maximize: bool = False,
        learn_lr: LearnLR = "off",
    ):
        super().__init__(
            lr, learn_lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
        )  # fmt: skip

    def _init_one(self, p: Tensor) -> dict[str, Tensor]:
        return {"sum": torch.full_like(p, self.hyper["initial_accumulator_value"])}

    def _update_one(self, g, s, p, lr, step):
        h = self.hyper
        g = -g if h["maximize"] else g
        if h["weight_decay"]:
            g = g + h["weight_decay"] * p
        total = s["sum"] + g * g
        std = _sqrt_zero_safe(total) + h["eps"]
        return p - lr / (1 + step * h["lr_decay"]) * g / std, {"sum": total}


SUPPORTED: dict[type[torch.optim.Optimizer], type[InnerOptimizer]] = {
    cls.torch_class: cls for cls in (SGD, Adam, AdamW, RMSprop, Adagrad)
}


def from_config(value, name: str = "model.inner_loop.optimizer") -> InnerOptimizer:
    """An `InnerOptimizer`, from one or from what LightningCLI makes of `class_path: torch.optim.X`
    (a callable that builds the optimizer from parameters): torch builds it on a dummy parameter, which
    checks the arguments and fills in torch's defaults, and the same arguments build fmaml's equivalent."""
    if isinstance(value, InnerOptimizer):
        if hasattr(value, "lazy_get_init_args"):
            value.init(
                {}
            )  # jsonargparse's lazy_instance (the module's default) runs __init__ at a first call
        return value
    supported = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED)
    built = _built_on_a_dummy(value, name, supported)
    if type(built) not in SUPPORTED:
        raise ValueError(
            f"{name}: {type(built).__module__}.{type(built).__qualname__} has no differentiable functional "
            f"equivalent in fmaml. Supported: {supported} (or fmaml.inner_optimizers.<the same name>, which "
            "also takes learn_lr)"
        )
    cls = SUPPORTED[type(built)]
    arguments = dict(built.defaults)
    if cls is AdamW:
        arguments.pop("decoupled_weight_decay", None)  # torch's AdamW sets it True itself; so does fmaml's
    ignored = _set_implementation_flags(type(built), arguments)
    known = set(inspect.signature(cls).parameters)
    if unknown := sorted(set(arguments) - known):
        raise ValueError(
            f"{name}: torch.optim.{type(built).__name__}'s argument(s) {unknown} have no functional equivalent "
            f"in fmaml's {cls.__name__} (it implements {sorted(known - {'learn_lr'})}): leave them at their "
            "defaults"
        )
    lr = arguments.pop("lr")
    optimizer = cls(lr=float(lr), **arguments)
    optimizer.ignored_flags = ignored
    return optimizer


def _built_on_a_dummy(value, name: str, supported: str) -> torch.optim.Optimizer:
    if not callable(value):
        raise ValueError(
            f"{name}={value!r}: give an inner optimizer, e.g. `class_path: torch.optim.SGD` with `init_args: "
            f"{{lr: 0.4}}`. Supported: {supported}"
        )
    try:
        built = value([torch.zeros(1, requires_grad=True)])
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{name}: {error}") from None
    if not isinstance(built, torch.optim.Optimizer):
        raise ValueError(
            f"{name}: {value!r} built a {type(built).__name__}, not an optimizer. Supported: {supported}"
        )
    return built


def _set_implementation_flags(torch_class: type, arguments: dict) -> dict:
    """Take torch's implementation flags out of `arguments`; return those set away from their defaults,
    which have no effect here (fmaml.settings_check warns about them)."""
    defaults = {k: p.default for k, p in inspect.signature(torch_class).parameters.items()}
    flags = {flag: arguments.pop(flag) for flag in IMPLEMENTATION_FLAGS if flag in arguments}
    return {flag: value for flag, value in flags.items() if value != defaults.get(flag)}


def learned_rate_tensors(optimizer: InnerOptimizer, params: Params, steps: int) -> dict[str, Tensor]:
    """The initial learned rates of `optimizer.learn_lr` for `params`: per-parameter tensors shaped like
    each parameter (Meta-SGD), or [steps] per parameter tensor (LSLR), all equal to `optimizer.lr`."""
    if optimizer.learn_lr == "per_parameter":
        return {name: torch.full_like(p, optimizer.lr) for name, p in params.items()}
    return {name: torch.full((steps,), float(optimizer.lr)) for name in params}


def rates_as_lr(rates: dict[str, Tensor], learn_lr: LearnLR, steps: int, trained_steps: int) -> InnerLR:
    """Learned rates as the `lr` of `update`: the per-parameter dict (Meta-SGD), or one dict of scalars
    per step (LSLR), where steps beyond the trained ones (evaluation) reuse the last trained step's rate."""
    if learn_lr == "per_parameter":
        return rates
    last = trained_steps - 1
    return [{name: rate[min(step, last)] for name, rate in rates.items()} for step in range(steps)]

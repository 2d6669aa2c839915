"""Meta-gradients not taken through the inner loop: iMAML (implicit) and Reptile (first order).

MAML differentiates the query loss through every inner step (fmaml.maml), so its memory and time grow
with the steps. These two do not:

- `Implicit` (iMAML, Rajeswaran et al. 2019). The inner problem is the support loss plus a proximal term,
  φ* = argmin_φ L_s(φ) + λ/2 ||φ - θ||². At its minimum ∇L_s(φ*) + λ(φ* - θ) = 0, so by the implicit
  function theorem dφ*/dθ = (I + H/λ)^-1 with H = ∇²L_s(φ*), and the meta-gradient is
      dL_q(φ*)/dθ = (I + H/λ)^-1 ∇L_q(φ*),
  solved by `cg_steps` iterations of conjugate gradient on Hessian-vector products. Only φ is kept,
  however many inner steps found it: memory is that of one support forward and double backward.
- `Reptile` (Nichol et al. 2018). k inner steps from θ to φ; the meta-gradient handed to the
  meta-optimizer is θ - φ (the meta-batch's mean of it), so that SGD at rate ε moves θ toward the tasks'
  solutions, θ <- θ + ε (φ̄ - θ), the paper's update.

Each is a small config object (`model.meta_objective.meta_gradient: {class_path: fmaml.meta_gradients.Implicit,
init_args: {lam: 2.0, cg_steps: 5}}`) with the per-task function `task_loss_and_grad(params, buffers, task,
**config)` -> (grads, query loss, metrics), the shape of fmaml.maml.task_loss_and_grad: `meta_loss(...,
meta_gradient=...)` maps it over the tasks by the same strategies (vmap, loop, chunked:N). `check` refuses,
before any work, the options of MAML that have no meaning for it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.func import grad, grad_and_value

from fmaml.maml import (
    LOSSES,
    Params,
    Tasks,
    _dot,
    _evaluate,
    _reported,
    adapt,
    forward,
    metrics_before_adapting,
)


class MetaGradient:
    """A meta-gradient not taken through the inner loop (iMAML's, Reptile's): the base of the classes
    `model.meta_objective.meta_gradient` takes. What they share: no graph through the inner steps, hence none of MAML's
    options that presuppose one."""

    proximal = 0.0
    name = ""

    def check(
        self, *, first_order, multi_step_loss, adapt_only, memory, learned_lr, per_step_network, prefix=""
    ) -> None:
        """Refuse, with the reason and the fix, the options that have no meaning here (ValueError)."""
        why = f"{self.name} never differentiates through the inner steps"
        refused = {
            "first_order (or second_order_from_step)": (first_order, f"{why}: drop it (MAML's option)"),
            "the multi-step loss": (multi_step_loss, f"{why}, so a loss after every step has no gradient"),
            "adapt_only (ANIL)": (
                adapt_only is not None,
                f"ANIL's frozen body with {self.name} is not supported",
            ),
            "memory=recompute": (
                memory == "recompute",
                f"{why}, so its memory is already flat in the steps: use memory=store (or auto)",
            ),
            "learned inner rates (learn_lr)": (learned_lr, f"{why}, so the rates get no meta-gradient"),
            "a per-step network (per-step BatchNorm)": (
                per_step_network,
                "per-step BatchNorm is MAML++'s, learned through the steps: turn it off",
            ),
        }
        for setting, (is_set, fix) in refused.items():
            if is_set:
                raise ValueError(f"{prefix}meta_gradient={self!r} with {setting}: {fix}")

    def _query(self, phi: Params, buffers: Params, task: Tasks, model, loss: str, steps: int, compute_dtype):
        """(∇L_q(φ), L_q(φ), metrics after adaptation)."""
        query_x, query_y = task["query"]

        def query_loss(p: Params):
            value, accuracy = _evaluate(p, buffers, query_x, query_y, model, loss, steps - 1, compute_dtype)
            return value, _reported(value, accuracy)

        query_grad, (value, metrics) = grad_and_value(query_loss, has_aux=True)(phi)
        return query_grad, value.detach(), metrics


def _metrics_before(params: Params, buffers: Params, task: Tasks, config: dict) -> dict[str, Tensor]:
    query = (task["query"], config["model"], config["loss"], config.get("compute_dtype"))
    return metrics_before_adapting(params, buffers, *query)


def _adapted(params: Params, buffers: Params, task: Tasks, proximal: float, config: dict) -> Params:
    """φ: the inner loop from detached params (no graph: neither method differentiates through it)."""
    inner = {
        k: config[k]
        for k in ("model", "loss", "steps", "lr", "inner_optimizer", "compute_dtype")
        if k in config
    }
    detached = {name: p.detach() for name, p in params.items()}
    return adapt(detached, buffers, task["support"], first_order=True, proximal=proximal, **inner)


class Implicit(MetaGradient):
    """iMAML's implicit meta-gradient (module docstring).

    lam: λ, the proximal term's weight (the iMAML paper's Omniglot runs: 2.0 for 5-way, 1.0 for 20-way).
        Larger keeps φ nearer θ; the implicit gradient is exact only at the inner problem's minimum, so the
        inner loop (steps, inner_optimizer) should come close to it.
    cg_steps: conjugate-gradient iterations, each one Hessian-vector product (the paper: 5). A fixed
        number, so that every task runs the same work under vmap.
    cg_tol: stop improving a task's solution once its residual ||r|| <= cg_tol * ||∇L_q|| (0: never).
        Under vmap the iterations still run for every task (the converged ones are frozen), so it bounds
        the error, not the time.
    """

    name = "iMAML"

    def __init__(self, lam: float = 1.0, cg_steps: int = 5, cg_tol: float = 0.0):
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0 < lam < math.inf:
            raise ValueError(
                f"meta_gradient.lam={lam!r}: iMAML's proximal weight λ must be a finite number > 0, e.g. 2.0"
            )
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(
                f"meta_gradient.cg_steps={cg_steps!r}: the conjugate-gradient iterations must be an integer "
                ">= 1, e.g. 5"
            )
        if isinstance(cg_tol, bool) or not isinstance(cg_tol, int | float) or not 0 <= cg_tol < math.inf:
            raise ValueError(
                f"meta_gradient.cg_tol={cg_tol!r}: the relative residual to stop at must be a number >= 0 "
                "(0: run every iteration)"
            )
        self.lam, self.cg_steps, self.cg_tol = float(lam), cg_steps, float(cg_tol)

    @property
    def proximal(self) -> float:
        return self.lam

    def __repr__(self) -> str:
        return f"Implicit(lam={self.lam}, cg_steps={self.cg_steps}, cg_tol={self.cg_tol})"

    def task_loss_and_grad(self, params: Params, buffers: Params, task: Tasks, **config):
        """One task's implicit meta-gradient: (grads, query loss, metrics)."""
        model, loss, steps = config["model"], config["loss"], config["steps"]
        compute_dtype = config.get("compute_dtype")
        phi = _adapted(params, buffers, task, self.lam, config)
        query_grad, value, metrics = self._query(phi, buffers, task, model, loss, steps, compute_dtype)
        support_x, support_y = task["support"]

        def support_loss(q: Params) -> Tensor:
            return LOSSES[loss](forward(model, (q, buffers), support_x, steps - 1, compute_dtype), support_y)

        def support_grad(p: Params) -> Params:
            return grad(support_loss)(p)

        def hessian_vector(v: Params) -> Params:
            # Reverse over reverse: exact under vmap through batch_norm (see fmaml.maml).
            return grad(lambda p: _dot(support_grad(p), v))(phi)

        grads = conjugate_gradient(
            lambda v: {n: v[n] + h / self.lam for n, h in hessian_vector(v).items()},
            query_grad,
            self.cg_steps,
            self.cg_tol,
        )
        if config.get("metrics_before", True):
            metrics |= _metrics_before(params, buffers, task, config)
        return grads, value, metrics


def conjugate_gradient(matvec, b: Params, iterations: int, tol: float = 0.0) -> Params:
    """x ≈ A^-1 b for a symmetric A given as `matvec`, from x = 0, by `iterations` steps of conjugate
    gradient; with `tol` > 0 it stops improving once ||r|| <= tol ||b||. Branch-free (stopping is a mask),
    so it runs unchanged under vmap.

    A = I + H/λ is positive definite at the proximal problem's minimum, but not always after a few inner
    steps from an untrained network (benchmarks/results/imaml_cg.json: lowest eigenvalue -1.5 on the
    sinusoid at λ = 2), where plain CG diverges. So a direction of non-positive curvature (pᵀAp <= 0) stops
    it, truncated CG as in Newton-CG: x is the last iterate before it, or b itself (A taken as I, the
    first-order answer) when the very first direction has it."""
    x = {n: torch.zeros_like(t) for n, t in b.items()}
    r = dict(b)
    direction = dict(b)
    r_norm2 = _dot(r, r)
    target2 = tol**2 * r_norm2
    active = r_norm2 > target2
    negative_at_start = torch.zeros_like(active)
    for k in range(iterations):
        a_direction = matvec(direction)
        curvature = _dot(direction, a_direction)
        if k == 0:
            negative_at_start = active & (curvature <= 0)
        active = active & (curvature > 0)
        alpha = torch.where(active, r_norm2 / torch.where(active, curvature, 1.0), 0.0)
        x = {n: x[n] + alpha * direction[n] for n in x}
        r = {n: r[n] - alpha * a_direction[n] for n in r}
        new_norm2 = _dot(r, r)
        beta = torch.where(active, new_norm2 / torch.where(active, r_norm2, 1.0), 0.0)
        direction = {n: r[n] + beta * direction[n] for n in r}
        r_norm2 = torch.where(active, new_norm2, r_norm2)
        active = active & (r_norm2 > target2)
    return {n: torch.where(negative_at_start, b[n], x[n]) for n in x}


class Reptile(MetaGradient):
    """Reptile's meta-gradient θ - φ (module docstring): hand it to the meta-optimizer as its gradient
    (the paper: plain SGD with the outer step size ε, `optimizer: torch.optim.SGD, lr: 1.0`, linearly
    annealed to 0; its inner loop is Adam with β1 = 0). The query set only gives the reported metrics."""

    name = "Reptile"

    def __repr__(self) -> str:
        return "Reptile()"

    def task_loss_and_grad(self, params: Params, buffers: Params, task: Tasks, **config):
        """One task's Reptile direction θ - φ: (grads, query loss after adaptation, metrics)."""
        phi = _adapted(params, buffers, task, 0.0, config)
        query = (
            *task["query"],
            config["model"],
            config["loss"],
            config["steps"] - 1,
            config.get("compute_dtype"),
        )
        with torch.no_grad():
            value, accuracy = _evaluate(phi, buffers, *query)
        metrics = _reported(value, accuracy)
        if config.get("metrics_before", True):
            metrics |= _metrics_before(params, buffers, task, config)
        return {name: params[name] - phi[name] for name in params}, value, metrics

"""Issue 21: iMAML's implicit meta-gradient (fmaml.meta_gradients.Implicit) against an exact reference,
in float64 on a tiny MLP.

The reference shares nothing with fmaml's implementation (fmaml is only called through `meta_loss`, its
models and its inner optimizer classes): its own flattening, its own plain-autograd inner loop on the
proximal problem L_s(φ) + λ/2 ||φ - θ||², the Hessian H = ∇²L_s(φ) built explicitly by
`torch.autograd.functional.hessian`, and the meta-gradient (I + H/λ)^-1 ∇L_q(φ) by `torch.linalg.solve`.
A second reference differentiates an inner loop run to convergence by plain autograd (the anchor θ not
detached): at the inner problem's minimum the two must agree (implicit function theorem).
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from test_maml_engine import _regression_tasks
from torch import nn
from torch.func import functional_call

from fmaml import MLP, meta_loss
from fmaml import inner_optimizers as fo
from fmaml.meta_gradients import Implicit

TASKS = 3
# The proximal weight keeps I + H/λ positive definite on these tasks (H's lowest eigenvalue at φ is about
# -1.8 here), yet far enough from the identity that CG needs many iterations: λ = 2, the paper's 5-way.
LAM = 2.0
STEPS, LR = 5, 0.1


def _case():
    torch.manual_seed(0)
    return MLP(1, 1, (8, 8)).double(), _regression_tasks(TASKS, k=10)


def _smooth_case():
    """The MLP with tanh for ReLU: a ReLU network's inner problem can have its minimum on a kink, where SGD
    oscillates (two of these three tasks stall at ||∇|| ~ 0.2) and no implicit function theorem applies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    return model.double(), _regression_tasks(TASKS, k=10)


# ------------------------------------------------------------------------------------------ reference


class _Flat:
    """The model's parameters as one vector θ, and the losses as functions of such a vector."""

    def __init__(self, model):
        self.model = model
        self.shapes = {name: p.shape for name, p in model.named_parameters()}
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflatten(self, vector):
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        pieces = torch.split(vector, sizes)
        return {
            name: piece.view(shape) for (name, shape), piece in zip(self.shapes.items(), pieces, strict=True)
        }

    def flatten(self, grads: dict):
        return torch.cat([grads[name].reshape(-1) for name in self.shapes])

    def loss(self, vector, x, y):
        return F.mse_loss(functional_call(self.model, self.unflatten(vector), (x,)), y)


def _split(tasks, split, t):
    x, y = tasks[split]
    return x[t], y[t]


def _reference_phi(flat, support, steps, lr, lam, theta=None, create_graph=False):
    """Plain SGD on the proximal problem; differentiable w.r.t. `theta` (the anchor too) if create_graph."""
    theta = flat.theta if theta is None else theta
    phi = theta if create_graph else theta.clone().requires_grad_()
    for _ in range(steps):
        objective = flat.loss(phi, *support) + lam / 2 * ((phi - theta) ** 2).sum()
        (g,) = torch.autograd.grad(objective, phi, create_graph=create_graph)
        phi = phi - lr * g
        if not create_graph:
            phi = phi.detach().requires_grad_()
    return phi


def _exact_implicit(flat, phi, support, query, lam):
    """(I + H/λ)^-1 ∇L_q(φ), H the explicit Hessian of the support loss at φ."""
    phi = phi.detach()
    hessian = torch.autograd.functional.hessian(lambda v: flat.loss(v, *support), phi)
    query_grad = torch.func.grad(lambda v: flat.loss(v, *query))(phi)
    identity = torch.eye(len(phi), dtype=phi.dtype)
    return torch.linalg.solve(identity + hessian / lam, query_grad)


def reference_implicit(model, tasks, steps=STEPS, lr=LR, lam=LAM, phis=None):
    """The meta-batch's mean exact implicit gradient; `phis`: per-task adapted vectors (else plain SGD)."""
    flat = _Flat(model)
    per_task = []
    for t in range(TASKS):
        support, query = _split(tasks, "support", t), _split(tasks, "query", t)
        phi = _reference_phi(flat, support, steps, lr, lam) if phis is None else phis[t]
        per_task.append(_exact_implicit(flat, phi, support, query, lam))
    return torch.stack(per_task).mean(0)


def reference_unrolled(model, tasks, steps, lr=LR, lam=LAM):
    """d L_q(φ_steps(θ)) / dθ through every inner step by plain autograd, the anchor θ included."""
    flat = _Flat(model)
    theta = flat.theta.clone().requires_grad_()
    total = 0.0
    for t in range(TASKS):
        phi = _reference_phi(
            flat, _split(tasks, "support", t), steps, lr, lam, theta=theta, create_graph=True
        )
        total = total + flat.loss(phi, *_split(tasks, "query", t))
    (g,) = torch.autograd.grad(total / TASKS, theta)
    return g


def fmaml_implicit(model, tasks, *, steps=STEPS, lr=LR, strategy="vmap", **implicit):
    """fmaml's meta-gradient as one flat vector, and the returned loss and metrics."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    options = {"lam": LAM, "cg_steps": 50} | implicit
    inner_optimizer = options.pop("inner_optimizer", fo.SGD())
    value, metrics = meta_loss(
        params, {}, tasks, model=model, loss="mse", steps=steps, lr=lr, strategy=strategy,
        inner_optimizer=inner_optimizer, meta_gradient=Implicit(**options),
    )  # fmt: skip
    value.backward()
    return _Flat(model).flatten({n: p.grad for n, p in params.items()}), value, metrics


def relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------ exactness


def test_conjugate_gradient_converges_to_the_explicit_solve():
    model, tasks = _case()
    exact = reference_implicit(model, tasks)
    errors = [relative(fmaml_implicit(model, tasks, cg_steps=n)[0], exact) for n in (1, 2, 4, 8, 16, 32)]
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in itertools.pairwise(errors)), errors
    assert errors[0] > 0.1 and errors[2] > 1e-2, errors  # else the test could not see a missing solve
    assert errors[-1] <= 1e-6, errors


def test_implicit_gradient_equals_an_inner_loop_run_to_convergence():
    """At the proximal problem's minimum, differentiating through the inner loop gives the implicit-function
    theorem's gradient. λ = 4 and lr = 0.1 make each SGD step a contraction (factor <= 0.8 here), so 150
    steps reach the minimum to rounding; after 5 steps the unrolled gradient is still far from it."""
    model, tasks = _smooth_case()
    lam, steps = 4.0, 150
    implicit, _, _ = fmaml_implicit(model, tasks, steps=steps, lam=lam, cg_steps=60)
    unrolled = reference_unrolled(model, tasks, steps, lam=lam)
    assert relative(implicit, unrolled) <= 1e-10
    assert relative(reference_unrolled(model, tasks, 5, lam=lam), unrolled) > 1e-2


@pytest.mark.parametrize("strategy", ["loop", "chunked:2"])
def test_strategies_agree(strategy):
    model, tasks = _case()
    vmapped, value, metrics = fmaml_implicit(model, tasks, cg_steps=4)
    other, other_value, other_metrics = fmaml_implicit(model, tasks, cg_steps=4, strategy=strategy)
    assert relative(other, vmapped) <= 1e-12
    torch.testing.assert_close(other_value, value, rtol=1e-12, atol=0)
    for name in ("loss", "loss_before"):
        torch.testing.assert_close(other_metrics[name], metrics[name], rtol=1e-12, atol=0)


def _reference_phi_torch_adam(flat, support, steps, lr, lam, betas):
    """φ from torch.optim.Adam itself on the proximal problem."""
    phi = flat.theta.clone().requires_grad_()
    optimizer = torch.optim.Adam([phi], lr=lr, betas=betas)
    for _ in range(steps):
        optimizer.zero_grad()
        (flat.loss(phi, *support) + lam / 2 * ((phi - flat.theta) ** 2).sum()).backward()
        optimizer.step()
    return phi.detach()


def test_any_inner_optimizer_runs_with_implicit():
    """The implicit gradient at the φ that Adam finds (torch.optim.Adam's own steps in the reference). λ = 10:
    at these Adam iterates I + H/2 is indefinite, where CG stops at the negative curvature (truncated)."""
    model, tasks = _case()
    flat, betas, lam = _Flat(model), (0.0, 0.999), 10.0
    phis = [
        _reference_phi_torch_adam(flat, _split(tasks, "support", t), STEPS, 0.01, lam, betas)
        for t in range(3)
    ]
    exact = reference_implicit(model, tasks, lam=lam, phis=phis)
    adam = fo.Adam(lr=0.01, betas=betas)
    for strategy in ("vmap", "loop"):
        got, _, _ = fmaml_implicit(model, tasks, lr=0.01, inner_optimizer=adam, strategy=strategy, lam=lam)
        assert relative(got, exact) <= 1e-9, strategy
    assert relative(reference_implicit(model, tasks, lr=0.01, lam=lam), exact) > 1e-3  # Adam's φ is not SGD's


def test_negative_curvature_stops_conjugate_gradient():
    """An indefinite system: plain CG would divide by pᵀAp <= 0 and wander; truncated CG keeps the iterate
    before it, or b when the first direction already has it (A taken as I)."""
    from fmaml.meta_gradients import conjugate_gradient

    b = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    indefinite = torch.diag(torch.tensor([1.0, -3.0], dtype=torch.float64))  # bᵀAb = -2 < 0
    got = conjugate_gradient(lambda v: {"w": indefinite @ v["w"]}, b, 10)
    torch.testing.assert_close(got["w"], b["w"])
    # Positive curvature along b, negative along the second direction: one CG step, then stop.
    later = torch.diag(torch.tensor([3.0, -1.0], dtype=torch.float64))  # bᵀAb = 2 > 0, then pᵀAp = -24
    first_step = (b["w"] @ b["w"]) / (b["w"] @ later @ b["w"]) * b["w"]
    got = conjugate_gradient(lambda v: {"w": later @ v["w"]}, b, 10)
    torch.testing.assert_close(got["w"], first_step)
    assert torch.isfinite(got["w"]).all()


def _residuals(model, tasks, cg_steps):
    """||(I + H/λ) x_k - b|| / ||b|| of each task's fmaml solution after k = 1..cg_steps iterations."""
    flat = _Flat(model)
    table = []
    for t in range(TASKS):
        one = {split: (x[t : t + 1], y[t : t + 1]) for split, (x, y) in tasks.items()}
        support, query = _split(tasks, "support", t), _split(tasks, "query", t)
        phi = _reference_phi(flat, support, STEPS, LR, LAM).detach()
        system = (
            torch.eye(len(phi), dtype=phi.dtype)
            + torch.autograd.functional.hessian(lambda v, s=support: flat.loss(v, *s), phi) / LAM
        )
        b = torch.func.grad(lambda v, q=query: flat.loss(v, *q))(phi)
        solutions = [fmaml_implicit(model, one, cg_steps=k)[0] for k in range(1, cg_steps + 1)]
        table.append([(((system @ x - b).norm() / b.norm()).item(), x) for x in solutions])
    return table


def test_cg_tol_freezes_each_converged_task():
    """With cg_tol, each task keeps the first iterate whose residual is within cg_tol ||b||, even under vmap
    where the iterations run on for the other tasks."""
    model, tasks = _case()
    cg_steps, cg_tol = 10, 2.5e-3
    table = _residuals(model, tasks, cg_steps)
    first_within = [next(k for k, (r, _) in enumerate(rows) if r <= cg_tol) for rows in table]
    assert all(abs(math.log10(r / cg_tol)) > 0.02 for rows in table for r, _ in rows)  # no borderline case
    assert len(set(first_within)) > 1 and max(first_within) < cg_steps - 1, first_within
    expected = torch.stack([rows[k][1] for rows, k in zip(table, first_within, strict=True)]).mean(0)
    for strategy in ("vmap", "loop"):
        frozen, _, _ = fmaml_implicit(model, tasks, cg_steps=cg_steps, cg_tol=cg_tol, strategy=strategy)
        assert relative(frozen, expected) <= 1e-12, strategy
    unfrozen, _, _ = fmaml_implicit(model, tasks, cg_steps=cg_steps)
    assert relative(unfrozen, expected) > 1e-6


# -------------------------------------------------------------------------------------------- evaluation


def test_evaluation_adapts_with_the_proximal_term():
    """Under no_grad the inner loop still minimises L_s + λ/2 ||φ - θ||²: the query loss after adaptation is
    the reference's at its proximal φ, the same as in training, and not MAML's (λ = 0)."""
    model, tasks = _case()
    flat = _Flat(model)
    expected = torch.stack(
        [
            flat.loss(
                _reference_phi(flat, _split(tasks, "support", t), STEPS, LR, LAM), *_split(tasks, "query", t)
            )
            for t in range(TASKS)
        ]
    ).detach()
    params = dict(model.named_parameters())
    options = dict(model=model, loss="mse", steps=STEPS, lr=LR, strategy="vmap")
    with torch.no_grad():
        value, metrics = meta_loss(params, {}, tasks, meta_gradient=Implicit(LAM), **options)
        _, maml_metrics = meta_loss(params, {}, tasks, **options)
    torch.testing.assert_close(metrics["loss"], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(value, expected.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["loss_before"], maml_metrics["loss_before"], rtol=1e-12, atol=0)
    assert (metrics["loss"] - maml_metrics["loss"]).abs().min() > 1e-3
    _, trained, train_metrics = fmaml_implicit(model, tasks, cg_steps=1)
    torch.testing.assert_close(trained.detach(), value, rtol=1e-12, atol=0)
    torch.testing.assert_close(train_metrics["loss"], metrics["loss"], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lam": 0}, "lam=0"),
        ({"lam": -1.0}, "lam=-1.0"),
        ({"lam": float("inf")}, "lam=inf"),
        ({"cg_steps": 0}, "cg_steps=0"),
        ({"cg_steps": 2.5}, "cg_steps=2.5"),
        ({"cg_tol": -1}, "cg_tol=-1"),
    ],
)
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Implicit(**options)


def _learned_lr(model):
    return {n: torch.full_like(p, LR, requires_grad=True) for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"first_order": True}, "first_order"),
        ({"step_weights": [0.5] * STEPS}, "multi-step loss"),
        ({"adapt_only": ["layers.4.weight"]}, "adapt_only"),
        ({"memory": "recompute"}, "memory=recompute"),
        ({"lr": _learned_lr}, "learn_lr"),
    ],
)
def test_maml_only_options_are_refused(options, message):
    model, tasks = _case()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    options = {k: v(model) if callable(v) else v for k, v in options.items()}
    options = {"lr": LR} | options
    with pytest.raises(ValueError, match=message) as error:
        meta_loss(
            params, {}, tasks, model=model, loss="mse", steps=STEPS, meta_gradient=Implicit(LAM), **options
        )
    assert "iMAML" in str(error.value)

"""fmaml's differentiable inner optimizers against an independent reference, finite differences, `higher`
and torch.optim's own step, in float64.

The reference below is written from torch.optim's documented update rules (the `.. math::` blocks of
torch.optim.SGD, Adam, AdamW, RMSprop and Adagrad; maximize negates the gradient first, as torch's code
does) as a plain-autograd inner loop: `torch.autograd.grad(create_graph=not first_order)` per inner step
and task. It shares no code with fmaml, which is only called through `meta_loss`, its optimizer classes
and its models.

Zero gradient entries (dead ReLU units; the sinusoid MLP has many): Adam's v, RMSprop's square average and
Adagrad's sum are then 0, where d sqrt(v)/dv is infinite and plain autograd gives 0 * inf = NaN. `higher`
registers a hook on v that zeroes the gradient flowing into it where v == 0 (not on RMSprop's centered
variance, so its centered RMSprop still gives NaN there); fmaml's sqrt has derivative 0 where its argument
is 0. Both are the subgradient 0 of |g| at g = 0. The reference takes the same value through its own
autograd.Function (`_sqrt_zero_derivative_at_zero`), and a test checks that a naive sqrt gives NaN there.
"""

import functools
import math
import os
import warnings

import higher
import pytest
import torch
import torch.nn.functional as F
from test_maml_engine import _classification_tasks, _regression_tasks, relative_error
from torch.func import functional_call

from fmaml import MLP, ConvNet, meta_loss
from fmaml import inner_optimizers as fo

LOSS_FUNCTIONS = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}
STEPS = 3


# ------------------------------------------------------------------------------- the reference rules


class _SqrtZeroDerivativeAtZero(torch.autograd.Function):
    """sqrt(x), x >= 0, whose derivative is taken as 0 where x == 0 (see the module docstring)."""

    @staticmethod
    def forward(ctx, x):
        root = torch.sqrt(x)
        ctx.save_for_backward(root)
        return root

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_root):
        (root,) = ctx.saved_tensors
        scale = torch.zeros_like(root)
        positive = root > 0
        scale[positive] = 0.5 / root[positive]
        return grad_root * scale


_sqrt_zero_derivative_at_zero = _SqrtZeroDerivativeAtZero.apply


def _sgd(
    g, s, p, lr, t, sqrt, *, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False
):
    g = -g if maximize else g
    if weight_decay:
        g = g + weight_decay * p
    if momentum:
        b = g if t == 1 else momentum * s["b"] + (1 - dampening) * g
        s = {"b": b}
        g = g + momentum * b if nesterov else b
    return p - lr * g, s


def _adam(
    g, s, p, lr, t, sqrt, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
    decoupled_weight_decay=False, higher_eps_placement=False,
):  # fmt: skip
    """Adam as torch documents it: p - lr * m_hat / (sqrt(v_hat) + eps). `higher_eps_placement`: higher's
    DifferentiableAdam's (an older torch's): p - lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)."""
    beta1, beta2 = betas
    g = -g if maximize else g
    if weight_decay and decoupled_weight_decay:
        p = p - lr * weight_decay * p
    elif weight_decay:
        g = g + weight_decay * p
    m = beta1 * s.get("m", 0.0) + (1 - beta1) * g
    v = beta2 * s.get("v", 0.0) + (1 - beta2) * g**2
    new = {"m": m, "v": v}
    if amsgrad:
        v = new["v_max"] = torch.maximum(s.get("v_max", torch.zeros_like(v)), v)
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    if higher_eps_placement:
        return p - lr * math.sqrt(bc2) / bc1 * m / (sqrt(v) + eps), new
    return p - lr * (m / bc1) / (sqrt(v / bc2) + eps), new


def _adamw(g, s, p, lr, t, sqrt, *, weight_decay=1e-2, **options):
    return _adam(g, s, p, lr, t, sqrt, weight_decay=weight_decay, decoupled_weight_decay=True, **options)


def _rmsprop(
    g, s, p, lr, t, sqrt, *, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
    maximize=False,
):  # fmt: skip
    g = -g if maximize else g
    if weight_decay:
        g = g + weight_decay * p
    v = alpha * s.get("v", 0.0) + (1 - alpha) * g**2
    new = {"v": v}
    if centered:
        g_ave = new["g_ave"] = alpha * s.get("g_ave", 0.0) + (1 - alpha) * g
        v = v - g_ave**2
    step = g / (sqrt(v) + eps)
    if momentum:
        step = new["b"] = momentum * s.get("b", 0.0) + step
    return p - lr * step, new


def _adagrad(
    g, s, p, lr, t, sqrt, *, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
    maximize=False,
):  # fmt: skip
    g = -g if maximize else g
    decayed_lr = lr / (1 + (t - 1) * lr_decay)
    if weight_decay:
        g = g + weight_decay * p
    state_sum = s.get("sum", initial_accumulator_value) + g**2
    return p - decayed_lr * g / (sqrt(state_sum) + eps), {"sum": state_sum}


RULES = {"SGD": _sgd, "Adam": _adam, "AdamW": _adamw, "RMSprop": _rmsprop, "Adagrad": _adagrad}


# -------------------------------------------------------------------------- the reference inner loop


def _rate(lr, step: int, name: str):
    """The reference's reading of a rate: a tensor, {name: tensor} or [{name: tensor}] per step."""
    if isinstance(lr, list):
        return lr[step][name]
    return lr[name] if isinstance(lr, dict) else lr


def _rate_leaves(lr) -> dict:
    if isinstance(lr, list):
        return {f"lr[{i}][{n}]": r for i, rates in enumerate(lr) for n, r in rates.items()}
    return {f"lr[{n}]": r for n, r in lr.items()} if isinstance(lr, dict) else {"lr": lr}


def _fresh(lr):
    """The same rates as new leaves that require grad."""
    if isinstance(lr, list):
        return [_fresh(rates) for rates in lr]
    if isinstance(lr, dict):
        return {n: _fresh(r) for n, r in lr.items()}
    return lr.detach().clone().requires_grad_()


def reference_meta_gradient(model, tasks, loss, params, lr, rule, first_order, steps=STEPS):
    """d(mean query loss)/d(params, rates) by autograd through a hand-written inner loop: (grads, loss)."""
    loss_fn = LOSS_FUNCTIONS[loss]
    params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    lr = _fresh(lr)
    (xs, ys), (xq, yq) = tasks["support"], tasks["query"]
    total = 0.0
    for i in range(xs.shape[0]):
        theta, state = dict(params), {n: {} for n in params}
        for step in range(steps):
            support_loss = loss_fn(functional_call(model, theta, (xs[i],)), ys[i])
            grads = torch.autograd.grad(
                support_loss, list(theta.values()), create_graph=not first_order, retain_graph=True
            )
            for (n, p), g in zip(list(theta.items()), grads, strict=True):
                theta[n], state[n] = rule(g, state[n], p, _rate(lr, step, n), step + 1)
        total = total + loss_fn(functional_call(model, theta, (xq[i],)), yq[i])
    value = total / xs.shape[0]
    inputs = params | _rate_leaves(lr)
    grads = torch.autograd.grad(value, list(inputs.values()))
    return dict(zip(inputs, grads, strict=True)), value.detach()


def fmaml_meta_gradient(model, tasks, loss, params, lr, optimizer, first_order, strategy, memory):
    """fmaml's meta-gradient w.r.t. the params and the learned rates, by `meta_loss(...).backward()`."""
    params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    lr = _fresh(lr)
    value, _ = meta_loss(
        params, {}, tasks, model=model, loss=loss, steps=STEPS, lr=lr, first_order=first_order,
        strategy=strategy, memory=memory, inner_optimizer=optimizer, metrics_before=False,
    )  # fmt: skip
    value.backward()
    inputs = params | _rate_leaves(lr)
    return {n: x.grad for n, x in inputs.items()}, value.detach()


def errors(got: dict, want: dict) -> tuple[float, float]:
    """Relative errors (params, learned rates) of `got` against `want`."""
    rates = [k for k in want if k.startswith("lr")]
    weights = [k for k in want if not k.startswith("lr")]

    def part(d, keys):
        return {k: d[k] for k in keys}

    return relative_error(part(got, weights), part(want, weights)), relative_error(
        part(got, rates), part(want, rates)
    )


# --------------------------------------------------------------------------------------------- cases

# id -> (fmaml/torch class name, options, inner lr). Options chosen so each one matters: amsgrad with a small
# beta2 (so the running max differs from v), momentum with dampening, weight decay on every family.
OPTIMIZERS = {
    "sgd_momentum_dampening_wd": ("SGD", dict(momentum=0.9, dampening=0.1, weight_decay=0.01), 0.01),
    "sgd_nesterov_maximize": ("SGD", dict(momentum=0.5, nesterov=True, maximize=True), 0.01),
    "adam": ("Adam", {}, 0.01),
    "adam_amsgrad_wd": ("Adam", dict(betas=(0.9, 0.5), amsgrad=True, weight_decay=0.01), 0.01),
    "adamw_amsgrad": ("AdamW", dict(betas=(0.8, 0.5), amsgrad=True, weight_decay=0.1), 0.01),
    "rmsprop": ("RMSprop", {}, 0.003),
    "rmsprop_centered_momentum": ("RMSprop", dict(centered=True, momentum=0.5, weight_decay=0.01), 0.003),
    "adagrad_decay_accumulator": (
        "Adagrad", dict(lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=0.01), 0.01,
    ),
}  # fmt: skip


def _fmaml_optimizer(spec: str) -> fo.InnerOptimizer:
    name, options, lr = OPTIMIZERS[spec]
    return getattr(fo, name)(lr=lr, **options)


def _reference_rule(spec: str, sqrt=_sqrt_zero_derivative_at_zero, **extra):
    name, options, _ = OPTIMIZERS[spec]
    return functools.partial(RULES[name], sqrt=sqrt, **options, **extra)


def _mlp_case():
    """The sinusoid MLP, 3 tasks (so chunked:2 has an uneven last chunk)."""
    torch.manual_seed(0)
    return MLP().double(), _regression_tasks(num_tasks=3), "mse"


def _convnet_case():
    """A tiny BatchNorm ConvNet: 2 ways, 2 shots, 8x8 images, 3 filters, 3 tasks (chunked:2 is uneven)."""
    torch.manual_seed(0)
    model = ConvNet(2, filters=3, image_size=8).double()
    return model, _classification_tasks(num_tasks=3, ways=2, shots=2, query=2, size=8), "cross_entropy"


CASES = {"mlp": _mlp_case, "convnet_bn": _convnet_case}


@functools.cache
def _case(case: str):
    model, tasks, loss = CASES[case]()
    return model, tasks, loss, {n: p.detach() for n, p in model.named_parameters()}


@functools.cache
def _reference(case: str, spec: str, first_order: bool):
    model, tasks, loss, params = _case(case)
    lr = torch.tensor(OPTIMIZERS[spec][2], dtype=torch.float64)
    return reference_meta_gradient(model, tasks, loss, params, lr, _reference_rule(spec), first_order)


@functools.cache
def _fmaml(case: str, spec: str, first_order: bool, strategy: str, memory: str):
    model, tasks, loss, params = _case(case)
    lr = torch.tensor(OPTIMIZERS[spec][2], dtype=torch.float64)
    return fmaml_meta_gradient(
        model, tasks, loss, params, lr, _fmaml_optimizer(spec), first_order, strategy, memory
    )


def _assert_exact(case, spec, first_order, strategy, memory, tolerance=1e-9):
    want, want_value = _reference(case, spec, first_order)
    got, value = _fmaml(case, spec, first_order, strategy, memory)
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=0)
    param_error, rate_error = errors(got, want)
    assert param_error <= tolerance and rate_error <= tolerance, (param_error, rate_error)


# --------------------------------------------------------------------- 1. against the reference


RUNS = [
    (strategy, memory, first_order)
    for strategy in ("vmap", "loop", "chunked:2")
    for memory in ("store", "recompute")
    for first_order in (False, True)
]


# The ConvNet costs ~1 s a run here (float64 through batch_norm's double backward): in the suite it runs the
# whole product for the optimizer with the most state (Adam with amsgrad and weight decay) and, for the others,
# one run of each code path (vmap through recompute's reverse over reverse, chunked first order, the loop's
# plain autograd). FMAML_EXHAUSTIVE_TESTS=1 runs the whole product for every optimizer on both models.
EXHAUSTIVE = os.environ.get("FMAML_EXHAUSTIVE_TESTS", "0") not in ("", "0")
CONVNET_RUNS = [("vmap", "recompute", False), ("chunked:2", "store", True), ("loop", "store", False)]


def _runs(case: str, spec: str) -> list[tuple[str, str, bool]]:
    full = EXHAUSTIVE or case == "mlp" or spec == "adam_amsgrad_wd"
    return RUNS if full else CONVNET_RUNS


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("spec", OPTIMIZERS)
def test_meta_gradient_equals_reference_under_every_strategy_and_memory(spec, case):
    """optimizer x model x {vmap, loop, chunked:2} x {store, recompute} x {second, first order} (see _runs);
    one test per optimizer and model, so that a failure names the runs that differ."""
    failures = []
    for strategy, memory, first_order in _runs(case, spec):
        try:
            _assert_exact(case, spec, first_order, strategy, memory)
        except AssertionError as error:
            failures.append(f"{strategy}/{memory}/{'first' if first_order else 'second'} order: {error}")
    assert not failures, "\n".join(failures)


def test_reference_sees_the_options():
    """Guards the reference: first and second order differ, and so do the optimizers' options."""
    first, _ = _reference("mlp", "adam_amsgrad_wd", True)
    second, _ = _reference("mlp", "adam_amsgrad_wd", False)
    plain, _ = _reference("mlp", "adam", False)
    assert min(errors(first, second)) > 1e-3
    assert min(errors(plain, second)) > 1e-3


# ------------------------------------------------------------------- 2. against finite differences


def _random_direction(params: dict, seed: int = 0) -> dict:
    """A random unit direction over the params and the rate "lr"."""
    g = torch.Generator().manual_seed(seed)
    direction = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    direction["lr"] = torch.randn((), generator=g, dtype=torch.float64)
    norm = sum((d**2).sum() for d in direction.values()).sqrt()
    return {n: d / norm for n, d in direction.items()}


@pytest.mark.parametrize("spec", OPTIMIZERS)
def test_mlp_meta_gradient_equals_finite_differences(spec):
    """Central differences of fmaml's own meta-loss along a random direction (params and lr), second order:
    independent of any reference rule, so it checks the reference's reading of torch's docs as well."""
    model, tasks, loss, params = _case("mlp")
    lr = torch.tensor(OPTIMIZERS[spec][2], dtype=torch.float64)
    grads, _ = _fmaml("mlp", spec, False, "vmap", "store")
    direction = _random_direction(params)
    derivative = sum((grads[n] * direction[n]).sum() for n in direction).item()

    def meta_loss_at(h: float) -> float:
        moved = {n: p + h * direction[n] for n, p in params.items()}
        with torch.no_grad():
            value, _ = meta_loss(
                moved, {}, tasks, model=model, loss=loss, steps=STEPS, lr=lr + h * direction["lr"],
                inner_optimizer=_fmaml_optimizer(spec), strategy="vmap", metrics_before=False,
            )  # fmt: skip
        return value.item()

    # Measured: the error falls as h^2 down to h = 1e-6 (RMSprop centered: 8e-5 at 1e-4, 8e-7 at 1e-5, 8e-9
    # at 1e-6); at 1e-4 Adagrad's difference crosses a ReLU kink.
    h = 1e-6
    finite_difference = (meta_loss_at(h) - meta_loss_at(-h)) / (2 * h)
    assert abs(finite_difference - derivative) <= 1e-6 * abs(derivative), (finite_difference, derivative)


# ------------------------------------------------------------------------------ 3. against higher


def higher_meta_gradient(model, tasks, loss, torch_optimizer, lr):
    """higher's differentiable optimizers (second order), the learned rate passed as its `override`."""
    loss_fn = LOSS_FUNCTIONS[loss]
    names, params = zip(*model.named_parameters(), strict=True)
    lr = lr.detach().clone().requires_grad_()
    (xs, ys), (xq, yq) = tasks["support"], tasks["query"]
    total = 0.0
    with warnings.catch_warnings():  # "Differentiable RMSprop suffers from gradient correctness issues"
        warnings.simplefilter("ignore")
        for i in range(xs.shape[0]):
            optimizer = torch_optimizer(params)  # fresh state for each task, as in fmaml
            context = higher.innerloop_ctx(
                model, optimizer, copy_initial_weights=False, override={"lr": [lr]}
            )
            with context as (fmodel, diffopt):
                for _ in range(STEPS):
                    diffopt.step(loss_fn(fmodel(xs[i]), ys[i]))
                total = total + loss_fn(fmodel(xq[i]), yq[i])
    grads = torch.autograd.grad(total / xs.shape[0], [*params, lr])
    return dict(zip([*names, "lr"], grads, strict=True))


# Options higher implements as torch does (higher has no `maximize`; its centered RMSprop gives NaN at
# zero gradient entries, see the module docstring). lr_decay 0.5: torch keeps Adagrad's step count in a
# float32 tensor, which higher multiplies by lr_decay; 0.5 keeps that product exact in float32.
HIGHER_AGREES = {
    "sgd_momentum_dampening_wd": ("SGD", dict(momentum=0.9, dampening=0.1, weight_decay=0.01), 0.01),
    "sgd_nesterov": ("SGD", dict(momentum=0.5, nesterov=True), 0.01),
    "rmsprop": ("RMSprop", {}, 0.003),
    "rmsprop_momentum_wd": ("RMSprop", dict(momentum=0.5, weight_decay=0.01), 0.003),
    "adagrad": ("Adagrad", {}, 0.01),
    "adagrad_decay_accumulator": ("Adagrad", dict(lr_decay=0.5, initial_accumulator_value=0.25), 0.01),
}


@pytest.mark.parametrize("spec", HIGHER_AGREES)
def test_mlp_meta_gradient_equals_higher(spec):
    name, options, lr = HIGHER_AGREES[spec]
    model, tasks, loss, params = _case("mlp")
    lr = torch.tensor(lr, dtype=torch.float64)
    want = higher_meta_gradient(
        model, tasks, loss, functools.partial(getattr(torch.optim, name), **options), lr
    )
    optimizer = getattr(fo, name)(lr=lr.item(), **options)
    # The loop: higher's formulation, whose inner gradients are summed in the same order. Under vmap, one
    # inner gradient entry of 8.7e-9 (of the order of eps) turns last-digit differences into 1.2e-12 on
    # RMSprop, as it does against the reference (1e-9 there, above).
    got, _ = fmaml_meta_gradient(model, tasks, loss, params, lr, optimizer, False, "loop", "store")
    param_error, rate_error = errors(got, want)
    assert param_error <= 1e-12 and rate_error <= 1e-12, (param_error, rate_error)


def test_adam_differs_from_higher_exactly_by_the_eps_placement():
    """higher's Adam puts eps before the bias correction, torch's (and fmaml's) after it. The reference
    with higher's placement matches higher; with torch's it matches fmaml; and the two differ."""
    model, tasks, loss, params = _case("mlp")
    lr = torch.tensor(0.01, dtype=torch.float64)
    from_higher = higher_meta_gradient(model, tasks, loss, torch.optim.Adam, lr)
    from_fmaml, _ = fmaml_meta_gradient(
        model, tasks, loss, params, lr, fo.Adam(lr=0.01), False, "loop", "store"
    )
    old_rule = functools.partial(_adam, sqrt=_sqrt_zero_derivative_at_zero, higher_eps_placement=True)
    old_placement, _ = reference_meta_gradient(model, tasks, loss, params, lr, old_rule, False)
    current_placement, _ = _reference("mlp", "adam", False)
    assert max(errors(old_placement, from_higher)) <= 1e-12
    assert max(errors(from_fmaml, current_placement)) <= 1e-12
    assert min(errors(from_fmaml, from_higher)) > 1e-6


# ----------------------------------------------------------------------- 4. zero inner-gradient entries

DEAD_UNITS = 8
ZERO_ENTRIES = {
    "adam": ("Adam", {}, 0.01),
    "adamw_amsgrad": ("AdamW", dict(amsgrad=True), 0.01),
    "rmsprop": ("RMSprop", {}, 0.003),
    "rmsprop_centered": ("RMSprop", dict(centered=True), 0.003),
    "adagrad": ("Adagrad", {}, 0.01),
}


@functools.cache
def _dead_units_case():
    """The sinusoid MLP with DEAD_UNITS first-layer ReLUs dead on every input (bias -100, inputs in [-5, 5],
    weights below 1): every inner gradient of their weights, biases and outgoing weights is exactly 0."""
    model, tasks, loss = _mlp_case()
    with torch.no_grad():
        model.layers[0].bias[:DEAD_UNITS] = -100.0
    return model, tasks, loss, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("spec", ZERO_ENTRIES)
def test_zero_gradient_entries_give_the_finite_reference(spec):
    name, options, lr = ZERO_ENTRIES[spec]
    model, tasks, loss, params = _dead_units_case()
    (xs, ys) = tasks["support"]
    first = torch.func.grad(lambda p: LOSS_FUNCTIONS[loss](functional_call(model, p, (xs[0],)), ys[0]))(
        params
    )
    assert sum((g == 0).sum() for g in first.values()) >= DEAD_UNITS * (1 + 1 + 40)
    lr = torch.tensor(lr, dtype=torch.float64)
    rule = functools.partial(RULES[name], **options)
    want, _ = reference_meta_gradient(
        model, tasks, loss, params, lr, functools.partial(rule, sqrt=_sqrt_zero_derivative_at_zero), False
    )
    naive, _ = reference_meta_gradient(
        model, tasks, loss, params, lr, functools.partial(rule, sqrt=torch.sqrt), False
    )
    assert any(g.isnan().any() for g in naive.values())  # so this case does exercise sqrt'(0)
    # vmap with recompute: the path furthest from plain autograd (the sqrt is the same function in all).
    optimizer = getattr(fo, name)(lr=lr.item(), **options)
    got, _ = fmaml_meta_gradient(model, tasks, loss, params, lr, optimizer, False, "vmap", "recompute")
    assert all(g.isfinite().all() for g in got.values())
    param_error, rate_error = errors(got, want)
    assert param_error <= 1e-9 and rate_error <= 1e-9, (param_error, rate_error)


def test_higher_centered_rmsprop_is_nan_at_zero_entries():
    """Why the comparison with higher leaves centered RMSprop out: higher masks the gradient into the square
    average where it is 0, not into the centered variance, so its meta-gradient is NaN there (fmaml's
    equals the reference, above)."""
    model, tasks, loss, _ = _dead_units_case()
    lr = torch.tensor(0.003, dtype=torch.float64)
    centered = functools.partial(torch.optim.RMSprop, centered=True)
    assert any(g.isnan().any() for g in higher_meta_gradient(model, tasks, loss, centered, lr).values())


# ------------------------------------------------------------------- 5. forward values = torch.optim

FORWARD_CASES = [
    ("SGD", {}),
    ("SGD", dict(momentum=0.9)),
    ("SGD", dict(momentum=0.9, dampening=0.3, weight_decay=0.1)),
    ("SGD", dict(momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
    ("Adam", {}),
    ("Adam", dict(betas=(0.8, 0.5), amsgrad=True, weight_decay=0.1)),
    ("Adam", dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("AdamW", {}),
    ("AdamW", dict(betas=(0.8, 0.5), amsgrad=True, maximize=True, eps=1e-3)),
    ("RMSprop", {}),
    ("RMSprop", dict(centered=True)),
    ("RMSprop", dict(momentum=0.9, weight_decay=0.1)),
    ("RMSprop", dict(centered=True, momentum=0.5, alpha=0.9, maximize=True)),
    ("Adagrad", {}),
    ("Adagrad", dict(lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=0.1, eps=1e-6)),
    ("Adagrad", dict(maximize=True)),
]


FORWARD_IDS = [f"{n}-" + ",".join(f"{k}={v}" for k, v in o.items()) for n, o in FORWARD_CASES]


@pytest.mark.parametrize(("name", "options"), FORWARD_CASES, ids=FORWARD_IDS)
def test_update_equals_torch_optim_step(name, options):
    """Five steps of fmaml's `update` and of torch.optim's real `step` on the same gradients (one row of
    them always 0) give the same params and the same state."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(4, 3, generator=g, dtype=torch.float64)
    gradients = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(5)]
    for gradient in gradients:
        gradient[0] = 0.0
    lr = 0.05
    reference = start.clone().requires_grad_()
    torch_optimizer = getattr(torch.optim, name)([reference], lr=lr, **options)
    optimizer = getattr(fo, name)(lr=lr, **options)
    params, state = {"w": start}, optimizer.init({"w": start})
    for step, gradient in enumerate(gradients):
        reference.grad = gradient.clone()
        torch_optimizer.step()
        params, state = optimizer.update({"w": gradient}, state, params, lr, step)
        torch.testing.assert_close(params["w"], reference.detach(), rtol=1e-12, atol=1e-15)
        torch_state = torch_optimizer.state[reference]
        for key, value in state["w"].items():
            torch.testing.assert_close(value, torch_state[key], rtol=1e-12, atol=1e-15, msg=key)


# ---------------------------------------------------------------------------- 6. learned rates


def _per_parameter_rates(params: dict, lr: float) -> dict:
    """Meta-SGD: a rate tensor per param, all different."""
    g = torch.Generator().manual_seed(1)
    return {n: lr * (0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64)) for n, p in params.items()}


def _per_layer_per_step_rates(params: dict, lr: float) -> list:
    """MAML++ LSLR: a scalar rate per param tensor and inner step, all different."""
    return [
        {n: torch.tensor(lr * (1 + 0.2 * step + 0.05 * k), dtype=torch.float64) for k, n in enumerate(params)}
        for step in range(STEPS)
    ]


LEARNED_RATES = {"per_parameter": _per_parameter_rates, "per_layer_per_step": _per_layer_per_step_rates}
LEARNED_RUNS = [("vmap", "recompute"), ("loop", "store")]


@pytest.mark.parametrize(("strategy", "memory"), LEARNED_RUNS, ids=["-".join(r) for r in LEARNED_RUNS])
@pytest.mark.parametrize("style", LEARNED_RATES)
@pytest.mark.parametrize("spec", ["sgd_momentum_dampening_wd", "adam_amsgrad_wd"])
def test_learned_rates_get_exact_meta_gradients(spec, style, strategy, memory):
    model, tasks, loss, params = _case("mlp")
    name, options, lr = OPTIMIZERS[spec]
    rates = LEARNED_RATES[style](params, lr)
    want, _ = _learned_reference(spec, style)
    optimizer = getattr(fo, name)(lr=lr, learn_lr=style, **options)
    got, _ = fmaml_meta_gradient(model, tasks, loss, params, rates, optimizer, False, strategy, memory)
    param_error, rate_error = errors(got, want)
    assert param_error <= 1e-9 and rate_error <= 1e-9, (param_error, rate_error)


@functools.cache
def _learned_reference(spec: str, style: str):
    model, tasks, loss, params = _case("mlp")
    rates = LEARNED_RATES[style](params, OPTIMIZERS[spec][2])
    return reference_meta_gradient(model, tasks, loss, params, rates, _reference_rule(spec), False)

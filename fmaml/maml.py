"""The pure functional core of fmaml: MAML as functions over dicts of tensors.

Nothing here knows about Lightning, torchmeta or configs. State is explicit:

    params   dict name -> Tensor, the meta-learned initial weights (what the outer loop updates)
    buffers  dict name -> Tensor, non-learned state (BatchNorm must not track running stats)
    tasks    {"support": (x, y), "query": (x, y)}, every tensor with a leading task dimension:
             x [tasks, ways*shots, C, H, W] (or [tasks, K, features]), y [tasks, ways*shots] (or [tasks, K, 1])

The layers, from the inside out:

    adapt(params, buffers, support)           -> adapted params          the inner loop, one task
    adapt_steps(params, buffers, support)     -> params after each step  the same, step by step
    task_loss(params, buffers, task)          -> (query loss, metrics)   adapt + evaluate, one task
    task_loss_and_grad(params, buffers, task) -> (grads, loss, metrics)  d task_loss / d params, one task
    task_loss_and_grad_recompute(...)         -> the same, in memory flat in the inner steps (recompute)
    meta_loss(params, buffers, tasks)         -> (mean loss, metrics)    every task, by a strategy

Why the meta-gradient is taken per task, inside the strategy: autograd over `vmap(grad(f))` through
`F.batch_norm(training=True)` gives wrong second-order gradients (a batching-rule bug in batch_norm's
backward, pytorch/functorch#534; see ../shared/repros/vmap_batchnorm_double_backward.py), while
`vmap(grad(grad(f)))` is exact. So `meta_loss` computes each task's exact meta-gradient with
`torch.func.grad` inside the vectorised function and hands it to autograd through a small
`autograd.Function`: callers still write `meta_loss(...)[0].backward()`, and the result is exact under
every strategy, for any model. `meta_loss` is three parts: the per-task meta-gradient
(`_per_task_meta_gradient`: stored, recomputed, or a `meta_gradient`), a strategy that maps it over the
tasks (`_over_tasks`: vmap, chunks, or a loop), and one reduction, their mean (`_mean_over_tasks`).

The inner loop is an optimizer of fmaml.inner_optimizers, pure `init`/`update` functions over dicts of
tensors (plain SGD by default, exactly θ - lr * g): SGD with momentum, Adam, RMSprop, ... run through the
same code, its state fresh for each task, and every strategy and memory mode differentiates through it.

The MAML++ / Meta-SGD / ANIL options, each off by default (and then costing nothing):
- learned inner rates: any tensor of `lr` that requires grad is meta-learned, e.g. a dict of rates shaped
  like the params (Meta-SGD) or a per-step list of dicts of scalars (MAML++ LSLR); under vmap they are
  differentiated inputs of the per-task function, like the params;
- `step_weights`: the multi-step loss (MSL), the weighted query loss after every inner step
  (`msl_weights` gives MAML++'s annealed weights);
- `adapt_only`: the names of the params the inner loop adapts (ANIL: the head's); the others are used
  as they are, and the inner gradient skips them;
- `meta_gradient`: iMAML's implicit gradient or Reptile's θ - φ instead of differentiating through the
  inner loop (fmaml.meta_gradients: per-task functions run by the same strategies); `proximal`: iMAML's
  λ/2 ||φ - θ||² in the inner problem;
- a model with `takes_inner_step` (MAML++'s per-step BatchNorm, fmaml.per_step_batch_norm) is told the
  inner step of every forward (`forward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fmaml.inner_optimizers import SGD, InnerLR, InnerOptimizer, State

Params = dict[str, Tensor]
Tasks = Mapping[str, tuple[Tensor, Tensor]]
LossName = Literal["cross_entropy", "mse"]
# The multi-step loss: one weight per inner step, [steps]; None is MAML's loss after the last step only.
StepWeights = Tensor | Sequence[float] | None

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
STRATEGIES = ("auto", "vmap", "loop", "chunked:N")
MEMORY = ("store", "recompute")
# memory="recompute" stores the graph of the last inner step(s) (run first on the way back, so recomputing
# them would only cost one more support forward and backward each) and recomputes the earlier ones. More
# stored steps trade memory for time; on the ConvNet the difference between 1 and 2 is within this CPU's
# timing noise, so one: the least memory.
STORED_STEPS = 1
# The paper's inner loop, θ - lr * g: the default inner optimizer (its own lr is unused: `lr` is passed).
PLAIN_SGD = SGD()


# ---------------------------------------------------------------------------------------------- one task


def _detached(params: Params) -> Params:
    return {name: p.detach() for name, p in params.items()}


def adapt(
    params: Params,
    buffers: Params,
    support: tuple[Tensor, Tensor],
    *,
    model: nn.Module,
    loss: LossName = "cross_entropy",
    steps: int = 1,
    lr: InnerLR = 0.4,
    first_order: bool = False,
    adapt_only: Collection[str] | None = None,
    inner_optimizer: InnerOptimizer = PLAIN_SGD,
    proximal: float = 0.0,
    compute_dtype: torch.dtype | None = None,
) -> Params:
    """Adapt `params` to one task by `steps` steps of `inner_optimizer` (plain SGD) on its support set.

    support: (x [ways*shots, ...], y [ways*shots] or [K, 1]), a single task (no task dimension).
    Returns the adapted params, differentiable w.r.t. `params` (second order) unless `first_order`,
    which detaches each inner gradient (FOMAML). `adapt_only`: the names of the params to adapt (ANIL);
    the others come back unchanged. None adapts them all. `inner_optimizer`: see fmaml.inner_optimizers;
    its state starts fresh here, and `lr` (possibly learned tensors) is its rate. `proximal` (λ, iMAML):
    the inner problem is the support loss + λ/2 ||φ - params||², which keeps φ near the params.
    `compute_dtype` (bf16/fp16 mixed precision): the network's forward runs in it, see `forward`.
    """
    inner = dict(
        model=model, loss=loss, steps=steps, lr=lr, first_order=first_order, adapt_only=adapt_only,
        inner_optimizer=inner_optimizer, proximal=proximal, compute_dtype=compute_dtype,
    )  # fmt: skip
    adapted = params
    for adapted in adapt_steps(params, buffers, support, **inner):  # noqa: B007 (only the last is wanted)
        pass
    return adapted


def adapt_steps(
    params: Params,
    buffers: Params,
    support: tuple[Tensor, Tensor],
    *,
    model: nn.Module,
    loss: LossName = "cross_entropy",
    steps: int = 1,
    lr: InnerLR = 0.4,
    first_order: bool = False,
    adapt_only: Collection[str] | None = None,
    inner_optimizer: InnerOptimizer = PLAIN_SGD,
    proximal: float = 0.0,
    compute_dtype: torch.dtype | None = None,
) -> Iterator[Params]:
    """`adapt`, step by step: yields the params after each of the `steps` inner steps."""
    x, y = support
    loss_fn = LOSSES[loss]
    frozen: Params = {}
    if adapt_only is not None:
        # ANIL: the other params are constants of the inner problem, so the inner gradient skips them.
        frozen = {name: p for name, p in params.items() if name not in adapt_only}
        params = {name: p for name, p in params.items() if name in adapt_only}

    # ANIL's frozen params are inputs of the loss but not differentiated; without them, the very
    # function of plain MAML (an extra argument or dict costs measurable time in the ConvNet loop).
    # (First order: the frozen params are constants of the inner gradient too, but not of the output.)
    state = ((_detached(frozen) if first_order else frozen), buffers) if frozen else (buffers,)
    anchor = _detached(params)

    def support_loss(p: Params, step: int) -> Tensor:
        value = loss_fn(forward(model, (p, *state), x, step, compute_dtype), y)
        if proximal:
            value = value + proximal / 2 * _dot(_minus(p, anchor), _minus(p, anchor))
        return value

    every_step = _inner_steps(
        support_loss, params, inner_optimizer.init(params), lr, range(steps), inner_optimizer, first_order
    )
    for adapted, _ in every_step:
        yield adapted | frozen if frozen else adapted


def forward(
    model: nn.Module,
    tensors: tuple[Params, ...],
    x: Tensor,
    inner_step: int,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """model(x) with `tensors` (params, buffers) in place of its own. A model with per-step weights or
    statistics (MAML++'s per-step BatchNorm: `takes_inner_step = True`) is also told the inner step whose
    weights to use: step i's support forward and the query forward after step i both use i (MAML++'s code).

    compute_dtype (torch.bfloat16 or torch.float16): mixed precision by explicit casts, because autocast
    fails inside vmap in this torch. The float tensors and x are cast to it for the forward (so its
    backward, the inner gradient, runs in it too), and the output is cast back to x's dtype, so the loss
    is taken in float32. The casts are differentiable: gradients reach the float32 params as float32, so
    the inner updates, the meta-gradient and the weights stay in float32, as under autocast.
    """
    kwargs = {"inner_step": inner_step} if getattr(model, "takes_inner_step", False) else {}
    if compute_dtype is None:
        return functional_call(model, tensors, (x,), kwargs)
    low = tuple({name: _cast(t, compute_dtype) for name, t in d.items()} for d in tensors)
    return functional_call(model, low, (_cast(x, compute_dtype),), kwargs).to(x.dtype)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _minus(a: Params, b: Params) -> Params:
    return {name: a[name] - b[name] for name in a}


def _inner_steps(
    support_loss: Callable[[Params, int], Tensor],
    params: Params,
    state: State,
    lr: InnerLR,
    steps: range,
    inner_optimizer: InnerOptimizer,
    first_order: bool,
) -> Iterator[tuple[Params, State]]:
    """The inner loop from (params, state): yields (params, optimizer state) after each step in `steps`."""
    for step in steps:
        # First order: the inner gradient is a constant, so take it at detached params; that builds no
        # graph for the outer derivative to walk (same values as detaching the gradient afterwards). The
        # optimizer's own use of the params (weight decay) stays differentiable, as in `higher`.
        grads = grad(support_loss)(_detached(params) if first_order else params, step)
        params, state = inner_optimizer.update(grads, state, params, lr, step)
        yield params, state


def _reported(value: Tensor, accuracy: Tensor | None, suffix: str = "") -> dict[str, Tensor]:
    """The metrics of a query evaluation: its loss (detached: only reported) and accuracy, if any."""
    return {"loss" + suffix: value.detach()} | (
        {"accuracy" + suffix: accuracy} if accuracy is not None else {}
    )


def metrics_before_adapting(
    params: Params,
    buffers: Params,
    query: tuple[Tensor, Tensor],
    model: nn.Module,
    loss: LossName,
    compute_dtype,
) -> dict[str, Tensor]:
    """loss_before (and accuracy_before): the query numbers of the unadapted params, one more query forward.
    Only reported, never differentiated."""
    with torch.no_grad():
        return _reported(*_evaluate(params, buffers, *query, model, loss, 0, compute_dtype), suffix="_before")


def _evaluate(
    params: Params,
    buffers: Params,
    x: Tensor,
    y: Tensor,
    model: nn.Module,
    loss: LossName,
    inner_step: int,
    compute_dtype: torch.dtype | None = None,
):
    """(loss, accuracy or None) of `params` on (x, y); `inner_step`: the step whose output these params are."""
    out = forward(model, (params, buffers), x, inner_step, compute_dtype)
    value = LOSSES[loss](out, y)
    accuracy = (out.argmax(-1) == y).float().mean() if loss == "cross_entropy" else None
    return value, accuracy


def task_loss(
    params: Params,
    buffers: Params,
    task: Tasks,
    *,
    model: nn.Module,
    loss: LossName = "cross_entropy",
    steps: int = 1,
    lr: InnerLR = 0.4,
    first_order: bool = False,
    metrics_before: bool = True,
    step_weights: StepWeights = None,
    adapt_only: Collection[str] | None = None,
    inner_optimizer: InnerOptimizer = PLAIN_SGD,
    proximal: float = 0.0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Adapt on one task's support set, then evaluate on its query set.

    task: {"support": (x, y), "query": (x, y)} for a single task (no task dimension).
    Returns (query loss after adaptation, metrics). metrics holds scalar tensors: "loss", and for
    classification "accuracy"; with `metrics_before` also "loss_before" (and "accuracy_before"), the
    query numbers of the unadapted params, at the cost of one more query forward pass.
    step_weights [steps]: the multi-step loss, sum_i step_weights[i] * (query loss after step i+1), at
    the cost of one query forward per step; the metrics stay those after the last step.
    """
    inner = dict(
        model=model, loss=loss, steps=steps, lr=lr, first_order=first_order, adapt_only=adapt_only,
        inner_optimizer=inner_optimizer, proximal=proximal, compute_dtype=compute_dtype,
    )  # fmt: skip
    query_x, query_y = task["query"]
    if step_weights is None:
        adapted = adapt(params, buffers, task["support"], **inner)
        value, accuracy = _evaluate(adapted, buffers, query_x, query_y, model, loss, steps - 1, compute_dtype)
        last = value
    else:
        value = 0.0
        every_step = enumerate(adapt_steps(params, buffers, task["support"], **inner))
        for weight, (i, adapted) in zip(step_weights, every_step, strict=True):
            last, accuracy = _evaluate(adapted, buffers, query_x, query_y, model, loss, i, compute_dtype)
            value = value + weight * last
    metrics = _reported(last, accuracy)
    if metrics_before:
        metrics |= metrics_before_adapting(params, buffers, task["query"], model, loss, compute_dtype)
    return value, metrics


def task_loss_and_grad(params: Params, buffers: Params, task: Tasks, **config) -> tuple[Params, Tensor, dict]:
    """d task_loss / d params for one task, exact to second order: (grads, query loss, metrics)."""
    grads, (value, metrics) = grad_and_value(task_loss, has_aux=True)(params, buffers, task, **config)
    return grads, value, metrics


def _task_loss_and_grads_with_rates(
    inputs: tuple[Params, list[Tensor]], buffers: Params, task: Tasks, *, with_rates: Callable, **config
) -> tuple[tuple[Params, list[Tensor]], Tensor, dict]:
    """`task_loss_and_grad` w.r.t. the params and the learned inner rates: inputs = (params, rates), and
    `with_rates(rates)` is the `lr` they stand in (see `_learned_rates`). Returns ((param grads, rate grads),
    query loss, metrics)."""

    def loss_of(params: Params, rates: list[Tensor]):
        return task_loss(params, buffers, task, **(config | {"lr": with_rates(rates)}))

    grads, (value, metrics) = grad_and_value(loss_of, argnums=(0, 1), has_aux=True)(*inputs)
    return grads, value, metrics


def _task_loss_and_grads_by_autograd(
    inputs: tuple[Params, list[Tensor]], buffers: Params, task: Tasks, *, with_rates: Callable, **config
) -> tuple[tuple[Params, list[Tensor]], Tensor, dict]:
    """`_task_loss_and_grads_with_rates` by plain `torch.autograd.grad`: the same function and the same
    result, for the loop strategy. With no vmap around it, the batch_norm bug cannot arise, and
    torch.func's transform layers only cost time: 1.2x (1 inner step) to 1.4x (5 steps) per meta-batch on
    the Omniglot ConvNet (benchmarks/bench_vs_higher.py --engines fmaml_loop)."""
    params = {name: p.detach().requires_grad_() for name, p in inputs[0].items()}
    rates = [rate.detach().requires_grad_() for rate in inputs[1]]
    with torch.enable_grad():
        value, metrics = task_loss(params, buffers, task, **(config | {"lr": with_rates(rates)}))
        leaves = [*params.values(), *rates]
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]
    param_grads = dict(zip(params, grads[: len(params)], strict=True))
    return (param_grads, grads[len(params) :]), value.detach(), tree_map(Tensor.detach, metrics)


def _learned_rates(lr: InnerLR) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], InnerLR]]:
    """The learned inner rates (the tensors of `lr` that require grad), and the function that rebuilds
    `lr` with other tensors in their places, in the same order."""
    leaves, spec = tree_flatten(lr)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.requires_grad]

    def with_rates(rates: Sequence[Tensor]) -> InnerLR:
        new = list(leaves)
        for i, rate in zip(where, rates, strict=True):
            new[i] = rate
        return tree_unflatten(new, spec)

    return [leaves[i] for i in where], with_rates


def task_loss_and_grad_recompute(
    params: Params,
    buffers: Params,
    task: Tasks,
    *,
    model: nn.Module,
    loss: LossName = "cross_entropy",
    steps: int = 1,
    lr: InnerLR = 0.4,
    first_order: bool = False,
    metrics_before: bool = True,
    step_weights: StepWeights = None,
    learned_rates: Sequence[Tensor] = (),
    with_rates: Callable | None = None,
    inner_optimizer: InnerOptimizer = PLAIN_SGD,
    compute_dtype: torch.dtype | None = None,
) -> tuple[tuple[Params, list[Tensor]], Tensor, dict]:
    """`task_loss_and_grad` in memory that does not grow with the inner steps: ((param grads, rate grads),
    query loss, metrics), the same values to rounding.

    Only the inner iterates z_i = (θ_i, s_i), params and optimizer state, are kept; the meta-gradient runs
    backwards over the steps, each recomputed alone (../shared/DESIGN.md, "Bounded memory"). With the step
    z_{i+1} = Φ_i(z_i, α) = update(∇L_s(θ_i), s_i, θ_i, α, i) and J = Σ_i w_i L_q(θ_i):
        ā = (w_k ∇L_q(θ_k), 0);  for i = k-1 .. 0:  dJ/dα += (∂Φ_i/∂α)ᵀ ā;  ā <- (∂Φ_i/∂z_i)ᵀ ā + (w_i ∇L_q(θ_i), 0)
    and dJ/dθ_0 = ā's θ part (`_adjoint_step`; the last steps start it, `_stored_steps_adjoint`).
    learned_rates, with_rates: `_learned_rates(lr)`'s; the rates' gradient is the second element.
    """
    (x, y), query = task["support"], task["query"]
    rates = list(learned_rates)

    def support_loss(p: Params, step: int) -> Tensor:
        return LOSSES[loss](forward(model, (p, buffers), x, step, compute_dtype), y)

    def query_loss(p: Params, step: int) -> tuple[Tensor, Tensor | None]:
        return _evaluate(p, buffers, *query, model, loss, step, compute_dtype)

    phi = _step_function(
        support_loss, with_rates if learned_rates else (lambda _: lr), inner_optimizer, first_order
    )
    start = max(steps - STORED_STEPS, 0)  # the last STORED_STEPS steps are not recomputed
    weights = [0.0] * (steps - 1) + [1.0] if step_weights is None else list(step_weights)
    iterates = [(params, inner_optimizer.init(params))]  # z_0 .. z_start, without any graph
    for i in range(start):
        iterates.append(phi(*iterates[i], rates, i))
    adjoint, rate_grads, value, metrics = _stored_steps_adjoint(
        phi, query_loss, weights, iterates[start], rates, range(start, steps)
    )
    for i in reversed(range(start)):
        # Here ā = dJ/dz_{i+1} from the later terms: add θ_{i+1}'s own query term, then step back to z_i.
        theta_next, _ = iterates.pop()  # no longer needed after this
        if weights[i] != 0:
            query_grad, value_i = grad_and_value(lambda p, i=i: query_loss(p, i)[0])(theta_next)
            value = value + weights[i] * value_i.detach()
            adjoint = ({n: a + weights[i] * query_grad[n] for n, a in adjoint[0].items()}, adjoint[1])
        del theta_next
        *adjoint, step_rate_grads = _adjoint_step(phi, iterates[i], rates, i, adjoint)
        rate_grads = [total + r for total, r in zip(rate_grads, step_rate_grads, strict=True)]
    if metrics_before:
        metrics |= metrics_before_adapting(params, buffers, query, model, loss, compute_dtype)
    return (adjoint[0], rate_grads), value, metrics


def _step_function(
    support_loss: Callable, rate: Callable, inner_optimizer: InnerOptimizer, first_order: bool
):
    """Φ_i(θ, s, α) -> (θ', s'): inner step i from params θ and optimizer state s, `rate(α)` its `lr`."""

    def phi(theta: Params, state: State, rates: list[Tensor], i: int) -> tuple[Params, State]:
        every_step = _inner_steps(
            support_loss, theta, state, rate(rates), range(i, i + 1), inner_optimizer, first_order
        )
        return next(every_step)

    return phi


def _stored_steps_adjoint(phi: Callable, query_loss: Callable, weights, z, rates: list[Tensor], steps: range):
    """The last inner steps `steps` from z = (θ, s), run with their graphs (their gradients are needed as
    soon as they are built, so recomputing them would only cost time): (ā = dJ/dz of their query terms,
    their share of dJ/dα, their share of J, the last step's metrics)."""

    def loss_of(theta: Params, state: State, rates: list[Tensor]):
        value = 0.0
        for i in steps:
            theta, state = phi(theta, state, rates, i)
            last, accuracy = query_loss(theta, i)
            value = value + weights[i] * last
        return value, (value, _reported(last, accuracy))

    (a_theta, a_state, rate_grads), (value, metrics) = grad(loss_of, argnums=(0, 1, 2), has_aux=True)(
        *z, rates
    )
    return (a_theta, a_state), list(rate_grads), value.detach(), metrics


def _adjoint_step(
    phi: Callable, z, rates: list[Tensor], i: int, adjoint
) -> tuple[Params, State, list[Tensor]]:
    """One step back from ā = dJ/dz_{i+1}: ((∂Φ_i/∂z_i)ᵀ ā, this step's (∂Φ_i/∂α)ᵀ ā), the gradient of
    (z, α) -> <Φ_i(z, α), ā>. Reverse over reverse (through ∇L_s inside Φ): exact under vmap through
    batch_norm, where forward-over-reverse is not. For plain SGD: ā - H_s(θ_i)(α ⊙ ā) and -ā ⊙ g_i."""

    def step_dot(theta: Params, state: State, rates: list[Tensor]) -> Tensor:
        new_theta, new_state = phi(theta, state, rates, i)
        return _dot(new_theta, adjoint[0]) + _dot(new_state, adjoint[1])

    return grad(step_dot, argnums=(0, 1, 2))(*z, rates)


def _dot(a, b) -> Tensor:
    """Σ a·b over two pytrees of tensors of the same structure (0 when they hold none)."""
    return sum(
        ((x * y).sum() for x, y in zip(tree_flatten(a)[0], tree_flatten(b)[0], strict=True)), start=0.0
    )


# ------------------------------------------------------------------------------------------ strategies


def _over_tasks(fn: Callable, params: Params | tuple, buffers: Params, tasks: Tasks, strategy: str):
    """Apply `fn(params, buffers, task)` to every task; outputs are stacked along a new task dim.
    `params` is shared by all tasks: the params, or (params, learned rates)."""
    if strategy == "vmap":
        return vmap(fn, in_dims=(None, None, 0), randomness="different")(params, buffers, tasks)
    if strategy.startswith("chunked:"):
        chunk = int(strategy.removeprefix("chunked:"))
        return vmap(fn, in_dims=(None, None, 0), randomness="different", chunk_size=chunk)(
            params, buffers, tasks
        )
    num_tasks = tasks["support"][0].shape[0]
    return _stacked([fn(params, buffers, _select(tasks, i)) for i in range(num_tasks)])


def _stacked(per_task: list):
    """Per-task outputs (same structure) -> one structure of tensors stacked along a new task dim."""
    return tree_map(lambda *xs: torch.stack(xs), *per_task)


def _select(tasks: Tasks, i: int) -> Tasks:
    return {split: (x[i], y[i]) for split, (x, y) in tasks.items()}


def resolve_strategy(strategy: str, model: nn.Module, device: torch.device | str) -> str:
    """Turn "auto" into a concrete strategy for this model and device.

    The rule, measured by benchmarks/run_cpu.sh (benchmarks/README.md): on CPU, vmap over convolution
    weights runs as a batched grouped convolution whose double backward is slow, so a per-task loop wins
    on conv nets (2.8x on the Omniglot 5-way 5-shot ConvNet, 1.7x to 3.3x across the three ConvNet
    workloads, at a quarter of the memory); on models without convolutions (the sinusoid MLP) vmap wins
    (6.8x). On CUDA, vmap is expected to win on both (not yet measured: no GPU so far).
    """
    if strategy != "auto":
        return strategy
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "loop" if torch.device(device).type == "cpu" and has_conv else "vmap"


# ------------------------------------------------------------------------------------------ meta-batch


class _ExactMetaLoss(torch.autograd.Function):
    """Mean query loss whose backward is the mean of per-task gradients computed in the forward.

    The forward receives the already-computed values; this Function only connects them to its inputs
    (the params, and any learned inner rates) in the autograd graph, so that `.backward()` (and DDP's
    gradient hooks) see the exact gradient.
    """

    @staticmethod
    def forward(ctx, loss: Tensor, grads: tuple[Tensor, ...], *inputs: Tensor) -> Tensor:
        ctx.save_for_backward(*grads)
        ctx.dtypes = [x.dtype for x in inputs]  # under autocast the per-task gradients may be bf16/fp16
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grads = (grad_output * g for g in ctx.saved_tensors)
        return (None, None, *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)))


def meta_loss(
    params: Params,
    buffers: Params,
    tasks: Tasks,
    *,
    model: nn.Module,
    loss: LossName = "cross_entropy",
    steps: int = 1,
    lr: InnerLR = 0.4,
    first_order: bool = False,
    strategy: str = "auto",
    metrics_before: bool = True,
    step_weights: StepWeights = None,
    adapt_only: Collection[str] | None = None,
    memory: Literal["store", "recompute"] = "store",
    inner_optimizer: InnerOptimizer = PLAIN_SGD,
    meta_gradient=None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The MAML meta-objective over a meta-batch: the mean over tasks of the post-adaptation query loss.

    tasks: {"support": (x, y), "query": (x, y)}, x [tasks, ways*shots, C, H, W], y [tasks, ways*shots]
           (regression: x [tasks, K, in], y [tasks, K, out]).
    strategy: how the same per-task function runs over the tasks: "vmap" (all at once), "loop" (one task
              at a time), "chunked:N" (vmap over N tasks at a time), or "auto" (`resolve_strategy`).
    memory: "store" keeps every inner step's graph; "recompute" (`task_loss_and_grad_recompute`) keeps only
            the inner iterates: the same meta-gradient, memory flat in the steps. Not with `adapt_only`.
    meta_gradient: None is MAML's, through the inner loop; else fmaml.meta_gradients' `Implicit` (iMAML)
            or `Reptile`, whose `proximal` term is part of the inner problem, evaluation's too.
    compute_dtype: None, or torch.bfloat16 / torch.float16: mixed precision by casts in every forward
            (`forward`); the inner updates and the meta-gradient stay in the params' dtype.
    The other options: the module docstring and `task_loss`. Returns (loss, metrics): a scalar whose
    `.backward()` puts the exact meta-gradient (second order unless `first_order`) in `.grad`, and per-task
    tensors [tasks]: loss, accuracy (classification), with `metrics_before` loss_before, accuracy_before.
    """
    check_arguments(
        params, tasks, model=model, loss=loss, steps=steps, lr=lr, strategy=strategy, step_weights=step_weights,
        adapt_only=adapt_only, memory=memory, inner_optimizer=inner_optimizer, compute_dtype=compute_dtype,
        first_order=first_order, meta_gradient=meta_gradient,
    )  # fmt: skip
    strategy = resolve_strategy(strategy, model, tasks["support"][0].device)
    config = dict(
        model=model, loss=loss, steps=steps, lr=lr, first_order=first_order, metrics_before=metrics_before,
        step_weights=step_weights, adapt_only=adapt_only, inner_optimizer=inner_optimizer,
        compute_dtype=compute_dtype,
    ) | ({"proximal": meta_gradient.proximal} if meta_gradient is not None else {})  # fmt: skip
    names = [name for name, p in params.items() if p.requires_grad]
    learned, with_rates = _learned_rates(lr) if torch.is_grad_enabled() else ([], None)
    if not (torch.is_grad_enabled() and (names or learned)):  # evaluation: inner gradients only
        _, metrics = _over_tasks(
            lambda p, b, t: task_loss(p, b, t, **config), params, buffers, tasks, strategy
        )
        return metrics["loss"].mean(), metrics
    # Detached inputs: the gradient reaches params (and rates) only through _ExactMetaLoss, never twice.
    detached = ({name: p.detach() for name, p in params.items()}, [rate.detach() for rate in learned])
    per_task = _per_task_meta_gradient(config, memory, meta_gradient, with_rates, strategy)
    (grads, rate_grads), values, metrics = _mean_over_tasks(per_task, detached, buffers, tasks, strategy)
    mean_grads = (*(grads[name] for name in names), *rate_grads)
    inputs = (*(params[name] for name in names), *learned)
    return _ExactMetaLoss.apply(values.mean(), mean_grads, *inputs), metrics


def _per_task_meta_gradient(
    config: dict, memory: str, meta_gradient, with_rates: Callable, strategy: str
) -> Callable:
    """One task's meta-gradient as a function of ((params, learned rates), buffers, task), returning
    ((param grads, rate grads), query loss, metrics), by one of three ideas: differentiate through the
    inner loop with every step's graph stored (memory="store"), or recomputed one step at a time on the way
    back (memory="recompute"), or a `meta_gradient` that does not differentiate through it (iMAML, Reptile).
    The loop takes the stored one by plain autograd (`_task_loss_and_grads_by_autograd`), its fast form."""
    if meta_gradient is not None:

        def per_task(inputs: tuple[Params, list[Tensor]], buffers: Params, task: Tasks):
            grads, value, metrics = meta_gradient.task_loss_and_grad(inputs[0], buffers, task, **config)
            return (grads, []), value, metrics

    elif memory == "recompute":
        recompute = {k: v for k, v in config.items() if k != "adapt_only"} | {"with_rates": with_rates}

        def per_task(inputs: tuple[Params, list[Tensor]], buffers: Params, task: Tasks):
            params, rates = inputs
            return task_loss_and_grad_recompute(params, buffers, task, learned_rates=rates, **recompute)

    else:
        stored = _task_loss_and_grads_by_autograd if strategy == "loop" else _task_loss_and_grads_with_rates

        def per_task(inputs: tuple[Params, list[Tensor]], buffers: Params, task: Tasks):
            return stored(inputs, buffers, task, with_rates=with_rates, **config)

    return per_task


def _mean_over_tasks(fn: Callable, inputs, buffers: Params, tasks: Tasks, strategy: str):
    """`fn(inputs, buffers, task) -> (grads, query loss, metrics)` over every task by `strategy`, reduced:
    (the grads' mean over tasks, query losses [tasks], metrics [tasks]). The loop adds each task's grads to
    a running sum, so that one task's meta-gradient is finished, and its graph freed, before the next
    starts: memory of one task, not of the meta-batch (and each chunk of chunked:N is one vmap)."""
    if strategy != "loop":
        grads, values, metrics = _over_tasks(fn, inputs, buffers, tasks, strategy)
        return tree_map(lambda g: g.mean(0), grads), values, metrics
    num_tasks = tasks["support"][0].shape[0]
    total, outputs = None, []
    for i in range(num_tasks):
        grads, value, metrics = fn(inputs, buffers, _select(tasks, i))
        total = grads if total is None else tree_map(torch.Tensor.add_, total, grads)
        outputs.append((value, metrics))
    values, metrics = _stacked(outputs)
    return tree_map(lambda t: t / num_tasks, total), values, metrics


# ------------------------------------------------------------------------------------- MAML++ schedules


def msl_weights(steps: int, meta_step: int, anneal_steps: int) -> list[float]:
    """The multi-step loss weights of MAML++ (Antoniou et al. 2019) at `meta_step`: [steps] floats.

    `get_per_step_loss_importance_vector` of their code, with meta-steps for its epochs: uniform (1/steps)
    at meta-step 0; each earlier step's weight then falls by 1/steps/anneal_steps per meta-step down to
    0.03/steps, and the last step gets the rest, so the weights always sum to 1. (MAML++ then drops the
    multi-step loss after `anneal_steps`: the caller's choice, see fmaml.module.MAML.)
    """
    decay = 1.0 / steps / anneal_steps
    floor = 0.03 / steps
    earlier = [max(1.0 / steps - meta_step * decay, floor)] * (steps - 1)
    last = min(1.0 / steps + meta_step * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [*earlier, last]


# ----------------------------------------------------------------------------------------- validation


def _is_positive_number(value) -> bool:
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value).all() and (value > 0).all())
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def check_steps(steps, name: str = "steps") -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}={steps!r}: the number of inner steps must be an integer >= 1")


def check_lr(lr, name: str = "lr") -> None:
    """One rate: a finite number > 0, or a tensor of them (a per-parameter rate)."""
    if not _is_positive_number(lr):
        raise ValueError(f"{name}={lr!r}: the inner learning rate must be a finite number > 0, e.g. 0.4")


def check_strategy(strategy, name: str = "strategy") -> None:
    if strategy not in ("auto", "vmap", "loop") and not _is_chunked(strategy):
        raise ValueError(f"{name}={strategy!r} is unknown: use one of {', '.join(STRATEGIES)} (N >= 1)")


def check_adapt_only(adapt_only, names: Collection[str], name: str = "adapt_only") -> None:
    """`adapt_only` must be None or a non-empty collection of names among `names` (the params')."""
    if adapt_only is None:
        return
    if isinstance(adapt_only, str) or not isinstance(adapt_only, Collection) or not adapt_only:
        raise ValueError(
            f"{name}={adapt_only!r}: give a non-empty list of parameter names to adapt (or None for all)"
        )
    if unknown := sorted(set(adapt_only) - set(names)):
        raise ValueError(f"{name}: no parameters named {unknown}; the parameters are {list(names)}")


def check_memory(memory, adapt_only=None, name: str = "memory") -> None:
    if memory not in MEMORY:
        raise ValueError(f"{name}={memory!r} is unknown: use one of {', '.join(MEMORY)}")
    if memory == "recompute" and adapt_only is not None:
        raise ValueError(
            f"{name}=recompute does not support adapt_only (ANIL) yet: use {name}=store with adapt_only, "
            "or drop adapt_only"
        )


def check_arguments(
    params: Params,
    tasks: Tasks,
    *,
    model,
    loss,
    steps,
    lr,
    strategy,
    step_weights=None,
    adapt_only=None,
    memory="store",
    inner_optimizer=PLAIN_SGD,
    compute_dtype=None,
    first_order=False,
    meta_gradient=None,
) -> None:
    """Raise a ValueError that names the argument, its value and the fix, before any work starts."""
    check_steps(steps)
    check_compute_dtype(compute_dtype)
    if not isinstance(inner_optimizer, InnerOptimizer):
        raise ValueError(
            f"inner_optimizer={inner_optimizer!r}: give one of fmaml.inner_optimizers' (e.g. SGD())"
        )
    check_memory(memory, adapt_only)
    check_adapt_only(adapt_only, params)
    check_rates(lr, steps, set(params) if adapt_only is None else set(adapt_only))
    if step_weights is not None:
        is_vector = not isinstance(step_weights, Tensor) or step_weights.dim() == 1
        if not is_vector or len(step_weights) != steps:
            raise ValueError(
                f"step_weights={step_weights!r}: give one weight per inner step (steps={steps}), the weight "
                "of the query loss after that step"
            )
    check_strategy(strategy)
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is unknown: use one of {sorted(LOSSES)}")
    check_tasks(tasks)
    if meta_gradient is not None:
        meta_gradient.check(
            first_order=first_order, multi_step_loss=step_weights is not None, adapt_only=adapt_only,
            memory=memory, learned_lr=bool(_learned_rates(lr)[0]),
            per_step_network=getattr(model, "takes_inner_step", False),
        )  # fmt: skip
    for module in model.modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.track_running_stats
            and module.training
        ):
            raise ValueError(
                f"model has {module} tracking running stats in train mode, which adaptation would update "
                "in place: build it with track_running_stats=False (MAML uses batch statistics)"
            )


COMPUTE_DTYPES = (torch.bfloat16, torch.float16)


def check_compute_dtype(compute_dtype, name: str = "compute_dtype") -> None:
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"{name}={compute_dtype!r}: mixed precision computes in torch.bfloat16 or torch.float16; "
            "give one of them, or None to compute in the params' dtype"
        )


def check_rates(lr: InnerLR, steps: int, adapted: set[str]) -> None:
    """`lr` (see `InnerLR`): one rate per inner step if per-step, one per adapted param if a dict."""
    per_step = isinstance(lr, Sequence) and not isinstance(lr, str)
    if per_step and len(lr) != steps:
        raise ValueError(
            f"lr has {len(lr)} per-step rates but steps={steps}: give exactly one rate per inner step"
        )
    for rate in list(lr) if per_step else [lr]:
        for value in rate.values() if isinstance(rate, Mapping) else [rate]:
            # Tensors are not checked: they may be learned rates, which Meta-SGD lets take any sign, and
            # a check would cost a device sync per meta-step. The numbers a user types are.
            if not isinstance(value, Tensor):
                check_lr(value)
        if isinstance(rate, Mapping) and (missing := sorted(adapted - set(rate))):
            raise ValueError(f"lr is a per-parameter dict but has no rate for {missing}: give one per param")


def check_tasks(tasks) -> None:
    """{"support": (x, y), "query": (x, y)}, each [tasks, examples, ...] with one task dimension."""
    if not isinstance(tasks, Mapping) or set(tasks) != {"support", "query"}:
        raise ValueError('tasks must be {"support": (x, y), "query": (x, y)}, got ' + _describe(tasks))
    num_tasks = tasks["support"][0].shape[0]
    for split, (x, y) in tasks.items():
        if x.shape[0] != num_tasks or y.shape[0] != num_tasks:
            raise ValueError(
                f"tasks[{split!r}]: x {tuple(x.shape)} and y {tuple(y.shape)} must share the leading task "
                f"dimension {num_tasks} of the support x"
            )
        if x.dim() < 2 or y.dim() < 2 or x.shape[1] != y.shape[1]:
            raise ValueError(
                f"tasks[{split!r}]: x {tuple(x.shape)} and y {tuple(y.shape)} must be [tasks, examples, ...] "
                "with the same number of examples"
            )


def _is_chunked(strategy) -> bool:
    if not isinstance(strategy, str) or not strategy.startswith("chunked:"):
        return False
    size = strategy.removeprefix("chunked:")
    return size.isdigit() and int(size) >= 1


def _describe(tasks) -> str:
    if isinstance(tasks, Mapping):
        return "a dict with keys " + repr(sorted(tasks))
    return type(tasks).__name__

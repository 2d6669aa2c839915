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
every strategy, for any model. (The loop strategy, which has no vmap, lets autograd differentiate the
loop directly: the same per-task function, one backward pass.)

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
from torch.utils._pytree import tree_flatten, tree_unflatten

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
    metrics = {"loss": last.detach()} | ({"accuracy": accuracy} if accuracy is not None else {})
    if metrics_before:
        with torch.no_grad():  # the "before" numbers are only reported, never differentiated
            value_before, accuracy_before = _evaluate(
                params, buffers, query_x, query_y, model, loss, 0, compute_dtype
            )
        metrics["loss_before"] = value_before
        if accuracy_before is not None:
            metrics["accuracy_before"] = accuracy_before
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
    and dJ/dθ_0 = ā's θ part. Each adjoint step is the gradient of (z, α) -> <Φ_i(z, α), ā>: for plain SGD,
    ā - H_s(θ_i)(α ⊙ ā) and -ā ⊙ g_i. It is reverse over reverse (through ∇L_s inside Φ), exact under vmap
    through batch_norm, where forward-over-reverse is not. First order takes ∇L_s at detached θ inside Φ.
    learned_rates / with_rates: the learned tensors of `lr` and the function that rebuilds `lr` from them
    (`_learned_rates`); their gradient comes out as the second element.
    """
    x, y = task["support"]
    query_x, query_y = task["query"]
    loss_fn = LOSSES[loss]
    rates = list(learned_rates)

    def rate(rates: list[Tensor]) -> InnerLR:
        return with_rates(rates) if learned_rates else lr

    def support_loss(p: Params, step: int) -> Tensor:
        return loss_fn(forward(model, (p, buffers), x, step, compute_dtype), y)

    def query_loss(p: Params, step: int) -> Tensor:
        return _evaluate(p, buffers, query_x, query_y, model, loss, step, compute_dtype)[0]

    # The last STORED_STEPS inner steps are not recomputed: their graphs are needed as soon as they are
    # built, so they run as `task_loss` does (stored) and the recursion starts from their gradient. Each
    # saves one support forward and backward; memory stays flat in the steps (those steps' graphs only).
    start = max(steps - STORED_STEPS, 0)
    weights = [0.0] * (steps - 1) + [1.0] if step_weights is None else list(step_weights)

    # Forward: only the iterates up to z_start, without any graph (support gradients are recomputed later).
    iterates = [(params, inner_optimizer.init(params))]
    iterates += _inner_steps(support_loss, *iterates[0], rate(rates), range(start), inner_optimizer, False)

    def stored_steps_loss(theta: Params, state: State, rates: list[Tensor]):
        every_step = _inner_steps(
            support_loss, theta, state, rate(rates), range(start, steps), inner_optimizer, first_order
        )
        value = 0.0
        for i, (theta, _) in zip(range(start, steps), every_step, strict=True):
            last, accuracy = _evaluate(theta, buffers, query_x, query_y, model, loss, i, compute_dtype)
            value = value + weights[i] * last
        metrics = {"loss": last.detach()} | ({"accuracy": accuracy} if accuracy is not None else {})
        return value, (value, metrics)

    (a_theta, a_state, rate_grads), (value, last_metrics) = grad(
        stored_steps_loss, argnums=(0, 1, 2), has_aux=True
    )(*iterates[start], rates)
    value, rate_grads = value.detach(), list(rate_grads)

    def step_dot(theta: Params, state: State, rates: list[Tensor], i: int, a_theta: Params, a_state: State):
        # <Φ_i(z, α), ā>: its gradient is one adjoint step (and this step's share of dJ/dα).
        step = _inner_steps(
            support_loss, theta, state, rate(rates), range(i, i + 1), inner_optimizer, first_order
        )
        new_theta, new_state = next(step)
        return _dot(new_theta, a_theta) + _dot(new_state, a_state)

    for i in reversed(range(start)):
        # Here ā = dJ/dz_{i+1} from the later terms: add θ_{i+1}'s own query term, then step back to z_i.
        theta_next, _ = iterates.pop()  # no longer needed after this
        if weights[i] != 0:
            query_grad, value_i = grad_and_value(query_loss)(theta_next, i)
            value = value + weights[i] * value_i.detach()
            a_theta = {n: a_theta[n] + weights[i] * query_grad[n] for n in a_theta}
        del theta_next
        a_theta, a_state, step_rate_grads = grad(step_dot, argnums=(0, 1, 2))(
            *iterates[i], rates, i, a_theta, a_state
        )
        rate_grads = [total + r for total, r in zip(rate_grads, step_rate_grads, strict=True)]

    metrics = {k: v.detach() for k, v in last_metrics.items()}
    if metrics_before:
        value_before, accuracy_before = _evaluate(
            params, buffers, query_x, query_y, model, loss, 0, compute_dtype
        )
        metrics["loss_before"] = value_before.detach()
        if accuracy_before is not None:
            metrics["accuracy_before"] = accuracy_before
    return (a_theta, rate_grads), value, metrics


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
    return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *per_task)


def _select(tasks: Tasks, i: int) -> Tasks:
    return {split: (x[i], y[i]) for split, (x, y) in tasks.items()}


def resolve_strategy(strategy: str, model: nn.Module, device: torch.device | str) -> str:
    """Turn "auto" into a concrete strategy for this model and device.

    The rule, measured by benchmarks/run_cpu.sh (README, "Benchmarks"): on CPU, vmap over convolution
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
    strategy: how the same per-task function runs over the tasks: "vmap" (torch.func.vmap, all at once),
              "loop" (a Python loop), "chunked:N" (vmap over N tasks at a time, to bound memory), or
              "auto" (see `resolve_strategy`). All give the same loss and meta-gradient.
    lr: see `InnerLR`; its tensors that require grad are learned inner rates (Meta-SGD, MAML++ LSLR).
    inner_optimizer: the inner loop's update rule (fmaml.inner_optimizers: SGD with momentum, Adam, RMSprop,
              ...), its state fresh for every task, `lr` its rate; plain SGD by default.
    step_weights [steps]: the multi-step loss (MAML++ MSL, see `msl_weights`); None: the last step's only.
    adapt_only: the names of the params the inner loop adapts (ANIL); None: all of them.
    memory: "store" keeps every inner step's graph for the meta-gradient (memory grows with the steps);
            "recompute" keeps only the inner iterates and recomputes one step at a time on the way back
            (`task_loss_and_grad_recompute`): the same exact meta-gradient, memory flat in the steps, for
            about one more inner forward and backward per step. Not with `adapt_only` (yet).
    meta_gradient: None is MAML's, differentiated through the inner loop. Otherwise an object of
            fmaml.meta_gradients (`Implicit`: iMAML; `Reptile`) whose `task_loss_and_grad(params, buffers,
            task, **config)` gives one task's meta-gradient without differentiating through the inner steps,
            run over the tasks by the same strategies; its `proximal` term is part of the inner problem
            (evaluation adapts with it too), and its `check` refuses the options it cannot honour.
    compute_dtype: None (the params' dtype), or torch.bfloat16 / torch.float16 for mixed precision under
            every strategy: each forward casts to it inside the per-task function (see `forward`), while
            the inner updates, the meta-gradient and its mean over tasks stay in the params' float32.
    Under "loop" (and each chunk of "chunked:N") one task's (chunk's) meta-gradient is finished before the
    next starts, so memory grows with one task (chunk), not the meta-batch.
    Returns (loss, metrics): `loss` is a scalar; when grad is enabled and some param (or learned rate)
    requires grad, `loss.backward()` puts the exact (second-order unless `first_order`) meta-gradient in
    `.grad`. `metrics` holds per-task tensors [tasks]: loss, and for classification accuracy (after the
    last inner step); with `metrics_before` (one more query forward per task) also loss_before and
    accuracy_before.
    """
    check_arguments(
        params,
        tasks,
        model=model,
        loss=loss,
        steps=steps,
        lr=lr,
        strategy=strategy,
        step_weights=step_weights,
        adapt_only=adapt_only,
        memory=memory,
        inner_optimizer=inner_optimizer,
        compute_dtype=compute_dtype,
    )
    if meta_gradient is not None:
        meta_gradient.check(
            first_order=first_order, multi_step_loss=step_weights is not None, adapt_only=adapt_only,
            memory=memory, learned_lr=bool(_learned_rates(lr)[0]),
            per_step_network=getattr(model, "takes_inner_step", False),
        )  # fmt: skip
    strategy = resolve_strategy(strategy, model, tasks["support"][0].device)
    config = dict(
        model=model,
        loss=loss,
        steps=steps,
        lr=lr,
        first_order=first_order,
        metrics_before=metrics_before,
        step_weights=step_weights,
        adapt_only=adapt_only,
        inner_optimizer=inner_optimizer,
        compute_dtype=compute_dtype,
    ) | ({"proximal": meta_gradient.proximal} if meta_gradient is not None else {})
    names = [name for name, p in params.items() if p.requires_grad]
    learned, with_rates = _learned_rates(lr) if torch.is_grad_enabled() else ([], None)
    if not (torch.is_grad_enabled() and (names or learned)):
        # Evaluation: inner gradients only (torch.func.grad works under no_grad), no meta-gradient.
        _, metrics = _over_tasks(
            lambda p, b, t: task_loss(p, b, t, **config), params, buffers, tasks, strategy
        )
        return metrics["loss"].mean(), metrics

    inputs = [*(params[name] for name in names), *learned]
    # Detached inputs: the gradient reaches params (and rates) only through _ExactMetaLoss, never twice.
    detached = {name: p.detach() for name, p in params.items()}
    detached_inputs = (detached, [rate.detach() for rate in learned])
    recompute = {k: v for k, v in config.items() if k != "adapt_only"} | {"with_rates": with_rates}

    def recomputed(inputs: tuple[Params, list[Tensor]], b: Params, t: Tasks):
        p, rates = inputs
        return task_loss_and_grad_recompute(p, b, t, learned_rates=rates, **recompute)

    if meta_gradient is not None:
        # iMAML, Reptile: no graph through the inner steps, so one per-task function for every strategy.
        def per_task(p: Params, b: Params, t: Tasks):
            return meta_gradient.task_loss_and_grad(p, b, t, **config)

        grads, values, metrics = _over_tasks(per_task, detached, buffers, tasks, strategy)
        mean_grads = tuple(grads[name].mean(0) for name in names)
        return _ExactMetaLoss.apply(values.mean(), mean_grads, *inputs), metrics

    if strategy == "loop":
        # Without vmap the batch_norm bug cannot arise, so plain autograd can differentiate each task. Each
        # task's meta-gradient is finished (and its graph freed) before the next starts, and summed at
        # once: memory of one task, not of the meta-batch.
        num_tasks = tasks["support"][0].shape[0]
        total, values, per_task_metrics = None, [], []
        for i in range(num_tasks):
            if memory == "store":
                value, metrics = task_loss(params, buffers, _select(tasks, i), **config)
                grads = torch.autograd.grad(value, inputs, allow_unused=True)
                grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
            else:
                (g, rate_g), value, metrics = recomputed(detached_inputs, buffers, _select(tasks, i))
                grads = [*(g[name] for name in names), *rate_g]
            total = grads if total is None else [t.add_(g) for t, g in zip(total, grads, strict=True)]
            values.append(value.detach())
            per_task_metrics.append(metrics)
        metrics = _stacked(per_task_metrics)
        mean_grads = tuple(t / num_tasks for t in total)
        return _ExactMetaLoss.apply(torch.stack(values).mean(), mean_grads, *inputs), metrics

    if memory == "recompute":
        (grads, rate_grads), values, metrics = _over_tasks(
            recomputed, detached_inputs, buffers, tasks, strategy
        )
        mean_grads = (*(grads[name].mean(0) for name in names), *(g.mean(0) for g in rate_grads))
    elif not learned:

        def per_task(p: Params, b: Params, t: Tasks):
            return task_loss_and_grad(p, b, t, **config)

        grads, values, metrics = _over_tasks(per_task, detached, buffers, tasks, strategy)
        mean_grads = tuple(grads[name].mean(0) for name in names)
    else:

        def per_task(inputs: tuple[Params, list[Tensor]], b: Params, t: Tasks):
            return _task_loss_and_grads_with_rates(inputs, b, t, with_rates=with_rates, **config)

        (grads, rate_grads), values, metrics = _over_tasks(
            per_task, detached_inputs, buffers, tasks, strategy
        )
        mean_grads = (*(grads[name].mean(0) for name in names), *(g.mean(0) for g in rate_grads))
    return _ExactMetaLoss.apply(values.mean(), mean_grads, *inputs), metrics


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

"""MAML++'s per-step BatchNorm (Antoniou et al. 2019, "How to train your MAML"): BNWB and BNRS.

- BNWB: a BatchNorm weight and bias per inner step, [steps, C]. Inner step i (its support forward, and
  the query forward after it) uses row min(i, steps - 1): evaluation may run more steps than training,
  and those reuse the last row.
- BNRS: running statistics per inner step, buffers running_mean / running_var [steps, C]. In train mode
  the layer normalises with batch statistics, as MAML does; in eval mode (Lightning's validation and test)
  with the running statistics of the step, as the MAML++ paper describes. (MAML++'s code,
  meta_neural_network_architectures.py MetaBatchNormLayer, calls F.batch_norm(training=True) always: it
  collects per-step statistics but normalises with batch statistics even at evaluation.)

The layer never updates anything in place in its forward, so it runs under vmap and every strategy.
The running statistics are functional state, updated outside the differentiated computation:
`task_statistics` gives one task's batch statistics of each layer's input in the support forward of
each inner step i, at θ_i, along the inner trajectory θ_0 .. θ_{k-1} (fmaml.maml.adapt_steps);
`fold_statistics` applies a meta-batch of them with the layer's momentum, task after task in order,
exactly as sequential nn.BatchNorm2d(track_running_stats=True) forwards would; `update_running_statistics`
does both for a model, over the tasks by the meta-loss's strategies (fmaml.module calls it every training
meta-step). Only the support forwards count: MAML++'s code also updates the statistics in the query
forwards (and in its evaluation forwards, which it then rolls back).

Costs and limits: the statistics pass re-runs the inner trajectory without a graph (k support forwards and
k - 1 inner gradients per task; 22% of a second-order, 33% of a first-order meta-step of the Omniglot
5-way 5-shot ConvNet with 5 steps, loop, on one CPU core), which strategy="auto" does not time. Under DDP
each process folds only its own tasks' statistics (DDP's buffer broadcast, if on, would then spread rank
0's; not checked yet). A meta-step whose meta-loss is not finite may fold non-finite statistics; training
then stops before any checkpoint holds them (fmaml.module).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmaml.inner_optimizers import InnerLR, InnerOptimizer
from fmaml.maml import PLAIN_SGD, Params, Tasks, _over_tasks, adapt_steps, forward, resolve_strategy

# Per layer (its module name): the batch mean and unbiased variance of its input, each [..., steps, C].
Statistics = dict[str, tuple[Tensor, Tensor]]


class PerStepBatchNorm2d(nn.Module):
    """BatchNorm2d with a weight and bias per inner step (BNWB) and, with `running_stats`, running
    statistics per inner step (BNRS). Called as layer(x, inner_step); see this module's docstring."""

    def __init__(
        self, num_features: int, steps: int, running_stats: bool = False, eps: float = 1e-5, momentum=0.1
    ):
        super().__init__()
        self.steps, self.eps, self.momentum = steps, eps, momentum
        # BatchNorm's init (scale 1, offset 0) in every row.
        self.weight = nn.Parameter(torch.ones(steps, num_features))
        self.bias = nn.Parameter(torch.zeros(steps, num_features))
        self.register_buffer("running_mean", torch.zeros(steps, num_features) if running_stats else None)
        self.register_buffer("running_var", torch.ones(steps, num_features) if running_stats else None)

    def forward(self, x: Tensor, inner_step: int = 0) -> Tensor:
        row = min(inner_step, self.steps - 1)
        if self.training or self.running_mean is None:
            return F.batch_norm(x, None, None, self.weight[row], self.bias[row], training=True, eps=self.eps)
        return F.batch_norm(
            x, self.running_mean[row], self.running_var[row], self.weight[row], self.bias[row], eps=self.eps
        )

    def extra_repr(self) -> str:
        features, running = self.weight.shape[1], self.running_mean is not None
        return f"{features}, steps={self.steps}, running_stats={running}, eps={self.eps}, momentum={self.momentum}"


def statistics_layers(model: nn.Module) -> dict[str, PerStepBatchNorm2d]:
    """The model's per-step BatchNorm layers that keep running statistics, by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, PerStepBatchNorm2d) and module.running_mean is not None
    }


def _input_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel (dim 1): the mean and the unbiased variance, as BatchNorm's running_var uses."""
    # Under autocast the features may be half precision; the statistics are kept in float32 at least.
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    dims = (0, *range(2, x.dim()))
    return x.mean(dims), x.var(dims, correction=1)


def _forward_statistics(
    model: nn.Module, names: Collection[str], tensors, x: Tensor, step: int, compute_dtype=None
) -> Statistics:
    """The statistics of each named layer's input in one forward of the model at inner step `step`."""
    modules = dict(model.named_modules())
    seen: Statistics = {}

    def recorder(name: str):
        def hook(module, args):
            seen[name] = _input_statistics(args[0])

        return hook

    handles = [modules[name].register_forward_pre_hook(recorder(name)) for name in names]
    try:
        forward(model, tensors, x, step, compute_dtype)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def task_statistics(
    params: Params,
    buffers: Params,
    task: Tasks,
    *,
    model: nn.Module,
    steps: int,
    lr: InnerLR,
    adapt_only: Collection[str] | None = None,
    inner_optimizer: InnerOptimizer = PLAIN_SGD,
    proximal: float = 0.0,
    compute_dtype: torch.dtype | None = None,
) -> Statistics:
    """One task's statistics of each running-statistics layer's input (statistics_layers) in the support
    forward of inner step i at θ_i, for i = 0 .. steps - 1: {name: (mean [steps, C], var [steps, C])}.
    Values only: call it without grad (the trajectory's values do not depend on the derivative order)."""
    names = list(statistics_layers(model))
    inner = dict(
        model=model, steps=steps, lr=lr, first_order=True, adapt_only=adapt_only,
        inner_optimizer=inner_optimizer, proximal=proximal, compute_dtype=compute_dtype,
    )  # fmt: skip
    later = itertools.islice(adapt_steps(params, buffers, task["support"], **inner), steps - 1)
    x = task["support"][0]
    per_step = [
        _forward_statistics(model, names, (theta, buffers), x, i, compute_dtype)
        for i, theta in enumerate(itertools.chain([params], later))
    ]
    return {
        name: (torch.stack([s[name][0] for s in per_step]), torch.stack([s[name][1] for s in per_step]))
        for name in names
    }


def fold_statistics(
    running_mean: Tensor, running_var: Tensor, means: Tensor, variances: Tensor, momentum: float = 0.1
) -> tuple[Tensor, Tensor]:
    """One layer's running statistics [rows, C] after a meta-batch of batch statistics [tasks, steps, C]:
    task after task, step after step, row min(step, rows - 1) <- (1 - momentum) row + momentum batch,
    torch's BatchNorm update. Returns new tensors (the inputs are left as they are)."""
    new_mean, new_var = running_mean.clone(), running_var.clone()
    rows = running_mean.shape[0]
    for task, step in itertools.product(range(means.shape[0]), range(means.shape[1])):
        row = min(step, rows - 1)
        new_mean[row] = (1 - momentum) * new_mean[row] + momentum * means[task, step].to(new_mean.dtype)
        new_var[row] = (1 - momentum) * new_var[row] + momentum * variances[task, step].to(new_var.dtype)
    return new_mean, new_var


@torch.no_grad()
def update_running_statistics(
    model: nn.Module,
    tasks: Tasks,
    *,
    steps: int,
    lr: InnerLR,
    strategy: str = "auto",
    adapt_only: Collection[str] | None = None,
    inner_optimizer: InnerOptimizer = PLAIN_SGD,
    first_order: bool = False,
    step_weights=None,
    meta_gradient=None,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Fold a meta-batch's per-step statistics (`task_statistics` of every task, by `strategy`) into the
    model's running-statistics buffers, in task order. Call it with the params the meta-step used (before
    the meta-optimizer's update), in train mode (the trajectory is the one training takes). The arguments
    are the meta-loss's; first_order and step_weights do not change the trajectory, so they are unused."""
    layers = statistics_layers(model)
    if not layers:
        return
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    inner = dict(
        model=model, steps=steps, lr=lr, adapt_only=adapt_only, inner_optimizer=inner_optimizer,
        proximal=meta_gradient.proximal if meta_gradient is not None else 0.0, compute_dtype=compute_dtype,
    )  # fmt: skip
    strategy = resolve_strategy(strategy, model, tasks["support"][0].device)
    statistics = _over_tasks(
        lambda p, b, t: task_statistics(p, b, t, **inner), params, buffers, tasks, strategy
    )
    for name, layer in layers.items():
        means, variances = statistics[name]
        new_mean, new_var = fold_statistics(
            layer.running_mean, layer.running_var, means, variances, layer.momentum
        )
        layer.running_mean.copy_(new_mean)
        layer.running_var.copy_(new_var)

"""Where fmaml's CPU loop loses to `higher` on the ConvNet: torch.func.grad against torch.autograd.grad.

    uv run python benchmarks/inner_grad_overhead.py

Omniglot 5-way 5-shot shapes, meta-batch 32, 1 inner step, second order, one process, engines run
round-robin (so machine drift hits all alike); prints median seconds per meta-step and the ratio to higher.
The two `autograd_*` variants are the same math with the inner gradient from torch.autograd.grad.
"""

import statistics
import time

import higher
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fmaml import ConvNet, meta_loss

torch.manual_seed(0)
model = ConvNet(5)
params = dict(model.named_parameters())
T, LR = 32, 0.4
xs, ys = torch.randn(T, 25, 1, 28, 28), torch.randint(0, 5, (T, 25))
xq, yq = torch.randn(T, 75, 1, 28, 28), torch.randint(0, 5, (T, 75))
tasks = {"support": (xs, ys), "query": (xq, yq)}
inner_opt = torch.optim.SGD(model.parameters(), lr=LR)


def with_higher():
    for i in range(T):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(F.cross_entropy(fmodel(xs[i]), ys[i]))
            (F.cross_entropy(fmodel(xq[i]), yq[i]) / T).backward()


def fmaml_loop():
    meta_loss(params, {}, tasks, model=model, steps=1, lr=LR, strategy="loop")[0].backward()


def adapted_query_loss(i):
    support = F.cross_entropy(functional_call(model, params, (xs[i],)), ys[i])
    grads = torch.autograd.grad(support, list(params.values()), create_graph=True)
    fast = {name: p - LR * g for (name, p), g in zip(params.items(), grads, strict=True)}
    return F.cross_entropy(functional_call(model, fast, (xq[i],)), yq[i]) / T


def autograd_loop():
    sum(adapted_query_loss(i) for i in range(T)).backward()


def autograd_per_task():
    for i in range(T):
        adapted_query_loss(i).backward()


engines = {
    "higher": with_higher,
    "fmaml_loop": fmaml_loop,
    "autograd_loop": autograd_loop,
    "autograd_per_task": autograd_per_task,
}
times = {name: [] for name in engines}
for _ in range(5):
    for name, step in engines.items():
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - start)
medians = {name: statistics.median(t[1:]) for name, t in times.items()}  # the first round is warm-up
for name, median in medians.items():
    print(f"{name:18s} {median:.3f} s  {medians['higher'] / median:.2f}x higher")

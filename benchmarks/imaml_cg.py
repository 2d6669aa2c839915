"""iMAML's conjugate-gradient convergence: the relative error of fmaml's implicit meta-gradient
(fmaml.meta_gradients.Implicit) against the exact one, per number of CG iterations, in float64.

    OMP_NUM_THREADS=1 taskset -c 0 uv run python benchmarks/imaml_cg.py --json benchmarks/results/imaml_cg.json

Two workloads, one fixed seed, a meta-batch of --tasks random tasks, the error of the meta-batch's mean
meta-gradient (what meta_loss(...).backward() leaves in .grad):
- sinusoid: the MLP 1-40-40-1 (1761 weights), K = 10, its config's inner rate 0.01, --sinusoid-steps inner
  steps. The exact gradient is tests/test_imaml.py's reference: its own inner loop on the proximal problem,
  the Hessian built explicitly (torch.autograd.functional.hessian) and torch.linalg.solve(I + H/λ, ∇L_q).
- omniglot5w1s: the MAML ConvNet (--filters, stride 2, BatchNorm on batch statistics) on random data of
  Omniglot's shapes, 5-way 1-shot, 1x28x28, 1 query per class, with configs/omniglot_imaml.yaml's inner
  loop (16 SGD steps) at --omniglot-lrs: 0.1 (the config's) with λ = 2, smaller with larger λ, since SGD on
  the proximal problem diverges once lr (λ + H's top eigenvalue, about 50 here) > 2. Its Hessian (112k
  weights at 64 filters) is too large to build, so the reference is fmaml's own CG run for --reference-cg
  iterations; the difference between half that and it is reported, to show whether it has converged.
For each λ of --lams (2.0: the iMAML paper's 5-way Omniglot value), also the extreme eigenvalues of
I + H/λ over the tasks (power iteration): CG solves the system only where it is positive definite, which
holds at the proximal problem's minimum (H + λI >= 0 there) but not necessarily after a few inner steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent / "tests"))  # the exact reference of tests/test_imaml.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_vs_higher import classification_tasks, sinusoid_tasks  # noqa: E402
from test_imaml import _exact_implicit, _Flat, _reference_phi  # noqa: E402
from torch.func import functional_call, grad  # noqa: E402

from fmaml import MLP, ConvNet, meta_loss  # noqa: E402
from fmaml.meta_gradients import Implicit  # noqa: E402


def fmaml_gradient(model, tasks, loss, steps, lr, lam, cg_steps, strategy) -> torch.Tensor:
    """fmaml's mean implicit meta-gradient, flattened in the model's parameter order."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    value, _ = meta_loss(
        params, {}, tasks, model=model, loss=loss, steps=steps, lr=lr, strategy=strategy, metrics_before=False,
        meta_gradient=Implicit(lam=lam, cg_steps=cg_steps),
    )  # fmt: skip
    value.backward()
    return torch.cat([p.grad.reshape(-1) for p in params.values()])


def exact_sinusoid_gradient(model, tasks, steps, lr, lam) -> torch.Tensor:
    flat = _Flat(model)
    per_task = []
    for t in range(tasks["support"][0].shape[0]):
        support = (tasks["support"][0][t], tasks["support"][1][t])
        query = (tasks["query"][0][t], tasks["query"][1][t])
        phi = _reference_phi(flat, support, steps, lr, lam)
        per_task.append(_exact_implicit(flat, phi, support, query, lam))
    return torch.stack(per_task).mean(0)


def support_hessian_vector_product(model, support, loss_fn, steps, lr, lam):
    """v -> H v, H the support loss's Hessian at the φ of `steps` SGD steps on the proximal problem (a
    torch.func loop of its own, not fmaml's), all as flat vectors."""
    flat = _Flat(model)
    x, y = support

    def support_loss(vector):
        return loss_fn(functional_call(model, flat.unflatten(vector), (x,)), y)

    phi = flat.theta
    for _ in range(steps):
        phi = phi - lr * grad(lambda v: support_loss(v) + lam / 2 * ((v - flat.theta) ** 2).sum())(phi)
    return lambda v: grad(lambda p: torch.dot(grad(support_loss)(p), v))(phi)


def extreme_eigenvalues(matvec, size: int, iterations: int, seed: int) -> tuple[float, float]:
    """(lowest, highest) eigenvalue estimates of a symmetric operator by power iteration: on it for the
    highest |eigenvalue|, then on (shift I - it) for the lowest. Each is a Rayleigh quotient, so the lowest
    is an upper bound: below 0 proves the operator indefinite."""

    def power(operator):
        v = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        for _ in range(iterations):
            v = operator(v)
            v = v / v.norm()
        return torch.dot(v, operator(v)).item()

    top = power(matvec)
    shift = abs(top)
    lowest = shift - power(lambda v: shift * v - matvec(v))
    return min(lowest, top), max(lowest, top)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def double(tasks: dict) -> dict:
    return {
        split: (x.double(), y.double() if y.is_floating_point() else y) for split, (x, y) in tasks.items()
    }


def lowest_and_highest(model, tasks, loss_fn, steps, lr, lam, seed) -> dict:
    """The extreme eigenvalues of I + H/λ over the meta-batch's tasks (power-iteration estimates)."""
    size = sum(p.numel() for p in model.parameters())
    pairs = []
    for t in range(tasks["support"][0].shape[0]):
        support = (tasks["support"][0][t], tasks["support"][1][t])
        hessian_vector = support_hessian_vector_product(model, support, loss_fn, steps, lr, lam)
        pairs.append(extreme_eigenvalues(lambda v, h=hessian_vector: v + h(v) / lam, size, 100, seed))
    return {"lowest": min(low for low, _ in pairs), "highest": max(high for _, high in pairs)}


def sinusoid(args, lam: float) -> dict:
    torch.manual_seed(args.seed)
    model = MLP().double()
    tasks = double(sinusoid_tasks(args.tasks, torch.Generator().manual_seed(args.seed)))
    setting = dict(steps=args.sinusoid_steps, lr=0.01, lam=lam)
    exact = exact_sinusoid_gradient(model, tasks, **setting)
    errors = {
        n: relative(fmaml_gradient(model, tasks, "mse", **setting, cg_steps=n, strategy="vmap"), exact)
        for n in args.cg_steps
    }
    return dict(
        setting, weights=sum(p.numel() for p in model.parameters()), relative_error=errors,
        reference="explicit Hessian (torch.autograd.functional.hessian) + torch.linalg.solve",
        eigenvalues_of_I_plus_H_over_lam=lowest_and_highest(model, tasks, F.mse_loss, **setting, seed=args.seed),
    )  # fmt: skip


def omniglot(args, lam: float, lr: float) -> dict:
    torch.manual_seed(args.seed)
    model = ConvNet(5, in_channels=1, filters=args.filters, image_size=28, pooling="stride").double()
    make = classification_tasks(ways=5, shots=1, query=1, channels=1, size=28)
    tasks = double(make(args.tasks, torch.Generator().manual_seed(args.seed)))
    setting = dict(steps=16, lr=lr, lam=lam)

    def gradient(cg_steps):
        return fmaml_gradient(model, tasks, "cross_entropy", **setting, cg_steps=cg_steps, strategy="loop")

    exact = gradient(args.reference_cg)
    half = args.reference_cg // 2
    errors = {n: relative(gradient(n), exact) for n in args.cg_steps}
    return dict(
        setting, weights=sum(p.numel() for p in model.parameters()), filters=args.filters,
        relative_error=errors, reference=f"fmaml's CG with {args.reference_cg} iterations",
        reference_check={f"cg {half} vs cg {args.reference_cg}": relative(gradient(half), exact)},
        eigenvalues_of_I_plus_H_over_lam=lowest_and_highest(
            model, tasks, F.cross_entropy, **setting, seed=args.seed
        ),
    )  # fmt: skip


def markdown_table(results: dict, cg_steps: list[int]) -> str:
    columns = [(name, lam) for name, by_lam in results.items() for lam in by_lam]
    header = " | ".join(f"{name}, λ = {lam:g}" for name, lam in columns)
    lines = [f"| CG iterations | {header} |", "|---|" + "---|" * len(columns)]
    for n in cg_steps:
        cells = " | ".join(f"{results[name][lam]['relative_error'][n]:.2e}" for name, lam in columns)
        lines.append(f"| {n} | {cells} |")
    cells = " | ".join(
        "[{lowest:.2f}, {highest:.1f}]".format(**results[name][lam]["eigenvalues_of_I_plus_H_over_lam"])
        for name, lam in columns
    )
    lines.append(f"| eigenvalues of I + H/λ | {cells} |")
    return "\n".join(lines)


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=BENCHMARKS)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "fmaml"], capture_output=True, text=True, cwd=BENCHMARKS
    )
    return done.stdout.strip() + (" (fmaml/ modified)" if dirty.stdout.strip() else "")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cg-steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 3, 5, 10, 20]
    )
    parser.add_argument("--lams", type=lambda s: [float(v) for v in s.split(",")], default=[2.0, 10.0, 100.0])
    parser.add_argument("--tasks", type=int, default=4, help="the meta-batch")
    parser.add_argument("--sinusoid-steps", type=int, default=5)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument(
        "--omniglot-lrs",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[0.1, 0.01, 0.001],
        help="the ConvNet's inner rate for each of --lams",
    )
    parser.add_argument("--reference-cg", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {
        "sinusoid": {lam: sinusoid(args, lam) for lam in args.lams},
        "omniglot5w1s": {
            lam: omniglot(args, lam, lr) for lam, lr in zip(args.lams, args.omniglot_lrs, strict=True)
        },
    }
    print(markdown_table(results, args.cg_steps))
    for name, by_lam in results.items():
        for lam, result in by_lam.items():
            print(f"{name}, λ = {lam:g}: reference {result['reference']}", result.get("reference_check", ""))
    record = {
        "command": " ".join([os.path.relpath(sys.argv[0], BENCHMARKS.parent), *sys.argv[1:]]),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "float64",
        "seed": args.seed,
        "tasks": args.tasks,
        "workloads": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()

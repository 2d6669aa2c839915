"""Mixed precision under every strategy, by explicit casts (fmaml.maml.forward's `compute_dtype`).

Autocast fails inside vmap in this torch, so the engine casts the params, buffers and inputs to bf16/fp16
for each forward inside the per-task function, and keeps the inner updates, the meta-gradient and the
weights in float32. Checked here:
- the casts are where they should be: every strategy matches a hand-written bf16 MLP (plain autograd, its
  own casts) far more closely than float32 does;
- on the ConvNet, each strategy x memory mode's bf16 (and fp16) meta-gradient is within the bound the
  loop meets under torch.autocast on the same meta-batch (relative error and cosine, with a margin);
- `--trainer.precision=bf16-mixed` trains with vmap and chunked, and auto measures bf16 candidates;
- a compute dtype that is not a half precision is refused, naming the argument.
"""

import pytest
import torch
import torch.nn.functional as F
from fixtures import config
from lightning.pytorch.plugins.precision import MixedPrecision

from fmaml import meta_loss, module
from fmaml.cli import main
from fmaml.meta_gradients import Implicit
from fmaml.models import MLP, ConvNet

STRATEGIES = ("vmap", "chunked:2", "loop")
# The bound: what the loop under torch.autocast (fmaml's only mixed precision before the casts) gives on
# the same meta-batch, relative error and 1 - cosine, with this much room (explicit casts also run
# BatchNorm in bf16, which autocast leaves in float32).
MARGIN = 1.5


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def fmaml_meta_gradient(model, tasks, compute_dtype, **options) -> torch.Tensor:
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    value, _ = meta_loss(params, {}, tasks, model=model, compute_dtype=compute_dtype, **options)
    value.backward()
    assert all(p.grad.dtype == torch.float32 for p in params.values()), "the meta-gradient left float32"
    return flat(p.grad for p in params.values())


# ---------------------------------------------------------------------------- against a hand-written bf16 MLP


def sinusoid_tasks(num_tasks=4, k=10):
    g = torch.Generator().manual_seed(0)
    amplitude = torch.rand(num_tasks, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(num_tasks, 1, 1, generator=g) * 3.14
    x = torch.rand(num_tasks, 2 * k, 1, generator=g) * 10 - 5
    y = amplitude * torch.sin(x - phase)
    return {"support": (x[:, :k], y[:, :k]), "query": (x[:, k:], y[:, k:])}


def reference_meta_gradient(model, tasks, dtype, steps=2, lr=0.01) -> torch.Tensor:
    """MAML by plain autograd over an MLP written out by hand, casting each layer's operands to `dtype`
    (None: float32) and its output back to float32; inner SGD in float32."""
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    low = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))

    def net(p, x):
        h = low(x)
        for i in range(0, len(p) - 2, 2):
            h = torch.relu(F.linear(h, low(p[i]), low(p[i + 1])))
        return F.linear(h, low(p[-2]), low(p[-1])).float()

    total = [torch.zeros_like(p) for p in params]
    num_tasks = tasks["support"][0].shape[0]
    for t in range(num_tasks):
        (xs, ys), (xq, yq) = ((x[t], y[t]) for x, y in (tasks["support"], tasks["query"]))
        fast = params
        for _ in range(steps):
            grads = torch.autograd.grad(F.mse_loss(net(fast, xs), ys), fast, create_graph=True)
            fast = [p - lr * g for p, g in zip(fast, grads, strict=True)]
        for acc, g in zip(total, torch.autograd.grad(F.mse_loss(net(fast, xq), yq), params), strict=True):
            acc += g / num_tasks
    return flat(total)


def test_the_loop_computes_the_hand_written_bf16_network_and_vmap_stays_within_the_bound():
    """The loop runs the very ops of the hand-written bf16 network (to the last bit); vmap and chunked run
    batched kernels, whose bf16 rounding differs, and equal each other."""
    torch.manual_seed(0)
    model, tasks = MLP(), sinusoid_tasks()
    options = dict(loss="mse", steps=2, lr=0.01, metrics_before=False)
    bf16_reference = reference_meta_gradient(model, tasks, torch.bfloat16)
    float32_reference = reference_meta_gradient(model, tasks, None)
    assert relative_error(float32_reference, bf16_reference) > 1e-3, "the reference's bf16 is not in effect"
    loop = fmaml_meta_gradient(model, tasks, torch.bfloat16, strategy="loop", **options)
    assert relative_error(loop, bf16_reference) < 1e-6
    vmap = fmaml_meta_gradient(model, tasks, torch.bfloat16, strategy="vmap", **options)
    # Its bf16 rounding is in the second-order terms (the first-order inner gradients agree with the loop's
    # to 1e-4): 2.5% off float32 against the loop's 0.9%, within a few percent.
    assert 1e-3 < relative_error(vmap, float32_reference) < 0.05
    chunked = fmaml_meta_gradient(model, tasks, torch.bfloat16, strategy="chunked:2", **options)
    assert relative_error(chunked, vmap) < 1e-6
    float32 = fmaml_meta_gradient(model, tasks, None, strategy="vmap", **options)
    assert relative_error(float32, float32_reference) < 1e-5


# --------------------------------------------------------------------------------- the ConvNet's bound


def image_tasks(num_tasks=4, ways=5, shots=5, size=28):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_tasks, 2 * ways * shots, 1, size, size, generator=g)
    y = torch.arange(ways).repeat_interleave(shots).repeat(num_tasks, 2)
    half = ways * shots
    return {"support": (x[:, :half], y[:, :half]), "query": (x[:, half:], y[:, half:])}


def agreement(low: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    return relative_error(low, reference), F.cosine_similarity(low, reference, 0).item()


@pytest.fixture(scope="module")
def convnet():
    """A ConvNet, a meta-batch, its float32 meta-gradient, and the loop under torch.autocast's bound."""
    torch.manual_seed(0)
    model, tasks = ConvNet(ways=5, filters=32), image_tasks()
    options = dict(loss="cross_entropy", steps=1, lr=0.4, metrics_before=False)
    float32 = fmaml_meta_gradient(model, tasks, None, strategy="loop", **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_error, autocast_cosine = agreement(
            fmaml_meta_gradient(model, tasks, None, strategy="loop", **options), float32
        )
    bound = (MARGIN * autocast_error, 1 - MARGIN * (1 - autocast_cosine))
    return model, tasks, options, float32, bound


@pytest.mark.parametrize("memory", ["store", "recompute"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_convnet_meta_gradient_within_the_autocast_loops_bound(convnet, strategy, memory):
    model, tasks, options, float32, (most_error, least_cosine) = convnet
    bf16 = fmaml_meta_gradient(model, tasks, torch.bfloat16, strategy=strategy, memory=memory, **options)
    error, cosine = agreement(bf16, float32)
    print(f"{strategy} {memory}: relative error {error:.3g} (bound {most_error:.3g}), cosine {cosine:.4f}")
    assert 1e-3 < error < most_error and cosine > least_cosine


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_fp16_convnet_meta_gradient_within_the_autocast_loops_bound(convnet, strategy):
    model, tasks, options, float32, (most_error, least_cosine) = convnet
    error, cosine = agreement(
        fmaml_meta_gradient(model, tasks, torch.float16, strategy=strategy, **options), float32
    )
    assert 1e-4 < error < most_error and cosine > least_cosine


def test_imaml_under_bf16_vmap_stays_near_float32(convnet):
    model, tasks, options, _, (most_error, least_cosine) = convnet
    imaml = dict(options, strategy="vmap", meta_gradient=Implicit(lam=2.0, cg_steps=3))
    error, cosine = agreement(
        fmaml_meta_gradient(model, tasks, torch.bfloat16, **imaml),
        fmaml_meta_gradient(model, tasks, None, **imaml),
    )
    assert 1e-3 < error < most_error and cosine > least_cosine


@pytest.mark.parametrize("bad", [torch.float64, torch.int8, "bf16"])
def test_a_compute_dtype_that_is_not_half_precision_is_refused(bad):
    model, tasks = MLP(), sinusoid_tasks()
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"compute_dtype=.*torch\.bfloat16 or torch\.float16"):
        meta_loss(params, {}, tasks, model=model, loss="mse", compute_dtype=bad)


# --------------------------------------------------------------------------------------------- the CLI

TINY = ["--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--data.meta_batch_size=4"]


def meta_loss_calls(monkeypatch, where: str) -> list[tuple]:
    """(strategy, compute_dtype) of every meta_loss call through `where`, as they happen."""
    calls = []

    def recording(*args, **kwargs):
        calls.append((kwargs.get("strategy"), kwargs.get("compute_dtype")))
        return meta_loss(*args, **kwargs)

    monkeypatch.setattr(where, recording)
    return calls


@pytest.mark.parametrize("strategy", ["vmap", "chunked:2"])
def test_bf16_mixed_trains_with_vmap_and_chunked(tmp_path, monkeypatch, strategy):
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", config("sinusoid.yaml"), *TINY, "--trainer.max_steps=3"]
    calls = meta_loss_calls(monkeypatch, "fmaml.module.meta_loss")
    cli = main([*fit, "--trainer.precision=bf16-mixed", f"--model.execution.strategy={strategy}"])
    assert cli.trainer.global_step == 3
    assert calls and set(calls) == {(strategy, torch.bfloat16)}
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in cli.model.parameters())


def test_auto_measures_bf16_candidates(tmp_path, monkeypatch):
    """Under bf16-mixed, auto times every strategy (vmap and chunked too), each in bf16 as it will run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FMAML_CACHE_DIR", str(tmp_path / "cache"))
    measured = meta_loss_calls(monkeypatch, "fmaml.auto_strategy.meta_loss")
    fit = ["fit", "--config", config("sinusoid.yaml"), *TINY, "--trainer.max_steps=1"]
    cli = main([*fit, "--trainer.precision=bf16-mixed", "--model.execution.strategy=auto"])
    assert cli.model.strategy_choice.choice["precision"] == "bf16-mixed"
    assert {dtype for _, dtype in measured} == {torch.bfloat16}
    assert {"loop", "vmap", "chunked:2"} <= {strategy for strategy, _ in measured}


def test_16_mixed_clips_the_true_meta_gradient_not_the_scaled_one(tmp_path, monkeypatch):
    """Under 16-mixed the meta-gradient carries Lightning's loss scale (65536) until the meta-optimizer's
    step unscales it: clipping must bound the true one, so one SGD(lr=1) step moves the weights by exactly
    the clip norm (clipping the scaled one would move them 65536x less)."""
    monkeypatch.chdir(tmp_path)
    clip, moved = 1e-2, []
    original = module._clip_meta_gradient

    def recording(optimizer, *args, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        moved.append((params, [p.detach().clone() for p in params]))
        return original(optimizer, *args, **kwargs)

    monkeypatch.setattr(module, "_clip_meta_gradient", recording)
    sgd = ["--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=1.0", "--model.execution.strategy=vmap"]
    fit = ["fit", "--config", config("sinusoid.yaml"), *TINY, "--trainer.max_steps=1", *sgd]
    # On CPU, --trainer.precision=16-mixed falls back to bf16-mixed: the plugin itself brings the scaler.
    plugin = [f"--trainer.plugins={MixedPrecision.__module__}.MixedPrecision", "--trainer.plugins.device=cpu"]
    cli = main(
        [*fit, *plugin, "--trainer.plugins.precision=16-mixed", f"--model.meta_objective.clip_norm={clip}"]
    )
    assert cli.trainer.precision == "16-mixed" and cli.trainer.precision_plugin.scaler is not None
    ((params, before),) = moved
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before, strict=True)])
    assert change.norm().item() == pytest.approx(clip, rel=1e-3)

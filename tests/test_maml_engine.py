"""The engine against an independent reference (`higher`), strategies against each other, and bad input."""

import higher
import pytest
import torch
import torch.nn.functional as F

from fmaml import MLP, ConvNet, meta_loss
from fmaml.maml import LOSSES

STRATEGIES = ["vmap", "loop", "chunked:2", "auto"]


def _classification_tasks(num_tasks=3, ways=5, shots=2, query=3, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.randn(num_tasks, ways * n, 1, size, size, generator=g, dtype=torch.float64)
        y = torch.arange(ways).repeat_interleave(n).expand(num_tasks, -1).clone()
        return x, y

    return {"support": split(shots), "query": split(query)}


def _regression_tasks(num_tasks=4, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(num_tasks, 1, 1, generator=g, dtype=torch.float64) * torch.pi

    def split():
        x = torch.rand(num_tasks, k, 1, generator=g, dtype=torch.float64) * 10 - 5
        return x, 2 * torch.sin(x + phase)

    return {"support": split(), "query": split()}


def _conv_case():
    torch.manual_seed(0)
    return ConvNet(5, filters=4).double(), _classification_tasks(), "cross_entropy"


def _mlp_case():
    torch.manual_seed(0)
    return MLP().double(), _regression_tasks(), "mse"


def higher_meta_gradient(model, tasks, loss, steps, lr, first_order):
    """The original project's formulation: a per-task loop with higher's differentiable SGD."""
    loss_fn = LOSSES[loss]
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    (xs, ys), (xq, yq) = tasks["support"], tasks["query"]
    num_tasks = xs.shape[0]
    inner_opt = torch.optim.SGD(params, lr=lr)
    for i in range(num_tasks):
        with higher.innerloop_ctx(
            model, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order
        ) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_fn(fmodel(xs[i]), ys[i]))
            query_loss = loss_fn(fmodel(xq[i]), yq[i]) / num_tasks
            # First order: higher detaches the fast weights, so the FOMAML meta-gradient is the query
            # gradient at the adapted weights.
            wrt = list(fmodel.parameters()) if first_order else params
            for t, g in zip(total, torch.autograd.grad(query_loss, wrt), strict=True):
                t += g
    return dict(zip((n for n, _ in model.named_parameters()), total, strict=True))


def fmaml_meta_gradient(model, tasks, loss, steps, lr, first_order, strategy, **options):
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    value, metrics = meta_loss(
        params,
        {},
        tasks,
        model=model,
        loss=loss,
        steps=steps,
        lr=lr,
        first_order=first_order,
        strategy=strategy,
        **options,
    )
    value.backward()
    return {n: p.grad for n, p in params.items()}, value, metrics


def relative_error(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    return (num / sum((b[k] ** 2).sum() for k in b).sqrt()).item()


@pytest.mark.parametrize("case", [_conv_case, _mlp_case], ids=["convnet_bn", "mlp"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_meta_gradient_equals_higher(case, steps, first_order, strategy):
    model, tasks, loss = case()
    lr = 0.4 if loss == "cross_entropy" else 0.01
    reference = higher_meta_gradient(model, tasks, loss, steps, lr, first_order)
    grads, _, _ = fmaml_meta_gradient(model, tasks, loss, steps, lr, first_order, strategy)
    assert relative_error(grads, reference) <= 1e-9


def test_first_and_second_order_differ():
    """Guards the test above against a reference that ignores `first_order`."""
    model, tasks, loss = _conv_case()
    second, _, _ = fmaml_meta_gradient(model, tasks, loss, 2, 0.4, False, "loop")
    first, _, _ = fmaml_meta_gradient(model, tasks, loss, 2, 0.4, True, "loop")
    assert relative_error(first, second) > 1e-3


@pytest.mark.parametrize("case", [_conv_case, _mlp_case], ids=["convnet_bn", "mlp"])
def test_strategies_agree(case):
    model, tasks, loss = case()
    results = {s: fmaml_meta_gradient(model, tasks, loss, 2, 0.1, False, s) for s in STRATEGIES}
    grads0, value0, metrics0 = results["loop"]
    for strategy, (grads, value, metrics) in results.items():
        assert relative_error(grads, grads0) <= 1e-12, strategy
        torch.testing.assert_close(value, value0, rtol=1e-12, atol=0)
        for name in metrics0:
            torch.testing.assert_close(metrics[name], metrics0[name], rtol=1e-12, atol=0)


def test_batchnorm_20way_1shot_vmap_is_exact():
    """Regression: autograd over vmap(grad(f)) through batch_norm is wrong (functorch#534), so a
    naive vmap MAML is ~50x off on 20-way 1-shot; fmaml's vmap must match the loop in float64."""
    torch.manual_seed(1)
    model = ConvNet(20, filters=4).double()
    tasks = _classification_tasks(num_tasks=4, ways=20, shots=1, query=1, seed=1)
    loop, _, _ = fmaml_meta_gradient(model, tasks, "cross_entropy", 1, 0.1, False, "loop")
    vmapped, _, _ = fmaml_meta_gradient(model, tasks, "cross_entropy", 1, 0.1, False, "vmap")
    reference = higher_meta_gradient(model, tasks, "cross_entropy", 1, 0.1, False)
    assert relative_error(vmapped, reference) <= 1e-9
    assert relative_error(loop, reference) <= 1e-9


def test_metrics_before_and_after_adaptation():
    model, tasks, loss = _conv_case()
    params = {n: p.detach() for n, p in model.named_parameters()}
    value, metrics = meta_loss(params, {}, tasks, model=model, loss=loss, steps=3, lr=0.4, strategy="vmap")
    assert set(metrics) == {"loss", "loss_before", "accuracy", "accuracy_before"}
    assert all(m.shape == (3,) for m in metrics.values())
    torch.testing.assert_close(value, metrics["loss"].mean())
    # The "before" loss is the query loss of the unadapted model, computed independently here.
    (_, _), (xq, yq) = tasks["support"], tasks["query"]
    before = torch.stack([F.cross_entropy(model(xq[i]), yq[i]) for i in range(3)])
    torch.testing.assert_close(metrics["loss_before"], before)
    assert not torch.allclose(metrics["loss"], metrics["loss_before"])
    # Without them (training steps that write no logs), the same loss and no extra forward pass's output.
    cheap, cheap_metrics = meta_loss(
        params, {}, tasks, model=model, loss=loss, steps=3, lr=0.4, strategy="vmap", metrics_before=False
    )
    assert set(cheap_metrics) == {"loss", "accuracy"}
    torch.testing.assert_close(cheap, value)


def test_evaluation_adapts_under_no_grad():
    """Validation runs under no_grad; adaptation must still happen (torch.func.grad ignores it)."""
    model, tasks, loss = _mlp_case()
    tasks = {"support": tasks["support"], "query": tasks["support"]}  # SGD on it must lower its loss
    params = dict(model.named_parameters())
    with torch.no_grad():
        value, metrics = meta_loss(params, {}, tasks, model=model, loss=loss, steps=5, lr=0.01)
    assert not value.requires_grad
    assert (metrics["loss"] < metrics["loss_before"]).all()
    with_grad, _ = meta_loss(params, {}, tasks, model=model, loss=loss, steps=5, lr=0.01)
    torch.testing.assert_close(value, with_grad.detach(), rtol=1e-12, atol=0)


def test_per_parameter_and_per_step_rates_equal_scalar():
    model, tasks, loss = _mlp_case()
    params = {n: p.detach() for n, p in model.named_parameters()}
    scalar, _ = meta_loss(params, {}, tasks, model=model, loss=loss, steps=2, lr=0.01)
    per_param = {n: torch.full_like(p, 0.01) for n, p in params.items()}
    value, _ = meta_loss(params, {}, tasks, model=model, loss=loss, steps=2, lr=[per_param, 0.01])
    torch.testing.assert_close(value, scalar, rtol=1e-12, atol=0)
    other, _ = meta_loss(params, {}, tasks, model=model, loss=loss, steps=2, lr=[0.01, 0.05])
    assert not torch.allclose(other, scalar)


def test_meta_training_learns_sinusoid():
    """A few hundred meta-steps on sinusoid tasks: adaptation must then help a lot."""
    torch.manual_seed(0)
    model = MLP()
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(params.values(), lr=5e-3)

    def sinusoid_tasks(num_tasks=25, k=10):
        amplitude = torch.rand(num_tasks, 1, 1) * 4.9 + 0.1
        phase = torch.rand(num_tasks, 1, 1) * torch.pi
        x = torch.rand(num_tasks, 2 * k, 1) * 10 - 5
        y = amplitude * torch.sin(x + phase)
        return {"support": (x[:, :k], y[:, :k]), "query": (x[:, k:], y[:, k:])}

    for _ in range(400):
        optimizer.zero_grad()
        value, _ = meta_loss(params, {}, sinusoid_tasks(), model=model, loss="mse", steps=1, lr=0.01)
        value.backward()
        optimizer.step()
    with torch.no_grad():
        _, metrics = meta_loss(params, {}, sinusoid_tasks(200), model=model, loss="mse", steps=5, lr=0.01)
    after, before = metrics["loss"].mean().item(), metrics["loss_before"].mean().item()
    assert after < 0.5 * before, (after, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps=0"),
        ({"steps": 1.5}, "steps=1.5"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": -0.1}, "lr=-0.1"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"lr": [0.1, 0.2], "steps": 3}, "steps=3"),
        ({"strategy": "pmap"}, "strategy='pmap'"),
        ({"strategy": "chunked:0"}, "strategy='chunked:0'"),
        ({"loss": "hinge"}, "loss='hinge'"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    model, tasks, loss = _mlp_case()
    params = dict(model.named_parameters())
    kwargs = {"loss": loss, **kwargs}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        meta_loss(params, {}, tasks, model=model, **kwargs)


def test_mismatched_shapes_raise_clear_errors():
    model, tasks, loss = _mlp_case()
    params = dict(model.named_parameters())
    xs, ys = tasks["support"]
    bad = {"support": (xs, ys[:-1]), "query": tasks["query"]}
    with pytest.raises(ValueError, match=r"tasks\['support'\].*leading task dimension"):
        meta_loss(params, {}, bad, model=model, loss=loss)
    bad = {"support": (xs, ys[:, :-1]), "query": tasks["query"]}
    with pytest.raises(ValueError, match=r"tasks\['support'\].*same number of examples"):
        meta_loss(params, {}, bad, model=model, loss=loss)
    with pytest.raises(ValueError, match="support"):
        meta_loss(params, {}, {"train": tasks["support"]}, model=model, loss=loss)


def test_batchnorm_with_running_stats_is_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    tasks = _regression_tasks()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        meta_loss(dict(model.named_parameters()), dict(model.named_buffers()), tasks, model=model, loss="mse")

"""memory="recompute" (the reverse recursion over inner steps) and the per-task loop: the same exact
meta-gradient as higher, the unrolled reference and central finite differences, in float64."""

import pytest
import torch
from fixtures import TINY, config
from test_maml_engine import _conv_case, _mlp_case, fmaml_meta_gradient, higher_meta_gradient, relative_error
from test_maml_options import CASES, _learned_rates, engine_gradient, unrolled_reference
from test_maml_options import _conv_case as _conv_case_with_head
from test_maml_options import _mlp_case as _mlp_case_with_head
from test_maml_options import relative_error as relative_error_lists

from fmaml import MLP, meta_loss
from fmaml.cli import main

STRATEGIES = ["vmap", "loop", "chunked:2"]


@pytest.mark.parametrize("case", [_conv_case, _mlp_case], ids=["convnet_bn", "mlp"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_recompute_meta_gradient_equals_higher(case, steps, first_order, strategy):
    model, tasks, loss = case()
    lr = 0.4 if loss == "cross_entropy" else 0.01
    reference = higher_meta_gradient(model, tasks, loss, steps, lr, first_order)
    grads, value, metrics = fmaml_meta_gradient(
        model, tasks, loss, steps, lr, first_order, strategy, memory="recompute"
    )
    assert relative_error(grads, reference) <= 1e-9
    _, stored_value, stored_metrics = fmaml_meta_gradient(
        model, tasks, loss, steps, lr, first_order, strategy
    )
    torch.testing.assert_close(value, stored_value, rtol=1e-12, atol=0)
    for name, values in stored_metrics.items():
        torch.testing.assert_close(metrics[name], values, rtol=1e-12, atol=0)


@CASES
@pytest.mark.parametrize("kind", ["per_parameter", "per_layer_per_step"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_recompute_learned_rates_equal_unrolled_reference(case, kind, strategy):
    model, tasks, loss, base, _ = case()
    wrt, lr, rate = _learned_rates(model, kind, base, steps=3)
    value_ref, reference = unrolled_reference(model, tasks, loss, 3, rate, wrt=wrt)
    value, _, grads = engine_gradient(model, tasks, loss, 3, lr, strategy, wrt=wrt, memory="recompute")
    torch.testing.assert_close(value, value_ref, rtol=1e-12, atol=0)
    assert relative_error_lists(grads, reference) <= 1e-9
    assert relative_error_lists(grads[-len(wrt) :], reference[-len(wrt) :]) <= 1e-9


@CASES
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_recompute_multi_step_loss_equals_unrolled_reference(case, strategy, first_order):
    model, tasks, loss, base, _ = case()
    weights = [0.2, 0.3, 0.5]
    value_ref, reference = unrolled_reference(
        model, tasks, loss, 3, lambda step, n: base, step_weights=weights, first_order=first_order
    )
    value, _, grads = engine_gradient(
        model,
        tasks,
        loss,
        3,
        base,
        strategy,
        step_weights=weights,
        first_order=first_order,
        memory="recompute",
    )
    torch.testing.assert_close(value, value_ref, rtol=1e-12, atol=0)
    assert relative_error_lists(grads, reference) <= 1e-9


@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_meta_gradient_agrees_with_central_finite_differences(memory):
    """An independent check of the second-order meta-gradient: (J(θ + εe) - J(θ - εe)) / 2ε per entry."""
    torch.manual_seed(0)
    model = MLP(hidden=(3,)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 6, 1, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.sin(x + torch.rand(2, 1, 1, generator=g, dtype=torch.float64))
    tasks = {"support": (x[:, :3], y[:, :3]), "query": (x[:, 3:], y[:, 3:])}
    config = dict(model=model, loss="mse", steps=3, lr=0.3, strategy="loop", memory=memory)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    meta_loss(params, {}, tasks, **config)[0].backward()

    def objective(p):
        with torch.no_grad():
            return meta_loss(p, {}, tasks, **config)[0].item()

    eps = 1e-6
    for name, param in params.items():
        numeric = torch.zeros_like(param)
        for i in range(param.numel()):
            plus = {n: p.detach().clone() for n, p in params.items()}
            minus = {n: p.detach().clone() for n, p in params.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            numeric.view(-1)[i] = (objective(plus) - objective(minus)) / (2 * eps)
        torch.testing.assert_close(param.grad, numeric, rtol=1e-6, atol=1e-8)


def test_first_order_recompute_differs_from_second_order():
    model, tasks, loss = _mlp_case()
    second, _, _ = fmaml_meta_gradient(model, tasks, loss, 3, 0.01, False, "vmap", memory="recompute")
    first, _, _ = fmaml_meta_gradient(model, tasks, loss, 3, 0.01, True, "vmap", memory="recompute")
    assert relative_error(first, second) > 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory": "disk"}, r"memory='disk' is unknown: use one of store, recompute"),
        (
            {"memory": "recompute", "adapt_only": ["head.weight"]},
            r"memory=recompute does not support adapt_only",
        ),
    ],
)
def test_bad_memory_arguments_raise_clear_errors(kwargs, message):
    model, tasks, loss, base, _ = _conv_case_with_head()
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=message):
        meta_loss(params, {}, tasks, model=model, loss=loss, lr=base, **kwargs)


def test_loop_meta_gradient_reaches_learned_rates_and_params_once():
    """The per-task loop hands one summed gradient to autograd: .grad is the mean, not doubled."""
    model, tasks, loss, base, _ = _mlp_case_with_head()
    wrt, lr, rate = _learned_rates(model, "per_parameter", base, steps=2)
    _, reference = unrolled_reference(model, tasks, loss, 2, rate, wrt=wrt)
    _, _, grads = engine_gradient(model, tasks, loss, 2, lr, "loop", wrt=wrt)
    assert relative_error_lists(grads, reference) <= 1e-9


def test_cli_trains_with_recompute_like_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = [
        "fit",
        "--config",
        config("sinusoid.yaml"),
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=0",
    ]
    store = main([*fit, *TINY, "--trainer.logger.init_args.name=store"]).model
    recompute = main(
        [*fit, *TINY, "--trainer.logger.init_args.name=recompute", "--model.execution.memory=recompute"]
    ).model
    for (name, a), b in zip(store.state_dict().items(), recompute.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match=r"model\.execution\.memory=recompute does not support adapt_only"):
        main([*fit, *TINY, "--model.execution.memory=recompute", "--model.inner_loop.adapt_only=[layers.4]"])

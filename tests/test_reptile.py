"""Issue 21: Reptile's meta-gradient (fmaml.meta_gradients.Reptile) is the meta-batch's mean of θ - φ, φ from
a plain loop of a real `torch.optim` optimizer on a deep copy of the network, in float64; the same under
every strategy; MAML's options that need a graph through the inner steps are refused; and the CLI trains
with it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from fixtures import TINY, config
from test_maml_engine import _classification_tasks, _regression_tasks

from fmaml import MLP, ConvNet, meta_loss
from fmaml import inner_optimizers as fo
from fmaml.cli import main
from fmaml.meta_gradients import Reptile

STEPS, TASKS = 4, 3
LOSSES = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}
# The inner optimizer pairs: torch.optim's class and arguments, and fmaml's equivalent. Adam with β1 = 0 is
# the Reptile paper's inner loop.
OPTIMIZERS = {
    "adam_beta1_0": (
        torch.optim.Adam,
        {"lr": 0.01, "betas": (0.0, 0.999)},
        fo.Adam(lr=0.01, betas=(0.0, 0.999)),
    ),
    "sgd": (torch.optim.SGD, {"lr": 0.05}, fo.SGD(lr=0.05)),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, fo.SGD(lr=0.05, momentum=0.9)),
}


def _mlp_case():
    torch.manual_seed(0)
    return MLP(1, 1, (8, 8)).double(), _regression_tasks(TASKS, k=10), "mse"


def _conv_case():
    torch.manual_seed(0)
    return ConvNet(5, filters=4).double(), _classification_tasks(TASKS, shots=1, query=2), "cross_entropy"


def reference(model, tasks, loss, torch_optimizer, options):
    """(mean of θ - φ over the tasks, per-task query loss at φ): torch.optim on a deep copy per task."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    directions, query_losses = [], []
    for t in range(TASKS):
        task_model = copy.deepcopy(model)
        optimizer = torch_optimizer(task_model.parameters(), **options)
        x, y = tasks["support"][0][t], tasks["support"][1][t]
        for _ in range(STEPS):
            optimizer.zero_grad()
            LOSSES[loss](task_model(x), y).backward()
            optimizer.step()
        phi = dict(task_model.named_parameters())
        directions.append({n: theta[n] - phi[n].detach() for n in theta})
        with torch.no_grad():
            query_losses.append(LOSSES[loss](task_model(tasks["query"][0][t]), tasks["query"][1][t]))
    mean = {n: torch.stack([d[n] for d in directions]).mean(0) for n in theta}
    return mean, torch.stack(query_losses)


def fmaml_reptile(model, tasks, loss, inner_optimizer, strategy="vmap"):
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    value, metrics = meta_loss(
        params, {}, tasks, model=model, loss=loss, steps=STEPS, lr=inner_optimizer.lr, strategy=strategy,
        inner_optimizer=inner_optimizer, meta_gradient=Reptile(),
    )  # fmt: skip
    value.backward()
    return {n: p.grad for n, p in params.items()}, value, metrics


def relative(a: dict, b: dict) -> float:
    difference = sum(((a[n] - b[n]) ** 2).sum() for n in b).sqrt()
    return (difference / sum((b[n] ** 2).sum() for n in b).sqrt()).item()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_meta_gradient_is_theta_minus_phi_of_torch_optim(optimizer):
    model, tasks, loss = _mlp_case()
    torch_optimizer, options, inner_optimizer = OPTIMIZERS[optimizer]
    expected, query_losses = reference(model, tasks, loss, torch_optimizer, options)
    grads, value, metrics = fmaml_reptile(model, tasks, loss, inner_optimizer)
    assert relative(grads, expected) <= 1e-10
    torch.testing.assert_close(metrics["loss"], query_losses, rtol=1e-10, atol=0)
    torch.testing.assert_close(value.detach(), query_losses.mean(), rtol=1e-10, atol=0)
    # Else the test could not see a meta-gradient of zeros.
    assert sum(d.abs().sum() for d in expected.values()) > 1e-3


def test_batchnorm_convnet_classification():
    """The ConvNet, BatchNorm with batch statistics, cross-entropy: torch.optim's Adam loop in train mode.
    The convolutions' biases, which BatchNorm cancels, have a gradient of rounding errors only (<= 1e-15),
    which Adam's normalisation scales up to ~1e-10 differently in the two loops: both must leave them ~0."""
    model, tasks, loss = _conv_case()
    torch_optimizer, options, inner_optimizer = OPTIMIZERS["adam_beta1_0"]
    expected, query_losses = reference(model, tasks, loss, torch_optimizer, options)
    grads, _, metrics = fmaml_reptile(model, tasks, loss, inner_optimizer, strategy="loop")
    cancelled = {n for n in expected if n.startswith("features.") and n.endswith(".0.bias")}
    assert len(cancelled) == 4
    assert (
        relative(
            {n: grads[n] for n in expected if n not in cancelled},
            {n: expected[n] for n in expected if n not in cancelled},
        )
        <= 1e-10
    )
    assert max(max(grads[n].abs().max(), expected[n].abs().max()) for n in cancelled) <= 1e-8
    torch.testing.assert_close(metrics["loss"], query_losses, rtol=1e-10, atol=0)
    assert {"accuracy", "accuracy_before", "loss_before"} <= set(metrics)


@pytest.mark.parametrize("strategy", ["loop", "chunked:2"])
def test_strategies_agree(strategy):
    model, tasks, loss = _mlp_case()
    inner_optimizer = OPTIMIZERS["adam_beta1_0"][2]
    vmapped, value, metrics = fmaml_reptile(model, tasks, loss, inner_optimizer)
    other, other_value, other_metrics = fmaml_reptile(model, tasks, loss, inner_optimizer, strategy)
    assert relative(other, vmapped) <= 1e-12
    torch.testing.assert_close(other_value, value, rtol=1e-12, atol=0)
    for name in ("loss", "loss_before"):
        torch.testing.assert_close(other_metrics[name], metrics[name], rtol=1e-12, atol=0)


def test_an_sgd_meta_step_at_rate_1_lands_on_the_mean_of_the_adapted_weights():
    """The paper's update θ <- θ + ε (φ̄ - θ): the meta-gradient handed to torch.optim.SGD(lr=ε)."""
    model, tasks, loss = _mlp_case()
    torch_optimizer, options, inner_optimizer = OPTIMIZERS["sgd"]
    direction, _ = reference(model, tasks, loss, torch_optimizer, options)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    theta = {n: p.detach().clone() for n, p in params.items()}
    meta_optimizer = torch.optim.SGD(params.values(), lr=1.0)
    value, _ = meta_loss(
        params, {}, tasks, model=model, loss=loss, steps=STEPS, lr=inner_optimizer.lr,
        inner_optimizer=inner_optimizer, meta_gradient=Reptile(),
    )  # fmt: skip
    value.backward()
    meta_optimizer.step()
    mean_phi = {n: theta[n] - direction[n] for n in theta}
    assert relative({n: p.detach() for n, p in params.items()}, mean_phi) <= 1e-12


def _learned_lr(model):
    return {n: torch.full_like(p, 0.05, requires_grad=True) for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"first_order": True}, "first_order"),
        ({"step_weights": [0.25] * STEPS}, "multi-step loss"),
        ({"adapt_only": ["layers.4.weight"]}, "adapt_only"),
        ({"memory": "recompute"}, "memory=recompute"),
        ({"lr": _learned_lr}, "learn_lr"),
    ],
)
def test_maml_only_options_are_refused(options, message):
    model, tasks, loss = _mlp_case()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    options = {"lr": 0.05} | {k: v(model) if callable(v) else v for k, v in options.items()}
    with pytest.raises(ValueError, match=message) as error:
        meta_loss(params, {}, tasks, model=model, loss=loss, steps=STEPS, meta_gradient=Reptile(), **options)
    assert "Reptile" in str(error.value)


# ------------------------------------------------------------------------------------------------- CLI


def _trained_weights(*options) -> dict:
    fit = ["fit", "--config", config("sinusoid.yaml"), *TINY, "--model.network.hidden=[8,8]"]
    fit += [
        "--model.execution.strategy=vmap",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        *options,
    ]
    module = main(fit).model
    return module, {n: p.detach().clone() for n, p in module.network.named_parameters()}


def test_the_cli_trains_with_reptile(in_tmp):
    """`--model.meta_objective.meta_gradient=fmaml.meta_gradients.Reptile` reaches the training step: other weights than
    MAML's after the same 2 meta-steps (tests/test_meta_gradient_cli.py covers the refusals and a test run)."""
    module, reptile = _trained_weights("--model.meta_objective.meta_gradient=fmaml.meta_gradients.Reptile")
    assert isinstance(module.train_inner["meta_gradient"], Reptile)
    _, maml = _trained_weights()
    assert relative(reptile, maml) > 1e-4

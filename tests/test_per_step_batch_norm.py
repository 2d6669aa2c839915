"""MAML++'s per-step BatchNorm (BNWB, BNRS) against a hand-written reference: one BatchNorm per inner step,
a plain autograd loop, sharing nothing with fmaml but the initial weights (float64, a tiny ConvNet)."""

import pytest
import torch
import torch.nn.functional as F
from fixtures import TINY, config, tiny_omniglot_root
from torch import nn

from fmaml.cli import main
from fmaml.maml import adapt, forward, meta_loss
from fmaml.models import BatchNormSettings, ConvNet
from fmaml.per_step_batch_norm import update_running_statistics

BATCH_NORM = "model.network.init_args.batch_norm"  # spelled out: the name a user types

TASKS, WAYS, SHOTS, SIZE, FILTERS, LR = 3, 2, 2, 8, 3, 0.1


def make_tasks(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(WAYS).repeat(SHOTS).expand(TASKS, -1)

    def x():
        return torch.randn(TASKS, WAYS * SHOTS, 1, SIZE, SIZE, generator=generator, dtype=torch.float64)

    return {"support": (x(), y), "query": (x(), y)}


def per_step_convnet(rows: int, running_stats: bool = True) -> ConvNet:
    torch.manual_seed(0)
    model = ConvNet(WAYS, filters=FILTERS, image_size=SIZE, batch_norm=BatchNormSettings(rows, running_stats))
    return model.double()


# ------------------------------------------------------------------------------------------ the reference


def reference_forward(theta, x, step, rows, batch_norms=None, running=None):
    """The ConvNet by hand. Train mode: batch statistics (through `batch_norms[layer][row]`, which then
    track them, when given); eval mode: `running[layer] = (mean, var)`, each [rows, C]."""
    h = x
    for layer in range(4):
        h = F.conv2d(h, theta[f"features.{layer}.0.weight"], theta[f"features.{layer}.0.bias"], 2, 1)
        row = min(step, rows - 1)
        weight, bias = theta[f"features.{layer}.1.weight"][row], theta[f"features.{layer}.1.bias"][row]
        if running is not None:
            mean, var = running[layer]
            h = F.batch_norm(h, mean[row], var[row], weight, bias, training=False)
        elif batch_norms is not None:
            h = batch_norms[layer][row](h) * weight[:, None, None] + bias[:, None, None]
        else:
            h = F.batch_norm(h, None, None, weight, bias, training=True)
        h = F.relu(h)
    return F.linear(h.flatten(1), theta["head.weight"], theta["head.bias"])


def reference_adapt(theta, x, y, steps, rows, first_order=False, batch_norms=None, running=None):
    """The params after each inner step, by plain SGD through autograd."""
    after = []
    for i in range(steps):
        loss = F.cross_entropy(reference_forward(theta, x, i, rows, batch_norms, running), y)
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=not first_order)
        theta = {name: p - LR * g for (name, p), g in zip(theta.items(), grads, strict=True)}
        after.append(theta)
    return after


def reference_meta_gradient(
    params, tasks, steps, rows, first_order=False, step_weights=None, batch_norms=None
):
    theta = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    (support_x, support_y), (query_x, query_y) = tasks["support"], tasks["query"]
    total = 0.0
    for t in range(TASKS):
        after = reference_adapt(theta, support_x[t], support_y[t], steps, rows, first_order, batch_norms)
        weights = [0.0] * (steps - 1) + [1.0] if step_weights is None else step_weights
        for i, (weight, adapted) in enumerate(zip(weights, after, strict=True)):
            if weight:
                total = total + weight * F.cross_entropy(
                    reference_forward(adapted, query_x[t], i, rows), query_y[t]
                )
    grads = torch.autograd.grad(total / TASKS, list(theta.values()))
    return dict(zip(theta, grads, strict=True))


def relative_error(grads: dict, reference: dict) -> float:
    flat = torch.cat([grads[name].flatten() for name in reference])
    expected = torch.cat([g.flatten() for g in reference.values()])
    return ((flat - expected).norm() / expected.norm()).item()


# ------------------------------------------------------------------------------------------ meta-gradients


@pytest.mark.parametrize(
    "strategy, memory, first_order, multi_step",
    [
        ("vmap", "store", False, False),
        ("loop", "store", False, False),
        ("chunked:2", "store", False, True),
        ("vmap", "recompute", False, True),
        ("loop", "recompute", False, False),
        ("chunked:2", "recompute", False, False),
        ("vmap", "store", True, False),
    ],
)
def test_meta_gradient_matches_one_batch_norm_per_step(strategy, memory, first_order, multi_step):
    steps = rows = 3
    model, tasks = per_step_convnet(rows), make_tasks(0)
    weights = [0.2, 0.3, 0.5] if multi_step else None
    params = dict(model.named_parameters())
    loss, _ = meta_loss(
        params, dict(model.named_buffers()), tasks, model=model, steps=steps, lr=LR, strategy=strategy,
        memory=memory, first_order=first_order, step_weights=weights,
    )  # fmt: skip
    loss.backward()
    reference = reference_meta_gradient(params, tasks, steps, rows, first_order, weights)
    assert relative_error({name: p.grad for name, p in params.items()}, reference) <= 1e-9
    # Per step: every row of a BatchNorm weight gets its own, different meta-gradient (first order: only
    # the last row's, the one the query forward uses, is not zero).
    rows_grad = params["features.1.1.weight"].grad
    if first_order:
        assert rows_grad[:-1].abs().sum() == 0 and rows_grad[-1].abs().sum() > 0
    else:
        assert all(rows_grad[i].abs().sum() > 0 for i in range(rows))
        assert not torch.allclose(rows_grad[0], rows_grad[1]) and not torch.allclose(
            rows_grad[1], rows_grad[2]
        )


# ------------------------------------------------------------------------------------ running statistics


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_running_statistics_after_meta_steps_match_sequential_batch_norms(strategy):
    steps, rows, meta_lr = 3, 2, 0.5  # steps 1 and 2 both use (and update) the last row
    model = per_step_convnet(rows)
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch_norms = [
        [nn.BatchNorm2d(FILTERS, affine=False, momentum=0.1).double() for _ in range(rows)] for _ in range(4)
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=meta_lr)
    for meta_step in range(3):
        tasks = make_tasks(meta_step)
        optimizer.zero_grad()
        params = dict(model.named_parameters())
        loss, _ = meta_loss(
            params, dict(model.named_buffers()), tasks, model=model, steps=steps, lr=LR, strategy=strategy
        )
        update_running_statistics(model, tasks, steps=steps, lr=LR, strategy=strategy)
        loss.backward()
        optimizer.step()
        grads = reference_meta_gradient(theta, tasks, steps, rows, batch_norms=batch_norms)
        theta = {name: p - meta_lr * grads[name] for name, p in theta.items()}
    for layer in range(4):
        bn = model.features[layer][1]
        for row in range(rows):
            for name in ("running_mean", "running_var"):
                expected = getattr(batch_norms[layer][row], name)
                assert not torch.equal(
                    expected,
                    torch.zeros_like(expected) if name == "running_mean" else torch.ones_like(expected),
                )
                torch.testing.assert_close(getattr(bn, name)[row], expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- evaluation


def random_statistics(model: ConvNet, rows: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    running = {}
    for layer in range(4):
        bn = model.features[layer][1]
        # Near the features' own statistics, so that ReLU keeps some of them whatever the row.
        bn.running_mean.copy_(0.1 * torch.randn(rows, FILTERS, generator=generator, dtype=torch.float64))
        bn.running_var.copy_(0.2 + 0.3 * torch.rand(rows, FILTERS, generator=generator, dtype=torch.float64))
        running[layer] = (bn.running_mean.clone(), bn.running_var.clone())
    return running


def test_eval_mode_normalises_with_the_step_s_running_statistics():
    rows = 2
    model = per_step_convnet(rows).eval()
    running = random_statistics(model, rows)
    with torch.no_grad():
        for layer in range(4):  # distinct per-step weights, so that a wrong row would show
            model.features[layer][1].weight.add_(torch.rand(rows, FILTERS, dtype=torch.float64))
    params = {name: p.detach() for name, p in model.named_parameters()}
    x = make_tasks(3)["query"][0][0]
    for step in range(rows + 2):  # beyond the rows: the last row's
        expected = reference_forward(params, x, step, rows, running=running)
        torch.testing.assert_close(model(x, inner_step=step), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(expected[0], expected[1])  # the features reach the head
    assert not torch.allclose(model(x, inner_step=0), model.train()(x, inner_step=0))  # not batch statistics


def test_changing_step_1_statistics_changes_the_output_after_two_steps_only():
    rows = 3
    model = per_step_convnet(rows).eval()
    random_statistics(model, rows)
    tasks = make_tasks(4)
    support = (tasks["support"][0][0], tasks["support"][1][0])
    query_x = tasks["query"][0][0]
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())  # the model's own tensors: changed in place below

    def query_output_after(steps: int):
        adapted = adapt(params, buffers, support, model=model, steps=steps, lr=LR)
        return forward(model, (adapted, buffers), query_x, steps - 1)

    after_one, after_two = query_output_after(1), query_output_after(2)
    assert not torch.allclose(after_two[0], after_two[1])  # the features reach the head
    buffers["features.0.1.running_mean"][1] += 0.1
    assert torch.equal(query_output_after(1), after_one)
    assert not torch.allclose(query_output_after(2), after_two)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_evaluation_meta_loss_adapts_with_the_running_statistics(strategy):
    steps = rows = 2
    model = per_step_convnet(rows).eval()
    running = random_statistics(model, rows)
    tasks = make_tasks(5)
    params = {name: p.detach() for name, p in model.named_parameters()}
    _, metrics = meta_loss(
        params, dict(model.named_buffers()), tasks, model=model, steps=steps, lr=LR, strategy=strategy
    )
    (support_x, support_y), (query_x, query_y) = tasks["support"], tasks["query"]
    for t in range(TASKS):
        theta = {name: p.clone().requires_grad_() for name, p in params.items()}
        adapted = reference_adapt(theta, support_x[t], support_y[t], steps, rows, running=running)[-1]
        expected = F.cross_entropy(
            reference_forward(adapted, query_x[t], steps - 1, rows, running=running), query_y[t]
        )
        torch.testing.assert_close(metrics["loss"][t], expected.detach(), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- without the options


class ConvNetBuiltTheOldWay(nn.Module):
    """fmaml's ConvNet as it was before per-step BatchNorm (stride 2, flatten head, PyTorch's init)."""

    def __init__(self, ways: int, filters: int, image_size: int):
        super().__init__()
        blocks = [
            nn.Sequential(
                nn.Conv2d(1 if i == 0 else filters, filters, kernel_size=3, stride=2, padding=1),
                nn.BatchNorm2d(filters, track_running_stats=False),
                nn.ReLU(),
            )
            for i in range(4)
        ]
        self.features = nn.Sequential(*blocks)
        size = image_size
        for _ in range(4):
            size = (size + 1) // 2
        self.head = nn.Linear(filters * size * size, ways)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("options", [{}, {"batch_norm": BatchNormSettings(per_step=0, running_stats=False)}])
def test_without_the_options_the_convnet_is_unchanged(options):
    torch.manual_seed(7)
    old = ConvNetBuiltTheOldWay(5, filters=4, image_size=28)
    torch.manual_seed(7)
    new = ConvNet(5, filters=4, image_size=28, **options)
    old_state, new_state = old.state_dict(), new.state_dict()
    assert list(new_state) == list(old_state)
    assert all(torch.equal(new_state[name], old_state[name]) for name in old_state)
    assert dict(new.named_buffers()) == {} and not getattr(new, "takes_inner_step", False)
    x = torch.randn(6, 1, 28, 28)
    torch.testing.assert_close(new(x), old(x), rtol=0, atol=0)
    new.load_state_dict(old_state)  # an old checkpoint's network loads


def test_per_step_batch_norm_keeps_the_convs_and_head_initialisation():
    plain, per_step = per_step_convnet(0, running_stats=False), per_step_convnet(3)
    for name, p in plain.named_parameters():
        other = dict(per_step.named_parameters())[name]
        if name.endswith(
            (".1.weight", ".1.bias")
        ):  # features.<block>.1: BatchNorm, one row per step, each the plain init
            assert other.shape == (3, *p.shape) and all(torch.equal(row, p) for row in other)
        else:
            assert torch.equal(other, p)
    assert {name: tuple(b.shape) for name, b in per_step.named_buffers()}["features.0.1.running_var"] == (
        3,
        FILTERS,
    )


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "options, words",
    [
        ({"running_stats": True}, [f"{BATCH_NORM}.running_stats=True", f"set {BATCH_NORM}.per_step to"]),
        ({"per_step": -1}, [f"{BATCH_NORM}.per_step=-1", "integer >= 0"]),
        ({"per_step": 2.5}, [f"{BATCH_NORM}.per_step=2.5", "integer >= 0"]),
        ({"per_step": True}, [f"{BATCH_NORM}.per_step=True", "integer >= 0"]),
    ],
)
def test_bad_per_step_options_are_refused(options, words):
    with pytest.raises(ValueError) as error:
        BatchNormSettings(**options)
    assert all(word in str(error.value) for word in words)


# ------------------------------------------------------------------------------------- the MAML++ config


def test_mamlpp_config_trains_the_running_statistics_and_tests_with_them(
    tmp_path_factory, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    root = tiny_omniglot_root(tmp_path_factory)
    common = [
        "--config",
        config("omniglot_mamlpp.yaml"),
        "--model.network.batch_norm.running_stats=true",  # off in the config (see it), on here
        f"--data.root={root}",
        "--model.network.filters=4",
        *TINY,
    ]
    fit = main(["fit", *common, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"])
    network = fit.model.network
    assert network.takes_inner_step and fit.model.adapt_only == [
        f"features.{i}.0.{kind}" for i in range(4) for kind in ("weight", "bias")
    ] + ["head.weight", "head.bias"]
    for block in network.features:
        bn = block[1]
        assert bn.running_mean.shape == (5, 4)
        assert all((bn.running_mean[row] != 0).all() and (bn.running_var[row] != 1).all() for row in range(5))
    checkpoint = tmp_path / "logs/fmaml/version_0/checkpoints/last.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    torch.testing.assert_close(
        state["state_dict"]["network.features.3.1.running_var"], network.features[3][1].running_var
    )

    def test_loss(path) -> float:
        return main(["test", *common, f"--ckpt_path={path}"]).trainer.callback_metrics["test/loss"].item()

    for name, value in state["state_dict"].items():  # the statistics back at their init
        if name.endswith(("running_mean", "running_var")):
            value.fill_(0.0 if name.endswith("running_mean") else 1.0)
    torch.save(state, tmp_path / "init_statistics.ckpt")
    assert test_loss(checkpoint) != test_loss(tmp_path / "init_statistics.ckpt")


def test_running_statistics_are_refused_across_processes():
    """Under DDP each process would fold only its own tasks' statistics: refused when the fit starts."""
    from types import SimpleNamespace

    from fmaml.module import MAML
    from fmaml.settings import InnerLoop

    def network(outputs):
        return ConvNet(outputs, filters=2, image_size=16, batch_norm=BatchNormSettings(2, running_stats=True))

    module = MAML(network, num_outputs=2, inner_loop=InnerLoop(steps=2))
    module._trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="batch_norm.running_stats=true is not supported with more than one"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(world_size=1)
    module.on_fit_start()

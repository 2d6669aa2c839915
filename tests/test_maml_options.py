"""The MAML++ / Meta-SGD / ANIL options: each against an independent reference, and each off by default.

The reference is plain autograd over an explicit inner loop written here (task by task, float64): no
torch.func.grad, no vmap, nothing of the engine's.
"""

import math

import lightning as L
import pytest
import torch
from fixtures import TINY, config, tiny_omniglot_root
from torch.func import functional_call

from fmaml import MLP, ConvNet, adapt, meta_loss
from fmaml.cli import main
from fmaml.data import EvaluationTasks, MetaDataModule, Sinusoid
from fmaml.inner_optimizers import SGD
from fmaml.maml import LOSSES, msl_weights
from fmaml.module import MAML
from fmaml.schedules import CosineAnnealingToMaxSteps
from fmaml.settings import grouped

STRATEGIES = ["vmap", "loop", "chunked:2"]
# ------------------------------------------------------------------------------- cases and reference


def _conv_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.randn(3, 5 * n, 1, 28, 28, generator=g, dtype=torch.float64)
        return x, torch.arange(5).repeat_interleave(n).expand(3, -1).clone()

    model = ConvNet(5, filters=4).double()
    return model, {"support": split(2), "query": split(3)}, "cross_entropy", 0.4, ["head.weight", "head.bias"]


def _mlp_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    phase = torch.rand(4, 1, 1, generator=g, dtype=torch.float64) * torch.pi

    def split():
        x = torch.rand(4, 10, 1, generator=g, dtype=torch.float64) * 10 - 5
        return x, 2 * torch.sin(x + phase)

    model = MLP().double()
    return model, {"support": split(), "query": split()}, "mse", 0.01, ["layers.4.weight", "layers.4.bias"]


CASES = pytest.mark.parametrize("case", [_conv_case, _mlp_case], ids=["convnet_bn", "mlp"])


def unrolled_reference(
    model, tasks, loss, steps, rate, *, step_weights=None, adapt_only=None, wrt=(), first_order=False
):
    """Mean over tasks of the (multi-step) query loss, and its gradient w.r.t. the model's params and the
    tensors in `wrt`, by autograd through an explicit loop. rate(step, name): the inner rate."""
    loss_fn = LOSSES[loss]
    params = dict(model.named_parameters())
    adapted = list(params) if adapt_only is None else adapt_only
    (xs, ys), (xq, yq) = tasks["support"], tasks["query"]
    num_tasks = xs.shape[0]
    total = 0.0
    for i in range(num_tasks):
        fast, objective = dict(params), 0.0
        for step in range(steps):
            inner = loss_fn(functional_call(model, fast, (xs[i],)), ys[i])
            grads = torch.autograd.grad(inner, [fast[n] for n in adapted], create_graph=not first_order)
            fast = fast | {n: fast[n] - rate(step, n) * g for n, g in zip(adapted, grads, strict=True)}
            if step_weights is not None:
                objective = objective + step_weights[step] * loss_fn(
                    functional_call(model, fast, (xq[i],)), yq[i]
                )
        if step_weights is None:
            objective = loss_fn(functional_call(model, fast, (xq[i],)), yq[i])
        total = total + objective / num_tasks
    grads = torch.autograd.grad(total, [*params.values(), *wrt], allow_unused=True)
    return total.detach(), grads


def engine_gradient(model, tasks, loss, steps, lr, strategy, wrt=(), **options):
    """meta_loss(...).backward(): (loss, metrics, grads of the params then of `wrt`, in reference order)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    value, metrics = meta_loss(
        params, {}, tasks, model=model, loss=loss, steps=steps, lr=lr, strategy=strategy, **options
    )
    value.backward()
    return value.detach(), metrics, [*(p.grad for p in params.values()), *(t.grad for t in wrt)]


def relative_error(a, b) -> float:
    a = [torch.zeros_like(y) if x is None else x for x, y in zip(a, b, strict=True)]
    b = [torch.zeros_like(x) if y is None else y for x, y in zip(a, b, strict=True)]
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True)).sqrt()
    return (num / sum((y**2).sum() for y in b).sqrt()).item()


# ------------------------------------------------------------------------------- learned inner rates


def _learned_rates(model, kind: str, base: float, steps: int):
    """(rates to differentiate, the engine's `lr` built from them, rate(step, name) for the reference).

    Random around `base`, so that a rate used for the wrong parameter or step would show."""
    g = torch.Generator().manual_seed(1)
    names = [n for n, _ in model.named_parameters()]
    if kind == "per_parameter":  # Meta-SGD: a rate tensor shaped like each parameter, every step
        rates = {
            n: (base * (0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))).requires_grad_()
            for n, p in model.named_parameters()
        }
        return list(rates.values()), rates, lambda step, n: rates[n]
    # MAML++ LSLR: one scalar per parameter tensor per step, kept as a [steps] vector per tensor
    rates = {
        n: (base * (0.5 + torch.rand(steps, generator=g, dtype=torch.float64))).requires_grad_()
        for n in names
    }
    lr = [{n: rates[n][step] for n in names} for step in range(steps)]
    return list(rates.values()), lr, lambda step, n: rates[n][step]


@CASES
@pytest.mark.parametrize("kind", ["per_parameter", "per_layer_per_step"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_learned_rates_meta_gradient_equals_unrolled_reference(case, kind, strategy):
    model, tasks, loss, base, _ = case()
    wrt, lr, rate = _learned_rates(model, kind, base, steps=2)
    value_ref, reference = unrolled_reference(model, tasks, loss, 2, rate, wrt=wrt)
    value, _, grads = engine_gradient(model, tasks, loss, 2, lr, strategy, wrt=wrt)
    torch.testing.assert_close(value, value_ref, rtol=1e-12, atol=0)
    assert relative_error(grads, reference) <= 1e-9
    # The rates' own gradient is checked too, not drowned in the params': it is there and it is right.
    assert all(g is not None and g.abs().sum() > 0 for g in grads[-len(wrt) :])
    assert relative_error(grads[-len(wrt) :], reference[-len(wrt) :]) <= 1e-9


def test_learned_rates_first_order_strategies_agree():
    """FOMAML with learned rates: the rates still get d loss / d rate = -(inner grad) . (query grad)."""
    model, tasks, loss, base, _ = _mlp_case()
    results = []
    for strategy in STRATEGIES:
        wrt, lr, _ = _learned_rates(model, "per_parameter", base, steps=2)
        results.append(engine_gradient(model, tasks, loss, 2, lr, strategy, wrt=wrt, first_order=True)[2])
    for grads in results[1:]:
        assert relative_error(grads, results[0]) <= 1e-12
    second_order = engine_gradient(
        model, tasks, loss, 2, _learned_rates(model, "per_parameter", base, 2)[1], "loop"
    )
    assert relative_error(results[0][: len(second_order[2])], second_order[2]) > 1e-6


def test_learned_rates_may_go_negative():
    """Meta-SGD lets a rate take any sign: the argument check must not reject learned (tensor) rates."""
    model, tasks, loss, _, _ = _mlp_case()
    params = {n: p.detach() for n, p in model.named_parameters()}
    lr = {n: torch.full_like(p, -0.01) for n, p in params.items()}
    with torch.no_grad():
        meta_loss(params, {}, tasks, model=model, loss=loss, lr=lr)  # evaluation: detached learned rates
    meta_loss(params, {}, tasks, model=model, loss=loss, lr={n: r.requires_grad_() for n, r in lr.items()})
    with pytest.raises(ValueError, match="lr=-0.01"):  # a number a user typed is still checked
        meta_loss(params, {}, tasks, model=model, loss=loss, lr=-0.01)


# ------------------------------------------------------------------------------------- multi-step loss


def test_msl_weights_follow_maml_plus_plus():
    # By hand from MAML++'s get_per_step_loss_importance_vector, 5 steps over 100 meta-steps:
    # decay 1/5/100 = 0.002 per meta-step, floor 0.03/5 = 0.006, the last step gets the rest.
    expected = {
        0: [0.2, 0.2, 0.2, 0.2, 0.2],
        50: [0.1, 0.1, 0.1, 0.1, 0.6],
        90: [0.02, 0.02, 0.02, 0.02, 0.92],
        100: [0.006, 0.006, 0.006, 0.006, 0.976],
        1000: [0.006, 0.006, 0.006, 0.006, 0.976],
    }
    for meta_step, weights in expected.items():
        assert msl_weights(5, meta_step, 100) == pytest.approx(weights, abs=1e-12), meta_step
    for steps in (1, 2, 5, 10):
        for meta_step in (0, 1, 7, 50, 99, 100, 5000):
            weights = msl_weights(steps, meta_step, 100)
            assert len(weights) == steps and math.isclose(sum(weights), 1.0, abs_tol=1e-12)
            assert all(w >= 0.03 / steps - 1e-15 for w in weights)


@CASES
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_multi_step_loss_equals_weighted_per_step_query_losses(case, strategy):
    model, tasks, loss, lr, _ = case()
    weights = [0.1, 0.3, 0.6]
    value_ref, reference = unrolled_reference(model, tasks, loss, 3, lambda step, n: lr, step_weights=weights)
    value, metrics, grads = engine_gradient(model, tasks, loss, 3, lr, strategy, step_weights=weights)
    torch.testing.assert_close(value, value_ref, rtol=1e-12, atol=0)
    assert relative_error(grads, reference) <= 1e-9
    # The reported loss stays the last step's query loss, as without MSL.
    plain, plain_metrics, plain_grads = engine_gradient(model, tasks, loss, 3, lr, strategy)
    torch.testing.assert_close(metrics["loss"], plain_metrics["loss"], rtol=1e-12, atol=0)
    assert not torch.allclose(value, plain) and relative_error(grads, plain_grads) > 1e-3
    # A [steps] tensor works like the list; all the weight on the last step is MAML's loss.
    as_tensor, _, _ = engine_gradient(
        model, tasks, loss, 3, lr, strategy, step_weights=torch.tensor(weights, dtype=torch.float64)
    )
    torch.testing.assert_close(as_tensor, value, rtol=1e-12, atol=0)
    last_only, _, last_grads = engine_gradient(
        model, tasks, loss, 3, lr, strategy, step_weights=[0.0, 0.0, 1.0]
    )
    torch.testing.assert_close(last_only, plain, rtol=1e-12, atol=0)
    assert relative_error(last_grads, plain_grads) <= 1e-12


# ---------------------------------------------------------------------------------------------- ANIL


@CASES
def test_anil_adapts_only_the_head(case):
    model, tasks, loss, lr, head = case()
    params = dict(model.named_parameters())
    (xs, ys), _ = tasks["support"], tasks["query"]
    adapted = adapt(params, {}, (xs[0], ys[0]), model=model, loss=loss, steps=2, lr=lr, adapt_only=head)
    assert adapted.keys() == params.keys()
    for name in params:
        if name in head:
            assert not torch.equal(adapted[name], params[name]), name
        else:
            assert adapted[name] is params[name], name  # used as-is, not even a copy


@CASES
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_anil_meta_gradient_equals_unrolled_reference(case, strategy):
    model, tasks, loss, lr, head = case()
    value_ref, reference = unrolled_reference(model, tasks, loss, 2, lambda step, n: lr, adapt_only=head)
    value, _, grads = engine_gradient(model, tasks, loss, 2, lr, strategy, adapt_only=head)
    torch.testing.assert_close(value, value_ref, rtol=1e-12, atol=0)
    assert relative_error(grads, reference) <= 1e-9
    # ANIL is not MAML: the features' meta-gradient changes when they are no longer adapted.
    _, _, maml_grads = engine_gradient(model, tasks, loss, 2, lr, strategy)
    assert relative_error(grads, maml_grads) > 1e-3


@CASES
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_anil_first_order_meta_gradient_reaches_the_features(case, strategy):
    # First order detaches the inner gradient, not the frozen features: their meta-gradient is the query
    # loss's at the adapted head.
    model, tasks, loss, lr, head = case()
    _, reference = unrolled_reference(
        model, tasks, loss, 2, lambda step, n: lr, adapt_only=head, first_order=True
    )
    _, _, grads = engine_gradient(model, tasks, loss, 2, lr, strategy, adapt_only=head, first_order=True)
    assert relative_error(grads, reference) <= 1e-9
    features = [g for (name, _), g in zip(model.named_parameters(), grads, strict=True) if name not in head]
    assert all(g is not None and g.abs().sum() > 0 for g in features)


def test_anil_with_learned_rates_for_the_head_only():
    model, tasks, loss, lr, head = _mlp_case()
    rates = {n: torch.tensor(lr, dtype=torch.float64, requires_grad=True) for n in head}
    _, reference = unrolled_reference(
        model, tasks, loss, 2, lambda step, n: rates[n], adapt_only=head, wrt=list(rates.values())
    )
    for strategy in STRATEGIES:
        for r in rates.values():
            r.grad = None
        _, _, grads = engine_gradient(
            model, tasks, loss, 2, rates, strategy, wrt=list(rates.values()), adapt_only=head
        )
        assert relative_error(grads, reference) <= 1e-9, strategy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapt_only": ["head.kernel"]}, r"adapt_only: no parameters named \['head.kernel'\]"),
        ({"adapt_only": []}, "adapt_only=\\[\\]"),
        ({"adapt_only": "head.weight"}, "adapt_only='head.weight'"),
        ({"step_weights": [0.5, 0.5], "steps": 3}, "one weight per inner step"),
        (
            {"lr": {"head.weight": 0.1}, "adapt_only": ["head.weight", "head.bias"]},
            r"no rate for \['head.bias'\]",
        ),
    ],
)
def test_bad_option_arguments_raise_clear_errors(kwargs, message):
    model, tasks, loss, _, _ = _conv_case()
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=message):
        meta_loss(params, {}, tasks, model=model, loss=loss, **kwargs)


# ------------------------------------------------------------------------------------- the module


def test_module_options_fail_at_start_up():
    def build(learn_lr="off", **kwargs):
        inner_optimizer = SGD(lr=0.01, learn_lr=learn_lr)
        return MAML(MLP, num_outputs=1, loss="mse", **grouped(inner_optimizer=inner_optimizer, **kwargs))

    with pytest.raises(ValueError, match=r"model.inner_loop.adapt_only=\['heads'\].*'layers.4.weight'"):
        build(adapt_only=["heads"])
    with pytest.raises(
        ValueError, match=r"model\.inner_loop\.optimizer \(SGD\): learn_lr='per_step' is unknown"
    ):
        build(learn_lr="per_step")
    with pytest.raises(ValueError, match="model.inner_loop.eval_lr=0.1 .*drop eval_lr"):
        build(learn_lr="per_parameter", eval_inner_lr=0.1)
    with pytest.raises(
        ValueError, match="model.inner_loop.second_order_from_step=10 .*set first_order: false"
    ):
        build(second_order_from_step=10, first_order=True)
    with pytest.raises(ValueError, match="model.inner_loop.second_order_from_step=-1"):
        build(second_order_from_step=-1)
    with pytest.raises(ValueError, match="model.meta_objective.msl_anneal_steps=0"):
        build(multi_step_loss=True, msl_anneal_steps=0)
    # Prefixes select whole modules: "layers.4" is the MLP's head; features and head of the ConvNet.
    assert build(adapt_only=["layers.4"]).adapt_only == ["layers.4.weight", "layers.4.bias"]
    conv = MAML(ConvNet, **grouped(adapt_only=["head", "features.3.0"]))
    assert conv.adapt_only == ["features.3.0.weight", "features.3.0.bias", "head.weight", "head.bias"]


def test_module_learned_rates_shapes_and_evaluation_beyond_trained_steps():
    per_parameter = MAML(
        MLP, num_outputs=1, loss="mse", **grouped(inner_optimizer=SGD(lr=0.01, learn_lr="per_parameter"))
    )
    for name, p in per_parameter.network.named_parameters():
        rate = per_parameter.inner_lrs[name.replace(".", "-")]
        assert rate.shape == p.shape and torch.all(rate == 0.01)
    lslr = MAML(
        MLP,
        num_outputs=1,
        loss="mse",
        **grouped(
            inner_optimizer=SGD(lr=0.01, learn_lr="per_layer_per_step"),
            inner_steps=2,
            adapt_only=["layers.4"],
        ),
    )
    assert set(lslr.inner_lrs) == {"layers-4-weight", "layers-4-bias"}  # rates for adapted params only
    with torch.no_grad():
        lslr.inner_lrs["layers-4-weight"].copy_(torch.tensor([0.1, 0.2]))
    lr = lslr._learned_lr(4, detach=True)
    assert [float(step["layers.4.weight"]) for step in lr] == pytest.approx([0.1, 0.2, 0.2, 0.2])
    assert not any(rate.requires_grad for step in lr for rate in step.values())


def _fit_sinusoid(tmp_path, max_steps: int, callbacks, **model_kwargs) -> MAML:
    model = MAML(MLP, num_outputs=1, loss="mse", **grouped(**model_kwargs))
    data = MetaDataModule(
        Sinusoid(),
        ways=1,
        shots=5,
        query_shots=5,
        meta_batch_size=4,
        evaluation=EvaluationTasks(num_val_tasks=2),
        root=str(tmp_path),
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        inference_mode=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    return model


class _Recorder(L.Callback):
    """Each meta-step's batch, params before the step, inner settings, and meta-gradient."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        params = {n: p.detach().clone() for n, p in module.network.named_parameters()}
        self.steps.append(
            {"step": module.global_step, "batch": batch, "params": params, "inner": module._train_inner()}
        )

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.steps[-1]["grads"] = [p.grad.clone() for p in module.network.parameters()]


def test_derivative_order_annealing_switches_at_the_step(tmp_path):
    recorder = _Recorder()
    module = _fit_sinusoid(
        tmp_path, 4, [recorder], inner_steps=2, inner_optimizer=SGD(lr=0.1), second_order_from_step=2
    )
    assert [r["step"] for r in recorder.steps] == [0, 1, 2, 3]
    for record in recorder.steps:
        by_order = {}
        for first_order in (True, False):
            params = {n: p.clone().requires_grad_() for n, p in record["params"].items()}
            value, _ = meta_loss(
                params,
                {},
                record["batch"],
                model=module.network,
                loss="mse",
                steps=2,
                lr=0.1,
                first_order=first_order,
            )
            value.backward()
            by_order[first_order] = [p.grad for p in params.values()]
        assert relative_error(by_order[True], by_order[False]) > 1e-4  # the two orders are distinguishable
        expected = by_order[record["step"] < 2]
        assert relative_error(record["grads"], expected) <= 1e-6, record["step"]


def test_multi_step_loss_is_annealed_then_dropped(tmp_path):
    recorder = _Recorder()
    _fit_sinusoid(
        tmp_path,
        4,
        [recorder],
        inner_steps=3,
        inner_optimizer=SGD(lr=0.01),
        multi_step_loss=True,
        msl_anneal_steps=2,
    )
    weights = [r["inner"].get("step_weights") for r in recorder.steps]
    assert weights[0] == pytest.approx([1 / 3] * 3)
    assert weights[1] == pytest.approx(msl_weights(3, 1, 2)) and weights[1][-1] > 1 / 3
    assert weights[2] is None and weights[3] is None  # MAML++: the last step's loss once annealed


def test_default_module_settings_are_the_plain_ones():
    """Every option off: the engine is called with exactly the settings it had before the options."""
    module = MAML(MLP, num_outputs=1, loss="mse", **grouped(inner_optimizer=SGD(lr=0.01)))
    assert module.inner_lrs is None and list(module.parameters()) == list(module.network.parameters())
    plain_sgd = SGD(lr=0.01)
    assert module.train_inner == {
        "steps": 1,
        "lr": 0.01,
        "first_order": False,
        "adapt_only": None,
        "inner_optimizer": plain_sgd,
        "meta_gradient": None,  # the engine's default: MAML's, through the inner loop
    }
    assert plain_sgd.is_stateless  # θ - lr * g, the paper's step


def test_cosine_annealing_of_the_meta_learning_rate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "--config",
            config("sinusoid.yaml"),
            "--trainer.max_steps=4",
            "--trainer.limit_val_batches=0",
            "--model.lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR",
            "--model.lr_scheduler.T_max=10",
            "--model.lr_scheduler.eta_min=0.0001",
            *TINY,
        ]
    )
    assert cli.trainer.global_step == 4
    lr = cli.trainer.optimizers[0].param_groups[0]["lr"]
    expected = 1e-4 + (1e-3 - 1e-4) * (1 + math.cos(math.pi * 4 / 10)) / 2  # once per meta-step
    assert lr == pytest.approx(expected, rel=1e-9)


# -------------------------------------------------------------------------------- configs end to end


@pytest.fixture
def omniglot_root(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tiny_omniglot_root(tmp_path_factory)


def test_mamlpp_config_learns_per_layer_per_step_rates(omniglot_root, tmp_path):
    common = [
        "--config",
        config("omniglot_mamlpp.yaml"),
        f"--data.root={omniglot_root}",
        "--model.network.filters=4",
    ]
    fit = ["--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1"]
    cli = main(["fit", *common, *fit, *TINY])
    module = cli.model
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, CosineAnnealingToMaxSteps) and scheduler.total_steps == 2  # max_steps
    assert module.inner_lrs["head-weight"].shape == (5,)  # one rate per inner step
    # The rates are given to the meta-optimizer, moved from their init, logged, and checkpointed.
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(rate) in optimized for rate in module.inner_lrs.values())
    assert any(not torch.all(rate == 0.1) for rate in module.inner_lrs.values())
    assert "train/inner_lr_mean" in cli.trainer.callback_metrics
    checkpoint = torch.load(tmp_path / "logs/fmaml/version_0/checkpoints/last.ckpt", weights_only=False)
    torch.testing.assert_close(
        checkpoint["state_dict"]["inner_lrs.head-weight"], module.inner_lrs["head-weight"]
    )
    # ... and evaluation (5 steps) adapts with them from the checkpoint.
    validate = main(
        ["validate", *common, f"--ckpt_path={tmp_path}/logs/fmaml/version_0/checkpoints/last.ckpt", *TINY]
    )
    torch.testing.assert_close(validate.model.inner_lrs["head-weight"], module.inner_lrs["head-weight"])
    assert "val/accuracy" in validate.trainer.callback_metrics


def test_anil_config_fast_dev_run(omniglot_root):
    cli = main(
        [
            "fit",
            "--config",
            config("omniglot_anil.yaml"),
            f"--data.root={omniglot_root}",
            "--trainer.fast_dev_run=true",
            "--model.network.filters=4",
            *TINY,
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.model.adapt_only == ["head.weight", "head.bias"]
    assert "val/accuracy" in cli.trainer.callback_metrics


def test_metasgd_config_learns_per_parameter_rates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", config("sinusoid_metasgd.yaml"), "--trainer.fast_dev_run=true", *TINY])
    assert cli.trainer.global_step == 1
    rate = cli.model.inner_lrs["layers-0-weight"]
    assert rate.shape == cli.model.network.layers[0].weight.shape
    assert not torch.all(rate == 0.01)  # one meta-step moved them

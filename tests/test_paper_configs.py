"""The reference code's settings (cbfinn/maml): the mean-pooled head, meta-gradient clipping under manual
optimization, and configs/paper/, each config saying on its first line what it is."""

import glob
import math
import os
import re
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fixtures import REPO, TINY, tiny_omniglot_root

from fmaml import MLP, ConvNet, meta_loss
from fmaml.callbacks import SaveRunConfig
from fmaml.cli import MAMLCLI, TRAINER_DEFAULTS, main
from fmaml.data import EvaluationTasks, MetaDataModule, Sinusoid
from fmaml.inner_optimizers import SGD
from fmaml.module import MAML
from fmaml.settings import MetaObjective, grouped

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
PAPER = sorted(glob.glob(os.path.join(REPO, "configs", "paper", "*.yaml")))
PAPER_OMNIGLOT = [p for p in PAPER if "omniglot" in os.path.basename(p)]
PAPER_MINIIMAGENET = [p for p in PAPER if "miniimagenet" in os.path.basename(p)]
# The reference's inner loop adapts its `weights` only: the four convolutions and the head, not BatchNorm.
REFERENCE_ADAPTED = [f"features.{i}.0.{t}" for i in range(4) for t in ("weight", "bias")] + [
    "head.weight",
    "head.bias",
]


# ------------------------------------------------------------------------------------------ the head


def test_mean_head_is_the_spatial_mean_then_the_linear_layer():
    torch.manual_seed(0)
    net = ConvNet(5, head_input="mean")
    x = torch.randn(3, 1, 28, 28)
    features = net.features(x)
    assert features.shape == (3, 64, 2, 2)
    expected = F.linear(features.mean(dim=(2, 3)), net.head.weight, net.head.bias)
    assert net.head.in_features == 64
    assert net(x).shape == (3, 5)
    torch.testing.assert_close(net(x), expected)
    # The default is unchanged: every position of the 2x2x64 features (MiniImageNet: 5x5x32).
    assert ConvNet(5).head.in_features == 256
    assert ConvNet(5, in_channels=3, filters=32, image_size=84, pooling="max").head.in_features == 800


def test_unknown_head_input_or_init_is_named():
    with pytest.raises(ValueError, match=r"head_input='avg' is unknown: use flatten .* or mean"):
        ConvNet(5, head_input="avg")
    with pytest.raises(ValueError, match=r"init='tf' is unknown: use pytorch .* or reference"):
        ConvNet(5, init="tf")


@pytest.mark.parametrize("head_input", ["mean", "flatten"])
def test_reference_init_draws_from_the_reference_distributions(head_input):
    torch.manual_seed(0)
    net = ConvNet(20, head_input=head_input, init="reference")
    for block in net.features:
        conv = block[0]
        bound = math.sqrt(6 / (conv.in_channels * 9 + conv.out_channels * 9))  # Xavier-uniform, 3x3
        assert conv.bias.abs().max() == 0
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert net.head.bias.abs().max() == 0
    weight = net.head.weight
    if head_input == "mean":  # the reference's Omniglot head: tf.random_normal, std 1
        assert 0.9 < weight.std() < 1.1 and weight.abs().max() > 2.5
    else:  # its MiniImageNet head: Xavier-uniform
        bound = math.sqrt(6 / (weight.shape[0] + weight.shape[1]))
        assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound


# ---------------------------------------------------------------------------------------- clipping


class _Recorder(L.Callback):
    """Each meta-step's batch, every meta-optimized tensor before it, and the gradient the optimizer gets."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.steps.append({"batch": batch, "before": before})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # After the step: the gradient as the optimizer got it (clipped in the module's own
        # on_before_optimizer_step, which runs after the callbacks' hooks of that name).
        self.steps[-1]["grads"] = {n: p.grad.clone() for n, p in module.named_parameters()}


def _fit_one_step(tmp_path, defer: bool, **clip) -> tuple[MAML, _Recorder]:
    # SGD at rate 1: the parameter change is exactly minus the gradient the optimizer was given.
    model = MAML(
        MLP,
        num_outputs=1,
        loss="mse",
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        **grouped(inner_optimizer=SGD(lr=0.01, learn_lr="per_parameter"), strategy="loop", **clip),
    )
    model.finite_guard.defer = defer
    data = MetaDataModule(
        Sinusoid(), shots=5, query_shots=5, meta_batch_size=4, evaluation=EvaluationTasks(num_val_tasks=2)
    )
    recorder = _Recorder()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        inference_mode=False,
        use_distributed_sampler=False,
        callbacks=[recorder],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    return model, recorder


def _unclipped_meta_gradient(model: MAML, step: dict) -> dict[str, torch.Tensor]:
    """The meta-gradient of the recorded batch, from the recorded weights (engine's meta_loss, no clipping)."""
    params = {n: p.clone().requires_grad_() for n, p in step["before"].items() if n.startswith("network.")}
    rates = {n: p.clone().requires_grad_() for n, p in step["before"].items() if n.startswith("inner_lrs.")}
    value, _ = meta_loss(
        {n.removeprefix("network."): p for n, p in params.items()},
        {},
        step["batch"],
        model=model.network,
        loss="mse",
        steps=1,
        lr={n.removeprefix("network."): rates["inner_lrs." + n[8:].replace(".", "-")] for n in params},
        strategy="loop",
    )
    value.backward()
    return {n: p.grad for n, p in (params | rates).items()}


@pytest.mark.parametrize("defer", [False, True], ids=["checked", "deferred"])
def test_clip_by_value_bounds_every_entry_before_the_step(tmp_path, defer):
    clip = 1e-3  # far below this meta-gradient's largest entries, so clipping is active
    model, recorder = _fit_one_step(tmp_path, defer, meta_grad_clip_value=clip)
    (step,) = recorder.steps
    unclipped = _unclipped_meta_gradient(model, step)
    assert set(unclipped) == set(step["grads"]) and any(n.startswith("inner_lrs.") for n in unclipped)
    assert max(g.abs().max() for g in unclipped.values()) > 10 * clip
    after = dict(model.named_parameters())
    for name, grad in step["grads"].items():
        torch.testing.assert_close(grad, unclipped[name].clamp(-clip, clip), rtol=1e-5, atol=1e-9)
        change = after[name].detach() - step["before"][name]
        # float32: after - before carries the rounding of after (|weights| < 2, so < 2.4e-7).
        torch.testing.assert_close(change, -grad, rtol=0, atol=1e-6)
        assert change.abs().max() <= clip + 1e-6, name


@pytest.mark.parametrize("defer", [False, True], ids=["checked", "deferred"])
def test_clip_by_norm_bounds_the_total_norm_before_the_step(tmp_path, defer):
    clip = 1e-2
    model, recorder = _fit_one_step(tmp_path, defer, meta_grad_clip_norm=clip)
    (step,) = recorder.steps
    unclipped = _unclipped_meta_gradient(model, step)
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in unclipped.values()]))
    assert norm > 10 * clip
    after = dict(model.named_parameters())
    changes = [after[n].detach() - step["before"][n] for n in step["grads"]]
    assert torch.linalg.vector_norm(torch.cat([c.flatten() for c in changes])) == pytest.approx(
        clip, rel=1e-4
    )
    for name, grad in step["grads"].items():  # the same direction, scaled down
        torch.testing.assert_close(grad, unclipped[name] * (clip / norm), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["clip_value", "clip_norm"])
@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True])
def test_bad_clipping_threshold_is_named(name, value):
    pattern = rf"model\.meta_objective\.{name}={re.escape(repr(value))}: .*positive finite"
    with pytest.raises(ValueError, match=pattern):
        MAML(MLP, num_outputs=1, loss="mse", meta_objective=MetaObjective(**{name: value}))


# ------------------------------------------------------------------------------------------ configs


def _instantiate(path: str, tmp_path, monkeypatch) -> MAMLCLI:
    monkeypatch.chdir(tmp_path)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # pytest's argv
    return MAMLCLI(
        MAML,
        MetaDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_callback=SaveRunConfig,
        args=["--config", path, "--trainer.accelerator=cpu"],
        run=False,
    )


def _reference_command(path: str) -> dict[str, str]:
    """The `--flag=value` pairs of the reference command the config's second line quotes."""
    with open(path) as f:
        second = f.read().splitlines()[1]
    assert second.startswith("# Reference: python main.py "), second
    return dict(re.findall(r"--(\w+)=(\S+)", second))


def test_there_are_paper_configs():
    names = {os.path.basename(p) for p in PAPER}
    expected = {f"omniglot_{c}.yaml" for c in ("5w1s", "5w5s", "20w1s", "20w5s")}
    assert names == expected | {"miniimagenet_5w1s.yaml", "miniimagenet_5w5s.yaml"}


@pytest.mark.parametrize("path", PAPER, ids=os.path.basename)
def test_paper_config_runs_the_quoted_reference_command(path, tmp_path, monkeypatch):
    cli = _instantiate(path, tmp_path, monkeypatch)
    model, data, reference = cli.model, cli.datamodule, _reference_command(path)
    ways = int(reference.get("num_classes", 5))  # main.py's default
    assert data.ways == ways and data.shots == int(reference["update_batch_size"])
    assert data.meta_batch_size == int(reference["meta_batch_size"])
    assert model.train_inner["steps"] == int(reference["num_updates"])
    assert cli.trainer.max_steps == int(reference["metatrain_iterations"])
    # Its loss is the sum over the support set divided by K: `ways` times fmaml's mean.
    assert model.train_inner["lr"] == pytest.approx(float(reference["update_lr"]) * ways)
    assert model.eval_inner["steps"] == 10 and data.evaluation.num_test_tasks == 600
    assert model.adapt_only == REFERENCE_ADAPTED
    optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 0.001  # main.py's meta_lr


@pytest.mark.parametrize("path", PAPER_OMNIGLOT, ids=os.path.basename)
def test_paper_omniglot_config(path, tmp_path, monkeypatch):
    cli = _instantiate(path, tmp_path, monkeypatch)
    data, network = cli.datamodule, cli.model.network
    assert data.dataset.split == "paper"
    assert data.query_shots == data.shots
    assert network.head_input == "mean" and network.head.in_features == 64
    assert 0.9 < network.head.weight.std() < 1.1  # init: reference, its N(0, 1) Omniglot head
    assert (cli.model.meta_objective.clip_value, cli.model.meta_objective.clip_norm) == (None, None)


@pytest.mark.parametrize("path", PAPER_MINIIMAGENET, ids=os.path.basename)
def test_paper_miniimagenet_config(path, tmp_path, monkeypatch):
    cli = _instantiate(path, tmp_path, monkeypatch)
    data, network = cli.datamodule, cli.model.network
    assert data.query_shots == 15  # main.py: DataGenerator(update_batch_size + 15) in training
    assert network.head_input == "flatten" and network.head.in_features == 32 * 5 * 5
    assert network.head.bias.abs().max() == 0  # init: reference
    # maml.py clips at 10 the gradient of a loss ways * query_shots / shots times fmaml's.
    scale = data.ways * data.query_shots / data.shots
    assert cli.model.meta_objective.clip_value == pytest.approx(10 / scale)
    assert cli.model.meta_objective.clip_norm is None


def test_paper_omniglot_config_trains(tmp_path_factory, tmp_path, monkeypatch):
    root = tiny_omniglot_root(tmp_path_factory, chars_per_split=20)  # enough characters for 5 ways
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "--config",
            os.path.join(REPO, "configs", "paper", "omniglot_5w1s.yaml"),
            f"--data.root={root}",
            "--trainer.fast_dev_run=true",
            "--model.network.filters=4",
            "--model.execution.strategy=loop",
            *TINY,
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.model.network.head.in_features == 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(REPO, "configs")))
def test_every_config_says_on_its_first_line_what_it_is(path):
    with open(path) as f:
        first = f.readline()
    assert first.startswith("# ") and len(first) > 40, first
    relative = os.path.relpath(path, os.path.join(REPO, "configs"))
    # Only configs/paper/ runs the reference's settings; the others must not claim the paper's.
    assert "the MAML paper's settings" not in first, relative
    if relative.startswith("paper" + os.sep):
        assert "reference code" in first, relative

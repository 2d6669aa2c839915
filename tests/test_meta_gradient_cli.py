"""Issue 21: `--model.meta_objective.meta_gradient` (iMAML, Reptile) end to end through the CLI and the module: settings
it cannot honour are refused at start-up in one line, before any data is looked at; strategy=auto measures
with it; evaluation adapts with iMAML's proximal term; a run with it trains and tests."""

import pytest
import torch
import torch.nn.functional as F
from fixtures import TINY, config, error_lines
from torch.func import functional_call

from fmaml import auto_strategy
from fmaml.cli import command_line, main
from fmaml.inner_optimizers import SGD
from fmaml.meta_gradients import Implicit, Reptile
from fmaml.models import MLP
from fmaml.module import MAML
from fmaml.settings import grouped

SINUSOID = config("sinusoid.yaml")
IMPLICIT = "--model.meta_objective.meta_gradient=fmaml.meta_gradients.Implicit"
REPTILE = "--model.meta_objective.meta_gradient=fmaml.meta_gradients.Reptile"
STARTUP_HINT = "(FMAML_DEBUG=1 shows the traceback)"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FMAML_DEBUG", raising=False)


@pytest.mark.parametrize(
    ("override", "error"),
    [
        pytest.param(
            [IMPLICIT, "--model.meta_objective.meta_gradient.lam=0"],
            "error: model.meta_objective.meta_gradient.lam=0.0: iMAML's proximal weight λ must be a finite number > 0",
            id="lam",
        ),
        pytest.param(
            [IMPLICIT, "--model.meta_objective.meta_gradient.cg_steps=0"],
            "error: model.meta_objective.meta_gradient.cg_steps=0: the conjugate-gradient iterations must be an integer >= 1",
            id="cg_steps",
        ),
        pytest.param(
            [IMPLICIT, "--model.inner_loop.first_order=true"],
            "error: model.meta_objective.meta_gradient=Implicit(lam=1.0, cg_steps=5, cg_tol=0.0) with first_order (or "
            "second_order_from_step): iMAML never differentiates through the inner steps",
            id="first-order",
        ),
        pytest.param(
            [REPTILE, "--model.meta_objective.multi_step_loss=true"],
            "error: model.meta_objective.meta_gradient=Reptile() with the multi-step loss",
            id="multi-step-loss",
        ),
        pytest.param(
            [REPTILE, "--model.execution.memory=recompute"],
            "error: model.meta_objective.meta_gradient=Reptile() with memory=recompute: Reptile never differentiates through "
            "the inner steps, so its memory is already flat in the steps",
            id="recompute",
        ),
        pytest.param(
            [IMPLICIT, "--model.inner_loop.adapt_only=[head]"],
            "error: model.meta_objective.meta_gradient=Implicit(lam=1.0, cg_steps=5, cg_tol=0.0) with adapt_only (ANIL)",
            id="anil",
        ),
        pytest.param(
            [
                REPTILE,
                "--model.inner_loop.optimizer=fmaml.inner_optimizers.SGD",
                "--model.inner_loop.optimizer.learn_lr=per_parameter",
            ],
            "error: model.meta_objective.meta_gradient=Reptile() with learned inner rates (learn_lr)",
            id="learned-rates",
        ),
        pytest.param(
            [IMPLICIT, "--model.network.init_args.batch_norm.per_step=1"],
            "error: model.meta_objective.meta_gradient=Implicit(lam=1.0, cg_steps=5, cg_tol=0.0) with a per-step network",
            id="per-step-batch-norm",
        ),
    ],
)
def test_a_setting_it_cannot_honour_is_one_line_at_start_up(override, error, tmp_path, capsys):
    no_data = [f"--data.root={tmp_path / 'nodata'}", "--data.dataset.init_args.download=false"]
    assert command_line(["fit", "--config", config("omniglot.yaml"), *override, *no_data, *TINY]) == 1
    line, hint = error_lines(capsys)
    assert line.startswith(error), line
    assert hint == STARTUP_HINT
    assert not (tmp_path / "nodata").exists()


def _sinusoid_tasks(num_tasks: int = 4, shots: int = 5):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(num_tasks, 2 * shots, 1, generator=generator) * 10 - 5
    y = torch.sin(x + torch.rand(num_tasks, 1, 1, generator=generator))
    return {"support": (x[:, :shots], y[:, :shots]), "query": (x[:, shots:], y[:, shots:])}


def test_strategy_auto_measures_with_the_meta_gradient(tmp_path, monkeypatch):
    """auto times the meta-loss it will run: iMAML's, with store only (recompute has nothing to save)."""
    monkeypatch.setenv(auto_strategy.CACHE_ENV, str(tmp_path))
    calls = []
    original = Implicit.task_loss_and_grad

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Implicit, "task_loss_and_grad", counting)
    module = MAML(lambda outputs: MLP(outputs, hidden=(8,)), num_outputs=1, loss="mse",
                  **grouped(meta_gradient=Implicit(lam=2.0, cg_steps=2)))  # fmt: skip
    assert module._memories() == ("store",)
    module.strategy_choice._measure(module, _sinusoid_tasks(), module._train_inner())
    assert calls, "auto measured without the meta-gradient it will train with"
    assert module.strategy_choice.choice["memory"] == "store"
    assert module.strategy_choice.choice["phase"] == {"meta_gradient": "iMAML", "multi_step_loss": False}


def test_evaluation_adapts_with_imaml_proximal_term():
    """iMAML's evaluation solves its own inner problem, support loss + λ/2 ||φ - θ||², written out here with
    plain autograd; Reptile's evaluation is MAML's."""
    tasks, lam, lr, steps = _sinusoid_tasks(), 20.0, 0.02, 3

    def evaluated(meta_gradient):
        torch.manual_seed(0)
        settings = grouped(
            inner_steps=steps, inner_optimizer=SGD(lr=lr), meta_gradient=meta_gradient, strategy="loop"
        )
        module = MAML(lambda outputs: MLP(outputs, hidden=(8,)), num_outputs=1, loss="mse", **settings)
        return module, module._evaluate(tasks)

    module, imaml = evaluated(Implicit(lam=lam))
    _, plain = evaluated(None)
    _, reptile = evaluated(Reptile())
    torch.testing.assert_close(reptile["loss"], plain["loss"])
    theta = {name: p.detach() for name, p in module.network.named_parameters()}
    expected = []
    for t in range(tasks["support"][0].shape[0]):
        (sx, sy), (qx, qy) = ((x[t], y[t]) for x, y in (tasks["support"], tasks["query"]))
        phi = {name: p.clone().requires_grad_() for name, p in theta.items()}
        for _ in range(steps):
            support = F.mse_loss(functional_call(module.network, phi, (sx,)), sy)
            proximal = sum(((phi[n] - theta[n]) ** 2).sum() for n in phi) * lam / 2
            grads = torch.autograd.grad(support + proximal, list(phi.values()))
            phi = {
                n: (p - lr * g).detach().requires_grad_()
                for (n, p), g in zip(phi.items(), grads, strict=True)
            }
        expected.append(F.mse_loss(functional_call(module.network, phi, (qx,)), qy).detach())
    torch.testing.assert_close(imaml["loss"], torch.stack(expected), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(imaml["loss"], plain["loss"], rtol=1e-3)


@pytest.mark.parametrize("meta_gradient", [IMPLICIT, REPTILE])
def test_a_run_with_it_trains_and_tests(meta_gradient, tmp_path):
    common = ["--config", SINUSOID, meta_gradient, "--model.network.hidden=[8,8]", *TINY]
    fit = main(["fit", *common, "--trainer.max_steps=3", "--trainer.limit_val_batches=0"])
    assert fit.trainer.global_step == 3
    assert type(fit.model.train_inner["meta_gradient"]).__name__ == meta_gradient.rsplit(".", 1)[-1]
    last = tmp_path / "logs" / "fmaml" / "version_0" / "checkpoints" / "last.ckpt"
    tested = main(["test", *common, f"--ckpt_path={last}"])
    assert "test/loss" in tested.trainer.callback_metrics

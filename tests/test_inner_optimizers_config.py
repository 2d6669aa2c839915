"""`fmaml.inner_optimizers.from_config` on what LightningCLI makes of `class_path: torch.optim.X`: the
mapping to fmaml's functional optimizers, torch's defaults, and the refusals."""

import functools
import inspect
import json

import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import OptimizerCallable

from fmaml import inner_optimizers as fo
from fmaml.inner_optimizers import IMPLEMENTATION_FLAGS, InnerOptimizer, from_config

SUPPORTED = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")
# Arguments away from every default, per optimizer: each must reach fmaml's optimizer unchanged.
ARGUMENTS = {
    "SGD": dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True),
    "Adam": dict(
        lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, amsgrad=True, decoupled_weight_decay=True
    ),
    "AdamW": dict(lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
    "RMSprop": dict(lr=0.02, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True),
    "Adagrad": dict(lr=0.02, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.2, eps=1e-6),
}


def _supported():
    return list(SUPPORTED)


def _torch_defaults(torch_class) -> dict:
    """torch's defaults of every argument but the params and the implementation flags."""
    parameters = inspect.signature(torch_class).parameters.items()
    return {k: p.default for k, p in parameters if k != "params" and k not in IMPLEMENTATION_FLAGS}


def _arguments(optimizer: InnerOptimizer) -> dict:
    return {"lr": optimizer.lr, **optimizer.hyper}


def _lightning_cli_value(class_path: str, init_args: dict):
    """What LightningCLI hands the module for `--model.inner_loop.optimizer` (typed InnerOptimizer |
    OptimizerCallable): jsonargparse's callable that builds the torch optimizer from params."""
    parser = ArgumentParser()
    parser.add_argument("--inner_optimizer", type=InnerOptimizer | OptimizerCallable)
    config = parser.parse_args(
        ["--inner_optimizer", json.dumps({"class_path": class_path, "init_args": init_args})]
    )
    return parser.instantiate(config).inner_optimizer


@pytest.mark.parametrize("name", _supported())
def test_torch_defaults_map_to_the_same_class_with_torch_defaults(name):
    torch_class = getattr(torch.optim, name)
    optimizer = from_config(torch_class)
    assert type(optimizer) is getattr(fo, name)
    assert _arguments(optimizer) == _torch_defaults(torch_class)
    assert optimizer.ignored_flags == {}


@pytest.mark.parametrize("name", SUPPORTED)
def test_fmaml_classes_have_torch_defaults(name):
    """fmaml's own classes (`class_path: fmaml.inner_optimizers.X`) start from torch's defaults too."""
    assert _arguments(getattr(fo, name)()) == _torch_defaults(getattr(torch.optim, name))


@pytest.mark.parametrize("name", _supported())
def test_arguments_reach_fmaml_unchanged(name):
    """The stand-in for LightningCLI's callable (a functools.partial) and jsonargparse's own both map to
    fmaml's class with the same arguments, and torch's defaults for the others."""
    torch_class, arguments = getattr(torch.optim, name), ARGUMENTS[name]
    expected = _torch_defaults(torch_class) | arguments
    for value in (
        functools.partial(torch_class, **arguments),
        _lightning_cli_value(f"torch.optim.{name}", arguments),
    ):
        optimizer = from_config(value)
        assert type(optimizer) is getattr(fo, name)
        assert _arguments(optimizer) == expected
        assert optimizer.ignored_flags == {}
        assert optimizer.learn_lr == "off"


def test_the_seed_config_lines():
    """`class_path: torch.optim.SGD` with lr 0.01, and `class_path: torch.optim.Adam`, as the seed has them."""
    sgd = from_config(_lightning_cli_value("torch.optim.SGD", {"lr": 0.01}))
    assert type(sgd) is fo.SGD and sgd.lr == 0.01 and sgd.is_stateless
    adam = from_config(_lightning_cli_value("torch.optim.Adam", {}))
    assert type(adam) is fo.Adam and _arguments(adam) == _torch_defaults(torch.optim.Adam)


def test_fmaml_optimizer_passes_through():
    optimizer = fo.Adam(lr=0.01, learn_lr="per_layer_per_step")
    assert from_config(optimizer) is optimizer
    assert from_config(_lightning_cli_value("fmaml.inner_optimizers.Adam", {"lr": 0.01})) == fo.Adam(lr=0.01)


def test_equal_arguments_compare_equal():
    assert from_config(functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)) == fo.SGD(
        lr=0.01, momentum=0.9
    )


@pytest.mark.parametrize("torch_class", [torch.optim.LBFGS, torch.optim.Adadelta], ids=["LBFGS", "Adadelta"])
def test_unsupported_optimizer_is_refused_with_the_supported_list(torch_class):
    with pytest.raises(ValueError, match=torch_class.__name__) as error:
        from_config(functools.partial(torch_class, lr=0.1))
    assert "model.inner_loop.optimizer" in str(error.value)
    for name in SUPPORTED:
        assert f"torch.optim.{name}" in str(error.value)


def test_something_else_is_refused_with_the_supported_list():
    for value in ("sgd", 0.01, lambda params: torch.nn.Linear(1, 1)):
        with pytest.raises(ValueError, match="model.inner_loop.optimizer.*torch.optim.SGD"):
            from_config(value)


INVALID = [
    ("SGD", dict(lr=0.01, momentum=-0.1), "-0.1"),
    ("SGD", dict(lr=0.01, nesterov=True), "Nesterov"),
    ("SGD", dict(lr=0.0), "lr=0.0"),
    ("SGD", dict(lr=-0.01), "-0.01"),
    ("Adam", dict(lr=0.01, betas=(1.5, 0.9)), "1.5"),
    ("Adam", dict(lr=0.0), "lr=0.0"),
    ("RMSprop", dict(lr=0.01, alpha=-0.5), "-0.5"),
    ("Adagrad", dict(lr=0.01, lr_decay=-1.0), "-1.0"),
]


@pytest.mark.parametrize(("name", "arguments", "value"), INVALID, ids=[f"{n}-{a}" for n, a, _ in INVALID])
def test_invalid_arguments_are_refused_by_name(name, arguments, value):
    """Through the config and through fmaml's class alike: a ValueError naming model.inner_loop.optimizer and
    the bad value."""
    for build in (
        lambda: from_config(functools.partial(getattr(torch.optim, name), **arguments)),
        lambda: getattr(fo, name)(**arguments),
    ):
        with pytest.raises(ValueError, match="model.inner_loop.optimizer") as error:
            build()
        assert value in str(error.value)


def _flags():
    """(optimizer, flag, a value away from its default) for every implementation flag torch's class has."""
    away = {"foreach": True, "fused": True, "capturable": True, "differentiable": True}
    return [
        (name, flag, value)
        for name in SUPPORTED
        for flag, value in away.items()
        if flag in inspect.signature(getattr(torch.optim, name)).parameters
    ]


@pytest.mark.parametrize(("name", "flag", "value"), _flags())
def test_implementation_flags_away_from_defaults_are_recorded(name, flag, value):
    torch_class = getattr(torch.optim, name)
    optimizer = from_config(functools.partial(torch_class, lr=0.01, **{flag: value}))
    assert optimizer.ignored_flags == {flag: value}
    assert _arguments(optimizer) == _torch_defaults(torch_class) | {"lr": 0.01}
    default = inspect.signature(torch_class).parameters[flag].default
    at_default = from_config(functools.partial(torch_class, lr=0.01, **{flag: default}))
    assert at_default.ignored_flags == {}

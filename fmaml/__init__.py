"""fmaml: model-agnostic meta-learning as pure torch.func functions, vectorised over tasks."""

import importlib

# Imported on first use (PEP 562), so that tools which need neither torch nor Lightning, such as
# `python -m fmaml.sweep` and `python -m fmaml.curves`, start in a second instead of ten.
_HOMES = {
    "adapt": "fmaml.maml",
    "meta_loss": "fmaml.maml",
    "resolve_strategy": "fmaml.maml",
    "task_loss": "fmaml.maml",
    "task_loss_and_grad": "fmaml.maml",
    "MLP": "fmaml.models",
    "ConvNet": "fmaml.models",
    "BatchNormSettings": "fmaml.models",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'fmaml' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])

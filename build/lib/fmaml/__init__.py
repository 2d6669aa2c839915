"""fmaml: model-agnostic meta-learning as pure torch.func functions, vectorised over tasks."""

from fmaml.maml import adapt, meta_loss, resolve_strategy, task_loss, task_loss_and_grad
from fmaml.models import MLP, ConvNet

__all__ = ["MLP", "ConvNet", "adapt", "meta_loss", "resolve_strategy", "task_loss", "task_loss_and_grad"]

"""fmaml.data: few-shot meta-learning data (torchmeta underneath) as a LightningDataModule.

Public API: the dataset specs `Omniglot`, `MiniImageNet`, `Sinusoid`, `ImageFolder` (your own images),
`TorchmetaDataset` (base class `DatasetSpec`, what configs select with class_path) and `MetaDataModule`, with
its setting groups `EvaluationTasks` and `Loading`. The batch format is described
in fmaml.data.tasks; `InMemoryEpisodes` and `SinusoidEpisodes` (fmaml.data.tensor_tasks) sample it as
tensor ops on a device.

`torchmeta_compat` is imported first: it must patch torchvision before torchmeta is first imported.
"""

from fmaml.data import torchmeta_compat  # noqa: F401  (must come before any torchmeta import)

# isort: split
from fmaml.data.datamodule import EvaluationTasks, Loading, MetaDataModule, resolve_root
from fmaml.data.specs import DatasetSpec, ImageFolder, MiniImageNet, Omniglot, Sinusoid, TorchmetaDataset
from fmaml.data.tensor_tasks import InMemoryEpisodes, SinusoidEpisodes

__all__ = [
    "DatasetSpec",
    "EvaluationTasks",
    "ImageFolder",
    "InMemoryEpisodes",
    "Loading",
    "MetaDataModule",
    "MiniImageNet",
    "Omniglot",
    "Sinusoid",
    "SinusoidEpisodes",
    "TorchmetaDataset",
    "resolve_root",
]

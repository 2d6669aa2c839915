"""MetaDataModule: few-shot tasks of a dataset spec, as a LightningDataModule.

Batches are ``{"support": (x, y), "query": (x, y)}``; shapes in fmaml.data.tasks. Training tasks are
random, and meta-batch i is a pure function of (global seed, i), where i is the trainer's global step,
whatever the number of processes: a fit resumed from a checkpoint sees exactly the tasks an
uninterrupted one would have seen (the loader is effectively endless: bound training with max_steps).
Validation and test use fixed tasks (`evaluation`: how many, drawn from which seed), identical in every
epoch, process and run.

Under DDP each process gets its share of every meta-batch (`meta_batch_size / world size` tasks: its
slice of the meta-batch one process would draw) and of the validation/test tasks; Lightning's
distributed sampler must be off (``Trainer(use_distributed_sampler=False)``, the CLI's default).

Training tasks come from one of two samplers (`loading.sampler`): torchmeta's, image by image in Python
(fmaml.data.tasks), or fmaml.data.tensor_tasks, whole meta-batches as tensor ops on the training device.
Both draw the same task distribution; validation and test always use the torchmeta tasks.
"""

from __future__ import annotations

# torchmeta can be imported directly here: fmaml/data/__init__.py has applied torchmeta_compat first.
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import Subset
from torchmeta.transforms import ClassSplitter

from fmaml.data.specs import SPLIT_NAMES, DatasetSpec, Omniglot, Sinusoid
from fmaml.data.tasks import FixedTasks, fixed_task_loader, random_task_loader
from fmaml.data.tensor_tasks import InMemoryEpisodes, SinusoidEpisodes, tensor_task_loader
from fmaml.private_apis import uses_distributed_sampler
from fmaml.settings_check import warn_ignored_data_settings

ROOT_ENV = "FMAML_DATA_ROOT"
SAMPLERS = ("auto", "tensor", "torchmeta")


def _check_positive(value, name: str) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"data.{name}={value!r} must be a positive integer; set --data.{name} to 1 or more")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class EvaluationTasks:
    """The fixed tasks of meta-validation and meta-test: never what is trained, so a resumed fit may change them.

    num_val_tasks, num_test_tasks: how many fixed tasks validation and test each run.
    seed: the seed they are drawn from (training tasks follow the global seed, which
        lightning.seed_everything exports as PL_GLOBAL_SEED; a resumed fit keeps its checkpoint's).
    """

    num_val_tasks: int = 100
    num_test_tasks: int = 600
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_val_tasks", "num_test_tasks"):
            _check_positive(getattr(self, name), f"evaluation.{name}")
        if not _is_int(self.seed):
            raise ValueError(
                f"data.evaluation.seed={self.seed!r} must be an integer; set --data.evaluation.seed to e.g. 0"
            )


@dataclass(frozen=True)
class Loading:
    """How training tasks are drawn, and by how many processes tasks are loaded.

    sampler: "tensor": whole meta-batches as tensor ops on the trainer's device, in the main process
        whatever num_workers (fmaml.data.tensor_tasks; the Sinusoid, or a classification dataset read once
        into memory: Omniglot takes 16 MB and a few seconds to load). "torchmeta": task by task through
        torchmeta (any dataset; uses num_workers). "auto": "tensor" for Omniglot and the Sinusoid, else
        "torchmeta". Both give the same task distribution, not the same tasks (so a resumed fit keeps its
        run's sampler); validation and test tasks are torchmeta's fixed ones either way.
    num_workers: DataLoader worker processes (0: load in the main process); a resumed fit may change it.
    """

    sampler: Literal["auto", "tensor", "torchmeta"] = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"data.loading.sampler={self.sampler!r} is not one of {', '.join(SAMPLERS)}; set "
                "--data.loading.sampler=auto (tensor where supported), tensor or torchmeta"
            )
        if not _is_int(self.num_workers) or self.num_workers < 0:
            raise ValueError(
                f"data.loading.num_workers={self.num_workers!r} must be an integer >= 0 (0 loads in the main "
                "process); set --data.loading.num_workers to 0 or more"
            )


DEFAULT_EVALUATION, DEFAULT_LOADING = EvaluationTasks(), Loading()


def resolve_root(root: str | None) -> str:
    """--data.root if given, else $FMAML_DATA_ROOT, else ./data; as an absolute path."""
    return os.path.abspath(os.path.expanduser(root or os.environ.get(ROOT_ENV) or "data"))


class MetaDataModule(L.LightningDataModule):
    """Few-shot tasks for meta-training (random), meta-validation and meta-test (fixed).

    Args:
        dataset: the dataset spec (fmaml.data.Omniglot, MiniImageNet, Sinusoid, TorchmetaDataset).
        ways: classes per task (classification; not used for regression).
        shots: support examples per class (regression: support points per task).
        query_shots: query examples per class (regression: query points per task).
        meta_batch_size: tasks per meta-batch, in total over all DDP processes.
        root: data folder; default $FMAML_DATA_ROOT, else ./data.
        evaluation: the fixed validation and test tasks, `EvaluationTasks` (`data.evaluation.num_test_tasks`).
        loading: the training tasks' sampler and the loader's workers, `Loading` (`data.loading.sampler`).

    Attributes for argument linking (valid right after __init__): ``num_outputs`` (ways, or 1 for
    regression), ``loss`` ("cross_entropy" or "mse"), ``in_channels`` and ``input_shape``.
    """

    def __init__(
        self,
        dataset: DatasetSpec,
        ways: int = 5,
        shots: int = 5,
        query_shots: int = 15,
        meta_batch_size: int = 32,
        root: str | None = None,
        evaluation: EvaluationTasks = DEFAULT_EVALUATION,
        loading: Loading = DEFAULT_LOADING,
    ):
        super().__init__()
        if not isinstance(dataset, DatasetSpec):
            raise TypeError(
                f"data.dataset must be a fmaml.data dataset spec (Omniglot, MiniImageNet, Sinusoid, "
                f"TorchmetaDataset), got {dataset!r}"
            )
        for name, value in [
            ("ways", ways),
            ("shots", shots),
            ("query_shots", query_shots),
            ("meta_batch_size", meta_batch_size),
        ]:
            _check_positive(value, name)
        if dataset.samples_per_class is not None and shots + query_shots > dataset.samples_per_class:
            raise ValueError(_too_few_samples(dataset.name, shots, query_shots, dataset.samples_per_class))
        self.sampler = _resolve_sampler(loading.sampler, dataset)

        self.dataset = dataset
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.meta_batch_size = meta_batch_size
        self.root = resolve_root(root)
        self.evaluation, self.loading = evaluation, loading
        self.save_hyperparameters(ignore=["dataset"])
        warn_ignored_data_settings(self)
        self._metadatasets: dict[str, object] = {}
        self._train_seed: int | None = None  # fixed at the first train_dataloader, or by a checkpoint
        self._episodes: InMemoryEpisodes | SinusoidEpisodes | None = None  # the tensor sampler's data

    # --- attributes for argument linking -------------------------------------------------------------
    @property
    def task_type(self) -> str:
        return self.dataset.task_type

    @property
    def num_outputs(self) -> int:
        return self.ways if self.task_type == "classification" else 1

    @property
    def loss(self) -> str:
        return "cross_entropy" if self.task_type == "classification" else "mse"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.input_shape)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    # --- Lightning hooks -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download/convert files once (e.g. the Omniglot zips -> data.hdf5)."""
        self.dataset.prepare(self.root)

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in splits.get(stage, ["train", "val", "test"]):
            if split not in self._metadatasets:
                self._metadatasets[split] = self._build(split)
        if stage in ("fit", None):
            self._share(self.meta_batch_size, "meta_batch_size")  # under DDP: fail now, not after validation

    def train_dataloader(self):
        rank, world_size = self._process()
        batch_size = self._share(self.meta_batch_size, "meta_batch_size")
        if self.sampler == "tensor":
            # Sampling on the device in the main process is the point: workers would only add copies.
            warnings.filterwarnings("ignore", message="The 'train_dataloader' does not have many workers")
            return tensor_task_loader(
                self._tensor_episodes(), batch_size, self._stream_seed(), rank, world_size, self._global_step
            )
        return random_task_loader(
            self._get("train"),
            batch_size,
            self.loading.num_workers,
            self._stream_seed(),
            rank,
            world_size,
            position=self._global_step,
        )

    def val_dataloader(self):
        return self._fixed_task_loader("val")

    def test_dataloader(self):
        return self._fixed_task_loader("test")

    def state_dict(self) -> dict:
        # Saved in checkpoints: a resumed fit continues the same task stream even if the global seed differs.
        return {"train_seed": self._train_seed} if self._train_seed is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning calls this when restoring a checkpoint, before it asks for the train dataloader.
        self._train_seed = state_dict.get("train_seed", self._train_seed)

    # --- helpers -------------------------------------------------------------------------------------
    def _stream_seed(self) -> int:
        if self._train_seed is None:
            # The seed of lightning.seed_everything (the CLI's seed_everything), the same in every DDP
            # process; without one, a random stream (from torch's RNG, as before).
            seed = os.environ.get("PL_GLOBAL_SEED")
            self._train_seed = int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        return self._train_seed

    def _tensor_episodes(self) -> InMemoryEpisodes | SinusoidEpisodes:
        """The tensor sampler's data on the training device (the trainer's root device, else the CPU),
        loaded once."""
        strategy = getattr(self.trainer, "strategy", None)
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        if self._episodes is None or self._episodes.device != device:
            if isinstance(self.dataset, Sinusoid):
                num_tasks = self.dataset.num_train_tasks
                self._episodes = SinusoidEpisodes(self.shots, self.query_shots, device, num_tasks)
            else:
                self._episodes = InMemoryEpisodes.from_metadataset(
                    self._get("train"), self.shots, self.query_shots, device
                )
        return self._episodes

    def _global_step(self) -> int:
        # Where the training stream (re)starts: one meta-step per batch, and Lightning restores the step
        # before it iterates the train loader. Without a Trainer, from the start.
        return self.trainer.global_step if self.trainer is not None else 0

    def _process(self) -> tuple[int, int]:
        """(global rank, world size) of this process; (0, 1) without a Trainer."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        if uses_distributed_sampler(trainer):
            raise ValueError(
                "MetaDataModule gives each DDP process its own tasks: create the Trainer with "
                "use_distributed_sampler=False (the fmaml CLI's default; --trainer.use_distributed_sampler=false)"
            )
        return trainer.global_rank, trainer.world_size

    def _share(self, total: int, name: str) -> int:
        _, world_size = self._process()
        if total % world_size:
            raise ValueError(
                f"data.{name}={total} must be a multiple of the {world_size} DDP processes, which share each "
                f"meta-batch; set --data.{name} to e.g. {world_size * max(1, total // world_size)}"
            )
        return total // world_size

    def _batch_size(self) -> int:
        # Evaluation batches only bound memory: no need for the meta-batch to divide evenly.
        return max(1, self.meta_batch_size // self._process()[1])

    def _fixed_task_loader(self, split: str):
        """This process's share of the split's fixed tasks (`evaluation.num_<split>_tasks`): every
        world_size-th, from its rank (uneven shares are fine)."""
        name = f"num_{split}_tasks"
        num_tasks = getattr(self.evaluation, name)
        tasks = FixedTasks(self._get(split), num_tasks, self.evaluation.seed, split)
        rank, world_size = self._process()
        if world_size > 1:
            if num_tasks < world_size:
                raise ValueError(
                    f"data.evaluation.{name}={num_tasks} is fewer than the {world_size} DDP processes; set "
                    f"--data.evaluation.{name} to {world_size} or more"
                )
            tasks = Subset(tasks, range(rank, num_tasks, world_size))
        return fixed_task_loader(tasks, self._batch_size(), self.loading.num_workers)

    def _get(self, split: str):
        if split not in self._metadatasets:
            self.prepare_data()  # used without a Trainer: prepare on demand (no-op when done)
            self._metadatasets[split] = self._build(split)
        return self._metadatasets[split]

    def _build(self, split: str):
        """Check the split against ways/shots (from file metadata only), then build its meta-dataset."""
        num_classes, fewest = self.dataset.split_stats(self.root, split)
        where = f"the {SPLIT_NAMES[split]} split of {self.dataset.name}"
        if self.task_type == "classification" and self.ways > num_classes:
            raise ValueError(
                f"data.ways={self.ways} is larger than the {num_classes} classes in {where}; lower --data.ways"
            )
        if self.shots + self.query_shots > fewest:
            smallest = getattr(self.dataset, "smallest_class", None)
            where += f" (the smallest class: {smallest(split)})" if smallest else ""
            raise ValueError(_too_few_samples(where, self.shots, self.query_shots, fewest))
        splitter = ClassSplitter(
            shuffle=True, num_train_per_class=self.shots, num_test_per_class=self.query_shots
        )
        return self.dataset.build(self.root, split, self.ways, self.shots, self.query_shots, splitter)


def _resolve_sampler(sampler: str, dataset: DatasetSpec) -> str:
    """What `sampler` (one of SAMPLERS) means for `dataset` ("tensor" or "torchmeta"), or a clear error."""
    # The tensor sampler knows one regression task family (the sinusoid); any classification dataset
    # whose classes fit in memory works, but only Omniglot is chosen automatically.
    supported = isinstance(dataset, Sinusoid) or dataset.task_type == "classification"
    if sampler == "tensor" and not supported:
        raise ValueError(
            f"data.loading.sampler=tensor does not support {dataset.name} (regression tasks other than the "
            "Sinusoid); set --data.loading.sampler=torchmeta or auto"
        )
    if sampler == "auto":
        return "tensor" if isinstance(dataset, (Omniglot, Sinusoid)) else "torchmeta"
    return sampler


def _too_few_samples(where: str, shots: int, query_shots: int, available: int) -> str:
    return (
        f"data.shots + data.query_shots = {shots} + {query_shots} = {shots + query_shots} is more than the "
        f"{available} examples per class in {where}; lower --data.shots or --data.query_shots"
    )

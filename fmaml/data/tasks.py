"""Task batches: torchmeta tasks -> ``{"support": (x, y), "query": (x, y)}``, random or fixed.

Batch format (what the engine consumes), for a batch of T tasks:

- classification: ``x`` float32 ``[T, ways * shots, C, H, W]``, ``y`` int64 ``[T, ways * shots]`` with
  labels 0..ways-1; the query likewise with ``query_shots``. Samples are grouped by class.
- regression (sinusoid): ``x`` and ``y`` float32 ``[T, shots, 1]`` (query ``[T, query_shots, 1]``).

Every task, random or fixed, is a pure function of a seed (`load_task`): no RNG state is carried from
one task to the next, so DataLoader workers, DDP processes and resumed runs all build the same tasks.
"""

from __future__ import annotations

# torchmeta can be imported directly here: fmaml/data/__init__.py has applied torchmeta_compat first.
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate
from torchmeta.transforms.splitters import Splitter
from torchmeta.utils.data import CombinationMetaDataset
from torchmeta.utils.data.dataloader import BatchMetaCollate

_collate_tasks = BatchMetaCollate(default_collate)  # what BatchMetaDataLoader uses
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def to_support_query(batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """torchmeta's ``{"train": [x, y], "test": [x, y]}`` -> ``{"support": (x, y), "query": (x, y)}``.

    Floating tensors become float32 (the sinusoid comes as float64 from numpy).
    """

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.is_floating_point() else t

    return {new: tuple(cast(t) for t in batch[old]) for new, old in (("support", "train"), ("query", "test"))}


def collate_fixed_tasks(tasks) -> dict:
    """A list of `load_task` results (already tensors) -> one batch of the format above."""
    return to_support_query(default_collate(tasks))


def load_task(metadataset, index, seed: int):
    """Task `index` of a torchmeta meta-dataset as tensors, ``{"train": [x, y], "test": [x, y]}``.

    While it is built, torch's RNG (torchmeta's Categorical draws the label permutation from it) and the
    meta-dataset's RNG (ClassSplitter's order within support and query, the sinusoid's inputs) are
    seeded with `seed`, so the task depends on nothing else. Which samples of a class go to the
    support and which to the query is ClassSplitter's own choice: a hash of the task's classes.
    """
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed also queues seeds for CUDA, at about 1 ms a call.
        torch.default_generator.manual_seed(seed)
        _seed(metadataset, seed)
        task = metadataset[index]
        return _collate_tasks.collate_task(task)  # samples are loaded (and labels drawn) here


def _seed(metadataset, seed: int) -> None:
    """`metadataset.seed(seed)`, ~50x faster: that builds new RandomStates (0.13 ms each, about as long as
    loading a sinusoid task), where reseeding the existing ones in place gives the very same streams."""
    splitter = metadataset.dataset_transform
    if isinstance(getattr(metadataset, "np_random", None), np.random.RandomState) and (
        splitter is None or isinstance(splitter, Splitter)
    ):
        metadataset.np_random.seed(seed)
        if splitter is not None:
            splitter.np_random.seed(seed)
    else:  # other transforms (e.g. a Compose): let torchmeta find what to seed
        metadataset.seed(seed)


def draw_task_table(metadataset, seed: int) -> None:
    """Toy meta-datasets (sinusoid, harmonic) draw their table of task parameters lazily, from their RNG
    at first access: draw it now from `seed`, so that it does not depend on which task came first."""
    if not isinstance(metadataset, CombinationMetaDataset):
        metadataset.seed(seed)
        metadataset[0]


def random_index(metadataset, rng: np.random.Generator):
    """A uniformly random task: `ways` distinct classes (torchmeta's CombinationRandomSampler draws the
    same way, with python's `random`), or one entry of a toy dataset's table."""
    if isinstance(metadataset, CombinationMetaDataset):
        num_classes, ways = len(metadataset.dataset), metadataset.num_classes_per_task
        return tuple(int(c) for c in rng.choice(num_classes, ways, replace=False))
    return int(rng.integers(len(metadataset)))


# ---------------------------------------------------------------------------------------------- training


class RandomTasks(Dataset):
    """The training stream: item `i` is process `rank`'s share of meta-batch `i`, a pure function of
    (seed, i, rank, world size).

    Task j of batch i is built from ``SeedSequence([seed, train], spawn_key=(0, i, j))``: its classes (or
    sinusoid), then the seed given to `load_task`. j counts over the whole meta-batch, and process r holds
    tasks ``r * batch_size`` to ``(r + 1) * batch_size - 1``, so any number of processes trains on the tasks
    one process would (the leading 0, once the rank, keeps one process's stream what it always was).
    Nothing depends on earlier batches, so a resumed fit that asks for batch i gets the very batch an
    uninterrupted one got, in any worker. One epoch is ``len(metadataset)`` tasks, like torchmeta's loader.
    """

    def __init__(self, metadataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.metadataset, self.batch_size, self.first = metadataset, batch_size, rank * batch_size
        self.entropy = [seed, SPLIT_IDS["train"]]
        # A toy dataset's table is a fixed pool of tasks (like a dataset's images), drawn from a constant:
        # the same in every run and process, whatever the seed, which picks tasks from it.
        draw_task_table(metadataset, SPLIT_IDS["train"])
        with warnings.catch_warnings():  # torchmeta warns that C(classes, ways) exceeds sys.maxsize
            warnings.simplefilter("ignore")
            self.num_batches = max(1, len(metadataset) // (batch_size * world_size))

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, i: int) -> dict:
        tasks = []
        for j in range(self.first, self.first + self.batch_size):
            rng = np.random.default_rng(np.random.SeedSequence(self.entropy, spawn_key=(0, i, j)))
            index = random_index(self.metadataset, rng)
            tasks.append(load_task(self.metadataset, index, int(rng.integers(2**32))))
        return collate_fixed_tasks(tasks)


class StreamSampler(Sampler[int]):
    """Batch indices from `position()` to the end of that epoch (epochs of `num_batches` batches).

    `position` is the trainer's global step (one meta-step per batch): Lightning restores it from the
    checkpoint before it first iterates the loader, and iterates it anew at each epoch, so the stream
    always continues where training is, whatever was prefetched or lost in an interruption.
    """

    def __init__(self, num_batches: int, position: Callable[[], int]):
        self.num_batches, self.position = num_batches, position

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        start = self.position()
        return iter(range(start, (start // self.num_batches + 1) * self.num_batches))


class StreamLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch (so it doesn't warn that it cannot): its
    position is the restored global step (see StreamSampler), so it has no state of its own to save."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _as_is(batch):
    return batch  # stream items are whole batches already


def stream_loader(batches: Dataset, num_workers: int, position: Callable[[], int]) -> StreamLoader:
    """The loader of a training stream whose item i is meta-batch i (RandomTasks, tensor_tasks.EpisodeStream),
    starting at batch `position()` (see StreamSampler)."""
    return StreamLoader(
        batches,
        batch_size=None,  # each item is a batch
        sampler=StreamSampler(len(batches), position),
        num_workers=num_workers,
        collate_fn=_as_is,
        persistent_workers=num_workers > 0,
    )


def random_task_loader(
    metadataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    position: Callable[[], int] = lambda: 0,
) -> DataLoader:
    """Random training tasks, `batch_size` per batch, for process `rank` of `world_size`; the first batch
    is batch `position()` of the stream (see RandomTasks, StreamSampler)."""
    return stream_loader(RandomTasks(metadataset, batch_size, seed, rank, world_size), num_workers, position)


# ------------------------------------------------------------------------------------ validation, test


class FixedTasks(Dataset):
    """`num_tasks` tasks of a meta-dataset that are the same every time, in every process.

    Task i is fully determined by (seed, split, i): its classes are drawn from a generator seeded with
    them, and it is built by `load_task` with a seed from them too. Each item is one task as tensors:
    ``{"train": [x, y], "test": [x, y]}`` (torchmeta's keys; the collate_fn renames them).
    """

    def __init__(self, metadataset, num_tasks: int, seed: int, split: str):
        self.metadataset = metadataset
        self.num_tasks = num_tasks
        self.seeds = [
            int(s) for s in np.random.SeedSequence([seed, SPLIT_IDS[split]]).generate_state(num_tasks)
        ]
        if isinstance(metadataset, CombinationMetaDataset):
            self.indices = [random_index(metadataset, np.random.default_rng(s)) for s in self.seeds]
        else:
            self.indices = list(range(num_tasks))
            draw_task_table(metadataset, self.seeds[0])

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, i: int):
        return load_task(self.metadataset, self.indices[i], self.seeds[i])


def fixed_task_loader(tasks: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Loader over fixed tasks (or a process's share of them), in order; the last batch may be partial."""
    return DataLoader(
        tasks,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fixed_tasks,
        persistent_workers=num_workers > 0,
    )

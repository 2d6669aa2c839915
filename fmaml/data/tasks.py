"""Task batches: torchmeta tasks -> ``{"support": (x, y), "query": (x, y)}``, random or fixed.

Batch format (what the engine consumes), for a batch of T tasks:

- classification: ``x`` float32 ``[T, ways * shots, C, H, W]``, ``y`` int64 ``[T, ways * shots]`` with
  labels 0..ways-1; the query likewise with ``query_shots``. Samples are grouped by class.
- regression (sinusoid): ``x`` and ``y`` float32 ``[T, shots, 1]`` (query ``[T, query_shots, 1]``).
"""

from __future__ import annotations

# torchmeta can be imported directly here: fmaml/data/__init__.py has applied torchmeta_compat first.
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, get_worker_info
from torch.utils.data.dataloader import default_collate
from torchmeta.utils.data import CombinationMetaDataset
from torchmeta.utils.data.dataloader import BatchMetaCollate
from torchmeta.utils.data.sampler import CombinationRandomSampler

_collate_tasks = BatchMetaCollate(default_collate)  # what BatchMetaDataLoader uses
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def to_support_query(batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """torchmeta's ``{"train": [x, y], "test": [x, y]}`` -> ``{"support": (x, y), "query": (x, y)}``.

    Floating tensors become float32 (the sinusoid comes as float64 from numpy).
    """

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.is_floating_point() else t

    return {new: tuple(cast(t) for t in batch[old]) for new, old in (("support", "train"), ("query", "test"))}


def collate_random_tasks(tasks) -> dict:
    """collate_fn of the training loader: a list of torchmeta tasks -> one batch of the format above."""
    return to_support_query(_collate_tasks(tasks))


def collate_fixed_tasks(tasks) -> dict:
    """collate_fn of the val/test loaders: a list of FixedTasks items (already tensors) -> one batch."""
    return to_support_query(default_collate(tasks))


def _reseed_worker(worker_id: int) -> None:
    # Each DataLoader worker gets a copy of the meta-dataset whose ClassSplitter / sinusoid RNG would be
    # identical in every worker; torch gives each worker its own seed, derived from the main process's
    # torch RNG, so training stays reproducible under lightning.seed_everything.
    info = get_worker_info()
    info.dataset.seed(info.seed % 2**32)


def random_task_loader(metadataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """Endless-ish stream of random training tasks (torchmeta's BatchMetaDataLoader, our batch format).

    Which classes form a task comes from python's `random` (torchmeta's CombinationRandomSampler, or
    torch's RandomSampler for the sinusoid), the label order from torch's RNG, the split of a class
    into support/query from a hash of the task, the order within it from the meta-dataset's RNG, which
    is seeded with `seed` here: all are reproducible under lightning.seed_everything.
    """
    metadataset.seed(seed)
    # What torchmeta's BatchMetaDataLoader does, with our collate_fn and persistent workers.
    if isinstance(metadataset, CombinationMetaDataset):
        sampler = CombinationRandomSampler(metadataset)
    else:
        sampler = RandomSampler(metadataset)
    return DataLoader(
        metadataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_random_tasks,
        worker_init_fn=_reseed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )


class FixedTasks(Dataset):
    """`num_tasks` tasks of a meta-dataset that are the same every time, in every process.

    Task i is fully determined by (seed, split, i): its classes are drawn from a generator seeded with
    them, and while it is built, torch's RNG (labels order) and the meta-dataset's RNG (ClassSplitter's
    order, sinusoid points) are seeded from them too. Each item is one task as tensors:
    ``{"train": [x, y], "test": [x, y]}`` (torchmeta's keys; the collate_fn renames them).
    """

    def __init__(self, metadataset, num_tasks: int, seed: int, split: str):
        self.metadataset = metadataset
        self.num_tasks = num_tasks
        self.seeds = [
            int(s) for s in np.random.SeedSequence([seed, SPLIT_IDS[split]]).generate_state(num_tasks)
        ]
        if isinstance(metadataset, CombinationMetaDataset):
            num_classes, ways = len(metadataset.dataset), metadataset.num_classes_per_task
            self.indices = [
                tuple(int(c) for c in np.random.default_rng(s).choice(num_classes, ways, replace=False))
                for s in self.seeds
            ]
        else:
            self.indices = list(range(num_tasks))
            # e.g. the sinusoid draws its table of amplitudes/phases lazily, from its RNG: draw it now.
            metadataset.seed(self.seeds[0])
            metadataset[0]

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seeds[i])
            self.metadataset.seed(self.seeds[i])
            task = self.metadataset[self.indices[i]]
            return _collate_tasks.collate_task(task)  # samples are loaded (and labels drawn) here


def fixed_task_loader(tasks: FixedTasks, batch_size: int, num_workers: int) -> DataLoader:
    """Loader over fixed tasks, in order; the last batch may hold fewer tasks."""
    return DataLoader(
        tasks,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fixed_tasks,
        persistent_workers=num_workers > 0,
    )

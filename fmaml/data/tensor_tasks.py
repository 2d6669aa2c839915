"""Training tasks sampled as tensor ops on the training device: a whole meta-batch per call, no Python
per image or per task.

- `InMemoryEpisodes`: any torchmeta classification meta-dataset that fits in memory (Omniglot: 25 MB as
  uint8). Its base classes are read once through torchmeta (same splits, same transforms) into one
  tensor ``[classes, samples, C, H, W]``; class augmentations (Omniglot's rotations) stay tensor ops.
- `SinusoidEpisodes`: the sinusoid regression tasks of `torchmeta.toy.Sinusoid`, drawn as tensors.
- `tensor_task_loader`: the training stream over either, with the contract of fmaml.data.tasks: meta-batch
  `i` is a pure function of (seed, i) (on a given device type: CPU and CUDA generators give different
  streams), process `rank` of `world_size` takes its share of it, and it resumes at the trainer's global
  step (`StreamSampler`).

Batches have the format of fmaml.data.tasks, and the same task distribution as the torchmeta path:
``ways`` distinct classes (a rotated class is a class of its own), ``shots + query_shots`` distinct
examples of each, labels 0..ways-1 randomly assigned to the classes, samples grouped by class.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchmeta.transforms import HorizontalFlip, Rotation, VerticalFlip

from fmaml.data.tasks import SPLIT_IDS, StreamLoader, stream_loader

Batch = dict[str, tuple[Tensor, Tensor]]


def batch_generator(seed: int, i: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of training meta-batch `i`, the whole of it over all processes: from (seed, i) alone."""
    # The leading 0 was the process rank: kept, so that one process draws the stream it always drew.
    sequence = np.random.SeedSequence([seed, SPLIT_IDS["train"]], spawn_key=(0, i))
    return torch.Generator(device=device).manual_seed(int(sequence.generate_state(1, np.uint64)[0]))


def pixel_map(augmentation, height: int, width: int) -> Tensor:
    """A class augmentation as a permutation of pixels: int64 ``[H*W]``, output pixel p = input pixel
    map[p]. None is the identity. torchmeta applies these to the PIL image before Resize; after it
    they give the same image, except that a quarter turn swaps the order of PIL's two rounded resize
    passes: on Omniglot 2.3% of the pixels of a 90/270-degree class differ, by one grey level."""
    grid = torch.arange(height * width).reshape(height, width)
    fix = "use --data.loading.sampler=torchmeta"
    if augmentation is None:
        return grid.flatten()
    if isinstance(augmentation, (HorizontalFlip, VerticalFlip)):
        return grid.flip(1 if isinstance(augmentation, HorizontalFlip) else 0).flatten()
    if isinstance(augmentation, Rotation) and augmentation.angle is not None and augmentation.center is None:
        if augmentation.angle % 90 == 0:
            turns = augmentation.angle % 360 // 90
            if turns % 2 and height != width:
                raise ValueError(
                    f"data.loading.sampler=tensor: the class augmentation {augmentation!r} needs square images, "
                    f"got {height}x{width}; {fix}"
                )
            return torch.rot90(grid, turns, dims=(0, 1)).flatten()  # counter-clockwise, like PIL
    raise ValueError(
        f"data.loading.sampler=tensor: the class augmentation {augmentation!r} has no pixel-permutation "
        f"equivalent (only rotations by multiples of 90 degrees and flips); {fix}"
    )


class InMemoryEpisodes:
    """Classification tasks by indexing one image tensor held on the device.

    images: ``[base_classes, samples, C, H, W]``, uint8 (pixel value * 255, as ToTensor reads uint8
        images) or float32.
    pixel_maps: ``[augmentations + 1, H*W]`` (row 0 the identity, see `pixel_map`): class
        ``a * base_classes + b`` is base class b under augmentation a, torchmeta's class numbering.
    num_tasks: tasks per epoch of the training stream (torchmeta's ``len(metadataset)``).
    counts: ``[base_classes]`` int64, the examples of each class when classes differ in size (each class's
        first ``counts[c]`` rows of ``images`` hold them, the rest is padding never sampled); None: all
        ``samples`` rows of every class.
    """

    def __init__(
        self,
        images: Tensor,
        pixel_maps: Tensor,
        ways: int,
        shots: int,
        query_shots: int,
        num_tasks: int,
        counts: Tensor | None = None,
    ):
        if images.dim() != 5 or images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(
                f"images must be uint8 or float32 [classes, samples, C, H, W], got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        self.images, self.pixel_maps = images, pixel_maps.to(images.device)
        self.ways, self.shots, self.query_shots, self.num_tasks = ways, shots, query_shots, num_tasks
        self.counts = None if counts is None else counts.to(images.device)
        if ways > self.num_classes:
            raise ValueError(
                f"data.ways={ways} is larger than the {self.num_classes} classes; lower --data.ways"
            )
        fewest = images.shape[1] if counts is None else int(counts.min())
        if shots + query_shots > fewest:
            raise ValueError(
                f"data.shots + data.query_shots = {shots + query_shots} is more than the {fewest} "
                "examples of the smallest class; lower --data.shots or --data.query_shots"
            )

    @classmethod
    def from_metadataset(cls, metadataset, shots: int, query_shots: int, device="cpu") -> InMemoryEpisodes:
        """Read every base class of a torchmeta CombinationMetaDataset through its own transform, class
        by class into one preallocated ``[classes, samples, C, H, W]`` tensor: uint8 if every image is
        exactly k/255 (ToTensor of uint8 images: 4x less memory, exactly), else float. A split is never
        held as float on the way: MiniImageNet's would be several GB."""
        class_dataset = metadataset.dataset
        base = [
            class_dataset[c] for c in range(class_dataset.num_classes)
        ]  # no augmentation below num_classes
        sizes = [len(examples) for examples in base]
        # Classes of unequal size are padded to the largest; `counts` keeps sampling inside each class.
        counts = None if len(set(sizes)) == 1 else torch.tensor(sizes)
        images = None
        for c, examples in enumerate(base):
            x = torch.stack([examples[k][0] for k in range(len(examples))])  # [samples, (C,) H, W]
            if x.dim() == 3:  # [samples, H, W]: no channel axis
                x = x.unsqueeze(1)
            if images is None:
                images = torch.zeros(len(base), max(sizes), *x.shape[1:], dtype=torch.uint8)
            elif x.shape[1:] != images.shape[2:]:
                raise ValueError(
                    f"data.loading.sampler=tensor needs images of one shape, got {tuple(x.shape[1:])} in class {c} "
                    f"and {tuple(images.shape[2:])} before; use --data.loading.sampler=torchmeta"
                )
            if images.dtype == torch.uint8:
                pixels = _uint8_pixels(x)
                if pixels is not None:
                    images[c, : len(x)] = pixels
                    continue
                # Not k/255: the whole split stays float (the classes read so far, back exactly).
                as_float = torch.empty(images.shape, dtype=x.dtype)
                as_float[:c].copy_(images[:c]).div_(255)
                images = as_float
            images[c, : len(x)] = x
        height, width = images.shape[-2:]
        maps = [pixel_map(a, height, width) for a in [None, *class_dataset.class_augmentations]]
        with warnings.catch_warnings():  # torchmeta warns that C(classes, ways) exceeds sys.maxsize
            warnings.simplefilter("ignore")
            num_tasks = len(metadataset)
        ways = metadataset.num_classes_per_task
        return cls(images.to(device), torch.stack(maps), ways, shots, query_shots, num_tasks, counts)

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def num_classes(self) -> int:
        """Base classes times (augmentations + 1)."""
        return self.images.shape[0] * self.pixel_maps.shape[0]

    def sample(self, num_tasks: int, generator: torch.Generator, share: slice = slice(None)) -> Batch:
        """`num_tasks` tasks: x float32 ``[T, ways*shots, C, H, W]``, y int64 ``[T, ways*shots]``
        (query likewise), grouped by class; class order is random and labels permuted per task.
        `share`: the tasks to build (a DDP process's part of the meta-batch); all are drawn."""
        T, W, S = num_tasks, self.ways, self.images.shape[1]
        K = self.shots + self.query_shots
        device, base_classes = self.device, self.images.shape[0]

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=device)

        # Distinct classes per task and distinct examples per class: the positions of the largest of iid
        # uniforms, a uniformly random ordered subset (topk: 10x faster than a full argsort on CPU).
        classes = rand(T, self.num_classes).topk(W, dim=1).indices  # [T, W]
        scores = rand(T, W, S)
        if self.counts is not None:  # padding rows score below every real example, so topk never takes them
            padding = torch.arange(S, device=device) >= self.counts[classes % base_classes][:, :, None]
            scores = scores.masked_fill(padding, -1.0)
        examples = scores.topk(K, dim=2).indices  # [T, W, K]
        labels = rand(T, W).argsort(dim=1)  # [T, W]: the label of each class of the task
        classes, examples, labels = classes[share], examples[share], labels[share]  # gather these images only
        x = self.images[(classes % base_classes)[:, :, None], examples]  # [T, W, K, C, H, W]
        if self.pixel_maps.shape[0] > 1:
            pixels = self.pixel_maps[classes // base_classes]  # [T, W, H*W]
            flat = x.flatten(-2)
            x = flat.gather(-1, pixels[:, :, None, None, :].expand_as(flat)).view_as(x)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return _split(x, labels, self.shots)


def _uint8_pixels(x: Tensor) -> Tensor | None:
    """Float images -> their pixel values round(x * 255) (same shape, in x's dtype), or None unless every
    image is exactly k/255, k = 0..255 (then x.float() / 255 of the uint8 pixels gives back x)."""
    pixels = (x * 255).round_()
    if torch.equal(pixels / 255, x) and (x.numel() == 0 or (pixels.min() >= 0 and pixels.max() <= 255)):
        return pixels
    return None


def _split(x: Tensor, labels: Tensor, shots: int) -> Batch:
    """``[T, W, K, ...]`` examples and ``[T, W]`` labels -> support (first `shots` of each class), query."""
    T, W, K = x.shape[:3]

    def part(examples: Tensor) -> tuple[Tensor, Tensor]:
        k = examples.shape[2]
        y = labels[:, :, None].expand(T, W, k).reshape(T, W * k)
        return examples.reshape(T, W * k, *x.shape[3:]), y

    return {"support": part(x[:, :, :shots]), "query": part(x[:, :, shots:])}


class SinusoidEpisodes:
    """Sinusoid regression tasks (Finn et al. 2017), as `torchmeta.toy.Sinusoid` draws them: y = A sin(x -
    phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5], no noise. torchmeta picks (A, phase) from a
    pre-drawn table of `num_tasks`; here each task draws its own, from the same distribution.
    """

    amplitude_range = (0.1, 5.0)
    phase_range = (0.0, math.pi)
    input_range = (-5.0, 5.0)

    def __init__(self, shots: int, query_shots: int, device="cpu", num_tasks: int = 1_000_000):
        self.shots, self.query_shots, self.num_tasks = shots, query_shots, num_tasks
        self.device = torch.device(device)

    def sample(self, num_tasks: int, generator: torch.Generator, share: slice = slice(None)) -> Batch:
        """x, y float32 ``[T, shots, 1]`` (support) and ``[T, query_shots, 1]`` (query), of the tasks
        `share` of the `num_tasks` drawn."""

        def uniform(bounds, *shape):
            low, high = bounds
            return low + (high - low) * torch.rand(*shape, generator=generator, device=self.device)

        amplitude = uniform(self.amplitude_range, num_tasks, 1, 1)
        phase = uniform(self.phase_range, num_tasks, 1, 1)
        x = uniform(self.input_range, num_tasks, self.shots + self.query_shots, 1)
        amplitude, phase, x = amplitude[share], phase[share], x[share]
        y = amplitude * torch.sin(x - phase)
        return {
            "support": (x[:, : self.shots], y[:, : self.shots]),
            "query": (x[:, self.shots :], y[:, self.shots :]),
        }


class EpisodeStream(Dataset):
    """Item `i`: process `rank`'s `batch_size` tasks of meta-batch `i`, drawn whole (``batch_size *
    world_size`` tasks) on the episodes' device with `batch_generator(seed, i)`: any number of processes
    trains on the tasks one process would. An epoch is ``num_tasks // (batch_size * world_size)`` batches,
    as in fmaml.data.tasks.RandomTasks."""

    def __init__(self, episodes, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.episodes, self.seed, self.total = episodes, seed, batch_size * world_size
        self.share = slice(rank * batch_size, (rank + 1) * batch_size)
        self.num_batches = max(1, episodes.num_tasks // self.total)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, i: int) -> Batch:
        generator = batch_generator(self.seed, i, self.episodes.device)
        return self.episodes.sample(self.total, generator, self.share)


def tensor_task_loader(
    episodes,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    position: Callable[[], int] = lambda: 0,
) -> StreamLoader:
    """The training stream of `episodes` (InMemoryEpisodes, SinusoidEpisodes), from batch `position()`.
    Sampled in the main process (no workers): the work is a few tensor ops on the training device."""
    return stream_loader(EpisodeStream(episodes, batch_size, seed, rank, world_size), 0, position)

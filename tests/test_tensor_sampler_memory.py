"""InMemoryEpisodes.from_metadataset reads a split class by class into its final tensor: the peak memory of
a load, measured in a fresh process, and the uint8 / float32 decision, against the old whole-split-as-float
reading."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fmaml.data import InMemoryEpisodes


class FakeClass:
    """One class of a torchmeta ClassDataset: item k is (image, label), the image made when asked."""

    def __init__(self, c: int, samples: int, image):
        self.c, self.samples, self.image = c, samples, image

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, k: int):
        if not 0 <= k < self.samples:
            raise IndexError(k)
        return self.image(self.c, k), self.c


class FakeClassDataset:
    class_augmentations = []

    def __init__(self, sizes: list[int], image):
        self.num_classes, self.sizes, self.image = len(sizes), sizes, image

    def __getitem__(self, c: int) -> FakeClass:
        return FakeClass(c, self.sizes[c], self.image)


class FakeMetaDataset:
    """What from_metadataset reads of a torchmeta CombinationMetaDataset."""

    num_classes_per_task = 2

    def __init__(self, sizes: list[int], image):
        self.dataset = FakeClassDataset(sizes, image)

    def __len__(self) -> int:
        return 1000


def grey_levels(shape: tuple[int, ...]):
    """Images exactly k/255 (as ToTensor reads uint8 images), distinct per (class, example)."""

    def image(c: int, k: int) -> torch.Tensor:
        n = torch.arange(torch.Size(shape).numel()) + 7 * k + 131 * c
        return (n % 256).float().div(255).view(shape)

    return image


def old_images(metadataset) -> torch.Tensor:
    """The split as the previous from_metadataset read it: all of it as float, then uint8 if exact."""
    base = [metadataset.dataset[c] for c in range(metadataset.dataset.num_classes)]
    images = torch.stack([torch.stack([examples[k][0] for k in range(len(examples))]) for examples in base])
    images = images.unsqueeze(2) if images.dim() == 4 else images
    as_uint8 = (images * 255).round()
    return as_uint8.to(torch.uint8) if torch.equal(as_uint8 / 255, images) else images


@pytest.mark.parametrize("shape", [(1, 6, 5), (6, 5), (3, 4, 4)])
def test_exact_grey_levels_are_read_as_uint8(shape):
    meta = FakeMetaDataset([4] * 5, grey_levels(shape))
    images = InMemoryEpisodes.from_metadataset(meta, 1, 1).images
    x = torch.stack([torch.stack([image for image, _ in meta.dataset[c]]) for c in range(5)])
    x = x.view(5, 4, -1, *shape[-2:])  # C axis added to [H, W] images
    assert images.dtype == torch.uint8 and images.shape == x.shape
    assert torch.equal(images, (x * 255).round().to(torch.uint8))
    assert torch.equal(images.float() / 255, x) and torch.equal(images, old_images(meta))


@pytest.mark.parametrize("inexact_class", [0, 3, 4])
def test_a_class_not_in_grey_levels_keeps_the_split_float32(inexact_class):
    """One class off the k/255 grid, first, in the middle or last: the whole split float32, the classes
    read before it converted back exactly, the same tensor as the old reading."""
    exact = grey_levels((1, 6, 5))

    def image(c, k):
        x = exact(c, k)
        return x + 0.1 / 255 if c == inexact_class else x

    meta = FakeMetaDataset([4] * 5, image)
    images = InMemoryEpisodes.from_metadataset(meta, 1, 1).images
    reference = old_images(meta)
    assert images.dtype == reference.dtype == torch.float32 and torch.equal(images, reference)


def test_grey_levels_outside_0_255_stay_float32():
    """k/255 with k > 255 has no uint8 pixel: float32 (the old reading wrapped it around, 510 -> 254)."""
    meta = FakeMetaDataset([3] * 2, lambda c, k: torch.full((1, 2, 2), 2.0))
    images = InMemoryEpisodes.from_metadataset(meta, 1, 1).images
    assert images.dtype == torch.float32 and torch.equal(images, torch.full((2, 3, 1, 2, 2), 2.0))


def test_unequal_classes_are_padded_and_sampled_only_within_their_examples():
    """Classes of 4, 3 and 5 examples: every sampled example is a real one of its class (never padding),
    each class's examples are all reachable, and too few examples in the smallest class is refused."""
    sizes = [4, 3, 5]
    # Example k of class c has every pixel (10 * c + k + 1) / 255; padding is 0.
    meta = FakeMetaDataset(sizes, lambda c, k: torch.full((1, 2, 2), (10 * c + k + 1) / 255))
    episodes = InMemoryEpisodes.from_metadataset(meta, 1, 2)
    assert episodes.images.shape[:2] == (3, 5) and episodes.counts.tolist() == sizes
    seen: dict[int, set[int]] = {c: set() for c in range(3)}
    for i in range(40):
        batch = episodes.sample(8, torch.Generator().manual_seed(i))
        for x, _ in (batch["support"], batch["query"]):
            values = torch.round(x[..., 0, 0, 0] * 255).long().flatten().tolist()
            assert 0 not in values, "a padding row was sampled"
            for v in values:
                c, k = divmod(v - 1, 10)
                assert k < sizes[c]
                seen[c].add(k)
    assert {c: len(ks) for c, ks in seen.items()} == {0: 4, 1: 3, 2: 5}
    with pytest.raises(ValueError, match=r"= 4 is more than the 3 examples of the smallest class"):
        InMemoryEpisodes.from_metadataset(meta, 2, 2)


def test_images_of_another_shape_are_refused():
    with pytest.raises(ValueError, match=r"images of one shape, got \(1, 5, 4\) in class 1"):
        InMemoryEpisodes.from_metadataset(
            FakeMetaDataset([2, 2], lambda c, k: torch.full((1, 4 + c, 4), 0.0)), 1, 1
        )


# A load of 400 classes x 20 images 1x84x84 (56 MB as uint8, 226 MB as float32) made one at a time, in
# a fresh process (forked from the zygote, tests/zygote.py, before it ran anything: not this test process,
# whose heap earlier tests grew): the growth of its peak resident memory over the load, and the final
# tensor's size.
# VmHWM, not getrusage's ru_maxrss: on Linux that also counts the peak of the memory replaced at exec, the
# (v)forked parent's: a pytest process grown past this one would set it.
MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    sys.path.insert(0, {tests!r})
    from test_tensor_sampler_memory import FakeMetaDataset, grey_levels
    from fmaml.data import InMemoryEpisodes

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    InMemoryEpisodes.from_metadataset(FakeMetaDataset([2] * 2, grey_levels((1, 84, 84))), 1, 1)  # warm-up
    meta = FakeMetaDataset([20] * 400, grey_levels((1, 84, 84)))
    gc.collect()
    try:  # reset the peak to the current resident size, so an earlier transient peak hides nothing
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
    except OSError:
        before = status("VmHWM")
    images = InMemoryEpisodes.from_metadataset(meta, 1, 1).images
    print(json.dumps(dict(growth=status("VmHWM") - before, nbytes=images.nbytes, dtype=str(images.dtype))))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_a_split_peaks_at_little_more_than_its_uint8_tensor(zygote):
    script = MEASURE.format(tests=str(Path(__file__).parent))
    process = zygote.popen(["-c", script], stdout=subprocess.PIPE, text=True)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    assert result["dtype"] == "torch.uint8" and result["nbytes"] == 400 * 20 * 84 * 84
    assert result["growth"] <= 1.5 * result["nbytes"], (
        f"loading grew the peak resident memory by {result['growth'] / 2**20:.0f} MB, "
        f"{result['growth'] / result['nbytes']:.2f}x the {result['nbytes'] / 2**20:.0f} MB uint8 tensor"
    )

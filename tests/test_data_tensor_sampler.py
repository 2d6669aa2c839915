"""The tensor episode sampler (fmaml.data.tensor_tasks): task format and distribution checked image by
image against an independent lookup, rotations against torchmeta's own, the (seed, rank, i) stream
contract, the sinusoid, `data.loading.sampler` in the DataModule and the CLI, and exact resume."""

import math

import pytest
import torch
from fixtures import tiny_omniglot_root
from test_resume_determinism import (
    OMNIGLOT,
    SINUSOID,
    assert_same_weights,
    fit,
    interrupted_and_uninterrupted,
)
from torchmeta.toy import Sinusoid as TorchmetaSinusoid
from torchmeta.transforms import Rotation

from fmaml.data import (
    EvaluationTasks,
    InMemoryEpisodes,
    Loading,
    MetaDataModule,
    MiniImageNet,
    Omniglot,
    Sinusoid,
    SinusoidEpisodes,
    TorchmetaDataset,
)
from fmaml.data.tensor_tasks import batch_generator, pixel_map, tensor_task_loader

WAYS, SHOTS, QUERY = 5, 2, 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_omniglot_root(tmp_path_factory)  # 8 characters per split, 20 drawings each


@pytest.fixture(scope="module")
def omniglot_train(root):
    dm = MetaDataModule(Omniglot(rotations=True), ways=WAYS, shots=SHOTS, query_shots=QUERY, root=root)
    return dm._get("train")


@pytest.fixture(scope="module")
def episodes(omniglot_train):
    return InMemoryEpisodes.from_metadataset(omniglot_train, SHOTS, QUERY)


@pytest.fixture(scope="module")
def lookup(episodes):
    """Every image of every class, rotations made by torch.rot90 -> (class id, drawing): an independent
    reference for what the sampler's indexing and pixel maps return."""
    base = episodes.images.shape[0]
    table = {}
    for turns in range(4):
        rotated = torch.rot90(episodes.images, turns, dims=(-2, -1))
        for b in range(base):
            for k in range(rotated.shape[1]):
                table[rotated[b, k].numpy().tobytes()] = (turns * base + b, k)
    assert len(table) == 4 * base * episodes.images.shape[1]  # all distinct, so the lookup is exact
    return table


def identify(x: torch.Tensor, lookup) -> list[tuple[int, int]]:
    """[N, C, H, W] float images -> their (class id, drawing)."""
    as_uint8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(as_uint8.float() / 255, x)
    return [lookup[image.numpy().tobytes()] for image in as_uint8]


def test_episodes_hold_the_base_classes_once(episodes, omniglot_train):
    assert episodes.images.shape == (8, 20, 1, 28, 28) and episodes.images.dtype == torch.uint8
    assert episodes.num_classes == len(omniglot_train.dataset) == 32  # 8 characters x 4 rotations
    image, _ = omniglot_train.dataset[3][7]  # torchmeta's transform (Resize + ToTensor) of class 3, drawing 7
    assert torch.equal(episodes.images[3, 7].float() / 255, image)


def test_tasks_have_the_counts_and_structure_of_torchmeta_tasks(episodes, lookup):
    batch = episodes.sample(40, torch.Generator().manual_seed(0))
    (xs, ys), (xq, yq) = batch["support"], batch["query"]
    assert xs.shape == (40, WAYS * SHOTS, 1, 28, 28) and xq.shape == (40, WAYS * QUERY, 1, 28, 28)
    assert xs.dtype == xq.dtype == torch.float32 and ys.dtype == yq.dtype == torch.int64
    rotated_seen = shared_base_seen = 0
    for t in range(40):
        assert torch.bincount(ys[t], minlength=WAYS).tolist() == [SHOTS] * WAYS
        assert torch.bincount(yq[t], minlength=WAYS).tolist() == [QUERY] * WAYS
        # Grouped by class: each block of `shots` (or `query_shots`) samples has one label.
        assert (ys[t].view(WAYS, SHOTS) == ys[t].view(WAYS, SHOTS)[:, :1]).all()
        assert (yq[t].view(WAYS, QUERY) == yq[t].view(WAYS, QUERY)[:, :1]).all()
        support, query = identify(xs[t], lookup), identify(xq[t], lookup)
        assert len(set(support + query)) == WAYS * (SHOTS + QUERY)  # no image twice: support, query disjoint
        class_of = {}
        for (cls, _), label in zip(support + query, torch.cat([ys[t], yq[t]]).tolist(), strict=True):
            assert class_of.setdefault(label, cls) == cls  # one class per label, in support and query
        classes = list(class_of.values())
        assert len(set(classes)) == WAYS  # distinct classes
        rotated_seen += sum(c >= 8 for c in classes)
        shared_base_seen += len({c % 8 for c in classes}) < WAYS  # two rotations of a character: 2 classes
    assert rotated_seen > 0 and shared_base_seen > 0
    first = ys[0].view(WAYS, SHOTS)[:, 0]
    assert any(not torch.equal(first, ys[t].view(WAYS, SHOTS)[:, 0]) for t in range(1, 40))  # permuted


def test_rotations_match_torchmeta(episodes, omniglot_train):
    """Class a * 8 + b is character b rotated by a * 90 degrees counter-clockwise, as torchmeta's
    Rotation (on the PIL image, before Resize) gives it: exactly for 180 degrees, within one grey level
    for 90 and 270 (on real Omniglot 2.3% of the pixels differ, by 1/255)."""
    classes = omniglot_train.dataset
    assert classes.class_augmentations == [Rotation(90), Rotation(180), Rotation(270)]
    for turns in (1, 2, 3):
        for b in (0, 5):
            theirs = torch.stack([image for image, _ in classes[turns * 8 + b]])
            ours = torch.rot90(episodes.images[b], turns, dims=(-2, -1)).float() / 255
            difference = (theirs - ours).abs()
            if turns == 2:  # resize commutes exactly with a half turn
                assert torch.equal(theirs, ours)
            else:  # PIL resizes width then height, rounding each pass: a quarter turn swaps the order
                assert difference.max() <= 1 / 255 + 1e-6 and (difference > 0).float().mean() < 0.1
            wrong_way = torch.rot90(episodes.images[b], -turns, dims=(-2, -1)).float() / 255
            if turns != 2:
                assert (theirs - wrong_way).abs().max() > 0.5


def test_sampled_rotated_classes_are_torchmeta_classes(root):
    """With the single augmentation Rotation(90), torchmeta's class 8 + b is character b turned by 90
    degrees: the sampler's class 8 + b must be that image (a turn the other way would not be)."""
    from torchmeta.datasets import Omniglot as TorchmetaOmniglot
    from torchvision.transforms import Compose, Resize, ToTensor

    meta = TorchmetaOmniglot(
        root,
        num_classes_per_task=WAYS,
        meta_split="train",
        transform=Compose([Resize(28), ToTensor()]),
        class_augmentations=[Rotation([90])],
    )
    episodes = InMemoryEpisodes.from_metadataset(meta, SHOTS, QUERY)
    assert episodes.num_classes == 16
    theirs = torch.stack([image for c in range(16) for image, _ in meta.dataset[c]]).flatten(1)  # [320, 784]
    batch = episodes.sample(4, torch.Generator().manual_seed(0))
    rotated_seen = False
    for t in range(4):
        x = torch.cat([batch["support"][0][t], batch["query"][0][t]]).flatten(1)
        labels = torch.cat([batch["support"][1][t], batch["query"][1][t]])
        nearest = [(image - theirs).abs().amax(1).min(0) for image in x]  # (distance, torchmeta index)
        assert all(distance <= 1 / 255 + 1e-6 for distance, _ in nearest)
        classes = torch.stack([index for _, index in nearest]) // 20
        for label in range(WAYS):
            assert classes[labels == label].unique().numel() == 1  # the label's images: one torchmeta class
        assert classes.unique().numel() == WAYS
        rotated_seen |= bool((classes >= 8).any())
    assert rotated_seen


def test_augmentations_without_a_pixel_permutation_are_refused():
    with pytest.raises(ValueError, match="no pixel-permutation equivalent.*data.loading.sampler=torchmeta"):
        pixel_map(Rotation(45), 28, 28)
    with pytest.raises(ValueError, match="needs square images"):
        pixel_map(Rotation(90), 28, 32)


def stream(episodes, n=3, start=0, seed=0, rank=0, world_size=1, batch_size=4):
    loader = tensor_task_loader(episodes, batch_size, seed, rank, world_size, position=lambda: start)
    it = iter(loader)
    return [torch.cat([t.flatten().float() for pair in next(it).values() for t in pair]) for _ in range(n)]


@pytest.mark.parametrize("source", ["omniglot", "sinusoid"])
def test_batch_i_is_a_function_of_seed_rank_and_i(source, episodes):
    data = episodes if source == "omniglot" else SinusoidEpisodes(3, 4)
    reference = stream(data)
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(a, b) for a, b in zip(reference, stream(data), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(reference[1:], stream(data, 2, start=1), strict=True))
    assert not torch.equal(reference[0], reference[1])
    assert not torch.equal(reference[0], stream(data, 1, rank=1, world_size=2)[0])
    assert not torch.equal(reference[0], stream(data, 1, seed=1)[0])
    g1, g2 = batch_generator(0, 5), batch_generator(0, 5)
    assert torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_cuda(omniglot_train, lookup):
    cuda = InMemoryEpisodes.from_metadataset(omniglot_train, SHOTS, QUERY, "cuda")
    a, b = stream(cuda, 2), stream(cuda, 2)
    assert a[0].is_cuda and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    batch = cuda.sample(4, batch_generator(0, 0, "cuda"))
    support = identify(batch["support"][0][0].cpu(), lookup)
    assert len({cls for cls, _ in support}) == WAYS
    sinusoid = SinusoidEpisodes(3, 4, "cuda").sample(4, batch_generator(0, 0, "cuda"))
    assert sinusoid["query"][1].is_cuda


def test_sinusoid_tasks():
    torchmeta = TorchmetaSinusoid(1)
    assert SinusoidEpisodes.amplitude_range == tuple(torchmeta._amplitude_range)
    assert SinusoidEpisodes.phase_range == tuple(torchmeta._phase_range)
    assert SinusoidEpisodes.input_range == tuple(torchmeta._input_range)
    batch = SinusoidEpisodes(10, 7).sample(2000, torch.Generator().manual_seed(0))
    (xs, ys), (xq, yq) = batch["support"], batch["query"]
    assert xs.shape == ys.shape == (2000, 10, 1) and xq.shape == yq.shape == (2000, 7, 1)
    assert xs.dtype == yq.dtype == torch.float32
    x, y = torch.cat([xs, xq], 1).double(), torch.cat([ys, yq], 1).double()
    assert x.abs().max() <= 5.0 and y.abs().max() <= 5.0
    # y = A sin(x - phase) = a sin x + b cos x with a = A cos(phase), b = -A sin(phase): fit a, b per task.
    features = torch.cat([torch.sin(x), torch.cos(x)], 2)  # [T, K, 2]
    coef = torch.linalg.lstsq(features, y).solution  # [T, 2, 1]
    assert (features @ coef - y).abs().max() < 1e-4  # the support and the query share one sinusoid
    a, b = coef[:, 0, 0], coef[:, 1, 0]
    amplitude, phase = torch.hypot(a, b), torch.atan2(-b, a)
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5.0 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    assert (y.abs().amax(1).squeeze() <= amplitude + 1e-4).all()
    # U[0.1, 5] and U[0, pi]: means 2.55 and pi/2, standard errors 0.03 and 0.02 over 2000 tasks.
    assert abs(amplitude.mean() - 2.55) < 0.15 and abs(phase.mean() - math.pi / 2) < 0.1
    assert abs(x.mean()) < 0.1


# ----------------------------------------------------------------------------------- data.loading.sampler


def test_sampler_setting(root, tmp_path):
    assert MetaDataModule(Omniglot(), root=root).sampler == "tensor"  # auto
    assert MetaDataModule(Sinusoid()).sampler == "tensor"
    assert MetaDataModule(MiniImageNet(), root=str(tmp_path)).sampler == "torchmeta"
    assert (
        MetaDataModule(MiniImageNet(), root=str(tmp_path), loading=Loading(sampler="tensor")).sampler
        == "tensor"
    )
    assert MetaDataModule(Omniglot(), root=root, loading=Loading(sampler="torchmeta")).sampler == "torchmeta"
    with pytest.raises(
        ValueError, match=r"data\.loading\.sampler='fast' is not one of auto, tensor, torchmeta"
    ):
        Loading(sampler="fast")
    harmonic = TorchmetaDataset("torchmeta.toy.Harmonic", task_type="regression", input_shape=[1])
    with pytest.raises(
        ValueError, match=r"data\.loading\.sampler=tensor does not support torchmeta\.toy\.Harmonic"
    ):
        MetaDataModule(harmonic, loading=Loading(sampler="tensor"))
    assert MetaDataModule(harmonic).sampler == "torchmeta"


def dm_batches(dm, loader_name, n=2):
    it = iter(getattr(dm, loader_name)())
    return [torch.cat([t.flatten().float() for pair in next(it).values() for t in pair]) for _ in range(n)]


def test_only_the_training_stream_changes(root):
    args = dict(
        ways=WAYS,
        shots=SHOTS,
        query_shots=QUERY,
        meta_batch_size=4,
        evaluation=EvaluationTasks(num_val_tasks=8),
        root=root,
    )
    tensor = MetaDataModule(
        Omniglot(rotations=True), loading=Loading(sampler="tensor", num_workers=2), **args
    )
    torchmeta = MetaDataModule(Omniglot(rotations=True), loading=Loading(sampler="torchmeta"), **args)
    loader = tensor.train_dataloader()
    assert loader.num_workers == 0  # sampled in the main process, whatever data.loading.num_workers
    batch = next(iter(loader))
    assert batch["support"][0].shape == (4, WAYS * SHOTS, 1, 28, 28)
    assert tensor._episodes is not None and torchmeta._episodes is None
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            dm_batches(tensor, "val_dataloader"), dm_batches(torchmeta, "val_dataloader"), strict=True
        )
    )
    assert not torch.equal(
        dm_batches(tensor, "train_dataloader", 1)[0], dm_batches(torchmeta, "train_dataloader", 1)[0]
    )


def test_cli_fit_with_the_tensor_sampler_resumes_exactly(tmp_path, root):
    cli = fit(tmp_path / "one", *OMNIGLOT, f"--data.root={root}", "--trainer.fast_dev_run=true")
    assert cli.datamodule.sampler == "tensor" and cli.datamodule._episodes is not None  # auto -> tensor
    whole, resumed = interrupted_and_uninterrupted(
        tmp_path, *OMNIGLOT, f"--data.root={root}", "--data.loading.sampler=tensor"
    )
    assert_same_weights(whole, resumed)


def test_cli_fit_with_the_torchmeta_sampler_resumes_exactly(tmp_path):
    whole, resumed = interrupted_and_uninterrupted(tmp_path, *SINUSOID, "--data.loading.sampler=torchmeta")
    assert_same_weights(whole, resumed)

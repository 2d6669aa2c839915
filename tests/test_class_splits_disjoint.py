"""Every dataset spec keeps its splits' classes apart: meta-validation and meta-test share no class, and
meta-training shares none with either, so neither validation (what a sweep tunes on) nor test ever sees a
class trained on, and validation never sees a test class.

Classes are compared by what they are (the Omniglot character, the MiniImageNet class, the image folder),
read from the built meta-datasets as fmaml uses them, so a rotated copy of a character counts as that
character. `Sinusoid` (and any regression `TorchmetaDataset`) has no classes: every task is a freshly
drawn function, so there is nothing to keep apart and it is not listed here.
"""

import os

import pytest
from fixtures import real_omniglot_root, tiny_omniglot_root, write_miniimagenet
from test_data_image_folder import write_folder

from fmaml.data import ImageFolder, MetaDataModule, MiniImageNet, Omniglot, TorchmetaDataset
from fmaml.data.specs import DatasetSpec

SPLITS = ("train", "val", "test")
# The attribute that names a class, on the per-class datasets each spec builds.
CLASS_NAME_ATTRIBUTES = ("character_name", "class_name", "name")


def class_identities(spec: DatasetSpec, root: str, split: str) -> list[str]:
    """The underlying class of every class of `split` (augmented copies included), through the DataModule."""
    dm = MetaDataModule(spec, root=root, ways=1, shots=1, query_shots=1, meta_batch_size=1)
    classes = dm._get(split).dataset
    names = []
    for i in range(len(classes)):
        one_class = classes[i]
        attribute = next(a for a in CLASS_NAME_ATTRIBUTES if hasattr(one_class, a))
        names.append(str(getattr(one_class, attribute)))
    return names


def assert_disjoint(spec: DatasetSpec, root: str) -> dict[str, set[str]]:
    found = {split: set(class_identities(spec, root, split)) for split in SPLITS}
    assert all(found.values()), {split: len(names) for split, names in found.items()}
    assert not found["val"] & found["test"], (
        f"validation and test share {sorted(found['val'] & found['test'])[:3]}"
    )
    for other in ("val", "test"):
        shared = found["train"] & found[other]
        assert not shared, f"meta-train and {other} share {sorted(shared)[:3]}"
    return found


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    return tiny_omniglot_root(tmp_path_factory, chars_per_split=20)


@pytest.fixture(scope="module")
def miniimagenet_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("miniimagenet"))
    write_miniimagenet(root, classes_per_split=(4, 3, 3), images_per_class=2, size=8)
    return root


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """A flat folder of 12 class folders, and one with train/ val/ test/ class folders."""
    base = tmp_path_factory.mktemp("image-folders")
    write_folder(base / "flat", [2] * 12, size=8)
    for first, split in enumerate(SPLITS):
        write_folder(base / "split" / split, [2] * 3, size=8, first=10 * first)
    return base


@pytest.mark.parametrize("rotations", [True, False])
@pytest.mark.parametrize("split", ["vinyals", "paper"])
def test_omniglot(omniglot_root, split, rotations):
    found = assert_disjoint(Omniglot(split=split, rotations=rotations), omniglot_root)
    assert len(set().union(*found.values())) == 60  # every character of the fixture is in one split


def test_miniimagenet(miniimagenet_root):
    found = assert_disjoint(MiniImageNet(image_size=8), miniimagenet_root)
    assert [len(found[s]) for s in SPLITS] == [4, 3, 3]


@pytest.mark.parametrize("rotations", [True, False])
def test_image_folder_split_by_fractions(image_folders, rotations):
    found = assert_disjoint(ImageFolder(str(image_folders / "flat"), image_size=8, rotations=rotations), "")
    assert len(set().union(*found.values())) == 12


def test_image_folder_with_split_folders(image_folders):
    found = assert_disjoint(ImageFolder(str(image_folders / "split"), image_size=8, rotations=True), "")
    assert {s: {os.path.basename(os.path.dirname(n)) for n in found[s]} for s in SPLITS} == {
        s: {s} for s in SPLITS
    }


@pytest.mark.parametrize(
    "name, kwargs, fixture",
    [
        ("torchmeta.datasets.Omniglot", {"use_vinyals_split": True}, "omniglot_root"),
        ("torchmeta.datasets.MiniImagenet", {}, "miniimagenet_root"),
    ],
)
def test_torchmeta_dataset(name, kwargs, fixture, request):
    """The escape hatch passes each split's name through to torchmeta's own split."""
    assert_disjoint(TorchmetaDataset(name, kwargs=kwargs, image_size=8), request.getfixturevalue(fixture))


@pytest.mark.real_data
@pytest.mark.parametrize("split, sizes", [("paper", (1100, 100, 423)), ("vinyals", (1028, 172, 423))])
def test_real_omniglot(tmp_path_factory, split, sizes):
    real = real_omniglot_root(tmp_path_factory)
    found = assert_disjoint(Omniglot(split=split), real)
    assert tuple(len(found[s]) for s in SPLITS) == sizes
    assert len(set().union(*found.values())) == 1623

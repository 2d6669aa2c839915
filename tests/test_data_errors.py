"""Bad arguments and bad data give errors that name the parameter/file and the fix."""

import os
import zipfile

import pytest
from fixtures import tiny_omniglot_root, write_miniimagenet, write_omniglot_zips

from fmaml.data import EvaluationTasks, Loading, MetaDataModule, MiniImageNet, Omniglot, Sinusoid
from fmaml.data.omniglot_files import OmniglotZipError, prepare_omniglot


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory):
    return tiny_omniglot_root(tmp_path_factory)


@pytest.mark.parametrize(
    "name, value",
    [
        ("ways", 0),
        ("ways", 2.5),
        ("ways", True),
        ("shots", -1),
        ("query_shots", 0),
        ("meta_batch_size", 0),
    ],
)
def test_bad_numbers(name, value):
    with pytest.raises(ValueError, match=rf"data\.{name}={value!r} must be .*--data\.{name}"):
        MetaDataModule(Sinusoid(), **{name: value})


@pytest.mark.parametrize(
    "group, name, value",
    [
        (EvaluationTasks, "num_val_tasks", 0),
        (EvaluationTasks, "num_test_tasks", -3),
        (EvaluationTasks, "seed", 1.5),
        (Loading, "num_workers", -1),
        (Loading, "num_workers", 1.5),
    ],
)
def test_bad_numbers_in_groups(group, name, value):
    key = f"data.{'evaluation' if group is EvaluationTasks else 'loading'}.{name}"
    escaped = key.replace(".", r"\.")
    with pytest.raises(ValueError, match=rf"{escaped}={value!r} must be .*--{escaped}"):
        group(**{name: value})


def test_bad_image_size():
    with pytest.raises(ValueError, match="data.dataset.image_size=0 must be a positive integer"):
        Omniglot(image_size=0)


def test_not_a_spec():
    with pytest.raises(TypeError, match="data.dataset must be a fmaml.data dataset spec"):
        MetaDataModule("omniglot")


def test_ways_larger_than_split(omniglot_root):
    dm = MetaDataModule(Omniglot(rotations=False), ways=9, root=omniglot_root)
    expected = (
        "data.ways=9 is larger than the 8 classes in the meta-test split of Omniglot; lower --data.ways"
    )
    with pytest.raises(ValueError, match=expected):
        dm.setup("test")
    MetaDataModule(Omniglot(rotations=True), ways=9, root=omniglot_root).setup("test")  # 32 classes


def test_too_many_shots():
    with pytest.raises(ValueError, match=r"5 \+ 16 = 21 is more than the 20 examples per class in Omniglot"):
        MetaDataModule(Omniglot(), shots=5, query_shots=16)  # before any file work


def test_too_many_shots_in_files(tmp_path):
    write_miniimagenet(tmp_path, images_per_class=8)
    dm = MetaDataModule(MiniImageNet(), shots=5, query_shots=4, root=str(tmp_path))
    with pytest.raises(ValueError, match="= 9 is more than the 8 examples per class in the meta-train split"):
        dm.setup("fit")


def test_omniglot_missing(tmp_path):
    dm = MetaDataModule(Omniglot(download=False), root=str(tmp_path))
    folder = os.path.join(str(tmp_path), "omniglot")
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "put images_background.zip and images_evaluation.zip in " + folder in message
    assert "https://github.com/brendenlake/omniglot" in message and "FMAML_DATA_ROOT" in message


def test_miniimagenet_missing(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="MiniImageNet not found: expected train_data.hdf5.*miniimagenet"
    ):
        MetaDataModule(MiniImageNet(), root=str(tmp_path)).setup("fit")


def test_truncated_zip(tmp_path):
    write_omniglot_zips(tmp_path, chars_per_split=2, drawings=3)
    path = tmp_path / "images_evaluation.zip"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        OmniglotZipError, match=f"{path} is corrupt or truncated.*re-copy images_evaluation.zip"
    ):
        prepare_omniglot(str(tmp_path), download=False)
    assert not [n for n in os.listdir(tmp_path) if "hdf5" in n]  # nothing half-written left behind


def test_corrupt_png(tmp_path):
    write_omniglot_zips(tmp_path, chars_per_split=2, drawings=3)
    with zipfile.ZipFile(tmp_path / "images_background.zip", "a") as zf:
        zf.writestr("images_background/Armenian/character01/0001_99.png", b"not a png")
    with pytest.raises(OmniglotZipError, match="cannot decode images_background/Armenian.*re-copy"):
        prepare_omniglot(str(tmp_path), download=False)
    assert not [n for n in os.listdir(tmp_path) if "hdf5" in n]


@pytest.mark.parametrize(
    "entry", ["omniglot/images_background/Latin/character01/a.png", "images_background/Latin/a.png"]
)
def test_wrong_layout(tmp_path, entry):
    write_omniglot_zips(tmp_path, chars_per_split=2, drawings=3)
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as zf:
        zf.writestr(entry, b"")
    with pytest.raises(
        OmniglotZipError, match=f"does not have the official Omniglot layout.*found '{entry}'"
    ):
        prepare_omniglot(str(tmp_path), download=False)


def test_prepare_is_idempotent(omniglot_root):
    data = os.path.join(omniglot_root, "omniglot", "data.hdf5")
    before = os.stat(data).st_mtime_ns
    prepare_omniglot(os.path.join(omniglot_root, "omniglot"), download=False)
    assert os.stat(data).st_mtime_ns == before

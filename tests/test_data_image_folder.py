"""`fmaml.data.ImageFolder`: your own images as a folder of class folders: a generated folder trains with
both samplers (classes of unequal size included), bad folders fail with clear errors, and real Omniglot
unpacked to that layout loads the built-in Omniglot's classes, pixel for pixel."""

import json
import os
import zipfile

import numpy as np
import pytest
import torch
from fixtures import TINY, config, real_omniglot_root
from PIL import Image

from fmaml.cli import main
from fmaml.data import ImageFolder, MetaDataModule, Omniglot


def write_folder(
    root, sizes: list[int], mode: str = "L", size: int = 12, seed: int = 0, first: int = 0
) -> None:
    """Class folders c00, c01, ... (from c<first>) with sizes[c] images each: a noisy class pattern, so
    classes are learnable."""
    rng = np.random.default_rng(seed)
    for c, n in enumerate(sizes):
        folder = os.path.join(root, f"c{first + c:02d}")
        os.makedirs(folder)
        pattern = rng.integers(0, 256, (size, size, 3 if mode == "RGB" else 1), dtype=np.uint8)
        for k in range(n):
            noisy = np.clip(pattern.astype(int) + rng.integers(-20, 21, pattern.shape), 0, 255).astype(
                np.uint8
            )
            Image.fromarray(noisy.squeeze(-1) if mode == "L" else noisy, mode).save(
                os.path.join(folder, f"{k}.png")
            )


def fit_args(path, *more):
    return [
        "fit", "--config", config("omniglot.yaml"), "--data.dataset=fmaml.data.ImageFolder",
        f"--data.dataset.init_args.path={path}", "--data.dataset.init_args.image_size=12",
        "--model.network.init_args.image_size=12", "--model.network.filters=4", "--data.ways=3",
        "--data.shots=1", "--data.query_shots=2", "--trainer.max_steps=3", "--trainer.val_check_interval=3",
        *TINY, *more,
    ]  # fmt: skip


@pytest.mark.parametrize("sampler", ["tensor", "torchmeta"])
def test_a_generated_folder_with_unequal_classes_trains(tmp_path, monkeypatch, sampler):
    write_folder(tmp_path / "images", [5, 3, 7, 4, 6, 3, 5, 4, 6, 5, 3, 8, 4, 5, 6, 3, 4, 5, 6, 7])
    monkeypatch.chdir(tmp_path)
    cli = main(fit_args(tmp_path / "images", f"--data.loading.sampler={sampler}"))
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["val/accuracy"])
    assert (tmp_path / "logs" / "fmaml" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_seeded_split_by_class_and_split_folders(tmp_path):
    write_folder(tmp_path / "flat", [3] * 10)
    splits = ImageFolder(str(tmp_path / "flat"), split_seed=1).splits()
    names = {s: [os.path.basename(folder) for folder, _ in classes] for s, classes in splits.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(sum(names.values(), [])) == [f"c{c:02d}" for c in range(10)]  # each class in one split
    assert ImageFolder(str(tmp_path / "flat"), split_seed=1).splits() == splits  # the seed fixes it
    assert ImageFolder(str(tmp_path / "flat"), split_seed=2).splits() != splits
    for split, sizes in (("train", [3, 3]), ("val", [4]), ("test", [5])):
        write_folder(tmp_path / "mine" / split, sizes, seed=len(split))
    spec = ImageFolder(str(tmp_path / "mine"), image_size=12)
    assert spec.split_stats("", "train") == (2, 3) and spec.split_stats("", "test") == (1, 5)
    assert spec.input_shape == (1, 12, 12)


def test_rgb_images_and_rotations(tmp_path):
    write_folder(tmp_path / "rgb", [4] * 10, mode="RGB")
    spec = ImageFolder(str(tmp_path / "rgb"), image_size=8, rotations=True)
    assert spec.input_shape == (3, 8, 8)
    assert spec.split_stats("", "train")[0] == 6 * 4 and spec.split_stats("", "test")[0] == 2
    assert ImageFolder(str(tmp_path / "rgb"), channels=1).input_shape == (1, 28, 28)


def test_bad_folders_fail_with_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.dataset.path=.*no such folder"):
        ImageFolder(str(tmp_path / "nowhere")).splits()
    write_folder(tmp_path / "empty_class", [3, 3, 3])
    os.makedirs(tmp_path / "empty_class" / "c99")
    with pytest.raises(ValueError, match=r"class folder .*c99 holds no images"):
        ImageFolder(str(tmp_path / "empty_class")).splits()
    write_folder(tmp_path / "mixed", [3] * 5)
    write_folder(tmp_path / "mixed", [3] * 5, mode="RGB", first=5)
    with pytest.raises(
        ValueError, match=r"mixes image modes: (L|RGB) .* and (L|RGB) .*set data.dataset.channels"
    ):
        ImageFolder(str(tmp_path / "mixed")).input_shape  # noqa: B018
    assert ImageFolder(str(tmp_path / "mixed"), channels=3).input_shape[0] == 3  # converting is the fix
    for split in ("train", "test"):
        write_folder(tmp_path / "no_val" / split, [3])
    with pytest.raises(FileNotFoundError, match=r"has train/, test/ but no val/"):
        ImageFolder(str(tmp_path / "no_val")).splits()
    with pytest.raises(ValueError, match=r"channels=2"):
        ImageFolder(str(tmp_path), channels=2)
    with pytest.raises(ValueError, match=r"split_fractions"):
        ImageFolder(str(tmp_path), split_fractions=(0.5, 0.5, 0.5))


def test_too_few_images_names_the_smallest_class(tmp_path):
    for split, sizes in (("train", [5, 5, 5]), ("val", [5, 2, 5]), ("test", [5, 5, 5])):
        write_folder(tmp_path / "imgs" / split, sizes, seed=len(split))
    data = MetaDataModule(ImageFolder(str(tmp_path / "imgs"), image_size=12), ways=3, shots=1, query_shots=2)
    data.prepare_data()
    with pytest.raises(
        ValueError,
        match=r"= 3 is more than the 2 examples per class in .*smallest class: .*val/c01, 2 images",
    ):
        data._get("val")


@pytest.mark.real_data
def test_real_omniglot_unpacked_to_folders_loads_the_builtin_classes_pixel_for_pixel(
    tmp_path_factory, tmp_path
):
    root = real_omniglot_root(tmp_path_factory)  # skips unless FMAML_OMNIGLOT_ZIPS is set
    folder = os.path.join(root, "omniglot")
    # Unpack the zips into train/val/test/<alphabet>__<character>/ by the Vinyals split's label files.
    where = {}
    for split in ("train", "val", "test"):
        with open(os.path.join(folder, f"vinyals_{split}_labels.json")) as f:
            for label in json.load(f):
                where[tuple(label[1:])] = (split, label)
    for name in ("images_background.zip", "images_evaluation.zip"):
        with zipfile.ZipFile(os.path.join(folder, name)) as archive:
            for member in archive.namelist():
                parts = member.split("/")
                if not member.endswith(".png"):
                    continue
                split, _ = where[(parts[-3], parts[-2])]
                target = tmp_path / "unpacked" / split / f"{parts[-3]}__{parts[-2]}"
                target.mkdir(parents=True, exist_ok=True)
                (target / parts[-1]).write_bytes(archive.read(member))
    spec = ImageFolder(str(tmp_path / "unpacked"), image_size=28, channels=1, invert=True)
    builtin = Omniglot(image_size=28, rotations=False)
    for split in ("train", "val", "test"):
        ours = spec.build(root, split, 5, 1, 1, None).dataset
        theirs = builtin.build(root, split, 5, 1, 1, None).dataset
        names = [os.path.basename(folder).replace("__", "/") for folder, _ in spec.splits()[split]]
        builtin_names = ["/".join(label[1:]) for label in theirs.labels]
        assert sorted(names) == sorted(builtin_names), split
        assert ours.num_classes == theirs.num_classes
    # Pixel-equal images, class by class, on a spread of test classes (every drawing of each).
    position = {name: i for i, name in enumerate(builtin_names)}
    for c in range(0, ours.num_classes, 40):
        ours_class, theirs_class = ours[c], theirs[position[names[c]]]
        assert len(ours_class) == len(theirs_class) == 20
        for k in range(20):
            assert torch.equal(ours_class[k][0], theirs_class[k][0]), (names[c], k)

"""The MAML paper's Omniglot split (`Omniglot(split="paper")`): 1200 / 423 characters, scaled on fixtures."""

import json
import os
import random
import shutil

import h5py
import pytest
from fixtures import real_omniglot_root, tiny_omniglot_root

from fmaml.cli import main
from fmaml.data import MetaDataModule, Omniglot
from fmaml.data.omniglot_files import PAPER_LABEL_FILES, paper_split, prepare_omniglot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_omniglot_root(tmp_path_factory)  # 3 x 8 = 24 characters


def labels(root: str, split: str) -> list[str]:
    with open(os.path.join(root, "omniglot", f"paper_{split}_labels.json")) as f:
        return ["/".join(triple) for triple in json.load(f)]


def all_characters(root: str) -> set[str]:
    with h5py.File(os.path.join(root, "omniglot", "data.hdf5"), "r") as f:
        return {f"{z}/{a}/{c}" for z in f for a in f[z] for c in f[z][a]}


def test_train_and_test_characters_are_disjoint_and_cover_everything(root):
    train, test = labels(root, "train"), labels(root, "test")
    assert len(all_characters(root)) == 24
    assert set(train).isdisjoint(test)
    assert set(train) | set(test) == all_characters(root)
    assert (len(train), len(test)) == (18, 6)  # round(1200 / 1623 * 24) = 18
    # Shuffled across both zips, not background = train: the paper ignores the alphabets' origin.
    assert {t.split("/")[0] for t in train} == {"images_background", "images_evaluation"}


@pytest.mark.parametrize("count, train", [(1623, 1200), (24, 18), (100, 74), (2, 1)])
def test_split_sizes_follow_the_papers_proportion(count, train):
    names = [f"images_background/A/character{i:04d}" for i in range(count)]
    first, second = paper_split(names)
    assert (len(first), len(second)) == (train, count - train)


def test_shuffle_is_fixed_and_independent_of_input_order():
    names = [f"images_evaluation/B/character{i:04d}" for i in range(200)]
    reference = paper_split(names)
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    assert paper_split(shuffled) == reference
    assert reference[0] != names[: len(reference[0])], "the characters were not shuffled"


@pytest.mark.parametrize("rotations", [True, False])
def test_split_stats_and_built_datasets(root, rotations):
    spec = Omniglot(split="paper", rotations=rotations)
    factor = 4 if rotations else 1
    # Rotations are a training augmentation: meta-val/test keep the 6 characters unrotated.
    expected = {"train": 18 * factor, "val": 6, "test": 6}
    dm = MetaDataModule(spec, root=root, ways=5, shots=1, query_shots=1, meta_batch_size=2, num_val_tasks=2)
    for split, classes in expected.items():
        assert spec.split_stats(root, split) == (classes, 20)
        built = dm._get(split).dataset
        assert len(built) == classes
        names = {"/".join(built.labels[i]) for i in range(built.num_classes)}
        assert names == set(labels(root, "train" if split == "train" else "test"))


def test_vinyals_is_still_the_default(root):
    assert Omniglot().split == "vinyals"
    assert Omniglot(rotations=False).split_stats(root, "val") == (8, 20)  # the 8 Vinyals val characters


def test_folder_prepared_before_the_paper_split_gets_its_labels(root, tmp_path):
    """An old prepared folder (no paper jsons, no zips needed) gets them on prepare, without a rebuild."""
    folder = tmp_path / "omniglot"
    shutil.copytree(os.path.join(root, "omniglot"), folder, ignore=shutil.ignore_patterns("*.zip"))
    originals = {name: (folder / name).read_text() for name in PAPER_LABEL_FILES}
    for name in PAPER_LABEL_FILES:
        (folder / name).unlink()
    mtime = os.path.getmtime(folder / "data.hdf5")
    prepare_omniglot(str(folder), download=False)  # would raise without the zips if it rebuilt data.hdf5
    assert {name: (folder / name).read_text() for name in PAPER_LABEL_FILES} == originals
    assert os.path.getmtime(folder / "data.hdf5") == mtime
    prepare_omniglot(str(folder), download=False)  # idempotent


def test_bad_split_value():
    with pytest.raises(ValueError, match=r"data\.dataset\.split='finn' is not an Omniglot split.*paper"):
        Omniglot(split="finn")


def test_bad_split_value_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                os.path.join(REPO, "configs", "omniglot.yaml"),
                "--data.dataset.init_args.split=finn",
            ]
        )
    assert exit_info.value.code != 0
    assert "split" in capsys.readouterr().err


def test_fast_dev_run_on_the_paper_split(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "--config",
            os.path.join(REPO, "configs", "omniglot_5w1s.yaml"),
            f"--data.root={root}",
            "--data.dataset.init_args.split=paper",
            "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--model.network.filters=4",
            "--data.meta_batch_size=2",
            "--data.num_val_tasks=2",
        ]
    )
    assert cli.datamodule.dataset.split == "paper"
    assert cli.trainer.global_step == 1
    assert len(cli.datamodule._get("val").dataset) == 6  # the unrotated test characters
    assert "val/accuracy" in cli.trainer.callback_metrics


@pytest.mark.real_data
def test_real_omniglot_paper_split(tmp_path_factory):
    real = real_omniglot_root(tmp_path_factory)
    train, test = labels(real, "train"), labels(real, "test")
    assert (len(train), len(test)) == (1200, 423)
    assert set(train).isdisjoint(test) and len(set(train) | set(test)) == 1623
    spec = Omniglot(split="paper")
    assert spec.split_stats(real, "train") == (4800, 20)
    assert spec.split_stats(real, "val") == spec.split_stats(real, "test") == (423, 20)

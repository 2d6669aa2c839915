"""The MAML paper's Omniglot split (`Omniglot(split="paper")`): 1100 / 100 / 423 characters, as its
reference code holds 100 of the paper's 1200 training characters out for validation; scaled on fixtures."""

import hashlib
import json
import os
import random
import shutil

import h5py
import numpy as np
import pytest
from fixtures import real_omniglot_root, tiny_omniglot_root

from fmaml.cli import main
from fmaml.data import EvaluationTasks, MetaDataModule, Omniglot
from fmaml.data.omniglot_files import PAPER_LABEL_FILES, paper_split, prepare_omniglot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_omniglot_root(tmp_path_factory)  # 3 x 8 = 24 characters: 17 / 1 / 6


@pytest.fixture(scope="module")
def root60(tmp_path_factory):
    # 3 x 20 = 60 characters: 40 / 4 / 16, enough validation classes for 5-way tasks once rotated.
    return tiny_omniglot_root(tmp_path_factory, chars_per_split=20)


def labels(root: str, split: str) -> list[str]:
    with open(os.path.join(root, "omniglot", f"paper_{split}_labels.json")) as f:
        return ["/".join(triple) for triple in json.load(f)]


def all_characters(root: str) -> set[str]:
    with h5py.File(os.path.join(root, "omniglot", "data.hdf5"), "r") as f:
        return {f"{z}/{a}/{c}" for z in f for a in f[z] for c in f[z][a]}


def split_before_validation(characters: list[str]) -> tuple[list[str], list[str]]:
    """fmaml's paper split before it held validation characters out (train, test): the test set that
    results were reported on, which must not change."""
    ordered = sorted(characters)
    shuffled = [ordered[i] for i in np.random.default_rng(1).permutation(len(ordered))]
    num_train = round(1200 / 1623 * len(characters))
    return shuffled[:num_train], shuffled[num_train:]


def fingerprint(characters) -> str:
    return hashlib.sha256(json.dumps(sorted(characters)).encode()).hexdigest()[:16]


@pytest.mark.parametrize("fixture, sizes", [("root", (17, 1, 6)), ("root60", (40, 4, 16))])
def test_train_val_and_test_characters_are_disjoint_and_cover_everything(fixture, sizes, request):
    root = request.getfixturevalue(fixture)
    train, val, test = (labels(root, s) for s in SPLITS)
    assert (len(train), len(val), len(test)) == sizes
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert set(train) | set(val) | set(test) == all_characters(root)
    # Shuffled across both zips, not background = train: the paper ignores the alphabets' origin.
    assert {t.split("/")[0] for t in train} == {"images_background", "images_evaluation"}


@pytest.mark.parametrize(
    "count, sizes", [(1623, (1100, 100, 423)), (60, (40, 4, 16)), (24, (17, 1, 6)), (100, (68, 6, 26))]
)
def test_split_sizes_follow_the_reference_codes_proportions(count, sizes):
    names = [f"images_background/A/character{i:04d}" for i in range(count)]
    assert tuple(len(part) for part in paper_split(names)) == sizes


@pytest.mark.parametrize("count", [1623, 60, 24])
def test_validation_is_carved_out_of_the_old_training_characters_and_test_is_unchanged(count):
    names = [f"images_evaluation/B/character{i:04d}" for i in range(count)]
    train, val, test = paper_split(names)
    old_train, old_test = split_before_validation(names)
    assert test == old_test
    assert train + val == old_train  # validation is the last of the 1200, as the reference's [1100:1200]


def test_shuffle_is_fixed_and_independent_of_input_order():
    names = [f"images_evaluation/B/character{i:04d}" for i in range(200)]
    reference = paper_split(names)
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    assert paper_split(shuffled) == reference
    assert reference[0] != names[: len(reference[0])], "the characters were not shuffled"


@pytest.mark.parametrize("rotations", [True, False])
def test_split_stats_and_built_datasets(root60, rotations):
    spec = Omniglot(split="paper", rotations=rotations)
    factor = 4 if rotations else 1
    # Rotations augment meta-training and, as in the reference code, meta-validation; test is unrotated.
    expected = {"train": 40 * factor, "val": 4 * factor, "test": 16}
    dm = MetaDataModule(
        spec,
        root=root60,
        ways=3,
        shots=1,
        query_shots=1,
        meta_batch_size=2,
        evaluation=EvaluationTasks(num_val_tasks=2),
    )
    for split, classes in expected.items():
        assert spec.split_stats(root60, split) == (classes, 20)
        built = dm._get(split).dataset
        assert len(built) == classes
        names = {"/".join(built.labels[i]) for i in range(built.num_classes)}
        assert names == set(labels(root60, split))


def test_vinyals_is_still_the_default(root):
    assert Omniglot().split == "vinyals"
    assert Omniglot(rotations=False).split_stats(root, "val") == (8, 20)  # the 8 Vinyals val characters


def copy_without_zips(root: str, tmp_path) -> str:
    """A copy of root's prepared omniglot/ folder without the zips: a rebuild of data.hdf5 would raise."""
    shutil.copytree(
        os.path.join(root, "omniglot"), tmp_path / "omniglot", ignore=shutil.ignore_patterns("*.zip")
    )
    return str(tmp_path / "omniglot")


def test_folder_prepared_before_the_paper_split_gets_its_labels(root, tmp_path):
    """An old prepared folder (no paper jsons, no zips needed) gets them on prepare, without a rebuild."""
    folder = copy_without_zips(root, tmp_path)
    originals = {name: open(os.path.join(folder, name)).read() for name in PAPER_LABEL_FILES}
    for name in PAPER_LABEL_FILES:
        os.remove(os.path.join(folder, name))
    mtime = os.path.getmtime(os.path.join(folder, "data.hdf5"))
    prepare_omniglot(folder, download=False)
    assert {name: open(os.path.join(folder, name)).read() for name in PAPER_LABEL_FILES} == originals
    assert os.path.getmtime(os.path.join(folder, "data.hdf5")) == mtime
    prepare_omniglot(folder, download=False)  # idempotent


def write_labels_of_the_split_without_validation(folder: str) -> None:
    """Make `folder` look prepared by fmaml before validation was held out: paper_train_labels.json
    with the 1200 (here scaled) characters that include today's validation ones, and no val file."""
    train, test = split_before_validation(sorted(all_characters(os.path.dirname(folder))))
    for split, keys in (("train", train), ("test", test)):
        with open(os.path.join(folder, f"paper_{split}_labels.json"), "w") as f:
            json.dump(sorted(k.split("/") for k in keys), f)
    os.remove(os.path.join(folder, "paper_val_labels.json"))


def test_folder_with_the_old_1200_423_labels_is_upgraded_when_the_split_is_read(root60, tmp_path):
    """The old training labels include the new validation characters: reading them would train on
    validation. The spec's first look at the folder rewrites them, without converting the zips."""
    folder = copy_without_zips(root60, tmp_path)
    write_labels_of_the_split_without_validation(folder)
    test_before = labels(str(tmp_path), "test")
    assert len(labels(str(tmp_path), "train")) == 44  # 40 + 4: the stale file
    spec = Omniglot(split="paper", rotations=False)
    assert [spec.split_stats(str(tmp_path), s)[0] for s in SPLITS] == [40, 4, 16]
    train, val, test = (labels(str(tmp_path), s) for s in SPLITS)
    assert set(train).isdisjoint(val) and test == test_before
    assert (train, val, test) == tuple(labels(root60, s) for s in SPLITS)


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


def test_fast_dev_run_on_the_paper_split(root60, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "--config",
            os.path.join(REPO, "configs", "omniglot_5w1s.yaml"),
            f"--data.root={root60}",
            "--data.dataset.init_args.split=paper",
            "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--model.network.filters=4",
            "--data.meta_batch_size=2",
            "--data.evaluation.num_val_tasks=2",
        ]
    )
    assert cli.datamodule.dataset.split == "paper"
    assert cli.trainer.global_step == 1
    val = cli.datamodule._get("val").dataset
    assert len(val) == 16  # the 4 validation characters, rotated as in training
    assert {"/".join(val.labels[i]) for i in range(val.num_classes)} == set(labels(root60, "val"))
    assert "val/accuracy" in cli.trainer.callback_metrics


@pytest.mark.real_data
def test_real_omniglot_paper_split(tmp_path_factory):
    real = real_omniglot_root(tmp_path_factory)
    train, val, test = (labels(real, s) for s in SPLITS)
    assert (len(train), len(val), len(test)) == (1100, 100, 423)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert len(set(train) | set(val) | set(test)) == 1623
    # The 423 test characters fmaml reported results on before validation was held out.
    assert fingerprint(test) == "6c65a5806de4d2e8"
    assert fingerprint(train + val) == "262e38c71abb38df"
    spec = Omniglot(split="paper")
    assert [spec.split_stats(real, s) for s in SPLITS] == [(4400, 20), (400, 20), (423, 20)]

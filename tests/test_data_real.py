"""Real Omniglot (skipped unless $FMAML_OMNIGLOT_ZIPS holds the two official-layout zips)."""

import json
import os

import pytest
import torch
from fixtures import real_omniglot_root

from fmaml.data import EvaluationTasks, MetaDataModule, Omniglot

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="session")
def omniglot_real_root(tmp_path_factory):
    return real_omniglot_root(tmp_path_factory)


def test_real_omniglot_splits_and_batch(omniglot_real_root):
    folder = os.path.join(omniglot_real_root, "omniglot")
    for split, characters in (("train", 1028), ("val", 172), ("test", 423)):
        with open(os.path.join(folder, f"vinyals_{split}_labels.json")) as f:
            assert len(json.load(f)) == characters
        for rotations, factor in ((False, 1), (True, 4)):
            assert Omniglot(rotations=rotations).split_stats(omniglot_real_root, split) == (
                characters * factor,
                20,
            )

    dm = MetaDataModule(
        Omniglot(), root=omniglot_real_root, meta_batch_size=4, evaluation=EvaluationTasks(num_val_tasks=4)
    )
    dm.setup("fit")
    assert len(dm._get("train").dataset) == 4112
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        x, y = batch["support"]
        assert x.shape == (4, 25, 1, 28, 28) and y.shape == (4, 25)
        assert batch["query"][0].shape == (4, 75, 1, 28, 28)
        assert torch.bincount(y[0], minlength=5).tolist() == [5] * 5
        assert 0.02 < x.mean() < 0.3  # ink is 1.0 on a 0.0 background, a small part of the image

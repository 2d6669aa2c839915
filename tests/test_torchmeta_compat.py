"""Each fix in fmaml.data.torchmeta_compat: the original behaviour fails, the patched one works."""

import importlib
import os

import numpy as np
import pytest
import torch
from fixtures import write_omniglot_zips

from fmaml.data import torchmeta_compat  # before torchmeta

# isort: split
from torchmeta.datasets.omniglot import Omniglot, OmniglotClassDataset
from torchmeta.utils.data.task import SubsetTask, Task


def test_apply_is_idempotent():
    download = OmniglotClassDataset.download
    torchmeta_compat.apply()
    torchmeta_compat._APPLIED = False  # force a second real run
    torchmeta_compat.apply()
    assert OmniglotClassDataset.download is download
    assert "__getitems__" in SubsetTask.__dict__


def test_fix1_torchmeta_imports(monkeypatch):
    import torchmeta.datasets.utils as tm_utils
    import torchvision.datasets.utils as tv_utils

    # torchvision (current) no longer has _get_confirm_token: torchmeta's import of it fails...
    monkeypatch.delattr(tv_utils, "_get_confirm_token")
    with pytest.raises(ImportError, match="_get_confirm_token"):
        importlib.reload(tm_utils)
    # ...until the compat module puts its stand-in there.
    torchmeta_compat._patch_torchvision_helpers()
    importlib.reload(tm_utils)
    assert tm_utils._get_confirm_token is torchmeta_compat._get_confirm_token


class _Numbers(Task):
    def __init__(self):
        super().__init__(index=0, num_classes=1)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor([float(i)]), 0


def test_fix2_subset_task_batched_fetch(monkeypatch):
    # torch's Subset.__init__ rejects subclasses overriding __getitem__ without __getitems__.
    monkeypatch.delattr(SubsetTask, "__getitems__")
    with pytest.raises(NotImplementedError, match="__getitems__"):
        SubsetTask(_Numbers(), [0, 2])
    monkeypatch.undo()
    subset = SubsetTask(_Numbers(), [3, 1, 2])
    assert subset.__getitems__([0, 2]) == [subset[0], subset[2]]
    x, y = next(iter(torch.utils.data.DataLoader(subset, batch_size=3)))  # uses __getitems__
    assert x.flatten().tolist() == [3.0, 1.0, 2.0] and y.tolist() == [0, 0, 0]


def test_fix3_omniglot_prepares_from_local_zips(tmp_path, monkeypatch):
    write_omniglot_zips(tmp_path / "omniglot", chars_per_split=3, drawings=4)
    # The original skips extraction when the zip exists, then lists folders that were never extracted.
    monkeypatch.setattr(
        OmniglotClassDataset, "download", torchmeta_compat.ORIGINALS["OmniglotClassDataset.download"]
    )
    with pytest.raises(FileNotFoundError):
        Omniglot(str(tmp_path), num_classes_per_task=2, meta_train=True, download=True)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="hold only 9 of the 1623 characters"):
        dataset = Omniglot(str(tmp_path), num_classes_per_task=2, meta_test=True, download=True)
    assert len(dataset.dataset) == 3
    image, _ = dataset[(0, 1)][0]
    assert image.size == (105, 105)
    assert os.path.isfile(tmp_path / "omniglot" / "data.hdf5")


def test_fix4_numpy_aliases_for_tcga_and_bach():
    import torchmeta.datasets.bach as bach
    import torchmeta.datasets.tcga as tcga

    assert not hasattr(np, "int")  # what those modules call, gone from numpy
    assert tcga.np.int(np.ceil(2.5)) == 3 and bach.np.float is float
    assert tcga.np.ceil is np.ceil  # everything else is numpy itself

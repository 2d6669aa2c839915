"""Typed dataset specs: what a config names as ``data.dataset`` (class_path + init_args).

jsonargparse cannot build torchmeta classes directly (they have no type hints), so each spec is a small
typed class that knows its task type and input shape, prepares its files, and builds the torchmeta
meta-dataset of one split. Example config::

    data:
      dataset:
        class_path: fmaml.data.Omniglot
        init_args: {image_size: 28, rotations: true, split: vinyals}
"""

from __future__ import annotations

# torchmeta can be imported directly here: fmaml/data/__init__.py has applied torchmeta_compat first.
import importlib
import json
import os
from typing import Literal

import h5py
import numpy as np
from torchmeta.datasets.omniglot import OmniglotClassDataset
from torchmeta.transforms import Categorical, Rotation
from torchmeta.utils.data import CombinationMetaDataset
from torchvision.transforms import Compose, Resize, ToTensor

from fmaml.data.omniglot_files import is_prepared, prepare_omniglot

Split = Literal["train", "val", "test"]
SPLIT_NAMES = {"train": "meta-train", "val": "meta-validation", "test": "meta-test"}
ROOT_HINT = "or set --data.root / FMAML_DATA_ROOT"


class DatasetSpec:
    """Base class of the dataset specs. Subclasses set the class attributes and implement the methods.

    - ``task_type``: "classification" (labels 0..ways-1, cross-entropy) or "regression" (MSE).
    - ``input_shape``: shape of one input, ``(C, H, W)`` for images, ``(1,)`` for the sinusoid.
    - ``samples_per_class``: images per class if fixed by the dataset (checked before any file work).
    """

    task_type: Literal["classification", "regression"] = "classification"
    input_shape: tuple[int, ...] = ()
    samples_per_class: int | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def prepare(self, root: str) -> None:
        """Download/convert the files under `root` if needed, or raise a clear error. Idempotent."""

    def split_stats(self, root: str, split: Split) -> tuple[int, int]:
        """(number of classes incl. class augmentations, fewest samples in a class) of a prepared split."""
        raise NotImplementedError

    def build(self, root: str, split: Split, ways: int, shots: int, query_shots: int, splitter):
        """The torchmeta meta-dataset of `split`; tasks are split by `splitter` (a ClassSplitter)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{self.name}({args})"


class _PaperSplitClassDataset(OmniglotClassDataset):
    """torchmeta's Omniglot classes, read from the paper split's ``paper_{train,test}_labels.json``.

    torchmeta builds the labels file name from this class attribute (``{1}`` is the meta-split), so a
    subclass is enough: nothing in torchmeta is patched.
    """

    filename_labels = "paper_{1}_labels.json"


class Omniglot(DatasetSpec):
    """Omniglot: 1623 characters of 50 alphabets, 20 drawings each, split by character.

    Args:
        image_size: images are resized from 105x105 to image_size x image_size (1 channel, ink 1.0).
        rotations: add each character rotated by 90/180/270 degrees as a new class (x4 classes).
        download: fetch the zips from GitHub if they are not in ``<root>/omniglot`` (needs network).
        split: which characters go to meta-train / meta-validation / meta-test:

            - ``"vinyals"`` (default): Vinyals et al. (2016), 1028 / 172 / 423 characters (torchmeta's
              split). ``rotations`` apply to every split.
            - ``"paper"``: the MAML paper's (Finn et al. 2017): all 1623 characters shuffled with a fixed
              seed, 1200 for meta-training and the other 423 for meta-test (see
              ``fmaml.data.omniglot_files.paper_split``; smaller fixtures keep the 1200/1623 proportion).
              ``rotations`` augment meta-training only (the paper's "augmented with rotations by
              multiples of 90 degrees"); meta-test keeps the 423 unrotated characters. The paper names
              only training and test characters, so there is no separate validation set:
              meta-validation uses the 423 test characters (other fixed tasks than the test's). fmaml never selects checkpoints by it: the last
              checkpoint is the one tested. Only results on this split compare with the paper's.

    Files: ``<root>/omniglot/images_background.zip`` and ``images_evaluation.zip`` (official layout);
    ``prepare`` converts them once to ``data.hdf5`` + labels jsons (see fmaml.data.omniglot_files).
    """

    samples_per_class = 20
    SPLITS = ("vinyals", "paper")

    def __init__(
        self,
        image_size: int = 28,
        rotations: bool = True,
        download: bool = True,
        split: Literal["vinyals", "paper"] = "vinyals",
    ):
        _check_positive_int("data.dataset.image_size", image_size)
        if split not in self.SPLITS:
            raise ValueError(
                f"data.dataset.split={split!r} is not an Omniglot split; set --data.dataset.split to "
                "vinyals (Vinyals et al., 1028/172/423 characters) or paper (Finn et al., 1200/423)"
            )
        self.image_size = image_size
        self.rotations = rotations
        self.download = download
        self.split = split
        self.input_shape = (1, image_size, image_size)

    def prepare(self, root: str) -> None:
        prepare_omniglot(os.path.join(root, "omniglot"), download=self.download)

    def _labels_file(self, split: Split) -> str:
        if self.split == "vinyals":
            return f"vinyals_{split}_labels.json"
        return f"paper_{'train' if split == 'train' else 'test'}_labels.json"

    def _rotated(self, split: Split) -> bool:
        return self.rotations and (self.split == "vinyals" or split == "train")

    def split_stats(self, root: str, split: Split) -> tuple[int, int]:
        folder = os.path.join(root, "omniglot")
        if not is_prepared(folder):
            self.prepare(root)
        with open(os.path.join(folder, self._labels_file(split))) as f:
            labels = json.load(f)
        with h5py.File(os.path.join(folder, "data.hdf5"), "r") as f:
            fewest = min((f["/".join(label)].shape[0] for label in labels), default=0)
        return len(labels) * (4 if self._rotated(split) else 1), fewest

    def build(self, root, split, ways, shots, query_shots, splitter):
        kwargs = dict(
            transform=Compose([Resize(self.image_size), ToTensor()]),
            class_augmentations=[Rotation([90, 180, 270])] if self._rotated(split) else None,
        )
        if self.split == "vinyals":
            from torchmeta.datasets import Omniglot

            return Omniglot(
                root,
                num_classes_per_task=ways,
                meta_split=split,
                use_vinyals_split=True,
                target_transform=Categorical(ways),
                dataset_transform=splitter,
                **kwargs,
            )
        # Meta-validation reads the test characters: the paper has no validation set.
        classes = _PaperSplitClassDataset(root, meta_split="train" if split == "train" else "test", **kwargs)
        return CombinationMetaDataset(
            classes, ways, target_transform=Categorical(ways), dataset_transform=splitter
        )


class MiniImageNet(DatasetSpec):
    """MiniImageNet (Ravi & Larochelle split, 64/16/20 classes of 600 84x84 RGB images).

    Args:
        image_size: images are resized to image_size x image_size (3 channels, values in [0, 1]).

    Files (torchmeta's processed format, cannot be downloaded here): ``<root>/miniimagenet/
    {train,val,test}_data.hdf5`` (group ``datasets`` holding one uint8 ``[N, 84, 84, 3]`` dataset per
    class) and ``{train,val,test}_labels.json`` (sorted class names). Make them on a machine with
    internet with ``torchmeta.datasets.MiniImagenet(root, meta_train=True, download=True)``.
    """

    def __init__(self, image_size: int = 84):
        _check_positive_int("data.dataset.image_size", image_size)
        self.image_size = image_size
        self.input_shape = (3, image_size, image_size)

    @staticmethod
    def files(split: str) -> tuple[str, str]:
        return f"{split}_data.hdf5", f"{split}_labels.json"

    def prepare(self, root: str) -> None:
        folder = os.path.abspath(os.path.join(root, "miniimagenet"))
        expected = [name for split in ("train", "val", "test") for name in self.files(split)]
        missing = [name for name in expected if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise FileNotFoundError(
                f"MiniImageNet not found: expected {', '.join(expected)} in {folder} (torchmeta's processed "
                "format; create it with torchmeta.datasets.MiniImagenet(root, meta_train=True, "
                f"download=True) where there is internet, then copy the folder), {ROOT_HINT} "
                f"(missing: {', '.join(missing)})"
            )

    def split_stats(self, root: str, split: Split) -> tuple[int, int]:
        self.prepare(root)
        data_file, labels_file = (os.path.join(root, "miniimagenet", n) for n in self.files(split))
        with open(labels_file) as f:
            labels = json.load(f)
        with h5py.File(data_file, "r") as f:
            fewest = min((f["datasets"][label].shape[0] for label in labels), default=0)
        return len(labels), fewest

    def build(self, root, split, ways, shots, query_shots, splitter):
        from torchmeta.datasets import MiniImagenet

        return MiniImagenet(
            root,
            num_classes_per_task=ways,
            meta_split=split,
            transform=Compose([Resize(self.image_size), ToTensor()]),
            target_transform=Categorical(ways),
            dataset_transform=splitter,
        )


class Sinusoid(DatasetSpec):
    """Sinusoid regression (Finn et al., 2017): y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi],
    x ~ U[-5, 5]. Needs no files. A task has `shots` support and `query_shots` query points (`ways` is
    not used). Inputs and targets are float32 ``[K, 1]`` per task.
    """

    task_type = "regression"
    input_shape = (1,)
    num_train_tasks = 1_000_000  # length of torchmeta's pre-drawn task table for meta-training

    def __init__(self):
        pass

    def split_stats(self, root: str, split: Split) -> tuple[int, int]:
        return 1, 2**31 - 1  # one "class" with as many points as asked for

    def build(self, root, split, ways, shots, query_shots, splitter):
        from torchmeta.toy import Sinusoid

        return Sinusoid(shots + query_shots, num_tasks=self.num_train_tasks, dataset_transform=splitter)


class TorchmetaDataset(DatasetSpec):
    """Escape hatch: any other torchmeta meta-dataset, by import path and keyword arguments.

    Args:
        name: import path of the torchmeta class, e.g. ``torchmeta.datasets.CIFARFS`` or
            ``torchmeta.toy.Harmonic``.
        kwargs: extra keyword arguments for it (e.g. ``{download: true}``).
        task_type: "classification" (the class is called with ``num_classes_per_task=ways``,
            ``meta_split=split``, ``target_transform=Categorical(ways)``) or "regression" (called with
            ``num_samples_per_task=shots + query_shots``, like the toy datasets).
        input_shape: shape of one input, e.g. ``[3, 32, 32]``; needed by models linked to the data.
        image_size: if set, images get ``Resize(image_size)`` + ``ToTensor()`` (else ``ToTensor()``).

    Example::

        dataset:
          class_path: fmaml.data.TorchmetaDataset
          init_args: {name: torchmeta.datasets.CIFARFS, kwargs: {download: true}, input_shape: [3, 32, 32]}

    The class must accept ``root`` first (classification) and ``dataset_transform``. No files are checked
    beforehand: the class's own errors are shown.
    """

    def __init__(
        self,
        name: str,
        kwargs: dict | None = None,
        task_type: Literal["classification", "regression"] = "classification",
        input_shape: list[int] | None = None,
        image_size: int | None = None,
    ):
        self.import_path = name
        self.kwargs = dict(kwargs or {})
        self.task_type = task_type
        self.input_shape = tuple(input_shape or ())
        self.image_size = image_size

    @property
    def name(self) -> str:
        return self.import_path

    def _class(self):
        module, _, attr = self.import_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(
                f"data.dataset.name={self.import_path!r} is not an importable class ({e}); "
                "use a full path such as torchmeta.datasets.CIFARFS"
            ) from e

    def split_stats(self, root: str, split: Split) -> tuple[int, int]:
        if self.task_type == "regression":
            return 1, 2**31 - 1
        # Building the class dataset is the only generic way to count classes.
        meta = self.build(root, split, 1, 1, 0, None)
        return len(meta.dataset), min((len(meta.dataset[i]) for i in range(len(meta.dataset))), default=0)

    def build(self, root, split, ways, shots, query_shots, splitter):
        cls = self._class()
        if self.task_type == "regression":
            return cls(shots + query_shots, dataset_transform=splitter, **self.kwargs)
        kwargs = {
            "transform": Compose([Resize(self.image_size), ToTensor()]) if self.image_size else ToTensor()
        }
        kwargs.update(self.kwargs)
        return cls(
            root,
            num_classes_per_task=ways,
            meta_split=split,
            target_transform=Categorical(ways),
            dataset_transform=splitter,
            **kwargs,
        )


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer; set --{name} to 1 or more")

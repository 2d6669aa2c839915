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
from torchmeta.utils.data import ClassDataset, CombinationMetaDataset
from torchmeta.utils.data import Dataset as TorchmetaClassData
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
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({args})"


class _PaperSplitClassDataset(OmniglotClassDataset):
    """torchmeta's Omniglot classes, read from the paper split's ``paper_{train,val,test}_labels.json``.

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
              seed, 1200 for meta-training and the other 423 for meta-test; as in the paper's reference
              code, 100 of the 1200 are held out for meta-validation, so 1100 / 100 / 423 (see
              ``fmaml.data.omniglot_files.paper_split``; smaller fixtures keep these proportions).
              Validation, and so a sweep's ``val/loss`` and its pruner, never sees a test character.
              ``rotations`` augment meta-training (the paper's "augmented with rotations by multiples of
              90 degrees") and meta-validation, whose reference code draws its tasks through the same
              rotations as training (each class turned by a random multiple of 90 degrees), so a
              validation score ranks settings on the distribution they were trained for; meta-test
              keeps the 423 unrotated characters, as before. Only results on this split compare with
              the paper's.

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
                "vinyals (Vinyals et al., 1028/172/423 characters) or paper (Finn et al., 1100/100/423)"
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
        return f"paper_{split}_labels.json"

    def _rotated(self, split: Split) -> bool:
        return self.rotations and (self.split == "vinyals" or split != "test")

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
        classes = _PaperSplitClassDataset(root, meta_split=split, **kwargs)
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


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")


class ImageFolder(DatasetSpec):
    """Your own images: a folder of class folders, one folder per class with its images inside.

    Args:
        path: the folder. Either it holds ``train/``, ``val/`` and ``test/``, each a folder of class folders
            (your split), or it is itself a folder of class folders, split by class: the classes shuffled
            with ``split_seed``, then cut into ``split_fractions`` (meta-train, meta-validation, meta-test).
        image_size: images are resized to image_size x image_size.
        channels: 1 (grey) or 3 (RGB): every image is converted to it. None: the images' own, which must
            then be one mode throughout (a folder mixing grey and colour is refused, naming a file of each).
        rotations: add each meta-training class rotated by 90/180/270 degrees as a new class (x4 classes).
        invert: use 255 - pixel (dark strokes on white become bright on black, as fmaml's Omniglot).
        split_seed, split_fractions: the split by class, when there are no train/val/test folders.

    Classes may differ in size (the tensor sampler pads them and samples within each); every class needs
    at least shots + query_shots images. Files: ``*.png``, ``*.jpg``, ... (IMAGE_EXTENSIONS), read with PIL.
    Example::

        data:
          dataset:
            class_path: fmaml.data.ImageFolder
            init_args: {path: /data/my_images, image_size: 28, channels: 1}
    """

    def __init__(
        self,
        path: str,
        image_size: int = 28,
        channels: int | None = None,
        rotations: bool = False,
        invert: bool = False,
        split_seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.64, 0.16, 0.2),
    ):
        _check_positive_int("data.dataset.image_size", image_size)
        if channels not in (None, 1, 3):
            raise ValueError(
                f"data.dataset.channels={channels!r}: set it to 1 (grey), 3 (RGB), or null to keep the images' own"
            )
        fractions = tuple(split_fractions)
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(
                f"data.dataset.split_fractions={list(fractions)}: give three positive fractions summing to 1 "
                "(meta-train, meta-validation, meta-test), e.g. [0.64, 0.16, 0.2]"
            )
        self.path = path
        self.image_size = image_size
        self.channels = channels
        self.rotations = rotations
        self.invert = invert
        self.split_seed = split_seed
        self.split_fractions = fractions
        self._splits: dict[str, list[tuple[str, list[str]]]] | None = None

    @property
    def name(self) -> str:
        return f"ImageFolder({self.path})"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.channels or self._mode_channels(), self.image_size, self.image_size)

    def splits(self) -> dict[str, list[tuple[str, list[str]]]]:
        """{split: [(class folder, [image files, sorted]), ...]}, classes sorted by folder; checked once."""
        if self._splits is None:
            self._splits = self._find_splits()
        return self._splits

    def _find_splits(self) -> dict[str, list[tuple[str, list[str]]]]:
        folder = os.path.abspath(self.path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"data.dataset.path={self.path!r}: no such folder ({folder}); give a folder of class folders"
            )
        present = [s for s in SPLIT_FOLDERS if os.path.isdir(os.path.join(folder, s))]
        if present:
            missing = [s for s in SPLIT_FOLDERS if s not in present]
            if missing:
                raise FileNotFoundError(
                    f"data.dataset.path={self.path!r} has {', '.join(p + '/' for p in present)} but no "
                    f"{', '.join(m + '/' for m in missing)}: give all three split folders, or none (then the "
                    "classes are split by data.dataset.split_fractions)"
                )
            return {s: _class_folders(os.path.join(folder, s)) for s in SPLIT_FOLDERS}
        classes = _class_folders(folder)
        order = np.random.default_rng(self.split_seed).permutation(len(classes))
        train_end = round(self.split_fractions[0] * len(classes))
        val_end = train_end + round(self.split_fractions[1] * len(classes))
        cuts = {"train": order[:train_end], "val": order[train_end:val_end], "test": order[val_end:]}
        empty = [s for s, idx in cuts.items() if len(idx) == 0]
        if empty:
            raise ValueError(
                f"data.dataset.path={self.path!r}: its {len(classes)} classes leave no class for the "
                f"{', '.join(SPLIT_NAMES[s] for s in empty)} split with split_fractions={list(self.split_fractions)}; "
                "add classes or change data.dataset.split_fractions"
            )
        return {s: [classes[i] for i in sorted(idx)] for s, idx in cuts.items()}

    def _mode_channels(self) -> int:
        from PIL import Image

        modes: dict[str, str] = {}
        for classes in self.splits().values():
            for _, files in classes:
                for file in files:
                    with Image.open(file) as image:
                        modes.setdefault(image.mode, file)
                    if len(modes) > 1:
                        (a, fa), (b, fb) = list(modes.items())[:2]
                        raise ValueError(
                            f"data.dataset.path={self.path!r} mixes image modes: {a} ({fa}) and {b} ({fb}); set "
                            "data.dataset.channels to 1 or 3 to convert every image to grey or RGB"
                        )
        (mode,) = modes
        return 1 if mode in ("1", "L", "I", "I;16", "F") else 3

    def prepare(self, root: str) -> None:
        self.splits()
        self.input_shape  # noqa: B018 (checks the image modes now, before any long work)

    def split_stats(self, root: str, split: Split) -> tuple[int, int]:
        classes = self.splits()[split]
        rotated = self.rotations and split == "train"
        return len(classes) * (4 if rotated else 1), min(len(files) for _, files in classes)

    def smallest_class(self, split: Split) -> str:
        folder, files = min(self.splits()[split], key=lambda c: len(c[1]))
        return f"{folder}, {len(files)} images"

    def build(self, root, split, ways, shots, query_shots, splitter):
        mode = {1: "L", 3: "RGB"}[self.input_shape[0]]
        classes = _ImageFolderClasses(
            self.splits()[split],
            mode,
            self.invert,
            meta_split=split,
            transform=Compose([Resize((self.image_size, self.image_size)), ToTensor()]),
            class_augmentations=[Rotation([90, 180, 270])] if self.rotations and split == "train" else None,
        )
        return CombinationMetaDataset(
            classes, ways, target_transform=Categorical(ways), dataset_transform=splitter
        )


def _class_folders(folder: str) -> list[tuple[str, list[str]]]:
    """The class folders of `folder` with their image files, both sorted; an empty class is an error."""
    classes = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        files = sorted(
            os.path.join(entry.path, f)
            for f in os.listdir(entry.path)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise ValueError(
                f"class folder {entry.path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it"
            )
        classes.append((entry.path, files))
    if not classes:
        raise ValueError(
            f"{folder} holds no class folders: put each class's images in a folder of its own there"
        )
    return classes


class _ImageFolderClasses(ClassDataset):
    """torchmeta's view of ImageFolder's classes: item i is class i's images (through class augmentation
    i // num_classes, as torchmeta numbers augmented classes)."""

    def __init__(self, classes, mode: str, invert: bool, meta_split: str, transform, class_augmentations):
        super().__init__(meta_split=meta_split, class_augmentations=class_augmentations)
        self.classes, self.mode, self.invert, self.transform = classes, mode, invert, transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int):
        folder, files = self.classes[index % self.num_classes]
        return _ImageClass(
            index, files, self.mode, self.invert, folder, self.get_transform(index, self.transform),
            self.get_target_transform(index),
        )  # fmt: skip


class _ImageClass(TorchmetaClassData):
    def __init__(self, index, files, mode, invert, name, transform, target_transform):
        super().__init__(index, transform=transform, target_transform=target_transform)
        self.files, self.mode, self.invert, self.name = files, mode, invert, name

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image, ImageOps

        with Image.open(self.files[i]) as file:
            image = file.convert(self.mode)
        if self.invert:
            image = ImageOps.invert(image)
        target = self.name if self.target_transform is None else self.target_transform(self.name)
        return (image if self.transform is None else self.transform(image)), target

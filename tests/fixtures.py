"""Tiny on-disk datasets for tests, and helpers that pytest fixtures in conftest.py can wrap.

- ``write_omniglot_zips(folder)``: a tiny Omniglot in the official zip layout, using real character
  names from torchmeta's Vinyals split so each split gets ``chars_per_split`` characters.
- ``write_miniimagenet(root)``: a tiny MiniImageNet in torchmeta's processed format.
- ``tiny_omniglot_root(tmp_path_factory)`` / ``real_omniglot_root(tmp_path_factory)``: prepared roots,
  made once per test session (cached here, so several fixtures wrapping them share the work).

Images are class-specific block patterns plus a little noise, so a few meta-steps can learn something.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import h5py
import numpy as np
from PIL import Image

# Real (alphabet, characterNN) names from torchmeta's assets/omniglot/{train,val,test}.json.
OMNIGLOT_SPLIT_ALPHABETS = {
    "train": ("images_background", "Alphabet_of_the_Magi"),  # 20 characters
    "val": ("images_background", "Armenian"),  # 41 characters
    "test": ("images_evaluation", "Kannada"),  # 41 characters
}
REAL_OMNIGLOT_ENV = "FMAML_OMNIGLOT_ZIPS"
_SESSION_CACHE: dict[str, str] = {}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CLI arguments for end-to-end tests: a small meta-batch and few tasks, on CPU, quiet. The CLI path is
# what those tests check, not the paper's numbers.
TINY = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.meta_batch_size=2",
    "--data.evaluation.num_val_tasks=4",
    "--data.evaluation.num_test_tasks=6",
]


def config(name: str) -> str:
    """The path of configs/<name>."""
    return os.path.join(REPO, "configs", name)


def error_lines(capsys) -> list[str]:
    """stderr's `error:` line and the line after it (the hint) of a refused start-up; stderr also holds
    warnings, which are not errors."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    (first,) = [i for i, line in enumerate(lines) if line.startswith("error:")]
    return lines[first : first + 2]


def class_pattern(class_id: int, size: int, channels: int = 0) -> np.ndarray:
    """A random 7x7 block pattern (bool), fixed by class_id, upscaled to size x size (x channels)."""
    rng = np.random.default_rng(1000 + class_id)
    shape = (7, 7, channels) if channels else (7, 7)
    blocks = rng.random(shape) < 0.4
    cell = -(-size // 7)
    return np.kron(blocks, np.ones((cell, cell, 1) if channels else (cell, cell), dtype=bool))[:size, :size]


def _noisy(pattern: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The pattern shifted by up to 2 pixels, with 2% of pixels flipped."""
    shifted = np.roll(pattern, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
    return shifted ^ (rng.random(pattern.shape) < 0.02)


def write_omniglot_zips(folder, chars_per_split: int = 8, drawings: int = 20, seed: int = 0) -> None:
    """Write images_background.zip and images_evaluation.zip (official layout) into `folder`.

    Entries: ``images_background/<Alphabet>/characterNN/<cid>_<dd>.png``, 105x105 PNG mode '1', ink 0
    and background 1. Each of the three Vinyals splits gets `chars_per_split` characters (<= 20).
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries: dict[str, list[tuple[str, bytes]]] = {"images_background": [], "images_evaluation": []}
    class_id = 0
    for zip_name, alphabet in OMNIGLOT_SPLIT_ALPHABETS.values():
        for c in range(1, chars_per_split + 1):
            class_id += 1
            pattern = class_pattern(class_id, 105)
            for d in range(1, drawings + 1):
                ink = _noisy(pattern, rng)
                buf = io.BytesIO()
                Image.fromarray(~ink).convert("1").save(buf, format="PNG")  # ink 0, background 1
                path = f"{zip_name}/{alphabet}/character{c:02d}/{class_id:04d}_{d:02d}.png"
                entries[zip_name].append((path, buf.getvalue()))
    for zip_name, files in entries.items():
        with zipfile.ZipFile(os.path.join(folder, f"{zip_name}.zip"), "w") as zf:
            for path, data in files:
                zf.writestr(path, data)


def write_miniimagenet(root, classes_per_split=(6, 6, 6), images_per_class: int = 20, size: int = 84) -> None:
    """Write ``<root>/miniimagenet/{split}_data.hdf5`` + ``{split}_labels.json`` (torchmeta's format).

    hdf5: group ``datasets`` with one uint8 ``[images_per_class, size, size, 3]`` dataset per class,
    named like the real wnids (n0000001, ...); labels json: sorted list of those names.
    """
    folder = os.path.join(root, "miniimagenet")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    class_id = 0
    for split, num_classes in zip(("train", "val", "test"), classes_per_split, strict=True):
        names = []
        with h5py.File(os.path.join(folder, f"{split}_data.hdf5"), "w") as f:
            group = f.create_group("datasets")
            for _ in range(num_classes):
                class_id += 1
                name = f"n{class_id:08d}"
                pattern = class_pattern(class_id, size, channels=3)
                images = np.stack([_noisy(pattern, rng) for _ in range(images_per_class)])
                group.create_dataset(name, data=images.astype(np.uint8) * 255)
                names.append(name)
        with open(os.path.join(folder, f"{split}_labels.json"), "w") as f:
            json.dump(sorted(names), f)


def tiny_omniglot_root(tmp_path_factory, chars_per_split: int = 8) -> str:
    """A data root whose omniglot/ holds the tiny zips, already prepared (once per session)."""
    key = f"tiny-{chars_per_split}"
    if key not in _SESSION_CACHE:
        import warnings

        from fmaml.data.omniglot_files import prepare_omniglot

        root = str(tmp_path_factory.mktemp(f"omniglot-{key}"))
        write_omniglot_zips(os.path.join(root, "omniglot"), chars_per_split=chars_per_split)
        with warnings.catch_warnings():  # "hold only N of the 1623 characters": expected here
            warnings.simplefilter("ignore")
            prepare_omniglot(os.path.join(root, "omniglot"), download=False)
        _SESSION_CACHE[key] = root
    return _SESSION_CACHE[key]


def real_omniglot_root(tmp_path_factory) -> str:
    """A data root with the real Omniglot prepared (once per session), or pytest.skip.

    Needs $FMAML_OMNIGLOT_ZIPS = a folder holding the two real zips; they are symlinked into a
    temporary root, never copied into the repository.
    """
    import pytest

    zips = os.environ.get(REAL_OMNIGLOT_ENV)
    names = ("images_background.zip", "images_evaluation.zip")
    if not zips or not all(os.path.isfile(os.path.join(zips, n)) for n in names):
        pytest.skip(f"set {REAL_OMNIGLOT_ENV} to a folder holding {' and '.join(names)}")
    if "real" not in _SESSION_CACHE:
        from fmaml.data.omniglot_files import prepare_omniglot

        root = str(tmp_path_factory.mktemp("omniglot-real"))
        os.makedirs(os.path.join(root, "omniglot"))
        for n in names:
            os.symlink(os.path.abspath(os.path.join(zips, n)), os.path.join(root, "omniglot", n))
        prepare_omniglot(os.path.join(root, "omniglot"), download=False)
        _SESSION_CACHE["real"] = root
    return _SESSION_CACHE["real"]

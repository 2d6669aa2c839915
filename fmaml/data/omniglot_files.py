"""Turn the two official Omniglot zips into torchmeta's processed format, offline.

Input, in ``<root>/omniglot``: ``images_background.zip`` and ``images_evaluation.zip`` with the layout
of https://github.com/brendenlake/omniglot/tree/master/python, i.e. ``images_background/<Alphabet>/
characterNN/<id>_<drawer>.png`` (105x105 PNGs, ink 0, background 1).

Output, in the same folder (what ``torchmeta.datasets.Omniglot`` reads):

- ``data.hdf5``: dataset ``images_background/<Alphabet>/characterNN`` of shape ``[drawings, 105, 105]``
  uint8, ink 255 and background 0 (torchmeta inverts the PNGs), drawings sorted by file name.
- ``vinyals_{train,val,test}_labels.json``: sorted ``[zip name, alphabet, character]`` triples of the
  Vinyals et al. (2016) split (from torchmeta's assets), and ``{train,test}_labels.json`` for the
  background/evaluation split.
- ``paper_{train,val,test}_labels.json``: the MAML paper's split (Finn et al. 2017), with the validation
  characters of its reference code, see `paper_split`.

The PNGs are decoded straight from the zips (no extraction to disk, no md5: rebuilt zips with identical
pixels are fine). data.hdf5 is written to a temporary file and renamed last, so a crash never leaves a
file that looks complete; concurrent preparers each write their own temporary file.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import socket
import threading
import warnings
import zipfile
import zlib
from collections.abc import Iterator

import h5py
import numpy as np
from PIL import Image

ZIP_NAMES = ("images_background", "images_evaluation")
SOURCE_URL = "https://github.com/brendenlake/omniglot/tree/master/python"
DOWNLOAD_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip"
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
DATA_FILE = "data.hdf5"
TORCHMETA_LABEL_FILES = tuple(f"vinyals_{s}_labels.json" for s in ("train", "val", "test")) + tuple(
    f"{s}_labels.json" for s in ("train", "test")
)
# Validation last: is_prepared keys on it, so a folder holding it never pairs it with the 1200-character
# paper_train_labels.json an older fmaml wrote (a crash before it leaves the folder to be rewritten).
PAPER_SPLITS = ("train", "test", "val")
PAPER_LABEL_FILES = tuple(f"paper_{s}_labels.json" for s in PAPER_SPLITS)
LABEL_FILES = TORCHMETA_LABEL_FILES + PAPER_LABEL_FILES
IMAGE_SIZE = 105
# The paper's split: all 1623 characters shuffled with this seed, the first 1200 for meta-training, of
# which the reference code holds the last 100 out for meta-validation.
PAPER_SPLIT_SEED = 1
PAPER_TRAIN_CHARACTERS, PAPER_VAL_CHARACTERS, ALL_CHARACTERS = 1200, 100, 1623


class OmniglotZipError(ValueError):
    """A zip is corrupt, truncated, or does not have the official layout."""


def is_prepared(folder: str) -> bool:
    """True when `folder` (``<root>/omniglot``) holds data.hdf5 and every labels json."""
    names = (DATA_FILE, *LABEL_FILES)
    return all(os.path.isfile(os.path.join(folder, n)) for n in names)


def prepare_omniglot(folder: str, download: bool = True) -> None:
    """Build data.hdf5 and the labels jsons in `folder` from the two zips; no-op if already done.

    Missing zips are downloaded (checked against the official md5) only if `download`; if that is off
    or fails, raises FileNotFoundError saying where to put which zips. A folder prepared by an older
    fmaml (no ``paper_*_labels.json``, or the old 1200/423 ones without ``paper_val_labels.json``) only
    gets all three rewritten, so the old 1200 training characters, which include the new validation
    ones, are never read.
    """
    folder = os.path.abspath(os.path.expanduser(folder))
    if is_prepared(folder):
        return
    data_file = os.path.join(folder, DATA_FILE)
    if os.path.isfile(data_file) and all(
        os.path.isfile(os.path.join(folder, n)) for n in TORCHMETA_LABEL_FILES
    ):
        # Prepared before the paper split or its validation set existed: data.hdf5 is complete (it is
        # written last), so the paper's labels can be rewritten from its keys in a second, without
        # converting the zips again.
        with h5py.File(data_file, "r") as f:
            present = {f"{z}/{a}/{c}" for z in f for a in f[z] for c in f[z][a]}
        _write_paper_label_files(folder, present)
        return
    zips = {name: os.path.join(folder, f"{name}.zip") for name in ZIP_NAMES}
    missing = [name for name, path in zips.items() if not os.path.isfile(path)]
    if missing:
        _download_or_explain(folder, missing, download)

    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, _private_name(f".{DATA_FILE}"))
    try:
        present = set()  # "images_background/<Alphabet>/<character>" keys written to data.hdf5
        with h5py.File(tmp, "w") as f:
            for name, path in zips.items():
                for key, images in _read_zip(name, path):
                    f.create_dataset(key, data=images)
                    present.add(key)
        _write_label_files(folder, present)
        os.replace(tmp, os.path.join(folder, DATA_FILE))  # data.hdf5 appears last, and complete
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _download_or_explain(folder: str, missing: list[str], download: bool) -> None:
    reason = "downloading is off"
    if download:
        from torchvision.datasets.utils import download_url

        try:
            for name in missing:
                part = _private_name(f"{name}.zip")  # renamed only once complete and md5-checked
                download_url(DOWNLOAD_URL.format(name=name), folder, part, md5=OFFICIAL_MD5[name])
                os.replace(os.path.join(folder, part), os.path.join(folder, f"{name}.zip"))
            return
        except Exception as e:  # no network, HTTP error, bad md5: all end in the same advice
            reason = f"download failed: {type(e).__name__}: {e}"
    raise FileNotFoundError(
        f"Omniglot not found: put images_background.zip and images_evaluation.zip in {folder} "
        f"(from {SOURCE_URL}), or set --data.root / FMAML_DATA_ROOT "
        f"(missing: {', '.join(n + '.zip' for n in missing)}; {reason})"
    )


def _read_zip(name: str, path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ("<name>/<Alphabet>/<character>", uint8 [drawings, 105, 105]) for each character of a zip."""
    layout = re.compile(rf"^{name}/([^/]+)/([^/]+)/([^/]+\.png)$")
    fix = f"re-copy {os.path.basename(path)} from {SOURCE_URL}"
    try:
        with zipfile.ZipFile(path) as zf:
            members = sorted(m for m in zf.namelist() if _is_image(m))
            bad = [m for m in members if not layout.match(m)]
            if bad or not members:
                found = f"found {bad[0]!r}" if bad else "found no PNG files"
                raise OmniglotZipError(
                    f"{path} does not have the official Omniglot layout: expected entries like "
                    f"{name}/<Alphabet>/characterNN/<id>_<drawer>.png, {found}; {fix}"
                )
            for character, group in itertools.groupby(members, key=_character_key):  # sorted: one group each
                yield character, np.stack([_decode(zf.read(m), path, m, fix) for m in group])
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise OmniglotZipError(f"{path} is corrupt or truncated ({e}); {fix}") from e


def _character_key(member: str) -> str:
    return "/".join(member.split("/")[:3])


def _is_image(member: str) -> bool:
    # Directory entries, macOS metadata and stray non-PNG files are not part of the data.
    base = os.path.basename(member)
    return member.endswith(".png") and not member.startswith("__MACOSX/") and not base.startswith(".")


def _decode(data: bytes, path: str, member: str, fix: str) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data)).convert("L")
    except OSError as e:
        raise OmniglotZipError(f"{path}: cannot decode {member} ({e}); {fix}") from e
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise OmniglotZipError(f"{path}: {member} is {image.size}, expected 105x105; {fix}")
    return 255 - np.asarray(image, dtype=np.uint8)  # invert, as torchmeta does: ink 255, background 0


def _write_label_files(folder: str, present: set[str]) -> None:
    """Write the labels jsons, keeping only characters that are in the zips (warn if some are not)."""
    from torchmeta.datasets.utils import get_asset

    splits = {}
    for split in ("train", "val", "test"):
        asset = get_asset("omniglot", f"{split}.json", dtype="json")  # {"background": {alphabet: [...]}}
        splits[f"vinyals_{split}"] = [
            [f"images_{zip_part}", alphabet, character]
            for zip_part, alphabets in asset.items()
            for alphabet, characters in alphabets.items()
            for character in characters
        ]
    listed = sum(len(v) for v in splits.values())
    splits["train"] = [k.split("/") for k in present if k.startswith("images_background/")]
    splits["test"] = [k.split("/") for k in present if k.startswith("images_evaluation/")]
    absent = sum("/".join(t) not in present for s in ("train", "val", "test") for t in splits[f"vinyals_{s}"])
    if absent:
        warnings.warn(
            f"The Omniglot zips in {folder} hold only {listed - absent} of the {listed} characters of the "
            "Vinyals split; using those (expected only for test fixtures).",
            stacklevel=3,
        )
    for split, labels in splits.items():
        kept = sorted(t for t in labels if "/".join(t) in present)
        _write_json_atomic(os.path.join(folder, f"{split}_labels.json"), kept)
    _write_paper_label_files(folder, present)


def paper_split(characters: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The MAML paper's class split (Finn et al. 2017, section 5.2): (train, val, test) character keys.

    All characters of both zips (``"images_background/<Alphabet>/characterNN"``) are sorted, shuffled by
    ``numpy.random.default_rng(PAPER_SPLIT_SEED)``, and the first ``round(1200 / 1623 * N)`` are the
    paper's meta-training characters, the rest its meta-test: 1200 / 423 on the real N = 1623. Of the
    1200, the last ``round(100 / 1623 * N)`` are held out for meta-validation, as the paper's reference
    code does (cbfinn/maml data_generator.py: ``num_val = 100``, train ``[:1100]``, val
    ``[1100:1200]``, test ``[1200:]``): 1100 / 100 / 423, the same proportions on smaller test
    fixtures. The test characters are the ones fmaml used before the validation set was carved out.
    The paper gives no seed (its code shuffles directory listings with Python's ``random.seed(1)``,
    which depends on the file system's order), so this is *a* random split of those sizes, the same on
    every machine, not the paper's exact characters.
    """
    ordered = sorted(characters)  # independent of the order the zips or the hdf5 list them in
    shuffled = [ordered[i] for i in np.random.default_rng(PAPER_SPLIT_SEED).permutation(len(ordered))]
    num_meta_train = round(PAPER_TRAIN_CHARACTERS / ALL_CHARACTERS * len(characters))
    num_train = num_meta_train - round(PAPER_VAL_CHARACTERS / ALL_CHARACTERS * len(characters))
    return shuffled[:num_train], shuffled[num_train:num_meta_train], shuffled[num_meta_train:]


def _write_paper_label_files(folder: str, present: set[str]) -> None:
    keys = dict(zip(("train", "val", "test"), paper_split(list(present)), strict=True))
    for split, name in zip(PAPER_SPLITS, PAPER_LABEL_FILES, strict=True):  # in that order: val last
        _write_json_atomic(os.path.join(folder, name), sorted(k.split("/") for k in keys[split]))


def _private_name(name: str) -> str:
    """`name` made this preparer's own: nodes sharing the data folder prepare it at once (Lightning's
    prepare_data runs on each node), each writing its own files and renaming them when complete."""
    return f"{name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"


def _write_json_atomic(path: str, obj) -> None:
    tmp = _private_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)

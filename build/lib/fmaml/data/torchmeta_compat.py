"""Make torchmeta 1.8.0 (unmaintained, written for torch 1.9) work on current torch/torchvision/numpy.

This is the ONLY module in fmaml that monkey-patches torchmeta. It must be imported before torchmeta
(``fmaml.data`` imports it first). ``apply()`` runs on import and is idempotent. Each fix below says why
it is needed and has a test in ``tests/test_torchmeta_compat.py`` that fails without it.
"""

from __future__ import annotations

import types

import numpy as np
import torchvision.datasets.utils as tv_utils

_APPLIED = False
ORIGINALS: dict[str, object] = {}  # what the patches replaced, for tests


# Fix 1. torchmeta.datasets.utils does `from torchvision.datasets.utils import _get_confirm_token,
# _save_response_content` at import time; torchvision >= 0.17 removed `_get_confirm_token`, so
# `import torchmeta` itself fails. The stand-ins keep torchmeta's Google Drive helper working as before.
def _get_confirm_token(response):
    """Old torchvision helper: the Google Drive "download anyway" token, from the response cookies."""
    for key, value in response.cookies.items():
        if key.startswith("download_warning"):
            return value
    return None


def _save_response_content(response, destination, chunk_size=32768):
    """Old torchvision helper: stream a requests response to `destination`."""
    with open(destination, "wb") as f:
        for chunk in response.iter_content(chunk_size):
            if chunk:
                f.write(chunk)


def _patch_torchvision_helpers() -> None:
    if not hasattr(tv_utils, "_get_confirm_token"):
        tv_utils._get_confirm_token = _get_confirm_token
    if not hasattr(tv_utils, "_save_response_content"):
        tv_utils._save_response_content = _save_response_content


# Fix 2. torch >= 2.6 `Subset.__init__` raises NotImplementedError when a subclass overrides
# `__getitem__` but not `__getitems__` (the batched-fetch hook of DataLoader). torchmeta's SubsetTask
# overrides `__getitem__`, so every ClassSplitter call (which builds SubsetTasks) raised.
def _subset_task_getitems(self, indices):
    """Batched fetch, through `__getitem__` so SubsetTask's own indexing is kept."""
    return [self[i] for i in indices]


def _patch_subset_task() -> None:
    from torchmeta.utils.data.task import SubsetTask

    if "__getitems__" not in SubsetTask.__dict__:
        SubsetTask.__getitems__ = _subset_task_getitems


# Fix 3. OmniglotClassDataset.download() (a) skips extraction when a zip is already on disk, so local
# zips never get processed; (b) checks the official md5s, which rebuilt (pixel-identical) zips fail;
# (c) writes data.hdf5 in place, so an interrupted run leaves a file that later passes the integrity
# check. fmaml.data.omniglot_files reads local zips directly (no md5, no extraction to disk), downloads
# only when a zip is missing, and writes atomically, with clear errors for missing/corrupt zips.
def _omniglot_download(self):
    from fmaml.data.omniglot_files import prepare_omniglot

    prepare_omniglot(self.root, download=True)


def _patch_omniglot() -> None:
    from torchmeta.datasets.omniglot import OmniglotClassDataset

    if OmniglotClassDataset.download is not _omniglot_download:
        ORIGINALS["OmniglotClassDataset.download"] = OmniglotClassDataset.download
    OmniglotClassDataset.download = _omniglot_download


# Fix 4. numpy 1.24 removed the aliases np.int/np.float/np.bool/np.object, still used by
# torchmeta.datasets.tcga (np.int) and torchmeta.datasets.bach (np.float). Rather than adding them
# to numpy for everyone, only those two modules see a numpy with the aliases.
class _NumpyWithAliases(types.ModuleType):
    int = int
    float = float
    bool = bool
    object = object

    def __getattr__(self, name):
        return getattr(np, name)


_NUMPY_WITH_ALIASES = _NumpyWithAliases("numpy")


def _patch_numpy_aliases() -> None:
    import torchmeta.datasets.bach as bach
    import torchmeta.datasets.tcga as tcga

    tcga.np = _NUMPY_WITH_ALIASES
    bach.np = _NUMPY_WITH_ALIASES


def apply() -> None:
    """Apply all fixes (idempotent). Fix 1 must run before the first `import torchmeta`."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_torchvision_helpers()
    _patch_subset_task()
    _patch_omniglot()
    _patch_numpy_aliases()
    _APPLIED = True


apply()

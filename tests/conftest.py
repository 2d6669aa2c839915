"""Test-wide settings."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def auto_strategy_cache(tmp_path_factory):
    """strategy="auto" caches its measurements per device, model and shapes: keep the tests' out of the
    user's cache, shared by the whole session (so two runs of one setting make the same choice)."""
    import os

    folder = tmp_path_factory.mktemp("fmaml-cache")
    previous = os.environ.get("FMAML_CACHE_DIR")
    os.environ["FMAML_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["FMAML_CACHE_DIR"]
    else:
        os.environ["FMAML_CACHE_DIR"] = previous


# The files whose tests run for minutes (subprocesses, servers, a venv install), slowest first. They are
# collected first, so that the two xdist workers start them at once and the short tests fill in around
# them; collected last (alphabetically), one worker would run a long tail alone while the other idles.
LONG_FIRST = (
    "test_run_gpu_smoke.py",
    "test_sweep_postgres.py",
    "test_multinode.py",
    "test_kill_resume.py",
    "test_ddp.py",
    "test_notebook.py",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order

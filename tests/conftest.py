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


@pytest.fixture(scope="session")
def zygote(tmp_path_factory, auto_strategy_cache):
    """A fork server that has imported fmaml once (tests/zygote.py): a real process per request, started
    in milliseconds instead of an interpreter's 10+ s of imports. One per test process (xdist worker)."""
    from zygote import Zygote

    server = Zygote(tmp_path_factory.mktemp("zygote"))
    yield server
    server.close()

"""Test-wide settings."""

import os
import shutil
import tempfile

import pytest

# One torch thread per test process (before anything imports torch), and in the processes the tests start
# (the variable is inherited): the parallelism is pytest-xdist's, one worker per core. Two workers of two
# OpenMP threads each on two cores spin-wait on each other: on a busy 2-core machine, test_cli's Omniglot
# fast_dev_run tests took 132 s of CPU time with two threads, 30 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Where PYTHONDONTWRITEBYTECODE is set, every interpreter the suite starts (xdist's workers, the
    zygotes, the fresh interpreters some tests need) would compile all it imports from source: about 8 of
    the 13 s of `import fmaml.cli` here. Instead the first one to import a module writes its bytecode into
    a folder of this run's (not the source tree, nor the environment), and the later ones read it. Set here,
    in the first pytest process, before it starts its workers (they inherit the environment)."""
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
        folder = tempfile.mkdtemp(prefix="fmaml-tests-pycache-")
        os.environ["PYTHONPYCACHEPREFIX"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The tests marked slow first, the others after them in their order: xdist's workers take tests as
    they free up, so a long test left for the end would run on alone while the other worker waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def auto_strategy_cache(tmp_path_factory):
    """strategy="auto" caches its measurements per device, model and shapes: keep the tests' out of the
    user's cache, shared by the whole session (so two runs of one setting make the same choice)."""
    folder = tmp_path_factory.mktemp("fmaml-cache")
    previous = os.environ.get("FMAML_CACHE_DIR")
    os.environ["FMAML_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["FMAML_CACHE_DIR"]
    else:
        os.environ["FMAML_CACHE_DIR"] = previous


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A test that writes logs/ and checkpoints where it runs: in its own temporary folder, with fmaml's
    start-up errors as users see them (not FMAML_DEBUG's tracebacks)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FMAML_DEBUG", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def zygote(tmp_path_factory, auto_strategy_cache):
    """A fork server that has imported fmaml once (tests/zygote.py): a real process per request, started
    in milliseconds instead of an interpreter's 10+ s of imports. One per test process (xdist worker)."""
    from zygote import Zygote

    server = Zygote(tmp_path_factory.mktemp("zygote"))
    yield server
    server.close()

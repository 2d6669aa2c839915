"""`python -m fmaml.sweep` on a real PostgreSQL server, as on several machines: two worker processes, each in
its own working folder, share one `postgresql://` study. A grid runs each point once, a search's best trial
is read back from the database, and a SIGKILLed worker's trial is failed and retried.

The server is the distribution's (initdb and pg_ctl on PATH or in /usr/lib/postgresql/*/bin), started in a
temporary folder on 127.0.0.1 for this module. Without it these tests fail (so CI cannot skip them unseen;
.ci/run installs the package) unless FMAML_NO_POSTGRES=1 says to skip them."""

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
from test_sweep import SWEEP_WITH_TRIALS_IN_PROCESS, TINY

from fmaml.sweep import Retry, main

# No strategy measurement in each trial.
RUN = [*TINY, "--model.execution.strategy=loop"]
State = optuna.trial.TrialState


def postgres_bin_dir() -> str | None:
    """The folder of the server's initdb and pg_ctl, the newest version where several are installed."""
    found = shutil.which("initdb") or max(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: [int(n) for n in re.findall(r"\d+", path)],
        default=None,
    )
    return os.path.dirname(os.path.realpath(found)) if found else None


def server_user() -> dict:
    """subprocess arguments that run the server unprivileged: initdb and postgres refuse to run as root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    pytest.fail("running as root and neither a 'postgres' nor a 'nobody' user exists to run the server as")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_checked(command: list[str], log: str, **kwargs) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)
    if result.returncode != 0:
        server_log = open(log).read() if os.path.exists(log) else ""
        pytest.fail(f"{command} failed:\n{result.stdout}{result.stderr}\n{server_log}")


@pytest.fixture(scope="module")
def postgres():
    """A throwaway server for this module's tests: its URL without a database, as superuser 'fmaml'."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        where = "no initdb on PATH or in /usr/lib/postgresql/*/bin"
        if os.environ.get("FMAML_NO_POSTGRES") == "1":
            pytest.skip(f"{where}, and FMAML_NO_POSTGRES=1")
        pytest.fail(
            f"{where}: install PostgreSQL's server package (apt-get install postgresql; .ci/run does), "
            "or set FMAML_NO_POSTGRES=1 to skip these tests"
        )
    as_user = server_user()
    # Not under pytest's tmp_path: that folder is private to root, where the server's user cannot enter.
    folder = tempfile.mkdtemp(prefix="fmaml-pg-")
    if as_user:
        os.chown(folder, as_user["user"], as_user["group"])
    data, log, port = os.path.join(folder, "data"), os.path.join(folder, "server.log"), free_port()
    initdb = [f"{bin_dir}/initdb", "-D", data, "-U", "fmaml", "--auth=trust", "--no-sync", "-E", "UTF8"]
    run_checked(initdb, log, cwd=folder, **as_user)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off"
    pg_ctl = [f"{bin_dir}/pg_ctl", "-D", data, "-l", log, "-w", "-t", "60"]
    run_checked([*pg_ctl, "-o", options, "start"], log, cwd=folder, **as_user)
    yield f"postgresql://fmaml@127.0.0.1:{port}"
    subprocess.run([*pg_ctl, "stop", "-m", "immediate"], capture_output=True, cwd=folder, **as_user)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def database(postgres, request):
    """A new database on the server for one test: the `--storage` URL its workers share."""
    import sqlalchemy

    name = re.sub(r"\W", "_", request.node.name.lower())[:63]
    engine = sqlalchemy.create_engine(f"{postgres}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{postgres}/{name}"


def worker(zygote, machine, url: str, *args: str, trial_start_s: float = 0):
    """`python -m fmaml.sweep` as on one machine: its own working folder, its logs in <machine>/logs; its own
    process group, so that killing it kills its trial's run too. Forked from the zygote (tests/zygote.py:
    no 10+ s of imports), its trials run inside it (test_sweep.run_trial_in_process, heartbeats included):
    what is tested is the workers' coordination through the database. A trial's own process, and that it
    dies with its killed worker: test_sweep's killed-worker test. trial_start_s: how long each trial waits
    before its run starts (a fresh process's imports), heartbeats going."""
    machine.mkdir(exist_ok=True)
    command = ["-c", SWEEP_WITH_TRIALS_IN_PROCESS, "--name", "s", "--storage", url, *args, *RUN]
    return zygote.popen(
        command,
        env=os.environ | {"FMAML_TEST_TRIAL_START_S": str(trial_start_s)},
        cwd=machine,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(*workers) -> list[str]:
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * len(workers), "\n\n".join(outputs)
    return outputs


def trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return sorted(optuna.load_study(study_name="s", storage=url).trials, key=lambda t: t.number)


def runs(machine) -> list[str]:
    """The trial folders a worker made on its machine, e.g. ['0-steps=1']."""
    return sorted(
        os.path.basename(os.path.dirname(p)) for p in glob.glob(f"{machine}/logs/sweeps/s/*/output.log")
    )


def test_a_postgresql_url_without_its_driver_says_which_extra_to_install(tmp_path, monkeypatch):
    for driver in ("psycopg", "psycopg2"):  # what SQLAlchemy 2.1 and 2.0 import for postgresql://
        monkeypatch.setitem(sys.modules, driver, None)
    url = "postgresql://fmaml:secret@127.0.0.1:1/sweeps"
    with pytest.raises(SystemExit) as error:
        main(["--grid", "model.inner_loop.steps=1", "--storage", url, "--save-dir", str(tmp_path), *RUN])
    message = str(error.value.code)
    assert message.startswith("--storage postgresql://fmaml:***@127.0.0.1:1/sweeps: the postgresql driver")
    assert "pip install 'fmaml[postgresql]' (or uv sync --extra postgresql)" in message
    assert "\n" not in message and "secret" not in message
    assert not os.listdir(tmp_path), "nothing may be created before the check"


@pytest.mark.slow
def test_two_machines_run_each_grid_point_once(zygote, database, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    outputs = finish(*(worker(zygote, m, database, "--grid", "model.inner_loop.steps=1,2") for m in (a, b)))
    points = [run.split("-", 1)[1] for run in runs(a) + runs(b)]
    assert sorted(points) == ["steps=1", "steps=2"], (runs(a), runs(b))
    stored = trials(database)
    complete = [t for t in stored if t.state == State.COMPLETE]
    assert sorted(t.params["model.inner_loop.steps"] for t in complete) == ["1", "2"]
    assert all(t.value == t.user_attrs["metrics"]["val/loss"] for t in complete)
    # Both workers may enqueue the grid; a trial that found its point taken is skipped, and says by whom.
    assert all("duplicate_of" in t.user_attrs for t in stored if t.state != State.COMPLETE)
    assert any("2 complete" in out for out in outputs), outputs


def wait_for_running_trial(url: str, machine, timeout: float = 120) -> None:
    """Until a trial is RUNNING and its run started (its output.log is written just before the run starts
    and its first heartbeat is sent)."""
    storage = optuna.storages.RDBStorage(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name="s", storage=storage)
        except KeyError:  # the first worker has not created the study yet
            continue
        if any(t.state == State.RUNNING for t in study.trials) and runs(machine):
            time.sleep(1)
            return
    pytest.fail(f"no trial of study 's' in {url} was RUNNING within {timeout} s")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # retried_trial_number
def test_a_search_survives_a_killed_machine_and_reads_its_best_trial_from_the_database(
    zygote, database, tmp_path
):
    """SIGKILL machine a's worker (and its trial's run) mid-trial. Once its heartbeats are past their grace
    period (3 heartbeats), machine a restarts its worker and machine b joins: one of them fails the killed
    trial and enqueues its retry (same parameters), which takes its place among the --trials; the best of
    the two trials the machines complete is read back from the database."""
    a, b = tmp_path / "a", tmp_path / "b"
    search = ["--search", "model.inner_loop.optimizer.lr=log:0.001:0.1", "--trials", "2", "--heartbeat", "1"]
    killed = worker(zygote, a, database, *search, trial_start_s=600)  # killed before its run starts
    wait_for_running_trial(database, a)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate()
    assert [t.state for t in trials(database)] == [State.RUNNING]
    time.sleep(3.5)
    outputs = finish(worker(zygote, a, database, *search), worker(zygote, b, database, *search))
    # Which of trials 1 and 2 is the retry depends on which machine failed the stale trial first.
    first, *others = trials(database)
    assert [t.state for t in (first, *others)] == [State.FAIL, State.COMPLETE, State.COMPLETE], outputs
    (retry,) = [t for t in others if Retry.retried_trial_number(t) == first.number]
    (sampled,) = [t for t in others if t is not retry]
    assert retry.params == first.params
    assert retry.params != sampled.params
    assert any(run.startswith("0-") for run in runs(a)), "the killed trial ran on machine a"
    assert sorted(int(run.split("-")[0]) for run in runs(a) + runs(b)) == [0, 1, 2]
    best = optuna.load_study(study_name="s", storage=database).best_trial
    assert best.value == min(retry.value, sampled.value)
    # The worker that finished last saw both trials and printed the best one as the database holds it.
    last = next(out for out in outputs if "2 complete, 1 fail" in out)
    assert f"best: trial {best.number}, val/loss={best.value:.6g}, {best.params}" in last

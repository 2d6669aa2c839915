"""`python -m fmaml.sweep` on Optuna: grid and search parsing, dry run, and real sweeps of tiny sinusoid fits
on a real SQLite study: two workers on one grid, a search read back from storage, a failing trial, a
trial whose run logs under --trainer.default_root_dir, a pruned trial, and a killed worker's trial."""

import csv
import glob
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout

import optuna
import pytest

import fmaml.sweep
from fmaml.cli import command_line
from fmaml.sweep import main, parse_grid, parse_search, short_names, split_values, version_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINUSOID = os.path.join(REPO, "configs", "sinusoid.yaml")
TINY = [
    "--config",
    SINUSOID,
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.meta_batch_size=2",
    "--data.evaluation.num_val_tasks=2",
]


def test_parse_grid():
    assert parse_grid(["model.inner_loop.steps=1,5,10", "model.inner_loop.optimizer.lr= 0.01, 0.1"]) == [
        ("model.inner_loop.steps", ["1", "5", "10"]),
        ("model.inner_loop.optimizer.lr", ["0.01", "0.1"]),
    ]
    assert split_values("[40,40],[64],{a: 1, b: 2}") == ["[40,40]", "[64]", "{a: 1, b: 2}"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("model.inner_loop.steps", "expected KEY=V1,V2"),
        ("model..inner_steps=1", "expected KEY=V1,V2"),
        ("=1,2", "expected KEY=V1,V2"),
        ("model.inner_loop.steps=", "empty value"),
        ("model.inner_loop.steps=1,,2", "empty value"),
        ("model.inner_loop.steps=1,1", "repeated"),
    ],
)
def test_bad_grid_is_an_error_before_any_run(spec, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--grid", spec, "--save-dir", str(tmp_path), *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "--grid" in err
    assert not os.listdir(tmp_path), "nothing may run or be created"


def test_same_key_twice_and_no_grid(capsys):
    with pytest.raises(SystemExit):
        main(["--grid", "model.inner_loop.optimizer.lr=1", "--grid", "model.inner_loop.optimizer.lr=2"])
    assert "--grid model.inner_loop.optimizer.lr is given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", SINUSOID])
    assert "--grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--search", "model.inner_loop.optimizer.lr=log:0.01:1", "--config", SINUSOID])
    assert "--search needs --trials N" in capsys.readouterr().err


def test_an_unusable_storage_url_is_a_clear_error_at_once(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--storage nosuch://x: not a usable database URL"):
        main(
            [
                "--grid",
                "model.inner_loop.steps=1",
                "--storage",
                "nosuch://x",
                "--save-dir",
                str(tmp_path),
                *TINY,
            ]
        )


def test_version_names_are_short_unique_and_safe():
    combos = [
        {
            "model.inner_loop.optimizer.lr": "0.1",
            "data.seed": "1",
            "model.seed": "2",
            "model.network.hidden": "[4,4]",
        }
    ]
    names = {"model.inner_loop.optimizer.lr": "lr", "data.seed": "data.seed", "model.seed": "model.seed"}
    names["model.network.hidden"] = "hidden"
    assert version_names(combos, names) == ["lr=0.1,data.seed=1,model.seed=2,hidden=4_4"]
    # The inner optimizer's rate is short as long as no other rate is swept with it.
    assert short_names(["model.inner_loop.steps", "model.inner_loop.optimizer.lr"]) == {
        "model.inner_loop.steps": "steps",
        "model.inner_loop.optimizer.lr": "lr",
    }
    rates = ["model.inner_loop.optimizer.lr", "model.optimizer.lr"]
    assert short_names(rates) == {key: key for key in rates}
    twins = [{"k": "a/b"}, {"k": "a_b"}]
    assert version_names(twins, {"k": "k"}) == ["k=a_b", "k=a_b-1"]


def test_parse_search():
    search = dict(
        parse_search(
            [
                "model.inner_loop.optimizer.lr=log:0.01:1",
                "model.inner_loop.steps=int:1:5",
                "data.shots=choice:1,5",
            ]
        )
    )
    assert search["model.inner_loop.optimizer.lr"] == optuna.distributions.FloatDistribution(
        0.01, 1, log=True
    )
    assert search["model.inner_loop.steps"] == optuna.distributions.IntDistribution(1, 5)
    assert search["data.shots"] == optuna.distributions.CategoricalDistribution(["1", "5"])
    for bad, message in [
        ("model.inner_loop.optimizer.lr=log:0:1", "LOW > 0"),
        ("model.inner_loop.optimizer.lr=float:1:0.5", "LOW < HIGH"),
        ("model.inner_loop.optimizer.lr=int:a:5", "two ints"),
        ("model.inner_loop.optimizer.lr=uniform:0:1", "expected KEY=KIND"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_search([bad])


def test_dry_run_prints_the_product(tmp_path, capsys):
    code = main(
        [
            "test",
            "--dry-run",
            "--name",
            "s",
            "--save-dir",
            str(tmp_path),
            "--grid",
            "model.inner_loop.steps=1,5",
        ]
        + ["--grid", "model.inner_loop.eval_steps=3,10", *TINY]
    )
    assert code == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 4
    first = commands[0]
    assert first[1:4] == ["-m", "fmaml", "test"]
    assert first[4:6] == ["--config", SINUSOID]  # the run's own arguments, in order
    assert f"--trainer.logger.init_args.save_dir={tmp_path}" in first
    assert "--trainer.logger.init_args.name=sweeps/s" in first
    versions = [next(a for a in c if a.startswith("--trainer.logger.init_args.version=")) for c in commands]
    assert [v.split("=", 1)[1] for v in versions] == [
        "0-steps=1,eval_steps=3",
        "1-steps=1,eval_steps=10",
        "2-steps=5,eval_steps=3",
        "3-steps=5,eval_steps=10",
    ]
    assert first[-2:] == [
        "--model.inner_loop.steps=1",
        "--model.inner_loop.eval_steps=3",
    ]  # last, so they win
    assert not os.listdir(tmp_path)


def run_trial_in_process(cmd, log_dir, storage, trial_id, heartbeat):
    """fmaml.sweep.run_trial without the interpreter start (10+ s of imports each): the trial's `python -m
    fmaml` command through `command_line` here, its output to <log_dir>/output.log and its exit status as
    the process's would be. For the tests of what the sweep does with trials; the process itself (Popen,
    heartbeats while it runs, a killed worker's trial) is what the killed-worker test runs."""
    assert cmd[:3] == [sys.executable, "-m", "fmaml"], cmd
    os.makedirs(log_dir, exist_ok=True)
    storage.record_heartbeat(trial_id)
    done = threading.Event()

    def beat():  # heartbeats while the run trains, as run_trial sends them while its process runs
        while not done.wait(heartbeat):
            storage.record_heartbeat(trial_id)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    start = time.perf_counter()
    try:
        with open(os.path.join(log_dir, "output.log"), "w") as f, redirect_stdout(f), redirect_stderr(f):
            print(shlex.join(cmd) + "\n", flush=True)
            # A trial's own process spends its first seconds importing: a test that kills the worker
            # mid-trial sets this to keep the trial there (heartbeats going) until the kill.
            time.sleep(float(os.environ.get("FMAML_TEST_TRIAL_START_S", "0")))
            try:
                code = command_line(cmd[3:])
            except SystemExit as stop:  # as the interpreter turns it into an exit status
                code = stop.code if isinstance(stop.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        done.set()
        beating.join()
    return code, time.perf_counter() - start


@pytest.fixture
def trials_in_process(monkeypatch):
    monkeypatch.setattr(fmaml.sweep, "run_trial", run_trial_in_process)


def study(tmp_path, name="s"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/sweeps/{name}/optuna.db")


# `python -m fmaml.sweep` whose trials run in its own process (run_trial_in_process): one process per worker
# instead of one per trial, forked from the zygote (tests/zygote.py: no 10+ s of imports per worker).
SWEEP_WITH_TRIALS_IN_PROCESS = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import fmaml.sweep, test_sweep
fmaml.sweep.run_trial = test_sweep.run_trial_in_process
sys.exit(fmaml.sweep.main())
"""


def sweep_process_with_trials_in_process(zygote, tmp_path, *args, name="s"):
    command = ["-c", SWEEP_WITH_TRIALS_IN_PROCESS, "--name", name, "--save-dir", str(tmp_path)]
    return zygote.popen([*command, *args, *TINY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_workers_on_one_storage_run_each_grid_point_once(zygote, tmp_path):
    """Two sweep processes started together on the same study: the 4 points run once each, in all. What
    is tested is the two processes' coordination through the storage, not how a trial's run starts: the
    trials run inside their worker (a trial's own process: the killed-worker test)."""
    grid = ["--grid", "model.inner_loop.steps=1,2", "--grid", "model.inner_loop.optimizer.lr=0.01,0.02"]
    workers = [sweep_process_with_trials_in_process(zygote, tmp_path, *grid) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    # Both outputs in full on failure (pytest shortens a list's repr): each ends with its worker's table.
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(outputs)
    runs = sorted(
        os.path.basename(os.path.dirname(p)) for p in glob.glob(str(tmp_path / "sweeps/s/*/output.log"))
    )
    points = [r.split("-", 1)[1] for r in runs]
    assert sorted(points) == sorted(f"steps={a},lr={b}" for a in ("1", "2") for b in ("0.01", "0.02")), runs
    complete = [t for t in study(tmp_path).trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(
        (t.params["model.inner_loop.steps"], t.params["model.inner_loop.optimizer.lr"]) for t in complete
    ) == sorted((a, b) for a in ("1", "2") for b in ("0.01", "0.02"))
    assert all(t.value == t.user_attrs["metrics"]["val/loss"] for t in complete)
    # The worker that finished last printed the whole study, read from the storage.
    assert any("4 complete" in out for out in outputs), outputs


def test_two_workers_asking_at_once_never_take_the_same_queued_trial(tmp_path, monkeypatch):
    """Optuna takes a queued trial by reading that it waits, then marking it running. On SQLite that read
    took no lock: two workers could both read "waiting" and both run the trial, and the second to finish
    crashed telling a finished trial (the two-workers test failed so, now and then, on a busy machine).
    Here the two reads are made to meet, as a busy machine makes them now and then: each worker, having
    read the trial's state, waits (up to 3 s) for the other to read it too. Each worker is a thread with
    its own connection, as a process would have."""
    study, _ = fmaml.sweep.open_study(f"sqlite:///{tmp_path}/optuna.db", "s", "minimize", 30.0, 0)
    study.enqueue_trial({"x": 1})
    both_read = threading.Barrier(2)
    waited = []
    check = optuna.storages.RDBStorage.check_trial_is_updatable

    def read_then_wait_for_the_other(self, trial_id, trial_state):
        if trial_state == optuna.trial.TrialState.WAITING:  # the queued trial's state, just read
            waited.append(trial_id)
            try:
                both_read.wait(timeout=3)
            except threading.BrokenBarrierError:  # the other is held until this one is done: as it must be
                pass
        return check(self, trial_id, trial_state)

    monkeypatch.setattr(optuna.storages.RDBStorage, "check_trial_is_updatable", read_then_wait_for_the_other)
    distributions = {"x": optuna.distributions.CategoricalDistribution([1, 2])}
    taken = []
    workers = [
        threading.Thread(target=lambda: taken.append(study.ask(distributions).number)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert waited, "the queued trial's state was not checked where this test waits: see Optuna's pop"
    assert sorted(taken) == [0, 1], f"trials taken: {taken} (the same one twice: both workers would run it)"


@pytest.mark.slow
def test_search_reports_its_best_trial_from_the_storage(trials_in_process, tmp_path, capsys):
    code = main(
        [
            "--name",
            "s",
            "--save-dir",
            str(tmp_path),
            "--search",
            "model.inner_loop.optimizer.lr=log:0.001:0.1",
        ]
        + ["--trials", "3", "--seed", "0", "--metric", "val/loss", *TINY]
    )
    out = capsys.readouterr().out
    assert code == 0
    stored = study(tmp_path)
    complete = [t for t in stored.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    assert len({t.params["model.inner_loop.optimizer.lr"] for t in complete}) == 3
    best = min(complete, key=lambda t: t.value)
    assert stored.best_trial.number == best.number
    assert f"best: trial {best.number}, val/loss={best.value:.6g}" in out
    with open(tmp_path / "sweeps" / "s" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    assert all(float(r["val/loss"]) == float(r["objective"]) > 0 for r in rows)
    # Reported after every validation, by global_step (val_check_interval=1 over 2 steps).
    assert sorted(best.intermediate_values) == [1, 2]


@pytest.mark.slow
def test_a_failing_trial_is_recorded_failed_and_the_sweep_goes_on(trials_in_process, tmp_path, capsys):
    """steps=0 is refused at start-up: that first trial fails, the next one completes."""
    code = main(["--name", "s", "--save-dir", str(tmp_path), "--grid", "model.inner_loop.steps=0,2", *TINY])
    out = capsys.readouterr().out
    assert code == 1
    states = {t.params["model.inner_loop.steps"]: t.state for t in study(tmp_path).trials}
    assert states == {"0": optuna.trial.TrialState.FAIL, "2": optuna.trial.TrialState.COMPLETE}
    sweep = tmp_path / "sweeps" / "s"
    assert "model.inner_loop.steps=0" in (sweep / "0-steps=0" / "output.log").read_text()
    assert "0-steps=0: failed (exit 1)" in out and "1 complete, 1 fail" in out
    assert (sweep / "1-steps=2" / "checkpoints" / "last.ckpt").is_file()
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["steps"] for r in rows] == ["0", "2"]
    assert [r["state"] for r in rows] == ["fail", "complete"]
    assert rows[0]["val/loss"] == "" and float(rows[1]["val/loss"]) > 0
    assert "steps  state" in out


@pytest.mark.slow
def test_trials_given_a_default_root_dir_are_read_where_their_runs_logged(
    trials_in_process, tmp_path, monkeypatch, capsys
):
    """`--trainer.default_root_dir R` puts a run's relative logger save_dir inside R: the sweep must read
    the trial's metrics from R/logs/sweeps/..., not from ./logs/sweeps/... where nothing was logged."""
    monkeypatch.chdir(tmp_path)  # the default --save-dir, logs, is relative: the case default_root_dir moves
    root = tmp_path / "root"
    code = main(
        [
            "--name",
            "s",
            "--grid",
            "model.inner_loop.optimizer.lr=0.01",
            *TINY,
            f"--trainer.default_root_dir={root}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    run_dir = root / "logs" / "sweeps" / "s" / "0-lr=0.01"
    assert (
        glob.glob(str(run_dir / "events.out.tfevents.*"))
        and (run_dir / "checkpoints" / "last.ckpt").is_file()
    )
    (trial,) = study(tmp_path / "logs").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("error")
    assert trial.value == trial.user_attrs["metrics"]["val/loss"] > 0
    assert os.path.samefile(trial.user_attrs["log_dir"], run_dir)
    with open(tmp_path / "logs" / "sweeps" / "s" / "summary.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert os.path.samefile(row["log_dir"], run_dir) and float(row["val/loss"]) == trial.value
    assert "1 complete" in out


@pytest.mark.slow
def test_a_trial_behind_the_median_is_pruned_before_its_last_step(trials_in_process, tmp_path, capsys):
    """The first trial trains (meta lr 0.01); the second cannot improve (meta lr 0): its first validation
    is behind the first trial's at that step, so it stops there, recorded as pruned."""
    long = ["--trainer.max_steps=20", "--trainer.val_check_interval=5"]
    code = main(
        ["--name", "s", "--save-dir", str(tmp_path), "--grid", "model.optimizer.init_args.lr=0.01,0.0"]
        + ["--prune", "--prune-startup-trials", "1", *TINY, *long]
    )
    assert code == 0, capsys.readouterr().out
    trained, frozen = sorted(study(tmp_path).trials, key=lambda t: t.number)
    assert trained.state == optuna.trial.TrialState.COMPLETE
    assert frozen.state == optuna.trial.TrialState.PRUNED
    assert frozen.user_attrs["pruned_at_step"] < 20
    assert max(frozen.intermediate_values) == frozen.user_attrs["pruned_at_step"]
    assert frozen.intermediate_values[5] > trained.intermediate_values[5]


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_retried_not_left_running(zygote, tmp_path):
    """kill -9 a worker (its run dies with it) mid-trial; the trial stays RUNNING in the storage until the
    sweep resumes: then it is failed for its missing heartbeats and its point retried. The workers are
    forked from the zygote (tests/zygote.py); the killed one's trial runs in a real `python -m fmaml`
    process; the resumed one's trial inside it (run_trial_in_process: what is tested there is the retry)."""
    args = [
        "--name",
        "s",
        "--save-dir",
        str(tmp_path),
        "--heartbeat",
        "1",
        "--grid",
        "model.inner_loop.steps=1",
    ]
    args += [*TINY, "--trainer.max_steps=-1", "--trainer.max_time=00:00:00:04"]
    worker = zygote.popen(["-m", "fmaml.sweep", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # a guard against a hang only: a busy machine may take minutes
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            if any(t.state == optuna.trial.TrialState.RUNNING for t in study(tmp_path).trials):
                break
        except Exception:  # the database, its folder or the study is not created yet
            pass
    time.sleep(2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    (running,) = study(tmp_path).trials
    assert running.state == optuna.trial.TrialState.RUNNING
    time.sleep(4)  # past the grace period (3 heartbeats) without a heartbeat
    command = ["-c", SWEEP_WITH_TRIALS_IN_PROCESS, *args]
    resumed = zygote.popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    first, retry = sorted(study(tmp_path).trials, key=lambda t: t.number)
    assert first.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == first.params


def test_a_failed_point_whose_retry_runs_on_another_machine_does_not_fail_this_one():
    """A worker that ends while another machine runs the retry of a killed trial exits 0: the retry's
    machine reports how the point ends. Failed and not retried (or its retry failed too): exit 1."""
    from fmaml.sweep import exit_status

    State = optuna.trial.TrialState

    def trial(state, lr):
        return optuna.trial.create_trial(
            params={"lr": lr}, distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1)},
            value=1.0 if state == State.COMPLETE else None, state=state,
        )  # fmt: skip

    failed, other = trial(State.FAIL, 0.1), trial(State.COMPLETE, 0.2)
    assert exit_status([failed, other]) == 1
    for retry_state in (State.RUNNING, State.WAITING, State.COMPLETE):
        assert exit_status([failed, other, trial(retry_state, 0.1)]) == 0
    assert exit_status([failed, other, trial(State.FAIL, 0.1)]) == 1

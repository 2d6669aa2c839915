"""Sweeps on Optuna: a grid, or a search, of `python -m fmaml` runs, one process per trial, coordinated by
an Optuna study in a database, so that several workers (threads here, processes on other machines) share
one sweep.

    python -m fmaml.sweep [fit|validate|test] --grid model.inner_loop.steps=1,5,10 \\
        [--grid model.inner_loop.optimizer.lr=0.01,0.1] \\
        --config configs/sinusoid.yaml [any other python -m fmaml arguments ...]
    python -m fmaml.sweep --search model.inner_loop.optimizer.lr=log:0.01:1 --search model.inner_loop.steps=int:1:5 \\
        --trials 20 --metric val/loss --direction minimize --config configs/sinusoid.yaml

- ``--grid KEY=V1,V2,...`` (repeatable): the values of one parameter, KEY as on fmaml's command line
  without the dashes. The sweep runs the Cartesian product of all grids, each point exactly once, whatever
  the number of workers: every point is enqueued in the study once, and a worker that takes a point
  another one already took skips it. Commas inside brackets do not split
  (``model.network.init_args.hidden=[40,40],[64,64]`` is two values).
- ``--search KEY=KIND:...`` (repeatable): sample KEY with Optuna's TPE sampler: ``log:LOW:HIGH`` (float,
  log scale), ``float:LOW:HIGH``, ``int:LOW:HIGH``, ``choice:A,B,C``. ``--trials N`` trials in all, counted
  over every worker of the study. The objective is the last logged value of ``--metric`` (default
  ``val/loss``), ``--direction minimize`` (default) or ``maximize``.
- Every other argument goes unchanged to each run; the subcommand is ``fit`` unless given first.
- Storage: by default an SQLite file beside the sweep's logs (``<save-dir>/sweeps/<name>/optuna.db``,
  nothing to start). ``--storage URL`` takes any database URL SQLAlchemy knows (``postgresql://user:pw@host/
  db``, its driver from ``pip install 'fmaml[postgresql]'``; ``mysql+pymysql://...``): start ``python -m
  fmaml.sweep`` with the same ``--name``, ``--storage`` and arguments on as many machines as you like, and
  they share one study. ``--workers N`` runs N trials at once on this machine. Running the same command
  again resumes the sweep.
- ``--prune``: Optuna's median pruner stops a trial whose ``--metric`` is behind the median of earlier
  trials at the same ``global_step`` (reported after every validation; fmaml trains in one endless epoch,
  so reporting by epoch would see one step). A pruned trial stops at that step, keeps its checkpoint, and
  is recorded as pruned.
- A trial that fails (exit code other than 0) is recorded as failed with the end of its output, reported,
  and the sweep goes on. A worker killed mid-trial (its run dies with it) stops sending heartbeats; when
  any worker of the study next looks (at start and before each trial), the trial is marked failed and
  retried once as a new trial, so nothing stays RUNNING (in a search, the retry takes the killed trial's
  place among the ``--trials``).
- Each trial logs to ``<save-dir>/sweeps/<name>/<number>-<values>``: its own TensorBoard version, and its
  console output in ``output.log`` there. Given ``--trainer.default_root_dir DIR`` (on the command line
  or in a config), a run puts its TensorBoard version and checkpoints under DIR (``DIR/<save-dir>/...``,
  for a relative save-dir), while the sweep's own files (``optuna.db``, ``summary.csv``, each
  ``output.log``) stay in ``<save-dir>/sweeps/<name>``. Each run reports the folder it logged to, and the
  sweep reads the trial's metrics there and lists it as the trial's ``log_dir``. At the end: a table of
  every trial of the study (read from the storage, so it covers every worker on every machine): values, state, objective, the last value of each
  metric matching ``--metrics`` (default ``val/*`` and ``test/*``), wall time and log dir; also written
  as ``summary.csv`` in the sweep's folder; searches also print the best trial. ``--dry-run`` prints the
  commands and runs nothing. Plots: ``optuna-dashboard sqlite:///logs/sweeps/<name>/optuna.db``
  (``pip install optuna-dashboard``), or ``tensorboard --logdir logs/sweeps/<name>``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import fnmatch
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

# Nothing here imports torch or Lightning (fmaml/__init__.py is lazy): a sweep process starts in half a second
# and leaves both to its trials.
import optuna

from fmaml.curves import read_scalars
from fmaml.trial_attrs import PRUNED_AT, RUN_LOG_DIR

SUBCOMMANDS = ("fit", "validate", "test")
KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
UNSAFE = re.compile(r"[^\w.+-]")  # characters kept out of the values in version folder names
Grid = list[tuple[str, list[str]]]  # (parameter, its values), in command-line order


def split_values(text: str) -> list[str]:
    """'1,[2,3],4' -> ['1', '[2,3]', '4']: split on commas outside brackets and braces."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return [*values, text[start:]]


def parse_grid(specs: list[str]) -> Grid:
    """['model.inner_loop.steps=1,5'] -> [('model.inner_loop.steps', ['1', '5'])]; ValueError on bad syntax."""
    grid: Grid = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip().removeprefix("--")
        example = "--grid model.inner_loop.steps=1,5,10"
        if not sep or not KEY.match(key):
            raise ValueError(
                f"--grid {spec!r}: expected KEY=V1,V2,... with a dotted parameter name, e.g. {example}"
            )
        values = [v.strip() for v in split_values(text)]
        if not text.strip() or any(v == "" for v in values):
            raise ValueError(
                f"--grid {spec!r}: empty value in {text!r}; give comma-separated values, e.g. {example}"
            )
        if len(set(values)) < len(values):
            raise ValueError(f"--grid {spec!r}: a value is repeated; give each value once")
        if key in (k for k, _ in grid):
            raise ValueError(f"--grid {key} is given twice; put all its values in one --grid {key}=V1,V2,...")
        grid.append((key, values))
    return grid


def combinations(grid: Grid) -> list[dict[str, str]]:
    """The Cartesian product of the grid, first parameter slowest: [{key: value, ...}, ...]."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in grid))]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's last component (model.inner_loop.steps -> steps), or the whole key where those clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def version_names(combos: list[dict[str, str]], names: dict[str, str]) -> list[str]:
    """One folder name per combination, e.g. 'steps=5,lr=0.1'; unique, file-system safe."""
    versions: list[str] = []
    for combo in combos:
        # [40,40] -> 40_40: commas separate the parameters, slashes would make subfolders.
        name = ",".join(f"{names[k]}={UNSAFE.sub('_', v.strip('[](){}'))}" for k, v in combo.items())
        versions.append(name if name not in versions else f"{name}-{len(versions)}")
    return versions


Search = list[tuple[str, optuna.distributions.BaseDistribution]]  # (parameter, how to sample it)
DUPLICATE_OF = "duplicate_of"  # user attr of a trial skipped because another took its grid point
# Fails a killed worker's trial and enqueues its retry; under its new name where Optuna has it (the old one
# warns from Optuna 4.9).
Retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", optuna.storages.RetryFailedTrialCallback)


def parse_search(specs: list[str]) -> Search:
    """['model.inner_loop.optimizer.lr=log:0.01:1'] -> [('model.inner_loop.optimizer.lr', FloatDistribution(0.01, 1,
    log=True))]."""
    example = (
        "--search model.inner_loop.optimizer.lr=log:0.001:1 (or float:LOW:HIGH, int:LOW:HIGH, choice:A,B)"
    )
    search: Search = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip().removeprefix("--")
        kind, _, rest = text.partition(":")
        if not sep or not KEY.match(key) or kind not in ("log", "float", "int", "choice") or not rest:
            raise ValueError(f"--search {spec!r}: expected KEY=KIND:..., e.g. {example}")
        if kind == "choice":
            choices = [v.strip() for v in split_values(rest)]
            if any(c == "" for c in choices) or len(set(choices)) < len(choices):
                raise ValueError(f"--search {spec!r}: give distinct, non-empty choices, e.g. choice:1,5,10")
            search.append((key, optuna.distributions.CategoricalDistribution(choices)))
            continue
        bounds = rest.split(":")
        number = int if kind == "int" else float
        try:
            low, high = (number(b) for b in bounds)
        except ValueError:
            raise ValueError(
                f"--search {spec!r}: expected {kind}:LOW:HIGH with two {number.__name__}s, e.g. {example}"
            ) from None
        if not low < high or (kind == "log" and low <= 0):
            raise ValueError(
                f"--search {spec!r}: need LOW < HIGH{' and LOW > 0 on a log scale' if kind == 'log' else ''}"
            )
        if kind == "int":
            search.append((key, optuna.distributions.IntDistribution(low, high)))
        else:
            search.append((key, optuna.distributions.FloatDistribution(low, high, log=kind == "log")))
        if key in (k for k, _ in search[:-1]):
            raise ValueError(f"--search {key} is given twice")
    return search


def trial_version(number: int, values: dict[str, str], names: dict[str, str]) -> str:
    """The trial's folder name, e.g. '3-steps=5,lr=0.1'."""
    return f"{number}-{version_names([values], names)[0]}"


def as_text(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def command(
    subcommand: str,
    passthrough: list[str],
    values: dict[str, str],
    logger: dict[str, str],
    report: dict | None = None,
) -> list[str]:
    """The `python -m fmaml` command of one trial; the sweep's settings come last, so they win. `report`:
    the init_args of fmaml.callbacks.ReportToOptuna, which reports the metric to the trial (and prunes)."""
    callback = {"class_path": "fmaml.callbacks.ReportToOptuna", "init_args": report} if report else None
    return [
        sys.executable,
        "-m",
        "fmaml",
        subcommand,
        *passthrough,
        *(f"--trainer.logger.init_args.{k}={v}" for k, v in logger.items()),
        *(f"--{k}={v}" for k, v in values.items()),
        *([f"--trainer.callbacks+={json.dumps(callback)}"] if callback else []),
    ]


DRIVER_EXTRAS = {"postgresql": "postgresql"}  # database -> the fmaml extra that installs its driver


def storage_url(given: str | None, sweep_dir: str) -> str:
    """The study's database URL: --storage, its driver checked now, so that a missing one stops the sweep
    before it creates anything; by default an SQLite file in the sweep's folder."""
    if given is None:
        return f"sqlite:///{os.path.abspath(sweep_dir)}/optuna.db"
    import sqlalchemy  # optuna's own dependency

    try:
        url = sqlalchemy.engine.make_url(given)
        sqlalchemy.create_engine(url).dispose()  # imports the driver; connects to nothing
    except sqlalchemy.exc.ArgumentError as error:  # a malformed URL or an unknown database
        raise SystemExit(
            f"--storage {given}: not a usable database URL ({error}); use sqlite:///path.db, "
            "postgresql://user:password@host/db or mysql+pymysql://..., with the driver installed"
        ) from None
    except ImportError as error:
        extra = DRIVER_EXTRAS.get(url.get_backend_name())
        fix = f"pip install 'fmaml[{extra}]' (or uv sync --extra {extra})" if extra else "install it"
        raise SystemExit(
            f"--storage {url.render_as_string()}: the {url.drivername} driver is not installed ({error}); {fix}"
        ) from None
    return given


def open_study(
    storage: str, name: str, direction: str, heartbeat: float, seed: int | None
) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """The sweep's study, created by the first worker and joined by the others, and its database. Heartbeats
    let any worker fail (and retry once) the trials of a worker that was killed."""
    import sqlalchemy.engine  # optuna's own dependency
    import sqlalchemy.exc

    # Heartbeats and their retries are experimental in Optuna, and used outside Study.optimize on purpose:
    # its warnings about that would open every worker's output, with nothing for a user to do.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings(
        "ignore", message="Heartbeat of storage is supposed to be used with Study.optimize"
    )

    sampler = optuna.samplers.TPESampler(seed=seed)
    # Two workers creating one new database at once: the loser's tables or version row clash; it retries, then joins.
    racing = (
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.IntegrityError,
        optuna.exceptions.StorageInternalError,
    )
    sqlite = sqlalchemy.engine.make_url(storage).get_backend_name() == "sqlite"
    for attempt in itertools.count():
        try:
            rdb = optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=max(1, round(heartbeat)),
                grace_period=max(2, round(3 * heartbeat)),
                heartbeat_stale_trial_callback=Retry(max_retry=1),
                engine_kwargs=SQLITE_ENGINE if sqlite else None,
            )
            if sqlite:
                serialize_sqlite_transactions(rdb.engine)
            study = optuna.create_study(
                study_name=name, storage=rdb, direction=direction, sampler=sampler, load_if_exists=True
            )
            return study, rdb
        except racing:
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)


# Another worker's transaction can hold an SQLite study for a moment; wait for it rather than fail.
SQLITE_ENGINE = {"connect_args": {"timeout": 60.0}}


def serialize_sqlite_transactions(engine) -> None:
    """Makes each of Optuna's transactions on an SQLite study take the database's write lock from its start
    (BEGIN IMMEDIATE), as SQLAlchemy's documentation does for SQLite's serializable isolation.

    Optuna takes a queued trial (and fails a stale one) by reading its state, then writing the new one. On
    PostgreSQL or MySQL that read locks the row (SELECT ... FOR UPDATE). SQLite has no row locks, and its
    Python driver starts no transaction for a read, so two workers could both read "waiting" and both run
    the trial: 6 of 300 queued trials were taken twice by two processes asking at once, before this."""
    import sqlalchemy  # optuna's own dependency

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN would come after the reads

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # the connections Optuna opened before this (creating the tables) have neither


def search_done(trials: list[optuna.trial.FrozenTrial], wanted: int) -> bool:
    """Whether a search has run its `wanted` trials. A killed worker's trial, failed and retried, is not one
    of them: its retry stands in, and runs (it waits in the queue) however many trials there are."""
    if any(t.state == optuna.trial.TrialState.WAITING for t in trials):
        return False
    retried = {Retry.retried_trial_number(t) for t in trials}
    return sum(DUPLICATE_OF not in t.user_attrs and t.number not in retried for t in trials) >= wanted


def point_of(trial: optuna.trial.FrozenTrial) -> str:
    """A trial's parameter values as one comparable key (an enqueued trial's, before it starts)."""
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    return json.dumps({k: as_text(v) for k, v in params.items()}, sort_keys=True)


def enqueue_grid(study: optuna.Study, combos: list[dict[str, str]]) -> int:
    """Enqueue every grid point no live or finished trial holds (failed ones again); returns how many."""
    taken = {point_of(t) for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL}
    missing = [c for c in combos if json.dumps(c, sort_keys=True) not in taken]
    for combo in missing:
        study.enqueue_trial(combo)
    return len(missing)


def owner_of_point(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int:
    """The number of the trial that runs this trial's grid point: the lowest-numbered one, among those not
    failed, holding it. Two workers that enqueued the same point at once thus agree on one runner."""
    point = point_of(trial)
    live = [
        t.number
        for t in study.get_trials(deepcopy=False)
        if t.state != optuna.trial.TrialState.FAIL and point_of(t) == point
    ]
    return min(live, default=trial.number)


def _die_with_parent() -> None:
    # A killed worker must not leave its run training on: the run gets SIGKILL when the worker dies.
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_trial(cmd: list[str], log_dir: str, storage, trial_id: int, heartbeat: float) -> tuple[int, float]:
    """Run one trial's command, its output to <log_dir>/output.log, sending heartbeats meanwhile; returns
    (exit code, wall seconds)."""
    os.makedirs(log_dir, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(log_dir, "output.log"), "w") as f:
        f.write(shlex.join(cmd) + "\n\n")
        f.flush()
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        while process.poll() is None:
            storage.record_heartbeat(trial_id)
            try:
                process.wait(timeout=heartbeat)
            except subprocess.TimeoutExpired:
                pass
    return process.returncode, time.perf_counter() - start


def last_metrics(log_dir: str, patterns: list[str]) -> dict[str, float]:
    """The last logged value of each scalar matching `patterns`; {} if the run wrote no event file."""
    try:
        curves = read_scalars(log_dir)
    except FileNotFoundError:
        return {}
    return {
        tag: points[-1][1]
        for tag, points in sorted(curves.items())
        if points and any(fnmatch.fnmatch(tag, p) for p in patterns)
    }


def shown(path: str) -> str:
    """`path` relative to the working directory when inside it (shorter in the table), else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def table(rows: list[dict[str, object]]) -> str:
    """Rows of equal keys -> an aligned text table (floats to 4 significant digits)."""
    columns = list(rows[0])
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [columns, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def summary_rows(study: optuna.Study, names: dict[str, str]) -> list[dict[str, object]]:
    """One row per trial of the study (every worker's, from the storage), duplicates left out."""
    trials = [t for t in study.get_trials(deepcopy=False) if DUPLICATE_OF not in t.user_attrs]
    tags = sorted({tag for t in trials for tag in t.user_attrs.get("metrics", {})})
    return [
        {
            "trial": t.number,
            **{
                names.get(k, k): as_text(v)
                for k, v in (t.params or t.system_attrs.get("fixed_params", {})).items()
            },
            "state": t.state.name.lower(),
            "objective": t.value if t.value is not None else "",
            **{tag: t.user_attrs.get("metrics", {}).get(tag, "") for tag in tags},
            "wall_s": round(t.user_attrs.get("wall_s", 0.0), 1),
            "log_dir": t.user_attrs.get("log_dir", ""),
        }
        for t in sorted(trials, key=lambda t: t.number)
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmaml.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # never take a prefix of a fmaml argument for one of ours
    )
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="values of one parameter")
    p.add_argument(
        "--search", action="append", default=[], metavar="KEY=KIND:...", help="a parameter to search"
    )
    p.add_argument("--trials", type=int, metavar="N", help="trials of a search, over all workers")
    p.add_argument("--metric", default="val/loss", help="the objective: a logged scalar (default: val/loss)")
    p.add_argument("--direction", choices=["minimize", "maximize"], default="minimize")
    p.add_argument(
        "--name", help="the sweep's folder under <save-dir>/sweeps and study name (default: date-time)"
    )
    p.add_argument("--save-dir", default="logs", help="TensorBoard save_dir of every run (default: logs)")
    p.add_argument(
        "--storage", help="database URL of the study (default: sqlite:///<sweep folder>/optuna.db)"
    )
    p.add_argument("--workers", type=int, default=1, metavar="N", help="trials at once here (default: 1)")
    p.add_argument(
        "--prune", action="store_true", help="stop trials behind the median (Optuna's MedianPruner)"
    )
    p.add_argument(
        "--prune-startup-trials", type=int, default=5, help="trials that run in full first (default: 5)"
    )
    p.add_argument("--heartbeat", type=float, default=30.0, help="seconds between a worker's heartbeats")
    p.add_argument("--seed", type=int, help="the search sampler's seed")
    p.add_argument(
        "--metrics",
        action="append",
        metavar="PATTERN",
        help="scalar tags (shell patterns) for the summary; repeatable (default: 'val/*' and 'test/*')",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


@dataclasses.dataclass
class Plan:
    """A sweep as its command asks for it, checked: what every worker of the sweep runs."""

    args: argparse.Namespace
    subcommand: str
    passthrough: list[str]  # the arguments each run gets unchanged
    grid: Grid
    search: Search
    name: str
    sweep_dir: str
    storage: str  # the study's database URL
    names: dict[str, str]  # parameter -> its short name in folder names and the table
    logger: dict[str, str]  # every run's TensorBoard save_dir and name


def parse_plan(p: argparse.ArgumentParser, argv: list[str]) -> Plan:
    """The command line as a Plan; a usage error (`p.error`) for anything wrong, before anything is created."""
    subcommand = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "fit"
    args, passthrough = p.parse_known_args(argv)
    try:
        grid, search = parse_grid(args.grid), parse_search(args.search)
    except ValueError as e:
        p.error(str(e))
    check_counts(p, args, grid, search)
    name = args.name or time.strftime("%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[\w-]+", name):
        p.error(f"--name {name!r}: use letters, digits, '_' and '-' (it becomes a folder name)")
    sweep_dir = os.path.join(args.save_dir, "sweeps", name)
    storage = storage_url(args.storage, sweep_dir)
    names = short_names([k for k, _ in grid] or [k for k, _ in search])
    logger = {"save_dir": args.save_dir, "name": f"sweeps/{name}"}
    return Plan(args, subcommand, passthrough, grid, search, name, sweep_dir, storage, names, logger)


def check_counts(p: argparse.ArgumentParser, args: argparse.Namespace, grid: Grid, search: Search) -> None:
    """A grid or a search (with its number of trials), and counts that can run."""
    if bool(grid) == bool(search):
        p.error(
            "give --grid KEY=V1,V2 (every combination once) or --search KEY=KIND:... with --trials N, not both"
        )
    if search and (args.trials is None or args.trials < 1):
        p.error(f"--search needs --trials N (N >= 1), the number of trials to run; got {args.trials}")
    if grid and args.trials is not None:
        p.error("--trials is for --search: a grid runs each of its combinations once")
    if args.workers < 1:
        p.error(f"--workers {args.workers}: must be 1 or more")
    if not args.heartbeat > 0:
        p.error(f"--heartbeat {args.heartbeat}: must be a positive number of seconds")


def print_commands(plan: Plan) -> None:
    """--dry-run: the command of every grid point, or a search's with its sampled values marked."""
    if plan.grid:
        for i, combo in enumerate(combinations(plan.grid)):
            logger = {**plan.logger, "version": trial_version(i, combo, plan.names)}
            print(shlex.join(command(plan.subcommand, plan.passthrough, combo, logger)))
    else:
        sampled = {k: "<sampled>" for k, _ in plan.search}
        logger = {**plan.logger, "version": "<trial>"}
        print(shlex.join(command(plan.subcommand, plan.passthrough, sampled, logger)))


@dataclasses.dataclass
class Running:
    """This process's part of a sweep: the study, the database behind it, and a lock its threads share. A
    trial is read from the database directly: the study's cache in front of it may hold an older copy of a
    trial this process owns, without what the trial's run (another process) wrote to it."""

    plan: Plan
    study: optuna.Study
    storage: optuna.storages.RDBStorage
    study_id: int  # the study's key in the database
    distributions: dict[str, optuna.distributions.BaseDistribution]
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def trial_id(self, trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
        """The trial's key in the database, where heartbeats and the run's callback find it."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)

    def stored(self, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
        """The trial as the database holds it now: what another process wrote too."""
        return self.storage.get_trial(self.trial_id(trial))


def join_study(p: argparse.ArgumentParser, plan: Plan) -> Running:
    """The plan's study, created or joined, checked to be this sweep's; stale trials failed, the grid's
    untaken points enqueued."""
    os.makedirs(plan.sweep_dir, exist_ok=True)
    args = plan.args
    study, storage = open_study(plan.storage, plan.name, args.direction, args.heartbeat, args.seed)
    check_settings(p, plan, study)
    optuna.storages.fail_stale_trials(study)
    where = f"-> {plan.sweep_dir}; study in {plan.storage}"
    if plan.grid:
        combos = combinations(plan.grid)
        added = enqueue_grid(study, combos)
        print(f"sweep {plan.name}: {len(combos)} combinations ({added} to run) {where}", flush=True)
        distributions = {k: optuna.distributions.CategoricalDistribution(v) for k, v in plan.grid}
    else:
        print(f"sweep {plan.name}: search of {args.trials} trials {where}", flush=True)
        distributions = dict(plan.search)
    return Running(plan, study, storage, storage.get_study_id_from_name(plan.name), distributions)


def check_settings(p: argparse.ArgumentParser, plan: Plan, study: optuna.Study) -> None:
    """Records the sweep's settings in a new study; refuses to join one started with other settings."""
    settings = {
        "subcommand": plan.subcommand,
        "grid": plan.grid,
        "search": plan.args.search,
        "metric": plan.args.metric,
        "arguments": plan.passthrough,
    }
    if "settings" not in study.user_attrs:
        study.set_user_attr("settings", settings)
    elif study.user_attrs["settings"] != json.loads(json.dumps(settings)):
        p.error(
            f"study {plan.name!r} in {plan.storage} was started with other settings:\n  "
            f"{study.user_attrs['settings']}\nthis command: {settings}\n"
            "Give this sweep another --name, or the same arguments to resume it."
        )


def work(running: Running) -> None:
    """One of this process's workers: runs trials until the sweep has none left."""
    while (trial := next_trial(running)) is not None:
        run_and_record(running, trial)


def next_trial(running: Running) -> optuna.Trial | None:
    """The next trial to run, or None when the sweep has none left. A grid trial whose point another
    trial holds (two workers enqueued it at once) is failed as a duplicate, and the next one asked."""
    study = running.study
    with running.lock:  # one ask at a time in this process; other processes are handled by owner_of_point
        while not nothing_left(running):
            trial = study.ask(running.distributions)
            if not running.plan.grid:
                return trial
            frozen = running.stored(trial)
            if "fixed_params" not in frozen.system_attrs:  # another worker took the last point
                trial.set_user_attr(DUPLICATE_OF, -1)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                return None
            owner = owner_of_point(study, frozen)
            if owner == trial.number:
                return trial
            trial.set_user_attr(DUPLICATE_OF, owner)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None


def nothing_left(running: Running) -> bool:
    """Whether the sweep is done asking: no grid point waits, or the search has run its trials (after
    failing, and so queueing the retry of, any killed worker's trial)."""
    optuna.storages.fail_stale_trials(running.study)
    trials = running.study.get_trials(deepcopy=False)
    if running.plan.grid:
        return not any(t.state == optuna.trial.TrialState.WAITING for t in trials)
    return search_done(trials, running.plan.args.trials)


def run_and_record(running: Running, trial: optuna.Trial) -> None:
    """Run one trial's command, then record in the study what it logged, and its outcome."""
    plan, args = running.plan, running.plan.args
    values = {k: as_text(v) for k, v in trial.params.items()}
    version = trial_version(trial.number, values, plan.names)
    log_dir = os.path.join(plan.sweep_dir, version)
    trial_id = running.trial_id(trial)
    report = {"storage": plan.storage, "study": plan.name, "trial_id": trial_id, "metric": args.metric,
              "prune": args.prune, "startup_trials": args.prune_startup_trials}  # fmt: skip
    cmd = command(plan.subcommand, plan.passthrough, values, {**plan.logger, "version": version}, report)
    with running.lock:
        print(f"[trial {trial.number}] {version}: running, output in {log_dir}/output.log", flush=True)
    code, wall = run_trial(cmd, log_dir, running.storage, trial_id, args.heartbeat)
    reported = running.storage.get_trial(trial_id).user_attrs  # what the run wrote there
    run_dir = shown(reported.get(RUN_LOG_DIR, log_dir))  # a run that died early reported nothing
    metrics = last_metrics(run_dir, [*(args.metrics or ["val/*", "test/*"]), args.metric])
    for key, value in {"metrics": metrics, "wall_s": wall, "log_dir": run_dir, "exit_code": code}.items():
        trial.set_user_attr(key, value)
    status = tell_outcome(running.study, trial, code, reported.get(PRUNED_AT), metrics, run_dir, args.metric)
    output = os.path.join(log_dir, "output.log")
    with running.lock:
        print(f"[trial {trial.number}] {version}: {status} in {wall:.1f} s", flush=True)
        if status.startswith("failed"):
            print(f"    last lines of {output}:\n{tail(output)}", flush=True)


def tell_outcome(
    study: optuna.Study,
    trial: optuna.Trial,
    code: int,
    pruned_at: int | None,
    metrics: dict[str, float],
    run_dir: str,
    metric: str,
) -> str:
    """Tell the study how the trial's run ended (pruned, its objective, or failed); returns it in words."""
    if code == 0 and pruned_at is not None:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return f"pruned at step {pruned_at}"
    if code == 0 and metric in metrics and math.isfinite(metrics[metric]):
        study.tell(trial, metrics[metric])
        return f"ok, {metric}={metrics[metric]:.4g}"
    reason = (
        f"exit {code}"
        if code
        else f"{metric} not logged in {run_dir} (it logged: {', '.join(metrics) or 'nothing'})"
    )
    trial.set_user_attr("error", reason)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return f"failed ({reason})"


def summarize(plan: Plan, study: optuna.Study) -> int:
    """The table of every trial of the study, also as summary.csv, and a search's best trial. Returns the
    exit status (`exit_status`)."""
    rows = summary_rows(study, plan.names)
    if not rows:
        print("no finished trials yet")
        return 0
    csv_path = os.path.join(plan.sweep_dir, "summary.csv")
    rows = write_csv(rows, csv_path)
    states = [row["state"] for row in rows]
    counts = ", ".join(
        f"{states.count(s)} {s}" for s in ("complete", "pruned", "fail", "running", "waiting") if s in states
    )
    print(f"\n{table(rows)}\n\n{counts}; summary in {csv_path}")
    if plan.search and any(s == "complete" for s in states):
        best = study.best_trial
        print(f"best: trial {best.number}, {plan.args.metric}={best.value:.6g}, {best.params}")
    return exit_status(study.trials)


def exit_status(trials: list[optuna.trial.FrozenTrial]) -> int:
    """1 while a point (grid point or sampled parameters) has failed and is neither done since nor being
    run again (its retry queued or running, on any machine: that machine reports how it ends), else 0."""
    State = optuna.trial.TrialState
    failed = {point_of(t) for t in trials if t.state == State.FAIL and DUPLICATE_OF not in t.user_attrs}
    done_or_under_way = (State.COMPLETE, State.PRUNED, State.RUNNING, State.WAITING)
    return 1 if failed - {point_of(t) for t in trials if t.state in done_or_under_way} else 0


def write_csv(rows: list[dict[str, object]], path: str) -> list[dict[str, object]]:
    """Writes rows whose keys may differ (trials of other parameters or metrics) as one CSV table; returns
    them as written, each with every column."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    rows = [{c: row.get(c, "") for c in columns} for row in rows]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser()
    plan = parse_plan(p, list(sys.argv[1:] if argv is None else argv))
    if plan.args.dry_run:
        print_commands(plan)
        return 0
    running = join_study(p, plan)
    with ThreadPoolExecutor(plan.args.workers) as pool:
        list(pool.map(lambda _: work(running), range(plan.args.workers)))
    return summarize(plan, running.study)


if __name__ == "__main__":
    sys.exit(main())

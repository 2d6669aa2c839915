"""`python -m fmaml.sweep`: grid parsing, dry run, and a real sweep of tiny sinusoid fits."""

import csv
import glob
import os
import shlex

import pytest

from fmaml.sweep import main, parse_grid, split_values, version_names

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
    "--data.num_val_tasks=2",
]


def test_parse_grid():
    assert parse_grid(["model.inner_steps=1,5,10", "model.inner_lr= 0.01, 0.1"]) == [
        ("model.inner_steps", ["1", "5", "10"]),
        ("model.inner_lr", ["0.01", "0.1"]),
    ]
    assert split_values("[40,40],[64],{a: 1, b: 2}") == ["[40,40]", "[64]", "{a: 1, b: 2}"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("model.inner_steps", "expected KEY=V1,V2"),
        ("model..inner_steps=1", "expected KEY=V1,V2"),
        ("=1,2", "expected KEY=V1,V2"),
        ("model.inner_steps=", "empty value"),
        ("model.inner_steps=1,,2", "empty value"),
        ("model.inner_steps=1,1", "repeated"),
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
        main(["--grid", "model.inner_lr=1", "--grid", "model.inner_lr=2"])
    assert "--grid model.inner_lr is given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", SINUSOID])
    assert "--grid" in capsys.readouterr().err


def test_version_names_are_short_unique_and_safe():
    combos = [{"model.inner_lr": "0.1", "data.seed": "1", "model.seed": "2", "model.network.hidden": "[4,4]"}]
    names = {"model.inner_lr": "inner_lr", "data.seed": "data.seed", "model.seed": "model.seed"}
    names["model.network.hidden"] = "hidden"
    assert version_names(combos, names) == ["inner_lr=0.1,data.seed=1,model.seed=2,hidden=4_4"]
    twins = [{"k": "a/b"}, {"k": "a_b"}]
    assert version_names(twins, {"k": "k"}) == ["k=a_b", "k=a_b-1"]


def test_dry_run_prints_the_product(tmp_path, capsys):
    code = main(
        ["test", "--dry-run", "--name", "s", "--save-dir", str(tmp_path), "--grid", "model.inner_steps=1,5"]
        + ["--grid", "model.eval_inner_steps=3,10", *TINY]
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
        "inner_steps=1,eval_inner_steps=3",
        "inner_steps=1,eval_inner_steps=10",
        "inner_steps=5,eval_inner_steps=3",
        "inner_steps=5,eval_inner_steps=10",
    ]
    assert first[-2:] == ["--model.inner_steps=1", "--model.eval_inner_steps=3"]  # last, so they win
    assert not os.listdir(tmp_path)


def test_existing_sweep_name_is_refused(tmp_path, capsys):
    os.makedirs(tmp_path / "sweeps" / "s")
    with pytest.raises(SystemExit):
        main(["--name", "s", "--save-dir", str(tmp_path), "--grid", "model.inner_steps=1", *TINY])
    assert "exists: give the sweep another --name" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_runs_every_value_and_reports_a_failed_one(tmp_path, capsys):
    """Three sinusoid fits of 2 steps; inner_steps=0 is invalid: that run fails, the others complete."""
    args = [
        "--name",
        "s",
        "--save-dir",
        str(tmp_path),
        "--grid",
        "model.inner_steps=1,0,2",
        "--parallel",
        "2",
    ]
    code = main([*args, *TINY])  # 2 at a time: rows must still come in grid order
    out = capsys.readouterr().out
    assert code == 1
    sweep = tmp_path / "sweeps" / "s"
    for ok in ("inner_steps=1", "inner_steps=2"):
        assert glob.glob(str(sweep / ok / "events.out.tfevents.*")), ok
        assert (sweep / ok / "checkpoints" / "last.ckpt").is_file()
    assert "model.inner_steps=0" in (sweep / "inner_steps=0" / "output.log").read_text()
    assert "inner_steps=0: failed (exit 1)" in out and "2 ok, 1 failed" in out

    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["inner_steps"] for r in rows] == ["1", "0", "2"]
    assert [r["status"] for r in rows] == ["ok", "failed (exit 1)", "ok"]
    for row in (rows[0], rows[2]):
        assert float(row["val/loss"]) > 0 and float(row["val/loss_before"]) > 0
        assert float(row["wall_s"]) > 0
        assert os.path.isdir(row["log_dir"])
    assert rows[1]["val/loss"] == ""
    assert rows[0]["val/loss"] != rows[2]["val/loss"]  # 1 and 2 training inner steps differ
    # The printed table holds the same rows.
    assert "inner_steps  val/loss" in out

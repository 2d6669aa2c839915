"""`python -m fmaml.curves`: scalars from TensorBoard event files to a CSV and a PNG."""

import csv
import sys

import pytest
from torch.utils.tensorboard import SummaryWriter

from fmaml.curves import main, read_scalars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, curves: dict[str, list[tuple[int, float]]]) -> str:
    """Event files as Lightning's TensorBoardLogger writes them: one add_scalar per (tag, step)."""
    with SummaryWriter(str(folder)) as writer:
        for tag, points in curves.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    a = write_run(
        tmp_path / "version_0",
        {
            "val/accuracy": [(10, 0.5), (20, 0.75)],
            "train/loss": [(1, 2.0), (2, 1.5), (3, 1.25)],
            "epoch": [(1, 0.0)],
        },
    )
    b = write_run(tmp_path / "version_1", {"val/accuracy": [(10, 0.25), (20, 0.5)], "train/loss": [(1, 3.0)]})
    return a, b


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_read_scalars(runs):
    curves = read_scalars(runs[0])
    assert curves["val/accuracy"] == [(10, 0.5), (20, 0.75)]
    assert curves["train/loss"] == [(1, 2.0), (2, 1.5), (3, 1.25)]


def test_csv_and_png_of_two_runs(runs, tmp_path, capsys):
    out, table = tmp_path / "plots" / "curve.png", tmp_path / "curve.csv"
    assert main([*runs, "--tags", "val/accuracy", "train/loss", "--out", str(out), "--csv", str(table)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    rows = read_csv(table)
    assert list(rows[0]) == ["run", "tag", "step", "value"]
    got = [(r["run"].rsplit("/", 1)[-1], r["tag"], int(r["step"]), float(r["value"])) for r in rows]
    assert got == [
        ("version_0", "val/accuracy", 10, 0.5),
        ("version_0", "val/accuracy", 20, 0.75),
        ("version_0", "train/loss", 1, 2.0),
        ("version_0", "train/loss", 2, 1.5),
        ("version_0", "train/loss", 3, 1.25),
        ("version_1", "val/accuracy", 10, 0.25),
        ("version_1", "val/accuracy", 20, 0.5),
        ("version_1", "train/loss", 1, 3.0),
    ]
    assert "2 run(s)" in capsys.readouterr().out


def test_patterns_and_default_tags(runs, tmp_path):
    table = tmp_path / "c.csv"
    main([runs[0], "--tags", "val/*", "--csv", str(table)])
    assert {r["tag"] for r in read_csv(table)} == {"val/accuracy"}
    main([runs[0], "--csv", str(table)])  # every tag but Lightning's bookkeeping (epoch)
    assert {r["tag"] for r in read_csv(table)} == {"val/accuracy", "train/loss"}


def test_missing_run_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope"), "--csv", str(tmp_path / "c.csv")])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_folder_above_the_versions_is_explained(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files.*give the version folder"):
        read_scalars(str(tmp_path))


def test_missing_tag_lists_the_available_ones(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*runs, "--tags", "val/accuracy", "test/accuracy", "--csv", str(tmp_path / "c.csv")])
    err = capsys.readouterr().err
    assert "--tags test/accuracy: no such scalar" in err and "train/loss" in err
    assert not (tmp_path / "c.csv").exists(), "nothing is written when a tag is missing"


def test_nothing_to_write(runs, capsys):
    with pytest.raises(SystemExit):
        main([runs[0]])
    assert "give --out curve.png, --csv curve.csv, or both" in capsys.readouterr().err


def test_png_without_matplotlib_is_a_clear_error(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit):
        main([runs[0], "--out", str(tmp_path / "c.png")])
    assert "--out needs matplotlib" in capsys.readouterr().err

"""fmaml/README.md's "In a notebook" cells run as written, on tiny settings, in a fresh virtual environment's
Python, in one process, as a notebook kernel runs them: the install cell installs uv, then a copy of this
checkout into that environment with uv and the override of torchmeta's torch pin (from the package
registry; uv's cache makes it a few seconds). Only `%pip` (IPython's) is done by uv here."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from fixtures import write_omniglot_zips

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The notebook's settings, made tiny; each must appear in the README's cells exactly as on the left.
TINY = {
    'FMAML = "./fmaml"': "FMAML = {repo!r}",
    "ZIPS = None": "ZIPS = {zips!r}",
    "STEPS, FILTERS = 200, 64": "STEPS, FILTERS = 2, 4",
    "TEST_TASKS = 600": "TEST_TASKS = 6",
}
MAGICS = ("%load_ext tensorboard", "%tensorboard --logdir logs")


def not_in_a_clone(folder: str, names: list[str]) -> set[str]:
    """What a clean clone lacks: environments, caches, build outputs, logs and benchmark results."""
    skipped = {"__pycache__"}
    if os.path.samefile(folder, REPO):
        skipped |= {".git", ".venv", ".pytest_cache", ".ruff_cache", "build", "logs", "data", "uv.lock"}
        skipped |= {n for n in names if n.endswith(".egg-info")}
    if os.path.samefile(folder, os.path.join(REPO, "benchmarks")):
        skipped.add("results")
    return skipped & set(names)


def notebook_cells() -> list[str]:
    text = open(os.path.join(REPO, "fmaml", "README.md")).read()
    section = text.split("## In a notebook", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_the_notebook_cells():
    cells = notebook_cells()
    assert len(cells) == 6
    source = "\n".join(cells)
    required = ["-m uv pip install --python {sys.executable}", "--override overrides.txt", "meta_loss("]
    for line in [*TINY, *MAGICS, "%pip install -q uv", *required]:
        assert line in source, line


@pytest.mark.slow
def test_the_notebook_cells_run(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("needs uv, as the install cell does")
    zips = tmp_path / "zips"
    write_omniglot_zips(zips)
    # A clone's files, not the checkout itself: building the package writes build/ into its folder.
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=not_in_a_clone)
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    script = ["import subprocess"]
    for cell in notebook_cells():
        for old, new in TINY.items():
            cell = cell.replace(old, new.format(repo=str(clone), zips=str(zips)))
        for line in cell.splitlines():
            if line == "%pip install -q uv":
                # IPython's %pip installs into the kernel's Python; a fresh uv venv has no pip, so uv does it.
                script.append(
                    f"subprocess.run([{uv!r}, 'pip', 'install', '-q', '--python', {python!r}, 'uv'], check=True)"
                )
                continue
            if line.startswith("%"):
                assert line in MAGICS, line  # IPython magics: the kernel's, not ours to run
                continue
            if line.startswith("!"):
                # IPython expands {name} in shell lines from the notebook's variables.
                script.append(f"subprocess.run({line[1:]!r}.format(**globals()), shell=True, check=True)")
                continue
            script.append(line)
    script.append("import fmaml, torch; print('installed:', fmaml.__file__, torch.__version__)")
    (tmp_path / "notebook.py").write_text("\n".join(script) + "\n")
    run = subprocess.run(
        [python, "notebook.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
    )  # fmt: skip
    if run.returncode and re.search(r"error sending request|dns error|network was disabled", run.stderr):
        pytest.skip(f"the install cell needs the package registry, unreachable here: {run.stderr[-500:]}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    out = run.stdout
    # fmaml from the fresh environment's site-packages, with a torch above torchmeta's pin.
    where, torch_version = re.search(r"installed: (\S+) (\S+)", out).groups()
    assert where.startswith(str(tmp_path / "venv")), where
    assert int(torch_version.split(".")[0]) >= 2, torch_version
    assert re.search(r"accuracy .*± .*checkpoint .*last\.ckpt \(step 2\)", out), out[-2000:]
    assert re.search(r"meta-loss \d+\.\d+, query accuracy after one step \d\.\d\d", out), out[-2000:]
    assert (tmp_path / "logs" / "fmaml" / "version_0" / "checkpoints" / "last.ckpt").is_file()

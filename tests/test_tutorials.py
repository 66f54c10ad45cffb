"""Every tutorial runs as written, at small settings (STRANKER_TUTORIAL_SMALL=1), in a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import has_her2st, her2st_dir

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NEEDS = {"02_her2st.py": "her2st"}
PRINTS = {"04_cohort.py": ["C-index", "AUC"]}  # what a tutorial's run must report


def _scripts():
    return sorted(p.name for p in TUTORIALS.glob("[0-9][0-9]_*.py"))


def test_the_readme_names_every_tutorial():
    assert _scripts()[:4] == ["01_quickstart.py", "02_her2st.py", "03_image_only.py", "04_cohort.py"]
    readme = (TUTORIALS.parent / "README.md").read_text()
    words = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
    assert f"holds {words[len(_scripts())]} notebooks" in readme
    for name in _scripts():
        assert f"`{name[:-3]}`" in readme, f"README does not describe tutorials/{name}"


@pytest.mark.parametrize("name", _scripts())
def test_tutorial_is_a_jupytext_notebook(name):
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(TUTORIALS / name)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[0] == "markdown" and kinds.count("code") >= 3 and kinds.count("markdown") >= 3
    assert nb.cells[0].source.startswith("# "), "the first cell gives the tutorial its title"


@pytest.mark.slow
@pytest.mark.timeout(1000)  # each runs in a subprocess limited to 900 s
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.her2st) if NEEDS.get(n) == "her2st" else n for n in _scripts()]
)
def test_tutorial_runs(name, tmp_path):
    if NEEDS.get(name) == "her2st" and not all(has_her2st(s) for s in ("C2", "C3", "C4", "C5")):
        pytest.skip(f"her2st sections C2-C5 not found in {her2st_dir()}")
    env = dict(
        os.environ,
        STRANKER_TUTORIAL_SMALL="1",
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",
        STRANKER_DATA_DIR=str(her2st_dir()),
    )
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(TUTORIALS / name)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, f"{name} failed:\n{out.stderr[-4000:]}"
    for text in PRINTS.get(name, []):
        assert text in out.stdout, f"{name} did not report {text!r}"

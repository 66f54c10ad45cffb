"""The documentation builds without a warning (when the docs extra is installed)."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(700)  # sphinx runs in a subprocess limited to 600 s
def test_sphinx_build_has_no_warnings(tmp_path):
    for mod in ("sphinx", "myst_nb", "furo", "jupytext"):
        pytest.importorskip(mod)
    docs = Path(__file__).resolve().parents[1] / "docs"
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "dummy", str(docs), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]

"""Sphinx configuration: myst-nb pages, API from numpydoc docstrings, tutorials from jupytext scripts."""

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import stranker  # noqa: E402

project = "stranker"
author = "stranker developers"
copyright = "2025, stranker developers"
release = version = stranker.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# the tutorials live in ../tutorials as jupytext percent scripts: copy them in and render them
# without running them (the test suite executes them at small settings)
_tutorials = HERE / "tutorials"
_tutorials.mkdir(exist_ok=True)
for _src in sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py")):
    _dst = _tutorials / _src.name
    if not _dst.exists() or _dst.read_bytes() != _src.read_bytes():
        shutil.copyfile(_src, _dst)

nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

exclude_patterns = ["_build", "conf.py", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True

html_theme = "furo"
html_title = f"stranker {version}"
html_static_path = ["_static"]

"""docs/api.md lists every public name of sr.pp/tl/pl/io/datasets, and only names that import."""

import importlib
import re
from pathlib import Path

import stranker as sr

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _listed() -> set[str]:
    """Names in the autosummary blocks of docs/api.md (relative to `stranker`)."""
    text = API.read_text()
    blocks = re.findall(r"\.\. autosummary::\n((?:   .*\n|\n)+)", text)
    return {line.strip() for b in blocks for line in b.splitlines()
            if line.strip() and not line.strip().startswith(":")}


def test_every_public_name_is_in_the_api_reference():
    public = {f"{mod.__name__.split('.', 1)[1]}.{name}"
              for mod in (sr.pp, sr.tl, sr.pl, sr.io, sr.datasets) for name in mod.__all__}
    missing = sorted(public - _listed())
    assert not missing, f"add to docs/api.md: {missing}"


def test_every_listed_name_imports_as_written():
    for name in sorted(_listed()):
        obj = sr
        for part in name.split("."):
            obj = getattr(obj, part)  # `sr.model.Config` as a user writes it
        head = name.split(".")[0]
        if head in ("model", "train"):
            assert importlib.import_module(f"stranker.{head}") is getattr(sr, head)


def test_shared_parameter_docs_are_filled_in():
    import inspect

    for mod in (sr.pp, sr.tl, sr.pl, sr.io, sr.datasets):
        for name in mod.__all__:
            doc = inspect.getdoc(getattr(mod, name)) or ""
            assert "{doc_" not in doc, f"{mod.__name__}.{name}: unfilled shared parameter doc"
    doc = inspect.getdoc(sr.pl.gene_map)
    assert "image_key, shapes_key, table_key, library_id\n    Which elements to use" in doc
    assert "bin_size\n    Visium HD: the bin size in µm (2, 8, 16)" in doc

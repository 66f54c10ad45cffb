import inspect
import subprocess
import sys

import pytest

import stranker as sr


def test_namespaces_and_version():
    for name in ("pp", "tl", "pl", "io", "datasets", "settings", "__version__"):
        assert hasattr(sr, name), name
    assert isinstance(sr.__version__, str) and sr.__version__


def test_import_is_fast_and_lazy():
    code = (
        "import sys, time; t = time.perf_counter(); import stranker; dt = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'spatialdata', 'squidpy', 'scanpy', 'timm', 'anndata') "
        "if m in sys.modules]; "
        "print(dt); print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert float(out[0]) < 2.0
    assert out[1] == "", f"heavy modules imported eagerly: {out[1]}"


def _public_functions():
    for mod in (sr.pp, sr.tl, sr.pl, sr.io, sr.datasets):
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.isfunction(obj):
                yield f"{mod.__name__}.{name}", obj


@pytest.mark.parametrize(("name", "fn"), list(_public_functions()))
def test_signature_conventions(name, fn):
    params = inspect.signature(fn).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3, f"{name} takes more than 3 positional parameters"
    for p in params:
        if p.name == "copy":
            assert p.kind == p.KEYWORD_ONLY, f"{name}: `copy` must be keyword-only"
    doc = inspect.getdoc(fn) or ""
    assert "Parameters" in doc or not positional, f"{name} lacks a numpydoc Parameters section"

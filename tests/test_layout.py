"""The package's layout as a contract: who may import whom, and where the user's objects are written.

- formats become sections in ``section/`` only; results are written by ``write/`` only; batches of
  spots run through a network in ``spots`` only;
- the public namespaces ``pp`` and ``pl`` are not libraries of each other or of ``tl``/``train``;
- the model core (``model/``, ``train/``) imports only torch, timm, numpy and the standard library, so
  it runs on a bare GPU machine.
"""

import ast
import re
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stranker"


def _imports(path: Path) -> set[str]:
    """Return the absolute names of the modules a file imports (relative imports resolved within stranker)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                out.add(name)
                if not node.module:  # from . import x
                    out.update(f"{name}.{a.name}" for a in node.names)
            else:
                out.add(node.module)
    return out


def _files(sub: str) -> list[Path]:
    return sorted((SRC / sub).rglob("*.py")) if (SRC / sub).is_dir() else [SRC / f"{sub}.py"]


@pytest.mark.parametrize("namespace", ["pp", "pl"])
def test_public_namespaces_are_not_private_libraries(namespace):
    """pp and pl reach shared code through the modules named for it, never through tl or train."""
    for f in _files(namespace):
        bad = sorted(m for m in _imports(f) if re.match(r"stranker\.(tl|train)(\.|$)", m))
        assert not bad, f"{f.relative_to(SRC)} imports {bad}"


@pytest.mark.parametrize("core", ["model", "train"])
def test_model_core_imports_only_torch_timm_numpy(core):
    # timm's own dependencies come with it: its hub client (and that client's progress bars), safetensors
    timm_deps = {"huggingface_hub", "safetensors", "tqdm"}
    allowed = {"torch", "timm", "numpy", "__future__"} | timm_deps | set(sys.stdlib_module_names)
    for f in _files(core):
        for m in _imports(f):
            top = m.split(".")[0]
            if top == "stranker":
                assert re.match(r"stranker\.(model|train)(\.|$)", m), f"{f.relative_to(SRC)} imports {m}"
            else:
                assert top in allowed, f"{f.relative_to(SRC)} imports {m}"


def test_only_section_reads_formats():
    """Only the section package picks elements out of a SpatialData or an AnnData's uns['spatial']."""
    pattern = re.compile(r"uns\[(Keys\.SPATIAL|['\"]spatial['\"])\]|get_transformation\(|\.tables\.items\(\)")
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC)
        if rel.parts[0] in ("section", "write", "io", "datasets"):  # readers, writers, dataset makers
            continue
        hits = [ln for ln in f.read_text().splitlines() if pattern.search(ln)]
        assert not hits, f"{rel} reads a format itself: {hits[:2]}"


def test_only_write_assigns_into_a_users_table():
    """Results go into the user's tables through ``write/`` only (objects stranker builds are its own)."""
    pattern = re.compile(r"\b(sp\.table|t|table|sdata|data)\.(layers|obsm|obs|var|uns)\[[^]]+\]\s*=[^=]")
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC)
        if rel.parts[0] == "write":
            continue
        hits = [ln.strip() for ln in f.read_text().splitlines() if pattern.search(ln)]
        assert not hits, f"{rel} writes into a user's table: {hits[:2]}"


def test_one_batched_inference_loop():
    """torch.no_grad + autocast over batches of spots lives in spots.py alone."""
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC)
        if rel.parts[0] in ("train", "model") or rel.name == "spots.py":
            continue
        text = f.read_text()
        assert "torch.autocast(" not in text, f"{rel} runs its own batched inference loop"


def test_input_error_is_exported():
    import stranker as sr
    from stranker._errors import InputError
    from stranker.section import as_sections

    assert sr.InputError is InputError
    with pytest.raises(sr.InputError):
        as_sections([])

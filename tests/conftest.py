from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"
if "STRANKER_DATA_DIR" not in os.environ and SHARED_HER2ST.exists():
    os.environ["STRANKER_DATA_DIR"] = str(SHARED_HER2ST)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("STRANKER_ALLOW_DOWNLOAD", "0")  # tests never download weights


def her2st_dir() -> Path:
    return Path(os.environ.get("STRANKER_DATA_DIR", SHARED_HER2ST))


def has_her2st(section: str = "C2") -> bool:
    d = her2st_dir()
    return all((d / f).exists() for f in (f"{section}.jpg", f"{section}.tsv.gz", f"{section}_selection.tsv"))


# reads the real files; skipped (pytest_collection_modifyitems) when STRANKER_DATA_DIR lacks them
needs_her2st = pytest.mark.her2st


def pytest_collection_modifyitems(config, items):
    """Skip `her2st` tests without the files and `gpu` tests without a CUDA device."""
    no_files = pytest.mark.skip(
        reason="her2st files (C2.jpg, C2.tsv.gz, C2_selection.tsv) not found in STRANKER_DATA_DIR"
    )
    gpu = None
    for item in items:
        if "her2st" in item.keywords and not has_her2st():
            item.add_marker(no_files)
        if "gpu" in item.keywords:
            if gpu is None:
                import torch

                gpu = torch.cuda.is_available()
            if not gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _quiet():
    import stranker as sr

    sr.settings.progress = False
    yield


def make_sdata(
    *,
    n: int = 12,
    h: int = 200,
    w: int = 240,
    radius: float = 8.0,
    image_scale: float = 1.0,
    shapes_scale: float = 1.0,
    multiscale: bool = False,
    seed: int = 0,
    extra_images: int = 0,
    counts: np.ndarray | None = None,
    genes: list[str] | None = None,
):
    """A small SpatialData whose image carries a colour code at every spot centre.

    The image is placed in 'global' with a Scale(image_scale) transformation, the shapes with
    Scale(shapes_scale); spot i sits at global position g_i, so its pixel in the image is g_i / image_scale.
    The pixel at each spot centre (3x3 block) has colour (i*10 % 256, 200, 50).
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sps
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale

    rng = np.random.default_rng(seed)
    img = np.full((3, h, w), 230, dtype=np.uint8)
    px = np.column_stack([rng.integers(20, w - 20, n), rng.integers(20, h - 20, n)]).astype(float)
    for i, (x, y) in enumerate(px.astype(int)):
        img[:, y - 1 : y + 2, x - 1 : x + 2] = np.array(
            [i * 10 % 256, 200, 50], dtype=np.uint8
        )[:, None, None]
    glob = px * image_scale
    img_el = Image2DModel.parse(
        img, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
        transformations={"global": Scale([image_scale, image_scale], axes=("y", "x"))},
        scale_factors=[2] if multiscale else None,
    )
    ids = [f"s{i}" for i in range(n)]
    shapes = ShapesModel.parse(
        glob / shapes_scale, geometry=0, radius=np.full(n, radius * image_scale / shapes_scale),
        index=pd.Index(ids), transformations={"global": Scale([shapes_scale, shapes_scale], axes=("x", "y"))},
    )
    if counts is None:
        counts = rng.poisson(3.0, size=(n, 5)).astype(np.float32)
    genes = genes or [f"G{j}" for j in range(counts.shape[1])]
    obs = pd.DataFrame({"spot_id": ids, "region": pd.Categorical(["spots"] * n)}, index=ids)
    adata = ad.AnnData(sps.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))
    adata.layers["counts"] = adata.X.copy()
    table = TableModel.parse(adata, region="spots", region_key="region", instance_key="spot_id")
    images = {"he": img_el}
    for k in range(extra_images):
        images[f"he{k + 2}"] = Image2DModel.parse(img.copy(), dims=("c", "y", "x"))
    sdata = SpatialData(images=images, shapes={"spots": shapes}, tables={"table": table})
    return sdata, px


@pytest.fixture(scope="session")
def synthetic_small():
    import stranker as sr

    return sr.datasets.synthetic(n_sections=4, n_spots=120, seed=0)


# slide-level tasks (tests/test_slides.py, tests/test_survival.py): one quick fit, one embedded cohort
SLIDE_FIT = dict(epochs=3, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet",
                 pretrained=False, n_top_genes=40, genes="heg")


@pytest.fixture(scope="session")
def slide_model(synthetic_small):
    from spatialdata import deepcopy

    import stranker as sr

    return sr.tl.fit([deepcopy(s) for s in synthetic_small[:3]], seed=0, **SLIDE_FIT)


@pytest.fixture(scope="session")
def slide_cohort(slide_model):
    """(slides, clinical table, embedded cohort with tile bags) of 60 synthetic 256-px slides."""
    import stranker as sr

    slides, clinical = sr.datasets.synthetic_cohort(60, size_px=256, seed=0)
    cohort = sr.tl.embed_slides(slide_model, slides, obs=clinical, keep_tiles=True)
    return slides, clinical, cohort


@pytest.fixture
def stranker_log(caplog):
    """Records of the stranker logger (it does not propagate: pytest's handler is attached to it)."""
    import logging

    log = logging.getLogger("stranker")
    log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="stranker")
    yield caplog
    log.removeHandler(caplog.handler)

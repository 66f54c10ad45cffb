"""Sparse count tables stay sparse: gene choice, targets and normalisation never densify the whole table."""

import time
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sps

import stranker as sr
from stranker._expression import lognorm, lognorm_sparse
from stranker.pp._genes import choose
from stranker.section import as_sections
from stranker.tl._fit import targets


def _sparse_sections(n_spots: int, n_genes: int = 5000, per_spot: int = 50, n_sections: int = 2,
                     seed: int = 0):
    """``n_sections`` AnnData tables of CSR counts (``per_spot / n_genes`` dense); low gene ids are common."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    n = n_spots * per_spot
    genes = (rng.random(n) ** 3 * n_genes).astype(np.int32)  # low gene ids are common, high ones rare
    counts = rng.integers(1, 6, n).astype(np.float32)
    x = sps.csr_matrix((counts, genes, np.arange(0, n + 1, per_spot)), shape=(n_spots, n_genes))
    x.sum_duplicates()
    out = []
    for i, rows in enumerate(np.array_split(np.arange(n_spots), n_sections)):
        a = ad.AnnData(x[rows[0] : rows[-1] + 1])
        a.var_names = [f"G{j}" for j in range(n_genes)]
        a.obsm["spatial"] = rng.uniform(0, 1000, (len(rows), 2))
        a.uns["spatial"] = {f"S{i}": {"scalefactors": {}}}  # library S{i}: two batches
        out.append(a)
    return out, x


def _peak_through_genes_and_targets(n_spots: int) -> tuple[float, int, float]:
    """Peak traced bytes of choosing 100 HVGs and building their targets, the dense table's size, seconds."""
    tables, x = _sparse_sections(n_spots)
    secs = as_sections(tables, need_image=False)
    dense_bytes = x.shape[0] * x.shape[1] * 4
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        genes = choose(secs, "hvg", n_top=100, layer=None)
        y = targets(secs, genes, None, 1e4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(genes) == 100 and [t.shape for t in y] == [(sp.n_spots, 100) for sp in secs]
    np.testing.assert_array_equal(np.concatenate(y), lognorm(x, cols=[int(g[1:]) for g in genes]))
    return peak, dense_bytes, time.perf_counter() - t0


_THREADS = """
import numpy as np, scipy.sparse as sps, anndata as ad
import stranker as sr
a = ad.AnnData(sps.random(300, 50, density=0.2, format="csr", dtype=np.float32, random_state=0) * 10)
a.obsm["spatial"] = np.random.default_rng(0).uniform(0, 100, (300, 2))
sr.pp.select_genes(a, flavor="hvg", n_top=10)
import torch
print(torch.get_num_threads())
"""


def test_choosing_genes_keeps_the_thread_count_torch_uses():
    """scanpy's sparse kernels start numba's OpenMP pool, which set the count torch then used to the CPUs.

    Once per process, before or after torch is imported: checked in a fresh process.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _THREADS], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_gene_choice_and_targets_of_a_large_sparse_table_stay_sparse():
    # 200k spots x 5k genes, ~1% non-zero: 3.7 GiB dense, ~80 MiB as CSR
    peak, dense_bytes, _ = _peak_through_genes_and_targets(200_000)
    assert peak < dense_bytes / 8, f"peak {peak / 2**20:.0f} MiB, dense table {dense_bytes / 2**20:.0f} MiB"


def test_lognorm_of_chosen_columns_and_sparse_equal_the_full_dense_one():
    rng = np.random.default_rng(1)
    dense = rng.poisson(0.3, (60, 40)).astype(np.float32)
    dense[5] = 0  # a spot without counts stays 0
    csr = sps.csr_matrix(dense)
    full = lognorm(dense)
    cols = np.array([7, 3, 39, 3])
    for mat in (dense, csr, dense.astype(np.int64), sps.csc_matrix(dense)):
        np.testing.assert_array_equal(lognorm(mat), full)
        np.testing.assert_array_equal(lognorm(mat, cols=cols), full[:, cols])
        np.testing.assert_array_equal(lognorm_sparse(mat).toarray(), full)
        np.testing.assert_array_equal(lognorm_sparse(mat, cols=cols).toarray(), full[:, cols])
    # duplicate entries of a CSR are summed before the log, as in the dense matrix
    dup = sps.csr_matrix((np.array([1.0, 2.0, 4.0]), np.array([0, 0, 1]), np.array([0, 3])), shape=(1, 2))
    np.testing.assert_array_equal(lognorm_sparse(dup).toarray(), lognorm(dup))
    np.testing.assert_allclose(np.expm1(lognorm(dup)), [[3 / 7 * 1e4, 4 / 7 * 1e4]], rtol=1e-6)


def test_normalize_writes_a_sparse_layer_for_a_sparse_table(synthetic_small):
    from spatialdata import deepcopy

    sd = deepcopy(synthetic_small[0])
    t = sd.tables["table"]
    assert sps.issparse(t.X)
    sr.pp.normalize(sd)
    got = t.layers["lognorm"]
    assert sps.issparse(got) and got.dtype == np.float32 and got.nnz == t.X.nnz
    np.testing.assert_array_equal(got.toarray(), lognorm(t.X.toarray()))
    t.layers["dense_counts"] = t.X.toarray()
    sr.pp.normalize(sd, layer="dense_counts", key_added="from_dense")
    assert isinstance(t.layers["from_dense"], np.ndarray)
    np.testing.assert_array_equal(t.layers["from_dense"], got.toarray())


@pytest.mark.parametrize("flavor", ["hvg", "heg"])
def test_gene_choice_is_the_same_on_dense_and_sparse_tables(synthetic_small, flavor):
    from spatialdata import deepcopy

    secs = [deepcopy(s) for s in synthetic_small[:2]]
    sparse_genes = sr.pp.select_genes(secs, flavor=flavor, n_top=30)
    for s in secs:
        s.tables["table"].X = s.tables["table"].X.toarray()
    assert sr.pp.select_genes(secs, flavor=flavor, n_top=30) == sparse_genes


def test_smooth_keeps_a_sparse_layer_sparse(synthetic_small):
    from spatialdata import deepcopy

    from stranker.pp._smooth import neighbour_weights

    sd = deepcopy(synthetic_small[0])
    t = sd.tables["table"]
    sr.pp.normalize(sd)
    sr.pp.smooth(sd, n_neighs=4)
    got = t.layers["smoothed"]
    assert sps.issparse(got) and got.dtype == np.float32
    w = neighbour_weights(np.asarray(t.obsm["spatial"]), 4).toarray()
    np.testing.assert_allclose(got.toarray(), w @ t.layers["lognorm"].toarray(), rtol=1e-5, atol=1e-6)
    t.layers["dense"] = t.layers["lognorm"].toarray()
    sr.pp.smooth(sd, layer="dense", n_neighs=4, key_added="from_dense")
    assert isinstance(t.layers["from_dense"], np.ndarray)
    np.testing.assert_allclose(t.layers["from_dense"], got.toarray(), rtol=1e-6, atol=1e-7)

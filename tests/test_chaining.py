"""Our outputs chain into squidpy and scanpy as they are (the API of squidpy 1.8)."""

import warnings

import numpy as np
import pytest

import stranker as sr

FAST = dict(
    epochs=3, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet", pretrained=False,
    n_top_genes=30, genes="heg"
)


@pytest.fixture(scope="module")
def predicted(synthetic_small):
    from spatialdata import deepcopy

    secs = [deepcopy(s) for s in synthetic_small]
    model = sr.tl.fit(secs[:3], seed=0, **FAST)
    sr.tl.predict(model, secs[3])
    return model, secs[3].tables["table"]


def _moran(table, layer, genes):
    import squidpy as sq

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # NaN or division trouble would show here
        df = sq.gr.spatial_autocorr(
            table, mode="moran", layer=layer, genes=genes, n_perms=None, copy=True, show_progress_bar=False
        )
    return df.loc[genes, "I"].to_numpy()


def test_spatial_autocorrelation_of_predicted_and_measured(predicted):
    import squidpy as sq

    model, table = predicted
    table = table.copy()
    sq.gr.spatial_neighbors_knn(table, n_neighs=6)  # sq.gr.spatial_neighbors is deprecated in squidpy 1.8
    sr.pp.normalize(table)  # measured expression on the predicted scale, in layers['lognorm']
    i_pred = _moran(table, "stranker", model.genes)
    i_meas = _moran(table, "lognorm", model.genes)
    assert np.isfinite(i_pred).all() and np.isfinite(i_meas).all()
    # tissue programs vary smoothly over the synthetic sections: both sides are spatially structured
    assert i_meas.mean() > 0.1
    assert i_pred.mean() > 0.2
    # control: the same predictions on scrambled positions carry no spatial structure
    rng = np.random.default_rng(0)
    table.obsm["spatial"] = table.obsm["spatial"][rng.permutation(table.n_obs)]
    sq.gr.spatial_neighbors_knn(table, n_neighs=6)
    assert abs(_moran(table, "stranker", model.genes).mean()) < 0.1


def test_leiden_on_the_image_embedding_finds_tissue_programs(predicted):
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    _, table = predicted
    table = table.copy()
    sc.pp.neighbors(table, use_rep="X_stranker", n_neighbors=10, random_state=0)
    sc.tl.leiden(table, flavor="igraph", n_iterations=2, directed=False, random_state=0, resolution=0.5)
    k = table.obs["leiden"].nunique()
    assert 2 <= k < table.n_obs // 5
    ari = adjusted_rand_score(table.obs["program"], table.obs["leiden"])
    # control: the same clustering on a random representation
    table.obsm["X_random"] = np.random.default_rng(0).normal(size=table.obsm["X_stranker"].shape)
    sc.pp.neighbors(table, use_rep="X_random", n_neighbors=10, random_state=0, key_added="rnd")
    sc.tl.leiden(
        table,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=0,
        resolution=0.5,
        neighbors_key="rnd",
        key_added="leiden_rnd",
    )
    ari_rnd = adjusted_rand_score(table.obs["program"], table.obs["leiden_rnd"])
    assert ari > 0.15 and ari > ari_rnd + 0.1, (ari, ari_rnd)


def test_the_readme_chain_when_the_table_lacks_modelled_genes(predicted, synthetic_small):
    # README: fit, predict on a section lacking some training genes, then Moran's I of the genes written
    import squidpy as sq
    from spatialdata import deepcopy

    model, _ = predicted
    sdata = deepcopy(synthetic_small[3])
    t = sdata.tables["table"]
    sdata.tables["table"] = lacking = t[:, ~t.var_names.isin(model.genes[:3])].copy()
    sr.tl.predict(model, sdata)
    genes = lacking.uns["stranker"]["genes"]
    assert genes == model.genes[3:] and lacking.uns["stranker"]["genes_absent"] == model.genes[:3]
    sq.gr.spatial_neighbors_knn(lacking, n_neighs=6)
    assert np.isfinite(_moran(lacking, "stranker", genes)).all()

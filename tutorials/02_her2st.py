# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # HER2+ breast cancer: predict a held-out section, then analyse it with squidpy and scanpy
#
# Four sections (C2–C5) of one patient of the HER2+ breast cancer legacy-ST dataset (Andersson et
# al., *Nat. Commun.* 12, 6012, 2021). We fit on C2, C3 and C4, predict C5 from its H&E image
# alone, compare the predicted maps with the measured ones, and check whether the spatial
# structure of the prediction (Moran's I per gene, via squidpy) matches the measured one.
#
# `sr.datasets.her2st` fetches the public files (checked against their SHA-256) into
# `sr.settings.data_dir`, or reads them from `$STRANKER_DATA_DIR` when they are already there.
# With `STRANKER_TUTORIAL_SMALL=1` the notebook runs in about a minute on a CPU with a tiny
# network and one epoch (the numbers are then meaningless); the full settings take a few minutes
# on a GPU.

# %%
import os

import numpy as np
import scanpy as sc
import squidpy as sq

import stranker as sr

SMALL = os.environ.get("STRANKER_TUTORIAL_SMALL") == "1"
if SMALL:
    FIT = dict(genes="heg", n_top_genes=30, epochs=1, backbone="test_resnet", pretrained=False, image_size=64)
else:
    FIT = dict(genes="hvg", n_top_genes=1000)  # the defaults: resnet18, 12 epochs

train = sr.datasets.her2st(["C2", "C3", "C4"])
test = sr.datasets.her2st("C5")
test

# %% [markdown]
# ## Fit on three sections, predict the fourth

# %%
model = sr.tl.fit(train, seed=0, **FIT)
sr.tl.predict(model, test)
metrics = sr.tl.evaluate(test)
print(f"C5: ACG {metrics['pcc_all']:.3f}, HEG {metrics['pcc_heg']:.3f} over {metrics['n_genes']} genes")

# %%
sr.pl.correlation(test)

# %% [markdown]
# ## Gene maps
#
# The two best-predicted genes among the 50 most expressed, and *ERBB2* (HER2) when the model
# predicts it: measured beside predicted, on one colour scale per gene.

# %%
table = test.tables["table"]
heg = metrics["heg_genes"]
r = table.var.loc[heg, "stranker_pcc"].sort_values(ascending=False)
show = r.index[:2].tolist() + (["ERBB2"] if "ERBB2" in model.genes and "ERBB2" not in r.index[:2] else [])
sr.pl.gene_map(test, show)

# %% [markdown]
# ## Spatial autocorrelation: predicted against measured
#
# squidpy's Moran's I on the same spatial graph, once on the predicted layer and once on the
# measured expression on the same scale (`sr.pp.normalize` writes `log1p(counts / total * 1e4)`,
# the target the model learned, to `layers['lognorm']`). `layers['stranker']` holds NaN for the
# genes the model does not predict, so we pass the genes it wrote, `uns['stranker']['genes']` (the
# modelled genes that C5's table has).

# %%
genes = table.uns["stranker"]["genes"]
sq.gr.spatial_neighbors_knn(table, n_neighs=6)
sr.pp.normalize(table)
moran = {
    layer: sq.gr.spatial_autocorr(
        table, mode="moran", layer=layer, genes=genes, n_perms=None, copy=True, show_progress_bar=False
    ).loc[genes, "I"]
    for layer in ("lognorm", "stranker")
}
i_meas, i_pred = moran["lognorm"], moran["stranker"]
rho = np.corrcoef(i_meas.rank(), i_pred.rank())[0, 1]
top = 20
overlap = len(set(i_meas.nlargest(top).index) & set(i_pred.nlargest(top).index))
print(f"Moran's I, mean: measured {i_meas.mean():.3f}, predicted {i_pred.mean():.3f}; Spearman rho {rho:.2f}")
print(f"{overlap} of the {top} most spatially autocorrelated genes are shared")

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(4, 4))
ax.scatter(i_meas, i_pred, s=8)
lim = [min(i_meas.min(), i_pred.min()), max(i_meas.max(), i_pred.max())]
ax.plot(lim, lim, color="0.6", lw=0.8, ls="--")
ax.set_xlabel("Moran's I, measured")
ax.set_ylabel("Moran's I, predicted")
ax.set_title(f"C5, {len(genes)} genes (Spearman {rho:.2f})")
plt.show()

# %% [markdown]
# Predictions are smoother than measurements (a model predicts the expected value from the
# image, without the sampling noise of the counts), so their Moran's I is higher across the
# board; what matters is whether the same genes rank high.
#
# ## Clusters of the image embedding
#
# `obsm['X_stranker']` feeds scanpy like any representation: a neighbour graph, Leiden
# clusters (scanpy's igraph flavour: `pip install igraph`), and a look at them in space and in
# a UMAP.

# %%
sc.pp.neighbors(table, use_rep="X_stranker", n_neighbors=10, random_state=0)
sc.tl.leiden(table, flavor="igraph", n_iterations=2, directed=False, random_state=0, resolution=0.5)
print(table.obs["leiden"].value_counts().to_dict())

# %%
ax = sc.pl.embedding(table, basis="spatial", color="leiden", size=60, show=False)
ax.invert_yaxis()  # image rows grow downwards: the same orientation as the gene maps above
ax.set_aspect("equal")
plt.show()

# %% [markdown]
# A UMAP of the same neighbour graph: `sr.pl.embedding` draws the one scanpy stored (it was
# computed from `X_stranker`) instead of computing its own.

# %%
sc.tl.umap(table, random_state=0)
sr.pl.embedding(test, color="leiden")

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
# # Quickstart: fit on three sections, predict the fourth
#
# The synthetic dataset is generated offline: four tissue programs (tumour, stroma, immune, fat)
# with distinct textures drive negative-binomial counts, so morphology truly determines
# expression. Every section is a `SpatialData` object with an H&E-like image `'he'`, circle spots
# `'spots'` and a table `'table'` of raw counts, the layout stranker reads everywhere.
#
# Set `STRANKER_TUTORIAL_SMALL=1` to run this notebook in seconds with a tiny network (the test
# suite does); the numbers quoted in the text are from the full settings.

# %%
import os

import stranker as sr

SMALL = os.environ.get("STRANKER_TUTORIAL_SMALL") == "1"
if SMALL:
    N_SPOTS, N_GENES, FIT = 100, 20, dict(epochs=2, backbone="test_resnet", pretrained=False, image_size=32)
else:
    N_SPOTS, N_GENES, FIT = 300, 100, dict(epochs=8, backbone="resnet18", image_size=64)

secs = sr.datasets.synthetic(n_sections=4, n_spots=N_SPOTS, seed=0)
train, test = secs[:3], secs[3]
secs[0]

# %% [markdown]
# ## Choose genes and fit
#
# Genes are chosen on the training sections only (highly variable genes here). `sr.tl.fit`
# trains the image–gene model and writes its in-sample results into each training table:
# `obsm['X_stranker']` (image embedding), `layers['stranker']` (predicted expression) and
# `uns['stranker']` (parameters and the per-epoch history of every loss term).

# %%
genes = sr.pp.select_genes(train, flavor="hvg", n_top=N_GENES)
model = sr.tl.fit(train, genes=genes, patch_px=64, seed=0, **FIT)
model

# %%
sr.pl.history(model)

# %% [markdown]
# ## Predict the held-out section and score it
#
# `sr.tl.evaluate` compares predicted with measured expression gene by gene (Pearson r across
# the spots of the section): ACG is the mean over all modelled genes, HEG the mean over the 50
# most expressed.

# %%
sr.tl.predict(model, test)
metrics = sr.tl.evaluate(test)
print(f"ACG {metrics['pcc_all']:.3f}, HEG {metrics['pcc_heg']:.3f}, MSE {metrics['mse']:.3f}")

# %%
sr.pl.correlation(test)

# %% [markdown]
# ## Look at it on the tissue
#
# Measured beside predicted expression for the two best-predicted genes, on one colour scale
# per gene.

# %%
table = test.tables["table"]
best = table.var["stranker_pcc"].dropna().sort_values(ascending=False).index[:2].tolist()
sr.pl.gene_map(test, best)

# %% [markdown]
# ## Results chain into scanpy
#
# The image embedding is a representation like any other: a UMAP of the training and test
# spots, coloured by section and by the tissue program the synthetic data painted. Spots group
# by program, not by section.

# %%
sr.pl.embedding([*train, test], color=["section", "program"])

# %% [markdown]
# The model is saved to a folder and loaded back, with its genes and target scaling.

# %%
import tempfile

with tempfile.TemporaryDirectory() as folder:
    model.save(folder, overwrite=True)
    again = sr.Model.load(folder)
print(again)

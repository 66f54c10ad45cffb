# %% [markdown]
# # Quickstart: fit on three synthetic sections, predict the fourth
#
# The synthetic dataset is generated offline: four tissue programs (tumour, stroma, immune, fat)
# with distinct textures drive negative-binomial counts, so morphology truly determines expression.

# %%
import scanpy as sc

import stranker as sr

secs = sr.datasets.synthetic(n_sections=4, n_spots=200, seed=0)
train, test = secs[:3], secs[3]
genes = sr.pp.select_genes(train, flavor="hvg", n_top=100)

# %%
model = sr.tl.fit(train, genes=genes, epochs=8, patch_px=64, image_size=64)
sr.tl.predict(model, test)
metrics = sr.tl.evaluate(test)
print({k: round(v, 3) for k, v in metrics.items() if isinstance(v, float)})

# %% [markdown]
# Results chain into scanpy: the image embedding is a representation like any other.

# %%
table = test.tables["table"]
sc.pp.neighbors(table, use_rep="X_stranker")
sc.tl.umap(table)
print(table.obsm["X_umap"].shape)

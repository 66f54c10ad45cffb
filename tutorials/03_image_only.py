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
# # Predict expression on a slide that has only an H&E image
#
# Most slides in a pathology archive have no spatial transcriptomics. Once a model is trained on
# sections that do, `sr.tl.predict` lays a grid of spot-sized tiles over the tissue of an
# image-only slide and predicts expression and embeddings for every tile.
#
# Here the model is trained on three synthetic sections; the fourth section's image is written
# to a JPEG file, and we start again from that file alone, as you would with your own slide.
# `STRANKER_TUTORIAL_SMALL=1` runs it in seconds with a tiny network.

# %%
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import stranker as sr

SMALL = os.environ.get("STRANKER_TUTORIAL_SMALL") == "1"
if SMALL:
    N_SPOTS, FIT = 100, dict(genes="heg", n_top_genes=20, epochs=2, backbone="test_resnet", pretrained=False,
                             image_size=32)
else:
    N_SPOTS, FIT = 300, dict(genes="hvg", n_top_genes=100, epochs=8, backbone="resnet18", image_size=64)

secs = sr.datasets.synthetic(n_sections=4, n_spots=N_SPOTS, seed=0)
model = sr.tl.fit(secs[:3], patch_px=64, seed=0, **FIT)

# %% [markdown]
# Save the model and an H&E image of an unseen section (a stand-in for your own slide).

# %%
folder = Path(tempfile.mkdtemp())
model.save(folder / "model")
rgb = np.moveaxis(secs[3].images["he"]["scale0"]["image"].values, 0, -1)
Image.fromarray(rgb).save(folder / "slide.jpg", quality=95)
print(sorted(p.name for p in folder.iterdir()))

# %% [markdown]
# ## Build an image-only SpatialData
#
# Read the JPEG and wrap it in a `SpatialData` with one image element. A multiscale image (here
# two levels) lets stranker read coarse views, for tissue detection and plots, without touching
# the full resolution. The pixel size matters: the model was trained on spots of a given width
# in micrometres, so tell stranker the slide's resolution, `attrs['microns_per_pixel']` (what
# `sr.io.read_slide` records from the file), or the tile width in pixels of this image, `tile_px=`;
# stranker refuses to guess. The synthetic sections record theirs in `uns['microns_per_pixel']`.

# %%
from spatialdata import SpatialData
from spatialdata.models import Image2DModel

with Image.open(folder / "slide.jpg") as im:
    pixels = np.asarray(im.convert("RGB"))
image = Image2DModel.parse(np.moveaxis(pixels, -1, 0), dims=("c", "y", "x"), scale_factors=[2])
slide = SpatialData(images={"he": image})
slide.attrs["microns_per_pixel"] = {"he": secs[3].tables["table"].uns["microns_per_pixel"]}
slide

# %% [markdown]
# ## Predict on a grid of tiles over the tissue
#
# Tissue is told from glass by Otsu's threshold on colour saturation at the coarsest level; a
# tile is kept when at least half of it is tissue. The result is a circles element
# `'stranker_tiles'` and a table `'stranker_table'` annotating it, with the predictions in
# `layers['stranker']` (held once: its `X` is empty, pass `layer='stranker'` to scanpy) and the image
# embedding in `obsm['X_stranker']`.

# %%
model = sr.Model.load(folder / "model")
sr.tl.predict(model, slide)
slide

# %%
tiles = slide.tables["stranker_table"]
print(f"{tiles.n_obs} tiles, {tiles.n_vars} predicted genes")
sr.pl.gene_map(slide, model.genes[:3])

# %% [markdown]
# The same section with its measured expression (which the image-only slide never saw), for
# comparison:

# %%
sr.tl.predict(model, secs[3])
sr.pl.gene_map(secs[3], model.genes[:3])

# %% [markdown]
# The tiles are spots like any others: `sr.pl.embedding(slide, color=...)`, scanpy's
# neighbours and Leiden clusters on `obsm['X_stranker']`, or squidpy's spatial statistics on the
# `'stranker_table'` work as in the HER2+ tutorial. To keep the result, write the slide with
# `slide.write('slide.zarr')`.

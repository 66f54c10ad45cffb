"""sr.tl.backbones: the named image backbones stranker knows, as a table."""

from __future__ import annotations

import pandas as pd


def backbones() -> pd.DataFrame:
    """Return the registry of named backbones: what ``backbone='uni'`` (etc.) loads, and how.

    Any timm model name or ``'hf-hub:ORG/NAME'`` works too; the names here add the timm arguments
    of each model card, its normalisation, and the physical patch size it was trained at, which
    :func:`stranker.tl.fit` and :func:`stranker.pp.embed_patches` use by default.

    Returns
    -------
    One row per name (the index), with columns ``repo`` (Hugging Face repository of the weights),
    ``timm`` (architecture), ``timm_kwargs``, ``input_px``, ``microns_per_pixel``, ``patch_um``
    (``input_px * microns_per_pixel``), ``mean``, ``std``, ``feature_dim``, ``gated`` (the repository
    asks you to accept a licence: accept it on ``https://huggingface.co/<repo>`` and
    ``hf auth login``; it says nothing of the licence's terms), ``frozen`` (frozen by default in
    ``fit``), ``pool`` and ``note``.
    """
    from ..model.backbones import REGISTRY

    rows = [
        {
            "name": b.name, "repo": b.repo, "timm": b.arch, "timm_kwargs": dict(b.kwargs),
            "input_px": b.input_px, "microns_per_pixel": b.mpp, "patch_um": b.patch_um,
            "mean": tuple(b.mean), "std": tuple(b.std), "feature_dim": b.dim, "gated": b.gated,
            "frozen": b.frozen, "pool": b.pool, "note": b.note,
        }
        for b in REGISTRY.values()
    ]
    return pd.DataFrame(rows).set_index("name")

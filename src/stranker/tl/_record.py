"""The run record of a fitted model: what it was trained on and how, saved with it in ``model.json``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

_ARRAYS = ("target_mean", "target_std")


@dataclass(eq=False)
class RunRecord:
    """What a :class:`stranker.Model` was trained on and how (``model.meta``).

    Saved as the ``meta`` object of ``model.json``, one JSON key per field (the layout of the dict it
    replaces, so folders saved before it load unchanged); keys it does not know are kept in
    ``extra`` and saved again. It can also be read by key (``model.meta['device']``), as that dict was.

    Attributes
    ----------
    target_mean, target_std
        Per-gene mean and standard deviation of the training targets (the model predicts
        standardised values, put back on the target scale with these).
    target, target_sum, layer
        The target in words, its ``target_sum`` and the layer of raw counts it came from.
    genes_source
        How the genes were chosen: ``'hvg'``, ``'heg'``, ``None`` (``var['stranker_selected']`` or
        HVGs) or ``'list'``.
    sections, n_spots
        Names of the training sections and their number of spots.
    patch_px, patch_um, microns_per_pixel
        Patch side in pixels of the first training section and in µm, and that section's µm/px
        (``None`` unless every training section records its resolution).
    spot_diameter_px, spot_diameter_um
        Median spot diameter of the training sections.
    history
        Per-epoch values of every loss term.
    weights_source, features, feature_dim
        Where the backbone's weights came from; for a fit on precomputed features, their record
        (:func:`stranker.pp.embed_patches`) and width.
    device, seed, torch, world_size, streamed
        Where and how it was trained (``world_size`` processes; patches streamed or in memory).
    train_seconds, fit_seconds
        Time spent training, and on the whole fit.
    extra
        Keys of a saved record that this version does not know.
    """

    target_mean: np.ndarray | None = None
    target_std: np.ndarray | None = None
    target: str | None = None
    target_sum: float | None = None
    layer: str | None = None
    genes_source: str | None = None
    sections: list[str] = field(default_factory=list)
    n_spots: int | None = None
    patch_px: float | None = None
    patch_um: float | None = None
    microns_per_pixel: float | None = None
    spot_diameter_px: float | None = None
    spot_diameter_um: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    weights_source: str | None = None
    features: dict[str, Any] | None = None
    feature_dim: int | None = None
    device: str | None = None
    seed: int | None = None
    torch: str | None = None
    world_size: int | None = None
    streamed: bool | None = None
    train_seconds: float | None = None
    fit_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> RunRecord:
        """Read a record from ``model.json``'s ``meta`` (of any stranker version) or from another record."""
        if isinstance(meta, RunRecord):
            meta = dict(meta.items())
        if not isinstance(meta, Mapping):
            raise TypeError(f"A run record is read from a dict, got {type(meta).__name__}.")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in meta.items() if k in names}
        for k in _ARRAYS:
            if known.get(k) is not None:
                known[k] = np.asarray(known[k], dtype=np.float32)
        extra = {k: v for k, v in meta.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as plain JSON values: one key per field, then the keys of ``extra``."""
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.items()}

    # read by key, as the dict this record replaces
    def keys(self) -> list[str]:
        """Names of the fields, then those of ``extra``."""
        return [f.name for f in fields(self) if f.name != "extra"] + list(self.extra)

    def items(self) -> Iterator[tuple[str, Any]]:
        """``(name, value)`` of every field, then of ``extra``."""
        return ((k, self[k]) for k in self.keys())

    def __getitem__(self, key: str) -> Any:
        if key != "extra" and key in {f.name for f in fields(self)}:
            return getattr(self, key)
        if key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value of field (or ``extra`` key) ``key``; ``default`` when absent or ``None``."""
        value = self[key] if key in self else None
        return default if value is None else value

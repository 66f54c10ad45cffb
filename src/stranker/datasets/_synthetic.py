"""Synthetic H&E-like sections in which tissue morphology determines gene expression.

Everything is generated offline from a seed: four tissue programs (tumour, stroma, immune, fat)
are laid out in smooth, section-specific proportion fields; the image is painted program by
program with a hematoxylin / eosin optical-density model; each spot's expression is drawn from a
negative binomial whose mean is the spot's realised program composition times program-specific
gene rates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._constants import Keys

if TYPE_CHECKING:
    import spatialdata

PROGRAMS: tuple[str, ...] = ("tumour", "stroma", "immune", "fat")

# A few recognisable marker names per program (used for the first markers of each program).
_MARKER_NAMES: dict[str, tuple[str, ...]] = {
    "tumour": ("EPCAM", "KRT8", "KRT18", "MKI67"),
    "stroma": ("COL1A1", "COL1A2", "COL3A1", "DCN"),
    "immune": ("PTPRC", "CD3E", "MS4A1", "CD74"),
    "fat": ("ADIPOQ", "PLIN1", "LEP", "FABP4"),
}

# Stain optical-density vectors (RGB) of hematoxylin and eosin, as in skimage's ``rgb_from_hed``.
_H_VEC = np.array([0.65, 0.70, 0.29])
_E_VEC = np.array([0.07, 0.99, 0.11])
_H_VEC = _H_VEC / np.linalg.norm(_H_VEC)
_E_VEC = _E_VEC / np.linalg.norm(_E_VEC)

# Relative cellularity (library size multiplier) of each program.
_CELLULARITY = np.array([1.2, 0.8, 1.0, 0.35])


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------
def _lattice(n_spots: int, spacing: float) -> tuple[np.ndarray, int, int]:
    """Hexagonal lattice of exactly ``n_spots`` centres ``(x, y)`` and the image size ``(h, w)``."""
    ncols = max(1, int(round(np.sqrt(n_spots * np.sqrt(3) / 2))))
    nrows = int(np.ceil(n_spots / ncols))
    dy = spacing * np.sqrt(3) / 2
    idx = np.arange(n_spots)
    row, col = idx // ncols, idx % ncols
    x = spacing + col * spacing + (row % 2) * spacing / 2
    y = spacing + row * dy
    w = int(np.ceil(spacing * (ncols - 1) + (spacing / 2 if nrows > 1 else 0) + 2 * spacing))
    h = int(np.ceil(dy * (nrows - 1) + 2 * spacing))
    return np.column_stack([x, y]).astype(float), h, w


def _proportion_field(rng: np.random.Generator, h: int, w: int, k: int):
    """Return a smooth field of program proportions: softmax of sums of random Gaussian bumps."""
    n_bumps = 3
    size = float(max(h, w))
    cx = rng.uniform(0, w, (k, n_bumps))
    cy = rng.uniform(0, h, (k, n_bumps))
    sig = rng.uniform(0.12, 0.3, (k, n_bumps)) * size
    amp = rng.uniform(0.6, 1.5, (k, n_bumps))
    offset = rng.normal(0, 0.1, k)
    temperature = 0.18

    def field(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        d2 = (x[:, None, None] - cx[None]) ** 2 + (y[:, None, None] - cy[None]) ** 2
        logits = (amp[None] * np.exp(-d2 / (2 * sig[None] ** 2))).sum(-1) + offset[None]
        logits = logits / temperature
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)

    return field


def _voronoi_labels(rng: np.random.Generator, h: int, w: int, spacing: float):
    """Voronoi tessellation of the image from jittered-grid seeds: label map and seed centres."""
    from scipy import ndimage

    gy, gx = np.mgrid[0 : h + spacing : spacing, 0 : w + spacing : spacing]
    sx = np.clip(gx.ravel() + rng.uniform(-0.45, 0.45, gx.size) * spacing, 0, w - 1)
    sy = np.clip(gy.ravel() + rng.uniform(-0.45, 0.45, gy.size) * spacing, 0, h - 1)
    ix, iy = sx.astype(int), sy.astype(int)
    ids = np.full((h, w), -1, dtype=np.int64)
    ids[iy, ix] = np.arange(sx.size)
    keep = np.unique(ids[ids >= 0])
    _, (ny, nx) = ndimage.distance_transform_edt(ids < 0, return_distances=True, return_indices=True)
    labels = ids[ny, nx]
    return labels, sx[keep], sy[keep], keep


# --------------------------------------------------------------------------------------------
# painting
# --------------------------------------------------------------------------------------------
def _stamp(od: np.ndarray, cx, cy, a, b, theta, val) -> None:
    """Draw filled ellipses into ``od`` (max-composited), vectorised over nuclei."""
    if len(cx) == 0:
        return
    h, w = od.shape
    r = int(np.ceil(a.max())) + 1
    offs = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(offs, offs, indexing="ij")
    ix0, iy0 = np.floor(cx).astype(int), np.floor(cy).astype(int)
    fx, fy = cx - ix0 - 0.5, cy - iy0 - 0.5
    X = dx[None] - fx[:, None, None]
    Y = dy[None] - fy[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = X * c + Y * s
    v = -X * s + Y * c
    inside = (u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2 <= 1.0
    px = ix0[:, None, None] + dx[None]
    py = iy0[:, None, None] + dy[None]
    inside &= (px >= 0) & (px < w) & (py >= 0) & (py < h)
    vals = np.broadcast_to(val[:, None, None], inside.shape)[inside]
    np.maximum.at(od, (py[inside], px[inside]), vals)


def _paint(rng: np.random.Generator, prog: np.ndarray, scale: float) -> np.ndarray:
    """Paint an RGB ``(3, h, w)`` uint8 H&E-like image given a per-pixel program map."""
    from scipy import ndimage

    h, w = prog.shape
    area = h * w
    masks = [prog == k for k in range(len(PROGRAMS))]

    # --- eosin (background) -------------------------------------------------------------
    # stroma: oriented collagen fibres (anisotropically smoothed noise, rotated)
    angle = rng.uniform(0, 180)
    d = int(np.ceil(np.hypot(h, w))) + 4
    noise = rng.standard_normal((d, d)).astype(np.float32)
    fib = ndimage.gaussian_filter(noise, sigma=(0.9 * scale, 9 * scale))
    fib = ndimage.rotate(fib, angle, reshape=False, order=1)
    oy, ox = (d - h) // 2, (d - w) // 2
    fib = fib[oy : oy + h, ox : ox + w]
    fib = np.clip(fib / (fib.std() + 1e-8), 0, 2.5) / 2.5
    # fat: adipocyte membranes = boundaries of a coarse Voronoi tessellation
    adip, *_ = _voronoi_labels(rng, h, w, 30 * scale)
    memb = np.zeros((h, w), dtype=bool)
    memb[1:, :] |= adip[1:, :] != adip[:-1, :]
    memb[:, 1:] |= adip[:, 1:] != adip[:, :-1]

    E = np.zeros((h, w), dtype=np.float32)
    E[masks[0]] = 0.32
    E[masks[1]] = (0.35 + 0.75 * fib)[masks[1]]
    E[masks[2]] = 0.2
    E[masks[3]] = np.where(memb, 0.75, 0.02)[masks[3]]
    E *= 1 + 0.15 * ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 2 * scale)

    # --- hematoxylin (nuclei) -----------------------------------------------------------
    H = np.zeros((h, w), dtype=np.float32)
    theta_fib = np.deg2rad(-angle)  # fibre direction after rotation (x axis rotated by -angle in image)
    # (program, px^2 per nucleus, a range, aspect range, od range, orientation)
    specs = [
        (0, 170, (4.5, 6.5), (0.7, 0.95), (0.9, 1.2), None),
        (1, 700, (5.0, 8.0), (0.2, 0.32), (1.3, 1.6), theta_fib),
        (2, 45, (2.2, 3.0), (0.85, 1.0), (1.7, 2.1), None),
        (3, 2500, (4.0, 6.0), (0.25, 0.35), (1.2, 1.5), None),
    ]
    for k, per, a_rng, asp_rng, od_rng, orient in specs:
        n = int(area / (per * scale**2))
        cx = rng.uniform(0, w, n)
        cy = rng.uniform(0, h, n)
        keep = masks[k][cy.astype(int), cx.astype(int)]
        cx, cy = cx[keep], cy[keep]
        m = len(cx)
        a = rng.uniform(*a_rng, m) * scale
        b = np.maximum(a * rng.uniform(*asp_rng, m), 0.8)
        if orient is None:
            theta = rng.uniform(0, np.pi, m)
        else:
            theta = orient + rng.normal(0, 0.25, m)
        _stamp(H, cx, cy, a, b, theta, rng.uniform(*od_rng, m).astype(np.float32))
    # chromatin texture
    H *= 1 + 0.3 * ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 0.8)

    # --- optical density -> RGB ---------------------------------------------------------
    sig = 0.7 * scale
    H = ndimage.gaussian_filter(H, sig)
    E = ndimage.gaussian_filter(E, sig)
    h_vec = _H_VEC * rng.uniform(0.95, 1.05)
    e_vec = _E_VEC * rng.uniform(0.95, 1.05)
    rgb = np.empty((3, h, w), dtype=np.float32)
    for c in range(3):
        rgb[c] = 242.0 * np.exp(-(H * h_vec[c] + E * e_vec[c]))
    rgb += rng.normal(0, 3.0, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# genes
# --------------------------------------------------------------------------------------------
def _gene_model(rng: np.random.Generator, n_genes: int):
    """Program-by-gene rate matrix (rows sum to 1), gene names, marker flags and dispersions."""
    k = len(PROGRAMS)
    base = rng.lognormal(0.0, 1.0, n_genes)
    fold = rng.lognormal(0.0, 0.4, (k, n_genes))
    means = base[None] * fold
    n_mark = int(np.clip(n_genes // 20, 1, max(1, n_genes // k)))
    names = [f"GENE{i:03d}" for i in range(n_genes)]
    marker = np.zeros(n_genes, dtype=bool)
    for p, prog in enumerate(PROGRAMS):
        cols = np.arange(p * n_mark, min((p + 1) * n_mark, n_genes))
        if len(cols) == 0:
            continue
        marker[cols] = True
        boost = np.exp(rng.uniform(2.0, 3.0, len(cols)))
        means[:, cols] = base[cols] * rng.lognormal(0.0, 0.2, (k, len(cols)))
        means[p, cols] *= boost
        # markers are reasonably expressed
        means[:, cols] *= 2.0
        for j, c in enumerate(cols[: len(_MARKER_NAMES[prog])]):
            names[c] = _MARKER_NAMES[prog][j]
    rates = means / means.sum(1, keepdims=True)
    dispersion = rng.uniform(0.2, 0.5, n_genes)
    return rates, names, marker, dispersion


# --------------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------------
def microns_per_pixel(patch_px: int) -> float:
    """Resolution of the synthetic images: a spot (``patch_px // 2`` pixels wide) is 100 µm."""
    return 100.0 / (int(patch_px) // 2)


def synthetic(
    n_sections: int = 4,
    n_spots: int = 300,
    *,
    n_genes: int = 200,
    patch_px: int = 64,
    seed: int = 0,
) -> list[spatialdata.SpatialData]:
    """Synthetic H&E-like sections whose tissue morphology determines gene expression.

    Four tissue programs (tumour, stroma, immune, fat), each with its own texture, are laid out
    in a smooth proportion field that differs between sections. Spots sit on a hexagonal lattice;
    each spot's counts are negative-binomial with mean ``libsize * p @ rates``, where ``p`` is the
    program composition actually painted inside the spot and ``rates`` is shared by all sections.

    Parameters
    ----------
    n_sections
        Number of sections.
    n_spots
        Number of spots per section.
    n_genes
        Number of genes.
    patch_px
        Spot centre-to-centre spacing in pixels; the spot diameter is ``patch_px // 2`` pixels
        (100 µm, as in legacy ST).
    seed
        Random seed; the output is a deterministic function of all arguments.

    Returns
    -------
    One :class:`spatialdata.SpatialData` per section with image ``'he'`` (multiscale RGB uint8),
    circles ``'spots'`` and table ``'table'`` (raw counts in ``X`` and ``layers['counts']``;
    ``obs['section']``, ``obs['program']``; ``obsm['spatial']`` pixel centres ``(x, y)``;
    ``obsm['programs']`` program proportions; ``var['program']``, ``var['marker']``;
    ``uns['microns_per_pixel']``, the resolution that gives a fitted model its physical size;
    ``uns['synthetic']``).

    Examples
    --------
    >>> sdatas = synthetic(n_sections=2, n_spots=100)
    >>> sdatas[0]["table"].shape
    (100, 200)
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel

    if n_sections < 1 or n_spots < 1 or n_genes < 1:
        raise ValueError("`n_sections`, `n_spots` and `n_genes` must be positive.")
    if patch_px < 8:
        raise ValueError("`patch_px` must be at least 8 pixels.")

    k = len(PROGRAMS)
    spacing = int(patch_px)
    diameter = spacing // 2
    scale = float(np.clip(spacing / 64.0, 0.5, 2.0))
    mpp = microns_per_pixel(patch_px)

    rates, gene_names, marker, dispersion = _gene_model(np.random.default_rng([seed, 1_000_003]), n_genes)
    gene_prog = np.asarray(PROGRAMS)[rates.argmax(0)]
    centers, h, w = _lattice(n_spots, spacing)

    # offsets of pixels inside a spot disc
    r = diameter / 2.0
    o = np.arange(-int(np.ceil(r)), int(np.ceil(r)) + 1)
    ody, odx = np.meshgrid(o, o, indexing="ij")
    in_disc = (odx + 0.5 - (r % 1)) ** 2 + (ody + 0.5 - (r % 1)) ** 2 <= r**2
    odx, ody = odx[in_disc], ody[in_disc]

    out = []
    for i in range(n_sections):
        rng = np.random.default_rng([seed, i])
        field = _proportion_field(rng, h, w, k)

        # program of each micro-region, sampled from the local proportions
        labels, sx, sy, keep = _voronoi_labels(rng, h, w, 11 * scale)
        p_seed = field(sx, sy)
        u = rng.random(len(sx))[:, None]
        seed_prog = (u > np.cumsum(p_seed, 1)).sum(1).clip(0, k - 1)
        lut = np.zeros(labels.max() + 1, dtype=np.int8)
        lut[keep] = seed_prog
        prog = lut[labels]

        img = _paint(rng, prog, scale)

        # realised composition inside each spot disc
        px = np.clip(np.round(centers[:, 0]).astype(int)[:, None] + odx[None], 0, w - 1)
        py = np.clip(np.round(centers[:, 1]).astype(int)[:, None] + ody[None], 0, h - 1)
        sp_prog = prog[py, px]
        props = np.stack([(sp_prog == j).mean(1) for j in range(k)], 1)

        # counts
        lib = 3000.0 * rng.lognormal(0.0, 0.3, n_spots) * (props @ _CELLULARITY)
        mu = lib[:, None] * (props @ rates)
        shape = 1.0 / dispersion
        lam = rng.gamma(shape[None], mu / shape[None])
        counts = rng.poisson(lam).astype(np.float32)

        sec = f"S{i}"
        ids = [f"{sec}_{j:04d}" for j in range(n_spots)]
        obs = pd.DataFrame(
            {
                "spot_id": ids,
                "region": pd.Categorical(["spots"] * n_spots),
                "section": pd.Categorical([sec] * n_spots),
                "program": pd.Categorical(np.asarray(PROGRAMS)[props.argmax(1)], categories=list(PROGRAMS)),
            },
            index=pd.Index(ids),
        )
        var = pd.DataFrame(
            {"program": pd.Categorical(gene_prog, categories=list(PROGRAMS)), "marker": marker},
            index=pd.Index(gene_names),
        )
        X = sp.csr_matrix(counts)
        adata = ad.AnnData(X=X, obs=obs, var=var)
        adata.layers["counts"] = X.copy()
        adata.obsm["spatial"] = centers.copy()
        adata.obsm["programs"] = props
        adata.uns[Keys.MPP] = mpp  # where every reader looks (as her2st and read_slide record it)
        adata.uns["synthetic"] = {
            "seed": seed,
            "section": i,
            "programs": list(PROGRAMS),
            "microns_per_pixel": mpp,
        }
        table = TableModel.parse(adata, region="spots", region_key="region", instance_key="spot_id")
        image = Image2DModel.parse(img, dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=[2])
        radius = np.full(n_spots, diameter / 2.0)
        shapes = ShapesModel.parse(centers.copy(), geometry=0, radius=radius, index=ids)
        out.append(sd.SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table}))
    return out

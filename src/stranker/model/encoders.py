"""Image and gene branches, and the projection/regression heads."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .augment import dihedral
from .stain import N_STAIN, reinhard, stain_features


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear with a residual, then LayerNorm (BLEEP / mclSTExp style)."""

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.fc = nn.Sequential(nn.GELU(), nn.Linear(d_out, d_out), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` to the output dimension."""
        p = self.proj(x)
        return self.norm(p + self.fc(p))


def cached_pretrained_file(name: str) -> str | None:
    """Path of timm's pretrained weights for ``name`` if already in the Hugging Face or torch hub cache."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return None
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for fname in ("open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin"):
            try:
                path = try_to_load_from_cache(hub_id.split("@")[0], fname)
            except Exception:
                path = None
            if isinstance(path, str) and Path(path).is_file():
                return path
    url = getattr(cfg, "url", None)
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if path.is_file():
            return str(path)
    return None


def create_backbone(name: str, weights: str | None = None, pretrained: bool = True) -> tuple[nn.Module, str]:
    """Return a timm backbone without classifier, and where its weights came from.

    ``weights`` (a local ``.pth``/``.pt``/``.bin``/``.safetensors`` state dict) wins; else timm's
    pretrained weights when they are already in its cache (never downloaded); else random init.
    """
    import timm

    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ValueError(f"Unknown timm backbone {name!r}; see `timm.list_models()` (e.g. 'resnet18').")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"`weights` file {str(path)!r} does not exist.")
        model = timm.create_model(name, pretrained=False, num_classes=0)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                    state = state[key]
        missing, unexpected = model.load_state_dict(state, strict=False)
        n_loaded = len(model.state_dict()) - len(missing)
        if n_loaded == 0:
            raise ValueError(
                f"No tensor of {str(path)!r} matches backbone {name!r}; is it the right architecture?"
            )
        return model, (
            f"file:{path.name} ({n_loaded} tensors, {len(missing)} missing, {len(unexpected)} unused)"
        )
    cached = cached_pretrained_file(name) if pretrained else None
    if cached is not None:
        model = timm.create_model(
            name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": cached}
        )
        return model, f"timm-cache:{Path(cached).name}"
    return timm.create_model(name, pretrained=False, num_classes=0), "random"


class ImageBranch(nn.Module):
    """Image branch: a backbone and stain statistics -> embedding and expression.

    Backbone over the first ``cnn_scales`` scales (shared weights) + stain statistics of every
    scale -> embedding and expression.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        backbone: str = "resnet18",
        weights: str | None = None,
        pretrained: bool = True,
        n_scales: int = 1,
        cnn_scales: int = 1,
        use_stain: bool = True,
        embed_dim: int = 256,
        dropout: float = 0.1,
        feature_dim: int | None = None,
        probe_only: bool = False,
        head_on: str = "embedding",
        stain_norm: str | None = None,
    ) -> None:
        super().__init__()
        self.stain_norm = stain_norm
        self.n_scales = n_scales
        self.cnn_scales = max(1, min(cnn_scales, n_scales))
        self.use_stain = use_stain and feature_dim is None
        self.probe_only = probe_only
        if head_on not in ("embedding", "features"):
            raise ValueError(f"`head_on` must be 'embedding' or 'features', got {head_on!r}.")
        self.head_on = head_on
        if feature_dim is None:
            self.backbone, self.weights_source = create_backbone(backbone, weights, pretrained)
            cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
            mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
            std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
            self.register_buffer("pix_mean", mean.view(1, 3, 1, 1))
            self.register_buffer("pix_std", std.view(1, 3, 1, 1))
            d_img = self.backbone.num_features * self.cnn_scales
        else:
            self.backbone, self.weights_source = None, "features"
            d_img = feature_dim
        d_stain = N_STAIN * n_scales if self.use_stain else 0
        self.register_buffer("stain_mean", torch.zeros(d_stain))
        self.register_buffer("stain_std", torch.ones(d_stain))
        self.register_buffer("feat_mean", torch.zeros(d_img if feature_dim else 0))
        self.register_buffer("feat_std", torch.ones(d_img if feature_dim else 0))
        self.proj = ProjectionHead(d_img + d_stain, embed_dim, dropout)
        d_head = d_img + d_stain if head_on == "features" else embed_dim + d_stain
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_head, n_genes))

    def stain(self, x: torch.Tensor) -> torch.Tensor:
        """Raw stain statistics of ``(b, s, 3, h, w)`` images in [0, 1] -> ``(b, s * 38)``."""
        b, s = x.shape[:2]
        return stain_features(x.flatten(0, 1)).view(b, s * N_STAIN)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``(b, s, 3, h, w)`` images in [0, 1], or ``(b, d)`` features.

        Returns embedding, expression.
        """
        parts = []
        if self.backbone is None:
            parts.append((x.float() - self.feat_mean) / self.feat_std)
        else:
            b = x.shape[0]
            if self.stain_norm == "reinhard":
                x = reinhard(x.flatten(0, 1)).view(x.shape)
            flat = ((x[:, : self.cnn_scales].flatten(0, 1) - self.pix_mean) / self.pix_std).contiguous(
                memory_format=torch.channels_last
            )
            parts.append(self.backbone(flat).float().view(b, -1))
        stain = None
        if self.use_stain:
            stain = ((self.stain(x) - self.stain_mean) / self.stain_std).clamp(-6, 6)
            parts.append(stain)
        feats = torch.cat(parts, dim=1)
        emb = self.proj(feats)
        if self.head_on == "features":  # the head reads backbone features (+ stain) beside the projection
            h = feats
        else:
            h = emb.detach() if self.probe_only else emb
            if stain is not None:
                h = torch.cat([h, stain], dim=1)
        if self.probe_only:
            h = h.detach()
        return emb, self.head(h)

    @torch.no_grad()
    def forward_tta(self, x: torch.Tensor, tta: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean embedding and expression over the 8 flips/rotations (or the plain view)."""
        if not tta or self.backbone is None:
            return self(x)
        embs, preds = zip(*(self(dihedral(x, k)) for k in range(8)), strict=True)
        return torch.stack(embs).mean(0), torch.stack(preds).mean(0)


class SpotContext(nn.Module):
    """Transformer over the spots of one section (spots as words) with learned 2-D positions."""

    def __init__(
        self, dim: int, layers: int = 2, heads: int = 4, bins: int = 64, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.bins = bins
        self.pos_x = nn.Embedding(bins, dim)
        self.pos_y = nn.Embedding(bins, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(b, d)`` of one section; ``pos`` ``(b, 2)`` positions in [0, 1]."""
        idx = (pos * (self.bins - 1)).round().long().clamp(0, self.bins - 1)
        x = tokens + self.pos_x(idx[:, 0]) + self.pos_y(idx[:, 1])
        return tokens + self.encoder(x[None])[0]


class GeneBranch(nn.Module):
    """MLP over standardised expression, optionally read in its spatial context."""

    def __init__(self, n_genes: int, *, hidden: int = 512, embed_dim: int = 256, dropout: float = 0.1,
                 context: SpotContext | None = None) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(n_genes, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, embed_dim)
        )
        self.context = context
        self.out = ProjectionHead(embed_dim, embed_dim, dropout)

    def forward(self, expr: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Embed expression ``(b, n_genes)``, in context when ``pos`` is given."""
        h = self.mlp(expr.float())
        if self.context is not None and pos is not None:
            h = self.context(h, pos)
        return self.out(h)

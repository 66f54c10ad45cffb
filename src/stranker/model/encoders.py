"""Image and gene branches, and the projection/regression heads."""

from __future__ import annotations

import torch
from torch import nn

from .augment import dihedral
from .backbones import apply_freeze, create_backbone, lookup, pixel_stats
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


class ImageBranch(nn.Module):
    """Image branch: a backbone and stain statistics -> embedding and expression.

    Backbone over the first ``cnn_scales`` scales (shared weights) + stain statistics of every
    scale -> embedding and expression. ``freeze``: ``True``, ``False``, ``'last:N'`` or ``None`` (frozen
    for the foundation models of the registry); ``download``: fetch weights missing from the cache.
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
        freeze: bool | str | None = None,
        download: bool = False,
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
            self.backbone, self.weights_source = create_backbone(backbone, weights, pretrained, download)
            if freeze is None:  # foundation models of the registry stay frozen unless asked
                spec = lookup(backbone)
                freeze = spec is not None and spec.frozen
            self.frozen = apply_freeze(self.backbone, freeze)
            mean, std = pixel_stats(self.backbone)
            self.register_buffer("pix_mean", mean)
            self.register_buffer("pix_std", std)
            d_img = self.backbone.num_features * self.cnn_scales
        else:
            self.backbone, self.weights_source, self.frozen = None, "features", False
            d_img = feature_dim
        d_stain = N_STAIN * n_scales if self.use_stain else 0
        self.register_buffer("stain_mean", torch.zeros(d_stain))
        self.register_buffer("stain_std", torch.ones(d_stain))
        self.register_buffer("feat_mean", torch.zeros(d_img if feature_dim else 0))
        self.register_buffer("feat_std", torch.ones(d_img if feature_dim else 0))
        self.proj = ProjectionHead(d_img + d_stain, embed_dim, dropout)
        d_head = d_img + d_stain if head_on == "features" else embed_dim + d_stain
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_head, n_genes))

    def train(self, mode: bool = True) -> ImageBranch:
        """Set training mode; a wholly frozen backbone stays in eval mode (its norm statistics too)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

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
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
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

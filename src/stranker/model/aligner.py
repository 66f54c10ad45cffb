"""The image-gene aligner: student and EMA-teacher image branches, gene branch, all loss terms."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .augment import JITTER_LEVELS
from .config import Config, finish_epochs
from .encoders import GeneBranch, ImageBranch, SpotContext


class Aligner(nn.Module):
    """Everything trainable of a stranker model (pure torch: it never sees AnnData)."""

    def __init__(
        self, cfg: Config, n_genes: int, feature_dim: int | None = None, download: bool = False
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = ImageBranch(
            n_genes, backbone=cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained,
            n_scales=len(cfg.scales), cnn_scales=cfg.cnn_scales, use_stain=cfg.use_stain,
            embed_dim=cfg.embed_dim, dropout=cfg.dropout,
            feature_dim=feature_dim, probe_only=cfg.probe_only, head_on=cfg.head_on, freeze=cfg.freeze,
            download=download, stain_norm=cfg.stain_norm,
        )
        # a wholly frozen backbone is shared by student and teacher (a foundation model held once)
        def shared() -> dict:  # a fresh memo for each copy (deepcopy fills it)
            return {id(self.student.backbone): self.student.backbone} if self.student.frozen else {}

        self.teacher = copy.deepcopy(self.student, memo=shared()).requires_grad_(False)
        context = (
            SpotContext(cfg.embed_dim, cfg.context_layers, cfg.context_heads, cfg.position_bins, cfg.dropout)
            if cfg.spot_context else None
        )
        self.gene = GeneBranch(n_genes, hidden=cfg.gene_hidden, embed_dim=cfg.embed_dim, dropout=cfg.dropout,
                               context=context)
        # with a sharp finish: the teacher as resolution jitter left it, for slides coarser than the training
        self.coarse = (
            copy.deepcopy(self.student, memo=shared()).requires_grad_(False) if finish_epochs(cfg) else None
        )

    def branch_for(self, coarser: float) -> ImageBranch:
        """Return the image branch that reads a slide with ``coarser`` times less detail than the training's.

        Without a sharp finish, the teacher. With one, the teacher (finished on sharp patches) up to half
        a step of the resolution jitter in log scale (``resolution_jitter ** (1 / 8)``, 1.15 at 3), and
        beyond it the teacher as the jitter left it (:attr:`coarse`), which has seen such patches.
        """
        if self.coarse is None or coarser <= self.cfg.resolution_jitter ** (1 / (2 * JITTER_LEVELS)):
            return self.teacher
        return self.coarse

    @property
    def weights_source(self) -> str:
        """Where the student's backbone weights came from."""
        return self.student.weights_source

    def loss_terms(self) -> list[str]:
        """Return the names of the loss terms with a positive weight."""
        c = self.cfg
        terms = [
            ("regression", c.w_regression), ("corr", c.w_corr), ("clip", c.w_clip), ("rank", c.w_rank),
            ("distill", c.w_distill), ("consistency", c.w_consistency),
        ]
        return [t for t, w in terms if w > 0]

    def training_losses(
        self, strong: torch.Tensor, weak: torch.Tensor | None, expr: torch.Tensor, pos: torch.Tensor | None,
        *, gather: Callable[[torch.Tensor], torch.Tensor] | None = None, local_weight: float = 1.0,
        unlabeled: tuple[torch.Tensor, torch.Tensor] | None = None, unlabeled_weight: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """All loss terms of one batch (spots of one section) and their weighted ``total``.

        Under distributed training the inputs are this process's share of the batch, ``gather``
        concatenates a tensor over all processes (with gradient), so the gene branch, InfoNCE and
        ranking terms see the whole batch; the per-spot terms (regression, distillation) are scaled
        by ``local_weight`` (share of the batch times world size), so that the gradient averaged
        over processes is the gradient of the whole batch.

        ``unlabeled``: a strong and a weak view of patches without expression (``w_consistency``):
        the student reads the strong view in the same forward pass as ``strong`` (one batch for
        batch-norm), the teacher the weak view, and the ``consistency`` term asks the student's
        predicted expression to match the teacher's (scaled by ``unlabeled_weight`` as above).
        """
        c = self.cfg
        n = strong.shape[0]
        if unlabeled is not None:
            emb, pred = self.student(torch.cat([strong, unlabeled[0]]))
            emb, pred, pred_u = emb[:n], pred[:n], pred[n:]
        else:
            emb, pred = self.student(strong)
        out: dict[str, torch.Tensor] = {}
        if c.w_regression > 0:
            out["regression"] = losses.regression(pred, expr) * local_weight
        if gather is not None:
            if c.w_corr > 0:  # a correlation over the whole batch
                pred = gather(pred)
            emb_l, emb, expr = emb, gather(emb), gather(expr)
            pos = gather(pos) if pos is not None else None
        else:
            emb_l = emb
        if c.w_corr > 0:
            out["corr"] = losses.gene_correlation(pred, expr)
        need_gene = c.w_clip > 0 or (c.w_rank > 0 and c.rank_reference == "gene")
        g = self.gene(expr, pos) if need_gene else None
        if c.w_clip > 0:
            out["clip"] = losses.info_nce(emb.float(), g.float(), c.temperature)
        if c.w_rank > 0:
            ref = g if c.rank_reference == "gene" else expr
            out["rank"] = losses.rank_consistency(emb, ref, c.rank_temperature, c.rank_mode)
        if c.w_distill > 0 and weak is not None:
            with torch.no_grad():
                t_emb, _ = self.teacher(weak)
            out["distill"] = losses.distillation(emb_l, t_emb) * local_weight
        if unlabeled is not None:
            with torch.no_grad():
                _, t_pred = self.teacher(unlabeled[1])
            out["consistency"] = losses.consistency(pred_u, t_pred) * unlabeled_weight
        weights = {
            "regression": c.w_regression, "corr": c.w_corr, "clip": c.w_clip, "rank": c.w_rank,
            "distill": c.w_distill, "consistency": c.w_consistency,
        }
        out["total"] = sum(weights[k] * v for k, v in out.items())
        return out

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        """EMA of the student's weights (decay ramps up over the first steps)."""
        d = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        pairs = [(t, s) for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True)
                 if t is not s]  # a shared frozen backbone stays exactly as it is
        t_params, s_params = [t for t, _ in pairs], [s for _, s in pairs]
        torch._foreach_mul_(t_params, d)
        torch._foreach_add_(t_params, s_params, alpha=1 - d)
        for tb, sb in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
            tb.copy_(sb)


@torch.no_grad()
def retrieve(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, chunk: int = 4096
) -> torch.Tensor:
    """Inverse-distance weighted mean of ``values`` of the ``k`` keys nearest each query (cosine space).

    Processed in chunks of queries, so memory stays bounded for any number of spots.
    """
    k = min(k, len(keys))
    kn = F.normalize(keys.float(), dim=1)
    out = torch.empty(len(query), values.shape[1], device=values.device, dtype=torch.float32)
    for start in range(0, len(query), chunk):
        q = F.normalize(query[start : start + chunk].float(), dim=1)
        sim, idx = (q @ kn.T).topk(k, dim=1)
        dist = (2 - 2 * sim).clamp_min(0).sqrt()
        w = 1.0 / (dist + 1e-3)
        w = w / w.sum(1, keepdim=True)
        out[start : start + chunk] = torch.einsum("qk,qkg->qg", w, values[idx].float())
    return out

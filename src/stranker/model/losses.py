"""Every loss term, one function each."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised ``a`` and ``b``; row i of each is a positive pair."""
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def rank_consistency(
    img: torch.Tensor, ref: torch.Tensor, temperature: float = 0.1, mode: str = "listwise"
) -> torch.Tensor:
    """Cross-modal ranking consistency: image-image similarities must order spots as ``ref`` does.

    Parameters
    ----------
    img
        ``(b, d)`` image embeddings (gradients flow here).
    ref
        ``(b, g)`` reference vectors of the same spots (expression or gene embeddings; detached).
    temperature
        Softness of the rankings.
    mode
        ``'listwise'``: for each anchor, KL divergence from the softmax over the reference
        similarities to the softmax over the image similarities (all other spots, O(b^2)).
        ``'pairwise'``: every triple (anchor, j, k) whose reference order is j > k adds
        ``softplus(-(s_ij - s_ik) / temperature)`` (O(b^3), the full form of RankByGene's
        sampled pairs).
    """
    b = img.shape[0]
    if b < 3:
        return img.sum() * 0.0
    zi = F.normalize(img.float(), dim=1)
    zr = F.normalize(ref.float().detach(), dim=1)
    si, sr = zi @ zi.T, zr @ zr.T
    eye = torch.eye(b, dtype=torch.bool, device=img.device)
    if mode == "listwise":
        si = si.masked_fill(eye, -1e4) / temperature
        sr = sr.masked_fill(eye, -1e4) / temperature
        return F.kl_div(F.log_softmax(si, 1), F.log_softmax(sr, 1), log_target=True, reduction="batchmean")
    if mode == "pairwise":
        dr = sr[:, :, None] - sr[:, None, :]  # (i, j, k): ref says j above k when > 0
        di = si[:, :, None] - si[:, None, :]
        valid = (dr > 0) & ~eye[:, :, None] & ~eye[:, None, :]
        w = dr.clamp_min(0)  # larger reference gaps count more
        loss = F.softplus(-di / temperature) * w
        return loss[valid].sum() / w[valid].sum().clamp_min(1e-8)
    raise ValueError(f"rank mode must be 'listwise' or 'pairwise', got {mode!r}")


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between student embeddings and the (detached) EMA teacher's."""
    return (1 - F.cosine_similarity(student.float(), teacher.float().detach(), dim=1)).mean()


def gene_correlation(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - Pearson r between predicted and measured expression of each gene over the batch's spots.

    Averaged over genes. A batch holds spots of one section, so the term asks each gene's predicted
    order of spots within a section to follow its measured order, blind to the section's level and
    scale (what the per-gene Pearson r of a held-out section scores). Genes constant in the batch
    count as r = 0.
    """
    if pred.shape[0] < 3:
        return pred.sum() * 0.0
    p = pred.float() - pred.float().mean(0)
    t = target.float() - target.float().mean(0)
    r = (p * t).sum(0) / (p.norm(dim=0) * t.norm(dim=0) + eps)
    return 1 - r.mean()


def consistency(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the student's predicted expression and the (detached) teacher's.

    The mean-teacher term (Tarvainen & Valpola 2017) on patches without measured expression.
    """
    return F.mse_loss(student.float(), teacher.float().detach())


def regression(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error on standardised expression."""
    return F.mse_loss(pred.float(), target.float())

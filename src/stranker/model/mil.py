"""Gated-attention multiple-instance learning over the tiles of a slide (pure torch).

Ilse, Tomczak & Welling, "Attention-based deep multiple instance learning", ICML 2018: each tile
embedding ``h_k`` gets a weight ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`` and the slide
is ``z = sum_k a_k h_k``, read out by a linear layer: one risk score (Cox partial likelihood) or
class logits (cross-entropy). Bags of different sizes are padded and masked so that a whole
cohort goes through in one batched step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class GatedAttentionMIL(nn.Module):
    """Gated-attention pooling of a bag of tile embeddings, then a linear read-out.

    Parameters
    ----------
    in_dim
        Size of a tile embedding.
    n_out
        1 for a risk score, the number of classes for classification.
    hidden
        Width of the tile projection (``h_k = ReLU(W x_k)``).
    attn_dim
        Width of the attention branches ``V`` and ``U``.
    dropout
        Dropout on the projected tiles.
    """

    def __init__(
        self, in_dim: int, n_out: int = 1, hidden: int = 64, attn_dim: int = 32, dropout: float = 0.25
    ):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attn_dim)
        self.attn_u = nn.Linear(hidden, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return outputs ``(b, n_out)``, attention ``(b, n)`` and pooled bags ``(b, hidden)``.

        ``x`` is ``(b, n, in_dim)`` padded bags, ``mask`` ``(b, n)`` true on real tiles.
        """
        h = self.project(x)
        logits = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        logits = logits.masked_fill(~mask, float("-inf"))
        a = torch.softmax(logits, dim=1)
        z = torch.einsum("bn,bnd->bd", a, h)
        return self.head(z), a, z


def pad_bags(bags: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of ``(n_i, d)`` arrays -> padded float tensor ``(b, max n_i, d)`` and boolean mask."""
    if any(len(b) == 0 for b in bags):
        raise ValueError("Every bag needs at least one tile.")
    n = max(len(b) for b in bags)
    d = bags[0].shape[1]
    x = np.zeros((len(bags), n, d), dtype=np.float32)
    mask = np.zeros((len(bags), n), dtype=bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events.

    ``risk`` ``(b,)`` log-hazards, ``time`` ``(b,)``, ``event`` ``(b,)`` bool.
    """
    order = torch.argsort(time, descending=True)
    r, t, e = risk[order], time[order], event[order]
    lse = torch.logcumsumexp(r, dim=0)  # log-sum over {j: t_j >= t_i} up to ties
    # with ties, the risk set of every tied subject includes all of them: take the group's last position
    last = torch.searchsorted(-t, -t, right=True) - 1
    lse = lse[last]
    n_events = e.sum().clamp(min=1)
    return -((r - lse) * e).sum() / n_events


def train_mil(
    bags: Sequence[np.ndarray],
    target: np.ndarray,
    *,
    task: str,
    event: np.ndarray | None = None,
    n_classes: int = 2,
    epochs: int = 150,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
    **kwargs,
) -> GatedAttentionMIL:
    """Fit a :class:`GatedAttentionMIL` on whole-cohort batches (the cohorts are small).

    Parameters
    ----------
    bags
        One ``(n_tiles, d)`` array per slide (already standardised).
    target
        Survival times (``task='cox'``) or integer class codes (``task='ce'``).
    task
        ``'cox'`` (partial likelihood; needs ``event``) or ``'ce'`` (cross-entropy).
    event
        Event indicators for ``'cox'``.
    n_classes
        Number of classes for ``'ce'``.
    epochs, lr, weight_decay
        Full-batch AdamW steps, learning rate and weight decay.
    seed
        Seed of the initialisation and dropout.
    **kwargs
        Passed to :class:`GatedAttentionMIL`.
    """
    if task not in ("cox", "ce"):
        raise ValueError(f"`task` must be 'cox' or 'ce', got {task!r}.")
    gen_state, n_threads = torch.random.get_rng_state(), torch.get_num_threads()
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a network this small runs fastest on one thread; more only contend
    try:
        x, mask = pad_bags(bags)
        net = GatedAttentionMIL(x.shape[2], 1 if task == "cox" else n_classes, **kwargs)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        if task == "cox":
            if event is None:
                raise ValueError("`event` is needed for task='cox'.")
            t = torch.as_tensor(np.asarray(target, dtype=np.float32))
            e = torch.as_tensor(np.asarray(event, dtype=bool))
        else:
            y = torch.as_tensor(np.asarray(target, dtype=np.int64))
        net.train()
        for _ in range(epochs):
            out, _, _ = net(x, mask)
            loss = cox_loss(out[:, 0], t, e) if task == "cox" else nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
    finally:
        torch.random.set_rng_state(gen_state)
        torch.set_num_threads(n_threads)
    return net


@torch.no_grad()
def predict_mil(
    net: GatedAttentionMIL, bags: Sequence[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Return outputs ``(b, n_out)``, per-bag attention weights and pooled vectors of a trained network."""
    x, mask = pad_bags(bags)
    net.eval()
    out, a, z = net(x, mask)
    att = [a[i, : len(b)].numpy() for i, b in enumerate(bags)]
    return out.numpy(), att, z.numpy()

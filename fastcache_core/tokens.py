"""Spatial token selection by saliency, token gather/scatter, and k-NN density token merging.

Everything here works on image tokens of shape (rows, tokens, width), one sample per row: no
operation mixes tokens of different rows, and none loops over tokens in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def relative_token_change(current: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Saliency ``S_i = ||X_t^i - X_{t-1}^i||^2`` and the squared norm ``||X_{t-1}^i||^2`` per token, (rows, N)."""
    diff = (current - previous).float()
    return (diff * diff).sum(-1), previous.float().pow(2).sum(-1)


def motion_token_count(
    saliency: torch.Tensor,
    previous_norm_sq: torch.Tensor,
    threshold: float,
    fraction: float,
    granularity: int,
) -> int:
    """How many of one sample's tokens to compute (``saliency`` summed over its guidance rows, (N,)).

    A token is static when its relative change ``sqrt(S_i / ||X_{t-1}^i||^2)`` is below ``threshold``;
    ``fraction < 1`` instead keeps exactly that share of tokens. The count is rounded up to a multiple
    of ``granularity`` so that samples with similar counts can share a batched block call.
    """
    n = saliency.shape[-1]
    if fraction < 1.0:
        count = math.ceil(fraction * n)
    elif threshold > 0.0:
        relative_sq = saliency / previous_norm_sq.clamp_min(1e-12)
        count = int((relative_sq >= threshold * threshold).sum())
    else:
        return n
    count = max(granularity, math.ceil(count / granularity) * granularity)
    return min(n, count)


def top_tokens(saliency: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` most salient tokens, in ascending position order, shape (count,)."""
    return torch.topk(saliency, count, sorted=False).indices.sort().values


def gather_tokens(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[r, positions[r]]`` for every row: (rows, N, D), (rows, k) -> (rows, k, D)."""
    return x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(base: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` with ``values`` written at ``positions`` of each row."""
    return base.scatter(1, positions.unsqueeze(-1).expand(-1, -1, base.shape[-1]), values)


@dataclass
class TokenMerge:
    """How one batch of rows was merged: enough to unmerge.

    ``kept``: (rows, n - r) indices of the kept tokens into the merged input, ascending;
    ``slot``: (rows, n) index of each input token's kept representative in the merged set;
    ``sizes``: (rows, n - r) how many input tokens each merged token stands for.
    """

    kept: torch.Tensor
    slot: torch.Tensor
    sizes: torch.Tensor | None = None


def knn_merge(x: torch.Tensor, merge_count: int, neighbors: int) -> tuple[torch.Tensor, TokenMerge]:
    """Merge the ``merge_count`` densest tokens of each row into their most similar kept token.

    Density is the mean cosine similarity to a token's ``neighbors`` nearest tokens (k-NN density):
    tokens in dense regions are redundant. Each merged token is averaged into its most similar kept
    token of the *same row*. Returns the merged tokens, (rows, n - merge_count, D), and the merge.
    """
    rows, n, _ = x.shape
    r = min(merge_count, n - 1)
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # (rows, n, n), per row only
    sim.diagonal(dim1=1, dim2=2).fill_(-2.0)
    k = min(neighbors, n - 1)
    density = sim.topk(k, dim=-1).values.mean(-1)  # (rows, n)
    sources = density.topk(r, dim=-1).indices  # (rows, r)
    is_source = torch.zeros(rows, n, dtype=torch.bool, device=x.device).scatter(1, sources, True)
    order = torch.arange(n, device=x.device).expand(rows, n) + is_source.long() * n
    kept = order.argsort(dim=1)[:, : n - r].sort(dim=1).values  # (rows, n - r)
    # every token's representative: itself when kept, its most similar kept token when merged
    sim_to_kept = sim.masked_fill(is_source.unsqueeze(1), -3.0)
    nearest_kept = sim_to_kept.argmax(-1)  # (rows, n)
    return _average_into(x, is_source, kept, nearest_kept)


def _average_into(
    x: torch.Tensor, is_source: torch.Tensor, kept: torch.Tensor, representative: torch.Tensor
) -> tuple[torch.Tensor, TokenMerge]:
    """Average every source token (``is_source``, (rows, n)) into its ``representative`` (an index into
    ``x`` of a kept token, (rows, n)); ``kept``: the kept tokens' indices, ascending, (rows, n - r)."""
    rows, n, _ = x.shape
    left = kept.shape[1]
    rank_of = torch.full((rows, n), -1, dtype=torch.long, device=x.device)
    rank_of.scatter_(1, kept, torch.arange(left, device=x.device).expand(rows, left))
    slot = torch.where(is_source, rank_of.gather(1, representative), rank_of)
    sums = torch.zeros(rows, left, x.shape[-1], dtype=x.dtype, device=x.device)
    sums.scatter_add_(1, slot.unsqueeze(-1).expand_as(x), x)
    counts = torch.zeros(rows, left, dtype=x.dtype, device=x.device)
    counts.scatter_add_(1, slot, torch.ones(rows, n, dtype=x.dtype, device=x.device))
    return sums / counts.unsqueeze(-1), TokenMerge(kept=kept, slot=slot, sizes=counts)


def static_bipartite_merge(
    x: torch.Tensor, saliency: torch.Tensor, merge_count: int
) -> tuple[torch.Tensor, TokenMerge]:
    """ToMe-style bipartite merging within each row's static tokens.

    The ``4 * merge_count`` least salient tokens of a row (``saliency``, (rows, n): the relative change
    since the last real compute) are the candidates; alternate ones by saliency form sets A and B, each A
    token finds its most similar B token (cosine), and the ``merge_count`` A tokens with the most similar
    partners are averaged into them. Moving tokens never merge. Returns the merged tokens and the merge,
    whose ``sizes`` give attention its proportional weights.
    """
    rows, n, _ = x.shape
    r = min(merge_count, n // 2)
    candidates = saliency.topk(min(n, 4 * r), dim=1, largest=False).indices  # least salient first
    a, b = candidates[:, 0::2], candidates[:, 1::2]
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = gather_tokens(unit, a) @ gather_tokens(unit, b).transpose(1, 2)  # (rows, |A|, |B|)
    best, partner = sim.max(-1)
    chosen = best.topk(r, dim=1).indices  # the A tokens with the most similar partners
    sources = a.gather(1, chosen)
    targets = b.gather(1, partner.gather(1, chosen))
    is_source = torch.zeros(rows, n, dtype=torch.bool, device=x.device).scatter(1, sources, True)
    representative = torch.arange(n, device=x.device).expand(rows, n).scatter(1, sources, targets)
    order = torch.arange(n, device=x.device).expand(rows, n) + is_source.long() * n
    kept = order.argsort(dim=1)[:, : n - r].sort(dim=1).values
    return _average_into(x, is_source, kept, representative)


def knn_unmerge(
    merged_out: torch.Tensor, merged_in: torch.Tensor, x_in: torch.Tensor, merge: TokenMerge
) -> torch.Tensor:
    """Give every input token its own input plus its representative's residual: (rows, n, D).

    ``out_i = x_i + (y_s - m_s)`` where ``s`` is token ``i``'s representative, ``m_s`` its merged input
    and ``y_s`` its output. Kept tokens that absorbed nothing get exactly ``y_s``.
    """
    residual = merged_out - merged_in
    return x_in + residual.gather(1, merge.slot.unsqueeze(-1).expand(-1, -1, residual.shape[-1]))

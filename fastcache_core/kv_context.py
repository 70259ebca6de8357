"""Keys and values of the tokens a token refresh leaves out: the attention context, kept per block.

A *token refresh* (``token_refresh.py``) runs the block stack on a share of a sample's image tokens
only. The other tokens must still serve as keys and values of every self-attention: measured on the
canvas model, dropping them from the context costs 16-18 dB (docs/method.md, section 4).
``ContextAttention`` is an attention processor installed on each block's self-attention. It keeps, per
block and batch-row slot (``state.RowPool``: per sample, never shared between rows), the projected
keys and values of every image token from the sample's last real compute, and has three modes, set by
``KVContext`` around a block call:

* off: the processor it replaced runs unchanged (identical output);
* record: plain self-attention over all tokens, and the keys and values are stored for the rows' slots;
* refresh: the rows hold only the refreshed tokens (``positions``, per row); their fresh keys and values
  are written into the cached ones, and their queries attend over all ``N`` tokens;
* proportional: the rows hold merged tokens, and a key standing for ``s`` tokens gets ``log s`` added
  to its attention logits (ToMe's proportional attention), as if its ``s`` tokens were all there.

Text tokens never pass through these processors (DiT has none; PixArt's reach the blocks through the
cross-attention, which stays as it is).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcache_core.state import RowPool, gather_rows, write_rows

RECORD, REFRESH, PROPORTIONAL = "record", "refresh", "proportional"


class KVContext:
    """The shared switch of every ``ContextAttention`` of one cache: mode, rows and refreshed positions."""

    def __init__(self, pool: RowPool) -> None:
        self.pool = pool
        self.mode: str | None = None
        self.slots: torch.Tensor | None = None
        """Pool slots of the rows of the block call in progress, (R,)."""
        self.positions: torch.Tensor | None = None
        """Refresh mode: the refreshed token positions of each row, (R, k), ascending."""
        self.tokens = 0
        """Refresh mode: the sample's full image-token count ``N``."""
        self.time_scale: torch.Tensor | None = None
        """Forecast context only. Record mode: ``1 / (t - t_prev)`` per row (0 without an earlier
        compute), for the keys' and values' slopes; refresh mode: ``t - t_last`` per row."""
        self._installed: list[tuple[nn.Module, Any]] = []

    @property
    def installed(self) -> bool:
        return bool(self._installed)

    def install(self, attentions: list[nn.Module]) -> None:
        """Put a ``ContextAttention`` on each block's self-attention (once; :meth:`uninstall` undoes it)."""
        if self._installed:
            return
        for block, attention in enumerate(attentions):
            previous = attention.processor
            attention.__dict__["processor"] = ContextAttention(self, block, previous)
            self._installed.append((attention, previous))

    def uninstall(self) -> None:
        """Give every self-attention its previous processor back."""
        for attention, previous in self._installed:
            attention.__dict__["processor"] = previous
        self._installed.clear()

    @contextmanager
    def recording(self, slots: torch.Tensor, inverse_gap: torch.Tensor | None = None) -> Iterator[None]:
        """Within: full-token block calls of rows ``slots`` store their keys and values (and, given
        ``inverse_gap``, their slopes since the rows' previous record)."""
        self.mode, self.slots, self.time_scale = RECORD, slots, inverse_gap
        try:
            yield
        finally:
            self.mode, self.slots, self.time_scale = None, None, None

    @contextmanager
    def refreshing(
        self, slots: torch.Tensor, positions: torch.Tensor, tokens: int, since: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Within: block calls hold only the tokens at ``positions`` of rows ``slots`` (of ``tokens``).
        Given ``since`` (time since the record, per row), the others' keys and values are extrapolated
        along their slopes and the fresh ones are not kept; else the fresh ones replace the kept ones."""
        self.mode, self.slots, self.positions, self.tokens = REFRESH, slots, positions, tokens
        self.time_scale = since
        try:
            yield
        finally:
            self.mode, self.slots, self.positions, self.tokens, self.time_scale = None, None, None, 0, None

    @contextmanager
    def proportional(self, sizes: torch.Tensor) -> Iterator[None]:
        """Within: block calls hold merged tokens, each standing for ``sizes`` (rows, n') tokens."""
        self.mode, self.time_scale = PROPORTIONAL, sizes.log()[:, None, None, :]
        try:
            yield
        finally:
            self.mode, self.time_scale = None, None

    def cached(self, block: int, which: str, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """The pool tensor of block ``block``'s keys or values, (capacity, tokens, inner)."""
        return self.pool.get(f"kv.{block}.{which}", (tokens, like.shape[-1]), like.dtype, like.device)

    def context(self, block: int, which: str, fresh: torch.Tensor) -> torch.Tensor:
        """Record mode: store ``fresh`` (R, N, inner) and return it. Refresh mode: write ``fresh``
        (R, k, inner) into the cache at the refreshed positions and return all N tokens, (R, N, inner)."""
        assert self.slots is not None
        scale = None if self.time_scale is None else self.time_scale.view(-1, 1, 1).to(fresh.dtype)
        if self.mode == RECORD:
            pool = self.cached(block, which, fresh.shape[1], fresh)
            if scale is not None:
                slope = (fresh - gather_rows(pool, self.slots, None)) * scale
                write_rows(self.cached(block, which + ".slope", fresh.shape[1], fresh), self.slots, None, slope)
            write_rows(pool, self.slots, None, fresh)
            return fresh
        assert self.positions is not None
        pool = self.cached(block, which, self.tokens, fresh)
        if scale is None:
            write_rows(pool, self.slots, self.positions, fresh)
            return gather_rows(pool, self.slots, None)
        slope = gather_rows(self.cached(block, which + ".slope", self.tokens, fresh), self.slots, None)
        context = torch.addcmul(gather_rows(pool, self.slots, None), scale, slope)
        index = self.positions.unsqueeze(-1).expand(-1, -1, fresh.shape[-1])
        return context.scatter(1, index, fresh)


class ContextAttention:
    """Self-attention processor that keeps the keys and values of tokens left out of a call (see the
    module docstring). Off, it calls the processor it replaced."""

    def __init__(self, context: KVContext, block: int, wrapped: Any) -> None:
        self.context = context
        self.block = block
        self.wrapped = wrapped

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        context = self.context
        if context.mode is None or encoder_hidden_states is not None:
            if temb is not None:
                kwargs["temb"] = temb
            result: torch.Tensor = self.wrapped(
                attn,
                hidden_states,
                *args,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
            return result
        if attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None:
            raise ValueError("token refresh supports plain, unmasked self-attention on (B, N, D) tokens")
        # the steps of diffusers' AttnProcessor2_0, so record mode equals it exactly
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        bias = None
        if context.mode == PROPORTIONAL:
            key, value, bias = attn.to_k(hidden_states), attn.to_v(hidden_states), context.time_scale
        else:
            key = context.context(self.block, "key", attn.to_k(hidden_states))
            value = context.context(self.block, "value", attn.to_v(hidden_states))
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if bias is not None:
            bias = bias.to(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        scaled: torch.Tensor = out / attn.rescale_output_factor
        return scaled

"""``python -m bench.token_cost``: what one DiT block costs as tokens grow, and what a token refresh saves.

On a random-weight ``DiTTransformer2DModel`` block (no download; width and heads as given), for each
token count ``N``, one block call on 2 rows (a guided pair):

* ``attention_share``: the share of the block's MACs in the attention scores and weighted sum
  (``scaled_dot_product_attention``), counted by torch's FLOP counter; the rest is linear layers;
* ``refresh_mac_fraction``: MACs of a refresh of ``fraction`` of the tokens, their queries over all N
  keys and values (``kv_context.ContextAttention``), against the full call;
* ``selection_mac_fraction``: the same tokens without the others as context (token selection);
* ``*_seconds`` (median of ``--repeats``): the full call, the full call recording keys and values, the
  refresh (gathers, key/value writes and the scatter of the output included); and ``refresh_overhead``
  = refresh seconds / (full seconds x refresh MAC fraction) - 1: how far wall-clock strays from MACs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from fastcache_core.kv_context import KVContext
from fastcache_core.state import RowPool
from fastcache_core.stats import flop_counter
from fastcache_core.tokens import gather_tokens, scatter_tokens


def _macs(fn: Callable[[], Any]) -> tuple[float, float]:
    """(all MACs, attention MACs) of ``fn``."""
    with flop_counter() as counter:
        fn()
    total = counter.get_total_flops() / 2.0
    attention = sum(v for k, v in counter.get_flop_counts().get("Global", {}).items() if "attention" in str(k)) / 2.0
    return total, attention


def _seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.no_grad()
def measure(tokens: int, width: int, heads: int, fraction: float, repeats: int) -> dict[str, Any]:
    from diffusers import DiTTransformer2DModel

    side = int(round((tokens) ** 0.5)) * 2
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        sample_size=side,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()
    block = model.transformer_blocks[0]
    rows = 2
    x = torch.randn(rows, tokens, width)
    kwargs = {"timestep": torch.full((rows,), 500), "class_labels": torch.tensor([3, 1000])}
    count = max(1, int(round(fraction * tokens)))
    positions = torch.stack([torch.randperm(tokens)[:count].sort().values for _ in range(rows)])
    selected = gather_tokens(x, positions)
    pool = RowPool()
    slots = torch.tensor([pool.acquire() for _ in range(rows)])
    context = KVContext(pool)
    context.install([block.attn1])

    def full() -> torch.Tensor:
        return block(x, **kwargs)

    def record() -> torch.Tensor:
        with context.recording(slots):
            return block(x, **kwargs)

    def refresh() -> torch.Tensor:
        chosen = gather_tokens(x, positions)
        with context.refreshing(slots, positions, tokens):
            out = block(chosen, **kwargs)
        return scatter_tokens(x, positions, out)

    def selection() -> torch.Tensor:
        return block(selected, **kwargs)

    record()
    full_macs, attention_macs = _macs(full)
    refresh_macs, _ = _macs(refresh)
    selection_macs, _ = _macs(selection)
    full_s, record_s, refresh_s = (_seconds(f, repeats) for f in (full, record, refresh))
    context.uninstall()
    refresh_fraction = refresh_macs / full_macs
    return {
        "tokens": tokens,
        "width": width,
        "fraction": fraction,
        "block_gmacs": round(full_macs / 1e9, 4),
        "attention_share": round(attention_macs / full_macs, 4),
        "refresh_mac_fraction": round(refresh_fraction, 4),
        "selection_mac_fraction": round(selection_macs / full_macs, 4),
        "full_seconds": round(full_s, 5),
        "record_seconds": round(record_s, 5),
        "refresh_seconds": round(refresh_s, 5),
        "refresh_overhead": round(refresh_s / (full_s * refresh_fraction) - 1.0, 3),
        "record_overhead": round(record_s / full_s - 1.0, 3),
        "kv_bytes_per_row_per_block": 2 * tokens * width * 4,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m bench.token_cost", description=__doc__)
    parser.add_argument("--tokens", default="256,1024,4096")
    parser.add_argument("--width", type=int, default=128, help="block width (the bundled models: 128)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        row = measure(tokens, args.width, args.heads, args.fraction, args.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    return rows


if __name__ == "__main__":
    main()

"""``python -m bench.refresh_diagnosis``: where a token refresh's error comes from (research, not a benchmark).

At every refresh step of a run, the same rows also run the whole stack on every token (the true
output ``Y`` at that step's input), and three relative errors are recorded, each over the output
projection (what the sampler integrates), summed over the refreshing samples:

* ``forecast_on_refreshed``: the forecast's error on the tokens the refresh picks (what it could remove);
* ``refresh_on_refreshed``: the refreshed outputs' error on the same tokens (stale keys and values of
  the others, or their extrapolation, make it nonzero);
* ``forecast_on_rest``: the forecast's error on the tokens left out (what stays);
* ``picked_share``: the share of the forecast's squared error held by the picked tokens.

Tuning seeds (20000 and up) by default.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from bench.cache.runner import ImageRunner, bench_pipeline, load_pipeline
from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache
from fastcache_core.token_refresh import TokenRefresh
from fastcache_core.tokens import gather_tokens


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.refresh_diagnosis", description=__doc__)
    parser.add_argument("--model", default="models/canvas-dit")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=20000)
    parser.add_argument("--tolerance", type=float, default=0.239)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--context", default="kept")
    parser.add_argument("--score", default="forecast_error")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = bench_pipeline(load_pipeline(args.model, "cpu", torch.float32))
    config = FastCacheConfig(
        params=CacheParams(method="fastcache", tolerance=args.tolerance, refresh_fraction=args.fraction),
        refresh_score=args.score,
        refresh_context=args.context,
    )
    handle = apply_fastcache(pipe.transformer, config)
    runner = handle._runner
    projection = runner.adapter.output_projection(pipe.transformer)
    sums = {"forecast_on_refreshed": 0.0, "refresh_on_refreshed": 0.0, "forecast_on_rest": 0.0, "total_sq": 0.0}
    original = TokenRefresh.run
    seen: list[dict[str, float]] = []

    def diagnosed(self: TokenRefresh, step: Any, call: Any, members: Any, rows: Any, image: Any, text: Any, slots: Any):
        index = runner.indices.rows(rows, image)
        x = image if index is None else image.index_select(0, index)
        row_slots = slots if index is None else slots.index_select(0, index)
        times = step.times if index is None else step.times.index_select(0, index)
        forecast = runner.history.forecast(row_slots, times, runner.gains(step, rows, x), x)
        scores = self._scores(x, row_slots, forecast)
        true, _ = runner.blocks_run(call, index, x, None, None, 0)
        part, counts = original(self, step, call, members, rows, image, text, slots)
        count = next(iter(counts.values()))
        local = {r: i for i, r in enumerate(rows)}
        by_row = {}
        for k in members:
            mine = [local[r] for r in step.sample_rows[k]]
            chosen = scores[mine].sum(0).topk(count).indices.sort().values
            by_row.update({i: chosen for i in mine})
        positions = torch.stack([by_row[i] for i in range(len(rows))])
        w = projection.detach().float()

        def sq(a: torch.Tensor) -> torch.Tensor:
            return ((a.float() @ w.T) ** 2).sum((-1, -2))

        rest = torch.ones_like(scores, dtype=torch.bool).scatter(1, positions, False)
        f_err = forecast - true
        picked = {
            "forecast_on_refreshed": float(sq(gather_tokens(f_err, positions)).sum()),
            "refresh_on_refreshed": float(sq(gather_tokens(part.image - true, positions)).sum()),
            "forecast_on_rest": float(sq(f_err * rest[..., None]).sum()),
            "total_sq": float(sq(true).sum()),
        }
        for key, value in picked.items():
            sums[key] += value
        seen.append(picked)
        return part, counts

    TokenRefresh.run = diagnosed  # type: ignore[method-assign]
    try:
        gen = ImageRunner(
            labels=[i % 10 for i in range(args.samples)],
            seeds=[args.seed + i for i in range(args.samples)],
            steps=50,
            guidance=4.0,
            batch_size=args.samples,
            device="cpu",
        )
        gen.run(pipe, handle=handle)
    finally:
        TokenRefresh.run = original  # type: ignore[method-assign]
        handle.remove()
    total = sums["total_sq"]
    result = {
        "settings": vars(args),
        "refresh_steps": len(seen),
        "relative_error": {k: round((v / total) ** 0.5, 5) for k, v in sums.items() if k != "total_sq"},
        "picked_share_of_forecast_sq_error": round(
            sums["forecast_on_refreshed"] / max(1e-30, sums["forecast_on_refreshed"] + sums["forecast_on_rest"]), 4
        ),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

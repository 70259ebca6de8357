"""The per-image stats a result carries: the one definition used by the engine and the API schema."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:  # the API's schemas use ImageStats without torch; only the engine builds one from a sample
    from fastcache_core.stats import SampleStats


class ImageStats(BaseModel):
    """What serving one image cost and what the cache did for it."""

    queue_wait_seconds: float = Field(description="from submission to admission into the running batch")
    compute_seconds: float = Field(description="from the image's first denoising step to its decoded result")
    steps: int = Field(description="denoising steps run")
    batch_sizes: list[int] = Field(
        description="images in this image's batch (its resolution's group) at each of its steps"
    )
    blocks_computed: int = Field(description="block evaluations really run (per sample, a guidance pair counts once)")
    blocks_approximated: int = Field(description="block evaluations served by the cache")
    tokens_computed_fraction: float = Field(
        description="at real computes, the share of image tokens that went through the blocks"
    )
    cache_hit_rate: float = Field(description="blocks_approximated / (blocks_computed + blocks_approximated)")
    mac_fraction: float = Field(description="estimated transformer MACs spent relative to uncached")
    method: str = Field(description="the cache method the image ran with")
    cache: dict[str, Any] = Field(description="the cache settings the image ran with, defaults filled in")
    approximator: str = Field(
        description="how skipped steps were filled: fitted forecast, taylor order 1, residual reuse or none"
    )

    @classmethod
    def from_sample(
        cls, stats: SampleStats, *, queue_wait_seconds: float, compute_seconds: float, batch_sizes: list[int]
    ) -> ImageStats:
        """The stats of one finished image from the cache's counters and the engine's timings."""
        return cls(
            queue_wait_seconds=round(queue_wait_seconds, 6),
            compute_seconds=round(compute_seconds, 6),
            steps=stats.steps,
            batch_sizes=list(batch_sizes),
            blocks_computed=stats.blocks_computed,
            blocks_approximated=stats.blocks_approximated,
            tokens_computed_fraction=stats.tokens_computed_fraction,
            cache_hit_rate=stats.cache_hit_rate,
            mac_fraction=stats.mac_fraction,
            method=stats.method,
            cache=stats.params,
            approximator=stats.approximator,
        )

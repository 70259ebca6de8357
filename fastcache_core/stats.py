"""Per-sample counters and the block cost model behind the estimated-MACs figures."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class SampleStats:
    """What the cache did for one sample (one request image and its guidance pair).

    Block counts are per sample, not per guidance row: a block reused by both rows of a pair counts
    once. MACs count both rows and include the cost of forecasts and error measurements.
    """

    sample_id: Any = None
    method: str = "fastcache"
    params: dict[str, Any] = field(default_factory=dict)
    approximator: str = "none"
    """How skipped steps were filled: "fitted forecast", "taylor order 1", "residual reuse" or "none"."""
    steps: int = 0
    blocks_computed: int = 0
    blocks_approximated: int = 0
    tokens_computed: int = 0
    tokens_total: int = 0
    macs_computed: float = 0.0
    macs_full: float = 0.0
    details: dict[str, float] = field(default_factory=dict)
    """What the method measured and decided for this sample (FastCache: ``window``, the refresh window
    in normalized time, and ``drift_ratio``, its measured drift relative to a typical sample's)."""

    @property
    def cache_hit_rate(self) -> float:
        """Share of block evaluations served by the cache."""
        total = self.blocks_computed + self.blocks_approximated
        return self.blocks_approximated / total if total else 0.0

    @property
    def tokens_computed_fraction(self) -> float:
        """At the sample's real computes, the share of its image tokens that went through the blocks
        (after token selection and merging); forecast steps do not count."""
        return self.tokens_computed / self.tokens_total if self.tokens_total else 1.0

    @property
    def mac_fraction(self) -> float:
        """Estimated transformer-block MACs spent, as a fraction of the uncached run."""
        return self.macs_computed / self.macs_full if self.macs_full else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            cache_hit_rate=self.cache_hit_rate,
            tokens_computed_fraction=self.tokens_computed_fraction,
            mac_fraction=self.mac_fraction,
        )
        return data


def _cpu_sdpa_flops(
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def flop_counter() -> torch.utils.flop_counter.FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU kernel of ``scaled_dot_product_attention``.

    torch's table covers the CUDA attention kernels but not the CPU one, which would make attention
    free on CPU; it gets the same formula here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


class BlockCostModel:
    """Multiply-accumulates of one block on one row as a function of its image-token count.

    Measured, not assumed: the block runs under ``torch.utils.flop_counter.FlopCounterMode`` on one row
    with ``n``, ``n/2`` and ``n/4`` image tokens and a quadratic ``a + b*n + c*n^2`` is fitted (linear
    layers are linear in ``n``, attention quadratic). Measured once per block and input shape.
    """

    def __init__(self) -> None:
        self._coefficients: dict[Hashable, tuple[float, float, float]] = {}

    def macs(self, key: Hashable, tokens: int, measure: Callable[[int], object], full_tokens: int) -> float:
        coeffs = self._coefficients.get(key)
        if coeffs is None:
            coeffs = self._fit(measure, full_tokens)
            self._coefficients[key] = coeffs
        a, b, c = coeffs
        return a + b * tokens + c * tokens * tokens

    def partial_macs(self, key: Hashable, queries: int, keys: int) -> float:
        """MACs with ``queries`` tokens run against ``keys`` attention keys (a token refresh), from the fit
        of ``key`` (measured first by :meth:`macs`): the linear layers scale with the queries, the
        attention with queries x keys."""
        a, b, c = self._coefficients[key]
        return a + b * queries + c * queries * keys

    @staticmethod
    def _fit(measure: Callable[[int], object], full_tokens: int) -> tuple[float, float, float]:
        points = sorted({max(1, full_tokens // 4), max(1, full_tokens // 2), full_tokens})
        values = []
        for n in points:
            with flop_counter() as counter:
                measure(n)
            values.append(counter.get_total_flops() / 2.0)
        if len(points) < 3:  # tiny token counts: a linear model is all the points allow
            b = values[-1] / points[-1]
            return 0.0, b, 0.0
        design = torch.tensor([[1.0, n, n * n] for n in points], dtype=torch.float64)
        solution = torch.linalg.solve(design, torch.tensor(values, dtype=torch.float64))
        return tuple(float(v) for v in solution)  # type: ignore[return-value]

"""``bench.cache``'s report: the JSON rows, FastCache's margin over each peer, the markdown table and
the speedup-vs-PSNR plot."""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.cache.instrument import overhead_fraction
from bench.cache.runner import Measured
from bench.cache.variant import Variant
from bench.common import clean_number, fmt, markdown_table, pyplot

ROW_KEYS = (
    "method",
    "params",
    "speedup",
    "mac_fraction",
    "psnr_db",
    "psnr_min_db",
    "ssim",
    "class_accuracy",
    "fid",
    "peak_mem_bytes",
    "overhead_fraction",
    "fastcache_margin_db",
)
UNCHANGED_FLAG = "output identical to uncached: the method never engaged"

log = logging.getLogger(__name__)


def fastcache_margins(rows: list[dict[str, Any]]) -> list[float | None]:
    """Per row, FastCache's PSNR interpolated at the row's MAC fraction along its tolerance sweep minus
    the row's PSNR (peer rows inside the sweep's MAC range only; ``None`` elsewhere)."""
    import numpy as np

    curve = sorted(
        (r["mac_fraction"], r["psnr_db"])
        for r in rows
        if r["method"] == "fastcache"
        and r["params"].get("setting") in ("default", "tolerance_sweep")
        and r["mac_fraction"] is not None
        and r["psnr_db"] is not None
    )
    margins: list[float | None] = []
    for r in rows:
        mac, value = r["mac_fraction"], r["psnr_db"]
        if (
            r["method"] in ("none", "fastcache")
            or len(curve) < 2
            or mac is None
            or value is None
            or not curve[0][0] <= mac <= curve[-1][0]
        ):
            margins.append(None)
            continue
        margins.append(float(np.interp(mac, [c[0] for c in curve], [c[1] for c in curve])) - value)
    return margins


def worst_image_psnr(per_image: torch.Tensor, cap: float = 100.0) -> float:
    """The lowest per-image PSNR, identical images capped at ``cap`` dB like the means."""
    return float(torch.clamp(per_image.double(), max=cap).min().item())


def build_rows(
    variants: list[Variant],
    measured: dict[tuple, Measured],
    reference: Measured,
    judge: Any,
    labels: torch.Tensor,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """One JSON row per variant (keys ``ROW_KEYS``) and its (label, note) for the table."""
    from fastcache_core.quality import mean_finite, psnr, ssim

    def fid(images: torch.Tensor) -> float:
        # a handful of images gives a rank-deficient feature covariance: FID still comes out, noisier
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Matrix is singular")
            return float(judge.fid_to_real(images))

    rows, notes, labels_by_key = [], [], {}
    for variant in variants:
        result = measured[variant.key]
        params = dict(variant.params)
        if variant.key in labels_by_key:
            params["measured_as"] = labels_by_key[variant.key]
        labels_by_key.setdefault(variant.key, f"{variant.method} {variant.label}")
        note = []
        if variant.attach is None:
            speedup, mac = 1.0, 1.0
        else:
            speedup = statistics.median(result.ratios)
            mac = result.flops / reference.flops if reference.flops > 0 else None
            if torch.equal(result.images, reference.images):
                params["flag"] = UNCHANGED_FLAG
                note.append("UNCHANGED: never engaged")
                log.warning(
                    "%s %s: images identical to uncached; its speed says nothing about caching",
                    variant.method,
                    variant.label,
                )
        if not result.deterministic:
            note.append("non-deterministic")
            log.warning("%s %s: timed images differ from the counted run's", variant.method, variant.label)
        if "measured_as" in params:
            note.append(f"= {params['measured_as']}")
        per_image = psnr(result.images, reference.images)
        row = {
            "method": variant.method,
            "params": params,
            "speedup": clean_number(speedup, 4),
            "mac_fraction": clean_number(mac, 4),
            "psnr_db": clean_number(mean_finite(per_image), 3),
            "psnr_min_db": clean_number(worst_image_psnr(per_image), 3),
            "ssim": clean_number(float(ssim(result.images, reference.images).mean()), 5),
            "class_accuracy": clean_number(judge.class_accuracy(result.images, labels), 4) if judge else None,
            "fid": clean_number(fid(result.images), 3) if judge else None,
            "peak_mem_bytes": int(result.peak_mem),
            "overhead_fraction": clean_number(overhead_fraction(result.timer, reference.timer), 4),
            "fastcache_margin_db": None,
        }
        assert tuple(row) == ROW_KEYS
        rows.append(row)
        notes.append((variant.label, "; ".join(note)))

    for row, margin in zip(rows, fastcache_margins(rows), strict=True):
        row["fastcache_margin_db"] = clean_number(margin, 3)
    return rows, notes


def print_table(
    rows: list[dict[str, Any]],
    notes: list[tuple[str, str]],
    reference: Measured,
    args: argparse.Namespace,
    device: str,
    elapsed: float,
) -> None:
    """The rows as a markdown table on stdout, and a footer with the uncached timing and its noise."""
    ref_per_image = statistics.median(reference.reference_seconds) / args.timing_samples
    noise = statistics.median(reference.ratios)  # the uncached pipeline timed against itself
    print(
        markdown_table(
            [
                "method",
                "setting",
                "speedup",
                "MAC fraction",
                "PSNR dB",
                "FastCache margin dB",
                "overhead",
                "SSIM",
                "class acc",
                "FID",
                "peak mem MiB",
                "note",
            ],
            [
                [
                    r["method"],
                    label,
                    fmt(r["speedup"], 2),
                    fmt(r["mac_fraction"], 3),
                    fmt(r["psnr_db"], 2),
                    fmt(r["fastcache_margin_db"], 2),
                    fmt(r["overhead_fraction"], 3),
                    fmt(r["ssim"], 4),
                    fmt(r["class_accuracy"], 3),
                    fmt(r["fid"], 2),
                    f"{r['peak_mem_bytes'] / 2**20:.0f}",
                    note,
                ]
                for r, (label, note) in zip(rows, notes, strict=True)
            ],
        )
    )
    print(
        f"\nuncached: {ref_per_image:.3f} s per image (batches of {args.batch_size}); "
        f"uncached vs itself (timing noise): {noise:.3f}; benchmark took {elapsed:.0f} s. "
        f"PSNR 100 dB = identical images. "
        f"Peak memory: {'CUDA max allocated' if device.startswith('cuda') else 'process RSS (CPU)'}."
    )


def plot_pareto(rows: list[dict[str, Any]], labels: list[str], path: str, title: str = "") -> None:
    """Speedup (x) vs PSNR (y): one line per method (FastCache's tolerance sweep as its line, its
    ablations as separate markers) and the Pareto front over all rows as a dashed line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 5.5), dpi=120)
    colors = {
        "fastcache": "tab:red",
        "teacache": "tab:blue",
        "fbcache": "tab:green",
        "taylorseer": "tab:purple",
        "pab": "tab:orange",
        "magcache": "tab:brown",
        "seacache": "tab:pink",
        "cachedit": "tab:olive",
    }
    points = [
        (r, label)
        for r, label in zip(rows, labels, strict=True)
        if r["method"] != "none" and r["speedup"] is not None and r["psnr_db"] is not None
    ]
    for method, color in colors.items():
        lines: dict[str, list[tuple[float, float]]] = {}
        for r, _ in points:
            if r["method"] != method or r["params"].get("setting") == "ablation":
                continue
            if method == "taylorseer" and r["params"].get("best_warmup") is False:
                # the other warm-ups of TaylorSeer's sweep: faint points, the best one is the line
                ax.plot(r["speedup"], r["psnr_db"], ".", color=color, alpha=0.25)
                continue
            name = method
            if method == "taylorseer":
                implementation = "per-sample" if r["params"].get("implementation") != "diffusers" else "diffusers"
                name = f"taylorseer ({implementation}, warm-up {r['params'].get('warmup_steps')})"
            lines.setdefault(name, []).append((r["speedup"], r["psnr_db"]))
        styles = itertools.cycle(("o-", "s--", "^:", "d-."))
        for style, (name, line) in zip(styles, sorted(lines.items()), strict=False):
            line.sort()
            ax.plot([p[0] for p in line], [p[1] for p in line], style, color=color, label=name, alpha=0.9)
        for r, _label in points:
            if r["method"] == method and r["params"].get("setting") == "default":
                ax.plot(r["speedup"], r["psnr_db"], "*", color=color, markersize=14, label="fastcache default")
    markers = iter("sD^vP<>Xh")
    for r, label in points:
        if r["params"].get("setting") == "ablation":
            ax.plot(
                r["speedup"],
                r["psnr_db"],
                next(markers, "x"),
                color="tab:red",
                alpha=0.6,
                markersize=8,
                linestyle="none",
                label=f"ablation: {label}",
            )
    front, best = [], -math.inf
    for s, p in sorted(((r["speedup"], r["psnr_db"]) for r, _ in points), key=lambda x: (-x[0], -x[1])):
        if p > best:
            front.append((s, p))
            best = p
    if front:
        front.sort()
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", linewidth=1, label="Pareto front")
    ax.axvline(1.0, color="black", linewidth=0.6, alpha=0.4)
    ax.set_xlabel("speedup over uncached (wall-clock)")
    ax.set_ylabel("PSNR vs uncached image of the same seed (dB)")
    ax.set_title(title or "bench.cache")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)

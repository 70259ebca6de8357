"""``bench.cache --grid``'s report: the per-cell table and the grid plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import fmt, markdown_table, pyplot

TABLE_ORDER = {"fastcache": 0, "best_fixed_schedule": 1, "taylorseer": 2}


def cell_name(steps: int, guidance: float) -> str:
    return f"{steps} st, g {guidance:g}"


def grid_table(result: dict[str, Any]) -> str:
    """Markdown: one line per method; per cell ``mean PSNR / worst image / MAC fraction``, then the grid
    mean, the worst cell (lowest cell mean), the worst image and the grid-average MAC fraction."""
    cells = [(c["steps"], c["guidance"]) for c in result["cells"]]
    by_cell = {(r["method"], r["params"]["label"], r["steps"], r["guidance"]): r for r in result["rows"]}
    lines = []
    for summary in sorted(result["summary"], key=lambda s: TABLE_ORDER.get(s["method"], 3)):
        entries = []
        for steps, guidance in cells:
            row = by_cell.get((summary["method"], summary["label"], steps, guidance))
            entries.append(
                "n/a"
                if row is None
                else f"{fmt(row['psnr_db'], 1)} / {fmt(row['psnr_min_db'], 1)} / {fmt(row['mac_fraction'], 2)}"
            )
        lines.append(
            [
                summary["method"],
                summary["label"],
                *entries,
                fmt(summary["grid_mean_psnr_db"], 2),
                fmt(summary["worst_cell_psnr_db"], 2),
                fmt(summary["psnr_min_db"], 2),
                fmt(summary["grid_mac_fraction"], 3),
            ]
        )
    header = [
        "method",
        "setting",
        *(cell_name(s, g) for s, g in cells),
        "grid mean dB",
        "worst cell dB",
        "worst image dB",
        "grid MAC",
    ]
    return markdown_table(header, lines)


def plot_grid(result: dict[str, Any], path: str, title: str = "") -> None:
    """Left: per cell, mean PSNR (line) and worst image (triangles) of FastCache's rows and
    ``best_fixed_schedule``. Right: grid-average MAC fraction vs grid-mean PSNR of every method, the
    fixed schedules coloured by warm-up."""
    plt = pyplot()
    fig, (cells_ax, front_ax) = plt.subplots(1, 2, figsize=(13, 5), dpi=120)
    cells = [(c["steps"], c["guidance"]) for c in result["cells"]]
    x = list(range(len(cells)))
    colors = iter(["tab:red", "tab:orange", "tab:pink", "tab:brown", "tab:olive", "tab:cyan"])
    for summary in result["summary"]:
        if summary["method"] not in ("fastcache", "best_fixed_schedule"):
            continue
        color = "tab:blue" if summary["method"] == "best_fixed_schedule" else next(colors, "tab:gray")
        rows = {
            (r["steps"], r["guidance"]): r
            for r in result["rows"]
            if r["method"] == summary["method"] and r["params"]["label"] == summary["label"]
        }
        means = [rows[c]["psnr_db"] if c in rows else None for c in cells]
        worst = [rows[c]["psnr_min_db"] if c in rows else None for c in cells]
        name = f"{summary['method']} {summary['label']} (MAC {fmt(summary['grid_mac_fraction'], 3)})"
        cells_ax.plot(x, means, "o-", color=color, label=name)
        cells_ax.plot(x, worst, "v", color=color, alpha=0.7)
    cells_ax.set_xticks(x, [cell_name(s, g) for s, g in cells], rotation=30, ha="right", fontsize=8)
    cells_ax.set_ylabel("PSNR vs uncached (dB): mean (o), worst image (v)")
    cells_ax.grid(alpha=0.3)
    cells_ax.legend(fontsize=7)
    warmup_colors = {1: "tab:green", 2: "tab:purple", 3: "tab:gray"}
    for summary in result["summary"]:
        mac, mean = summary["grid_mac_fraction"], summary["grid_mean_psnr_db"]
        if mac is None or mean is None:
            continue
        if summary["method"] == "taylorseer":
            warmup = int(summary["params"]["warmup_steps"])
            per_sample = summary["params"]["implementation"] != "diffusers"
            front_ax.plot(
                mac,
                mean,
                "o" if per_sample else "x",
                color=warmup_colors.get(warmup, "black"),
                alpha=0.7,
                label=f"TaylorSeer warm-up {warmup} ({'per-sample' if per_sample else 'diffusers'})",
            )
        elif summary["method"] == "best_fixed_schedule":
            front_ax.plot(
                mac, mean, "s", markersize=12, fillstyle="none", color="tab:blue", label="best_fixed_schedule"
            )
        else:
            front_ax.plot(mac, mean, "*", markersize=14, color="tab:red", label=f"fastcache {summary['label']}")
    handles, labels = front_ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one legend entry per label
    front_ax.legend(unique.values(), unique.keys(), fontsize=7)
    front_ax.set_xlabel("grid-average MAC fraction")
    front_ax.set_ylabel("grid-mean PSNR (dB)")
    front_ax.grid(alpha=0.3)
    fig.suptitle(title or "bench.cache --grid")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)

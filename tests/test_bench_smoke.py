"""Smoke tests of the benchmarks on a tiny model: structure of their output only, never timing."""

import importlib.util
import json
import logging
import math
import sys

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {
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
}
# cache-dit is an optional bench extra: its rows exist only where it is installed
OPTIONAL_METHODS = {"cachedit": importlib.util.find_spec("cache_dit") is not None}
METHODS = {"none", "fastcache", "fbcache", "teacache", "taylorseer", "pab", "magcache", "seacache"} | {
    method for method, installed in OPTIONAL_METHODS.items() if installed
}


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_bench_cache_quick_on_a_tiny_model(tiny_dit_dir, tmp_path, capsys):
    from bench import cache

    out, plot = tmp_path / "cache.json", tmp_path / "cache.png"
    cache.main(
        [
            "--model",
            str(tiny_dit_dir),
            "--quick",
            "--samples",
            "2",
            "--steps",
            "6",
            "--threads",
            "1",
            "--no-progress",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert row["method"] in METHODS
        assert isinstance(row["params"], dict)
        for key in ("speedup", "mac_fraction", "psnr_db", "ssim", "peak_mem_bytes"):
            assert finite(row[key]) and row[key] >= 0, (key, row)
        # the tiny model has no digit classifier beside it: no judge, so these are null
        assert row["class_accuracy"] is None and row["fid"] is None
        assert row["overhead_fraction"] is None or finite(row["overhead_fraction"]), row
        if row["method"] in ("none", "fastcache"):
            assert row["fastcache_margin_db"] is None
        elif row["fastcache_margin_db"] is not None:
            assert finite(row["fastcache_margin_db"])
    assert {r["method"] for r in rows} == METHODS, "every method, peers included, has a row"
    assert [r["method"] for r in rows].count("none") == 1
    fastcache = [r for r in rows if r["method"] == "fastcache"]
    assert sum(r["params"].get("setting") == "default" for r in fastcache) == 1
    tolerances = {
        r["params"]["tolerance"] for r in fastcache if r["params"].get("setting") in ("default", "tolerance_sweep")
    }
    assert len(tolerances) >= 5
    ablations = {r["params"].get("ablation") for r in fastcache if r["params"].get("setting") == "ablation"}
    assert {
        "block_cache_only",
        "token_selection_only",
        "block_cache+token_selection",
        "block_cache+token_selection+merge",
        "block_cache+merge",
        "block_cache+token_refresh",
        "uncalibrated",
    } <= ablations
    assert any(r["params"].get("implementation") == "fastcache per-sample" for r in rows if r["method"] == "taylorseer")
    assert len([r for r in rows if r["method"] == "teacache"]) >= 3
    for peer in METHODS - {"none", "fastcache", "teacache"}:
        assert len([r for r in rows if r["method"] == peer]) >= 2, peer
    assert plot.read_bytes()[:8] == PNG_MAGIC
    table = capsys.readouterr().out
    assert "| method |" in table and "taylorseer" in table


def test_bench_cache_methods_filter(tiny_dit_dir, tmp_path):
    from bench import cache

    out = tmp_path / "cache.json"
    rows = cache.main(
        [
            "--model",
            str(tiny_dit_dir),
            "--quick",
            "--samples",
            "1",
            "--steps",
            "4",
            "--threads",
            "1",
            "--no-progress",
            "--methods",
            "pab",
            "--json",
            str(out),
        ]
    )
    assert [r["method"] for r in rows] == ["none", "pab", "pab"]
    assert json.loads(out.read_text()) == rows


def test_bench_cache_skips_cachedit_rows_without_cache_dit(tiny_dit_dir, monkeypatch, caplog):
    from bench import cache

    monkeypatch.setitem(sys.modules, "cache_dit", None)  # makes `import cache_dit` fail, as when not installed
    with caplog.at_level(logging.WARNING, logger="bench.cache"):
        rows = cache.main(
            [
                "--model",
                str(tiny_dit_dir),
                "--quick",
                "--samples",
                "1",
                "--steps",
                "4",
                "--threads",
                "1",
                "--no-progress",
                "--methods",
                "cachedit",
            ]
        )
    assert [r["method"] for r in rows] == ["none"]
    assert "cachedit rows skipped: cache-dit is not installed" in caplog.text


def test_bench_serve_quick_on_a_tiny_model(tiny_dit_dir, tmp_path):
    from bench import serve

    out, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    result = serve.main(
        [
            "--model",
            str(tiny_dit_dir),
            "--quick",
            "--batch-sizes",
            "1,4",
            "--load-factors",
            "1,4",
            "--requests",
            "6",
            "--steps",
            "3",
            "--warmup",
            "2",
            "--mixed-cache",
            "--ready-timeout",
            "120",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert finite(data["throughput_ratio_batched_vs_single"]) and data["throughput_ratio_batched_vs_single"] > 0
    rows = data["rows"]
    assert {(r["config"], r["max_batch_size"]) for r in rows} == {("batch1", 1), ("batch4", 4)}
    assert len(rows) == 4  # 2 configurations x 2 rates
    for row in rows:
        assert row["requests"] == 6 and row["completed"] == 6, row
        for key in (
            "rate_rps",
            "throughput_images_per_s",
            "latency_p50_s",
            "latency_p95_s",
            "latency_p99_s",
            "queue_wait_mean_s",
            "batch_size_mean",
        ):
            assert finite(row[key]) and row[key] >= 0, (key, row)
        assert row["latency_p50_s"] <= row["latency_p95_s"] <= row["latency_p99_s"]
        assert 1 <= row["batch_size_max"] <= row["max_batch_size"]
    assert all(r["batch_size_max"] == 1 for r in rows if r["config"] == "batch1")
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("argv", [["--methods", "nope"], ["--samples", "0"]])
def test_bench_cache_rejects_bad_flags(argv):
    from bench import cache

    with pytest.raises(SystemExit):
        cache.parse_args(argv)


MIX_KEYS = {
    "mix",
    "mixed_efficiency",
    "expected_capacity_images_per_s",
    "mixed_capacity_images_per_s",
    "load_factor",
    "mixed_rate_rps",
    "failed",
    "kinds",
    "rounds",
    "latency_requests",
}
KIND_KEYS = {
    "kind",
    "weight",
    "request",
    "capacity_images_per_s",
    "completed",
    "requests",
    "latency_p50_s",
    "latency_p95_s",
    "latency_p99_s",
    "alone_rate_rps",
    "alone_latency_p50_s",
    "alone_latency_p95_s",
    "alone_latency_p99_s",
    "p99_vs_alone",
}


def test_bench_serve_mix_on_a_tiny_model(tiny_dit_dir, tmp_path, capsys):
    from bench import serve

    out = tmp_path / "mix.json"
    result = serve.main(
        [
            "--model",
            str(tiny_dit_dir),
            "--mix",
            "--batch-sizes",
            "4",
            "--requests",
            "5",
            "--mix-repeats",
            "2",
            "--mix-latency-requests",
            "5",
            "--steps",
            "2",
            "--ready-timeout",
            "120",
            "--json",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert set(data["mixed_efficiency"]) == {"resolutions", "steps", "cache"}
    assert all(finite(v) and v > 0 for v in data["mixed_efficiency"].values())
    assert [m["mix"] for m in data["mixes"]] == ["resolutions", "steps", "cache"]
    for mix in data["mixes"]:
        assert set(mix) == MIX_KEYS, mix
        assert mix["mixed_efficiency"] == data["mixed_efficiency"][mix["mix"]]
        assert len(mix["rounds"]) == 2 and mix["mixed_efficiency"] in [r["mixed_efficiency"] for r in mix["rounds"]]
        assert math.isclose(sum(k["weight"] for k in mix["kinds"]), 1.0)
        assert mix["failed"] == 0
        for kind in mix["kinds"]:
            assert set(kind) == KIND_KEYS, kind
            assert finite(kind["capacity_images_per_s"]) and kind["capacity_images_per_s"] > 0
            assert kind["completed"] >= 1  # exact proportions: 5 requests hold every kind of a mix
            assert kind["latency_p50_s"] <= kind["latency_p95_s"] <= kind["latency_p99_s"]
            assert finite(kind["p99_vs_alone"])
            assert kind["alone_latency_p50_s"] <= kind["alone_latency_p99_s"]
    kinds = {m["mix"]: [k["kind"] for k in m["kinds"]] for m in data["mixes"]}
    assert kinds["resolutions"] == ["16x16", "24x24"] and kinds["steps"] == ["steps2", "steps1"]
    assert len(kinds["cache"]) == len(serve.MIXED_CACHE)
    assert [k["weight"] for k in data["mixes"][0]["kinds"]] == [0.8, 0.2]
    printed = capsys.readouterr().out
    assert printed.count("mixed_efficiency") == 3 and "| kind | weight |" in printed


def test_bench_serve_mix_draws_each_kind_in_its_exact_proportion():
    import random

    from bench.serve_mix import mix_picks

    picks = mix_picks([0.8, 0.2], 64, random.Random(0))
    assert len(picks) == 64 and picks.count(1) == 13  # 12.8 rounds to 13
    assert picks != sorted(picks)  # shuffled, not in blocks
    assert [mix_picks([0.2] * 5, 7, random.Random(1)).count(k) for k in range(5)] == [2, 2, 1, 1, 1]


@pytest.mark.parametrize(
    "argv", [["--mix", "nope"], ["--mix", "--mixed-cache"], ["--mix-sizes", "32"], ["--mix", "--mix-repeats", "0"]]
)
def test_bench_serve_rejects_bad_mix_flags(argv):
    from bench import serve

    with pytest.raises(SystemExit):
        serve.parse_args(argv)


@pytest.mark.parametrize("argv", [["--memory", "nope"], ["--memory", "redis,ftp"], ["--memory", "--mix"]])
def test_bench_serve_rejects_bad_memory_flags(argv):
    from bench import serve

    with pytest.raises(SystemExit):
        serve.parse_args(argv)


def test_bench_serve_memory_defaults_to_redis_against_s3():
    from bench import serve

    assert serve.parse_args(["--memory"]).memory == ["redis", "s3"]


def test_fastcache_margin_interpolates_along_the_tolerance_sweep():
    from bench.cache import fastcache_margins

    sweep = [
        {"method": "fastcache", "params": {"setting": s}, "mac_fraction": m, "psnr_db": p}
        for s, m, p in (("default", 0.2, 40.0), ("tolerance_sweep", 0.4, 50.0))
    ]
    peers = [
        {"method": "seacache", "params": {}, "mac_fraction": 0.3, "psnr_db": 44.0},
        {"method": "taylorseer", "params": {}, "mac_fraction": 0.6, "psnr_db": 55.0},
    ]
    assert fastcache_margins(sweep + peers) == [None, None, 1.0, None]  # 45 - 44; 0.6 is outside the sweep


GRID_ROW_KEYS = {"method", "params", "steps", "guidance", "mac_fraction", "psnr_db", "psnr_min_db", "ssim"}


def test_bench_cache_grid_on_a_tiny_model(tiny_dit_dir, tmp_path, capsys):
    from bench import cache

    out, plot = tmp_path / "grid.json", tmp_path / "grid.png"
    result = cache.main(
        [
            "--model",
            str(tiny_dit_dir),
            "--grid",
            "--grid-steps",
            "3,5",
            "--grid-guidance",
            "2",
            "--samples",
            "1",
            "--taylorseer-warmups",
            "1",
            "--taylorseer-intervals",
            "2,3",
            "--threads",
            "1",
            "--no-progress",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["cells"] == [{"steps": 3, "guidance": 2.0}, {"steps": 5, "guidance": 2.0}]
    rows = result["rows"]
    for row in rows:
        assert set(row) == GRID_ROW_KEYS, row
        assert finite(row["mac_fraction"]) and row["mac_fraction"] > 0, row
        assert row["psnr_min_db"] <= row["psnr_db"], row
    # every method at every cell: the default, 2 schedules x 2 implementations, best_fixed_schedule
    per_cell = {
        (c["steps"], c["guidance"]): [r for r in rows if (r["steps"], r["guidance"]) == (c["steps"], c["guidance"])]
        for c in result["cells"]
    }
    for cell_rows in per_cell.values():
        assert sorted(r["method"] for r in cell_rows) == ["best_fixed_schedule", "fastcache"] + ["taylorseer"] * 4
    implementations = {r["params"]["implementation"] for r in rows if r["method"] == "taylorseer"}
    assert implementations == {"fastcache per-sample", "diffusers"}
    best = result["best_fixed_schedule"]
    default = next(s for s in result["summary"] if s["method"] == "fastcache")
    assert best["method"] == "best_fixed_schedule"
    assert (best["params"]["warmup_steps"], best["params"]["cache_interval"]) in {(1, 2), (1, 3)}
    if best["params"]["within_budget"]:
        assert best["grid_mac_fraction"] <= default["grid_mac_fraction"]
    assert best["worst_cell_psnr_db"] == min(r["psnr_db"] for r in rows if r["method"] == "best_fixed_schedule")
    assert plot.read_bytes()[:8] == PNG_MAGIC
    table = capsys.readouterr().out
    assert "| method | setting | 3 st, g 2 | 5 st, g 2 | grid mean dB | worst cell dB |" in table


def summary(mean, worst, mac, warmup=1, interval=2):
    return {
        "method": "taylorseer",
        "label": f"w{warmup} i{interval}",
        "params": {"warmup_steps": warmup, "cache_interval": interval, "implementation": "diffusers"},
        "grid_mean_psnr_db": mean,
        "worst_cell_psnr_db": worst,
        "grid_mac_fraction": mac,
    }


def test_best_fixed_schedule_is_the_best_grid_mean_within_fastcaches_macs():
    from bench.cache.schedules import best_fixed_schedule

    schedules = [summary(50.0, 40.0, 0.5), summary(40.0, 30.0, 0.2), summary(40.0, 33.0, 0.19), summary(30, 20, 0.1)]
    best = best_fixed_schedule(schedules, budget=0.2)
    assert best["label"] == schedules[2]["label"]  # 0.5 MACs is over budget; equal means: the better worst cell
    assert best["within_budget"] is True


def test_best_fixed_schedule_falls_back_to_the_cheapest_when_all_spend_more():
    from bench.cache.schedules import best_fixed_schedule

    schedules = [summary(50.0, 40.0, 0.5), summary(45.0, 35.0, 0.3)]
    best = best_fixed_schedule(schedules, budget=0.2)
    assert best["label"] == schedules[1]["label"] and best["within_budget"] is False


def test_grid_images_use_none_of_the_calibration_seeds():
    from bench import cache
    from bench.cache.grid import CALIBRATION_SEEDS, MAGCACHE_SEED

    args = cache.parse_args(["--grid"])
    seeds = set(range(args.seed, args.seed + args.samples))
    assert not seeds & CALIBRATION_SEEDS
    assert max(seeds) < MAGCACHE_SEED

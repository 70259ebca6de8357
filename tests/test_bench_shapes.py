"""``bench.shapes`` at one block of each published shape: it runs through the engine and reports the
cache's state and savings (structure and invariants only, never timing)."""

import json

import pytest

from bench.shapes.catalog import SHAPES


def run_shapes(tmp_path, *extra: str) -> dict:
    from bench.shapes.cli import main

    out = tmp_path / "shapes.json"
    main(["--layers", "1", "--repeats", "1", "--no-timers", "--threads", "1", "--out", str(out), *extra])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def dit_row(tmp_path_factory):
    report = run_shapes(tmp_path_factory.mktemp("shapes"), "--shape", "dit-xl-2", "--steps", "12", "--batches", "1,2")
    return report["rows"][0]


def test_dit_xl_2_is_built_at_its_published_width_and_one_block(dit_row):
    assert dit_row["config"]["num_layers"] == 1
    assert dit_row["config"]["attention_head_dim"] * dit_row["config"]["num_attention_heads"] == 1152
    assert dit_row["image_tokens"] == 256
    assert dit_row["parameters"] < dit_row["published_parameters"]


def test_the_saving_tolerance_skips_work_that_tolerance_zero_computes(dit_row):
    assert 0.0 < dit_row["mac_fraction"] < 0.7


def test_the_cache_state_per_image_is_the_same_at_every_batch_size(dit_row):
    per_image = {b["batch"]: b["cache_state_bytes_per_image"] for b in dit_row["batches"]}
    assert per_image[1] == per_image[2] == dit_row["cache_state_bytes_per_image"] > 0
    # the stack's history (output, slope, input) of both guidance rows: tokens x width float32 numbers
    assert dit_row["cache_state_bytes_per_image"] >= 2 * 2 * 256 * 1152 * 4


@pytest.mark.parametrize("shape", [name for name in SHAPES if name != "dit-xl-2"])
def test_every_published_shape_runs_a_cached_step_through_the_engine(tmp_path, shape):
    row = run_shapes(
        tmp_path, "--shape", shape, "--size", "128", "--text-tokens", "16", "--steps", "2", "--batches", ""
    )["rows"][0]
    assert row["shape"] == shape and row["steps"] == 2
    assert row["cache_state_bytes_per_image"] > 0
    assert row["published_parameters"] > 5e8


def test_a_saved_shape_directory_loads_as_a_diffusers_pipeline(tmp_path):
    from bench.shapes.cli import main
    from service.engine.loading import load_pipeline

    main(["--shape", "dit-xl-2", "--layers", "1", "--save-pipeline", str(tmp_path / "dit")])
    pipe = load_pipeline(str(tmp_path / "dit"), "cpu", "float32")  # as fastcache-serve --model loads it
    assert type(pipe).__name__ == "DiTPipeline"
    assert pipe.transformer.config.num_layers == 1 and pipe.labels["class 7"] == 7

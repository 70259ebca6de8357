"""A cache method is a plug-in: one class registered by name is served by the engine beside FastCache,
with no library file touched."""

from __future__ import annotations

import numpy as np
import pytest

from fastcache_core import CacheParams
from fastcache_core.methods import (
    COMPUTE,
    FORECAST,
    CacheMethod,
    MethodContext,
    get_method,
    method_names,
    register_method,
    unregister_method,
)
from service.engine.engine import Job
from service.engine.families import GenerationSpec
from tests.engine_tools import Recorder, admit_together, close_engine, make_engine
from tests.servers import decode_image

PLUGIN = "reuse-odd-steps"


class ReuseOddSteps(CacheMethod):
    """Computes the even steps and reuses the last real output (a zero-gain forecast) on odd ones."""

    name = PLUGIN
    summary = "test plug-in: plain reuse on every odd step"

    def approximator(self, profile):
        return "plain reuse"

    def mode(self, sample, context: MethodContext, probe):
        return COMPUTE if sample.computes == 0 or sample.step % 2 == 0 else FORECAST

    def forecast_gain(self, sample, context):
        return 0.0


@pytest.fixture
def plugin():
    method = register_method(ReuseOddSteps())
    yield method
    unregister_method(PLUGIN)


@pytest.fixture(scope="module")
def pipe():
    from tests.tiny_pipelines import tiny_dit_pipeline

    return tiny_dit_pipeline(num_layers=3)


def job(recorder: Recorder, job_id: str, params: CacheParams, seed: int) -> Job:
    spec = GenerationSpec("3", None, 8, 2.0, seed, 16, 16, params)
    return Job(
        job_id=job_id,
        spec=spec,
        on_event=lambda event, j=job_id: recorder._record(j, "step", event),
        on_done=lambda result, j=job_id: recorder._done(j, result),
    )


def test_a_registered_method_is_known_to_request_validation(plugin):
    assert PLUGIN in method_names() and get_method(PLUGIN) is plugin
    assert CacheParams(method=PLUGIN).method == PLUGIN


def test_an_unknown_method_is_rejected_with_the_known_names():
    with pytest.raises(ValueError, match="fastcache"):
        CacheParams(method=PLUGIN)


def test_a_method_name_cannot_be_registered_twice(plugin):
    with pytest.raises(ValueError, match="already registered"):
        register_method(ReuseOddSteps())


def test_a_plugin_method_batched_with_fastcache_rows_equals_its_solo_run(plugin, pipe):
    engine = make_engine(pipe, max_batch_size=4)
    try:
        recorder = Recorder()
        together = [
            job(recorder, "plugin", CacheParams(method=PLUGIN), seed=5),
            job(recorder, "fastcache", CacheParams(tolerance=0.8), seed=6),
            job(recorder, "none", CacheParams(method="none"), seed=7),
        ]
        admit_together(engine, recorder, together)
        batched = recorder.wait("plugin", "fastcache", "none")
        for result in batched:
            assert result.status == "succeeded", result.error
        engine.submit(job(recorder, "plugin-solo", CacheParams(method=PLUGIN), seed=5))
        (solo,) = recorder.wait("plugin-solo")
    finally:
        close_engine(engine)
    plugin_batched, fastcache_batched, _ = batched
    assert np.array_equal(decode_image(plugin_batched.images[0]["b64_json"]), decode_image(solo.images[0]["b64_json"]))
    stats = plugin_batched.images[0]["stats"]
    assert stats["method"] == PLUGIN and stats["blocks_approximated"] > 0
    assert stats["blocks_approximated"] != fastcache_batched.images[0]["stats"]["blocks_approximated"]

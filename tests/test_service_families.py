"""``--model`` takes PixArt, SD3 and Flux pipeline directories too (saved here from tiny configs)."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.servers import Server, decode_image
from tests.tiny_pipelines import BUILDERS

NEGATIVE_PROMPT = {"pixart": True, "sd3": True, "flux": False}


@pytest.fixture(scope="module", params=["pixart", "sd3", "flux"])
def family_server(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / f"tiny-{request.param}"
    BUILDERS[request.param]().save_pretrained(path)
    server = Server("--model", str(path), "--max-batch-size", "4")
    yield request.param, server
    server.stop()


def body(**extra):
    return {"prompt": "a red cat on a tree", "steps": 6, "width": 32, "height": 32, "guidance_scale": 2.0, **extra}


def test_text_pipeline_serves_batched_requests_identical_to_solo(family_server):
    family, server = family_server
    bodies = [body(seed=1, cache={"tolerance": 0.0}), body(seed=2, prompt="the blue dog", cache={"tolerance": 0.5})]
    with ThreadPoolExecutor(2) as pool:
        batched = list(pool.map(lambda b: httpx.post(f"{server.url}/generate", json=b, timeout=120), bodies))
    for b, response in zip(bodies, batched, strict=True):
        assert response.status_code == 200, response.text
        image = response.json()["images"][0]
        assert decode_image(image["b64_json"]).shape == (32, 32, 3)
        solo = httpx.post(f"{server.url}/generate", json=b, timeout=120).json()["images"][0]
        assert abs(decode_image(image["b64_json"]) - decode_image(solo["b64_json"])).max() <= 1


def test_negative_prompt_where_the_family_has_one(family_server):
    family, server = family_server
    response = httpx.post(f"{server.url}/generate", json=body(negative_prompt="blurry"), timeout=120)
    if NEGATIVE_PROMPT[family]:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 422 and "negative_prompt" in response.json()["detail"]


def test_sizes_off_the_models_grid_are_rejected(family_server):
    _, server = family_server
    response = httpx.post(f"{server.url}/generate", json=body(width=30), timeout=60)
    assert response.status_code == 422 and "width" in response.json()["detail"]

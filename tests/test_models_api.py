"""``GET /v1/models`` (the OpenAI list) and ``GET /v1/models/{model}``, with the real OpenAI client."""

import openai
import pytest
from openai import OpenAI

from tests.conftest import LABELS
from tests.servers import Server, decode_image


@pytest.fixture(scope="module")
def server(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--max-batch-size", "4")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_the_openai_client_lists_the_served_model(client):
    models = client.models.list()
    assert [model.id for model in models.data] == ["tiny-dit"]
    model = models.data[0]
    assert model.object == "model" and model.owned_by and isinstance(model.created, int) and model.created > 0


def test_the_list_has_exactly_the_openai_shape(server):
    with server.client() as http:
        body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert [set(entry) for entry in body["data"]] == [{"id", "object", "created", "owned_by"}]


def test_retrieving_the_model_gives_what_a_client_needs_to_build_a_request(server, client):
    assert client.models.retrieve("tiny-dit").id == "tiny-dit"
    with server.client() as http:
        serving = http.get("/v1/models/tiny-dit").json()["serving"]
    assert serving["labels"] == LABELS
    assert serving["family"] == "dit" and serving["max_n"] == 4
    assert "none" in serving["cache_methods"] and "fastcache" in serving["cache_methods"]
    assert serving["default_width"] == serving["default_height"] == 16


def test_an_unknown_model_is_an_openai_404(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("dall-e-3")
    assert raised.value.body["code"] == "model_not_found" and raised.value.body["param"] == "model"


def test_images_accept_the_listed_model_name_or_none_and_refuse_another(client):
    listed = client.models.list().data[0].id
    for model in (listed, None):
        extra = {} if model is None else {"model": model}
        result = client.images.generate(prompt="four", n=1, size="16x16", extra_body={"steps": 3, "seed": 2}, **extra)
        assert decode_image(result.data[0].b64_json).shape == (16, 16, 3)
    with pytest.raises(openai.NotFoundError) as raised:
        client.images.generate(prompt="four", model="dall-e-3", extra_body={"steps": 3})
    assert "tiny-dit" in raised.value.body["message"]


def test_the_model_routes_need_the_key_when_the_server_has_one(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--api-key", "k3y")
    try:
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert OpenAI(base_url=f"{s.url}/v1", api_key="k3y", max_retries=0).models.list().data[0].id == "tiny-dit"
    finally:
        s.stop()

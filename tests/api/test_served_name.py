"""--served-model-name: the backbone answers to the given name (even one with ':' in it) and no longer to its
directory's name; a name that a task already has is refused at start-up."""

from __future__ import annotations

import httpx
import pytest

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from tests.api.conftest import MAX_MODEL_LEN, serve
from tests.api.test_errors import error_of

NAME = "acme/llama-tiny:v2"


def test_the_backbone_is_served_under_the_given_name(tiny_llama, library_dir):
    engine = Engine(EngineConfig(model=tiny_llama, library=library_dir, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN,
                                 served_model_name=NAME))
    with serve(engine) as served, httpx.Client(base_url=served.url, timeout=60) as http:
        assert served.backbone == NAME and http.get("/v1/models").json()["data"][0]["id"] == NAME
        body = {"prompt": "the quick", "max_tokens": 4, "temperature": 0}
        plain = http.post("/v1/completions", json=body | {"model": NAME})
        assert plain.status_code == 200 and plain.json()["model"] == NAME
        tagged = http.post("/v1/completions", json=body | {"model": f"{NAME}:reverse"})
        assert tagged.status_code == 200, tagged.text
        assert tagged.json()["tessera"]["composition"]["task"] == "reverse"
        old = tiny_llama.rstrip("/").rsplit("/", 1)[-1]
        assert error_of(http.post("/v1/completions", json=body | {"model": old}), 404)["code"] == "model_not_found"


@pytest.mark.parametrize("name", ["reverse", "auto", " "])
def test_a_name_taken_by_a_task_or_routing_is_refused(tiny_llama, library_dir, name):
    with pytest.raises(ValueError, match="served"):
        Engine(EngineConfig(model=tiny_llama, library=library_dir, num_kv_blocks=8, served_model_name=name))

"""--lora-resolver-dir: adapters of a directory load on first use, by model name or in explicit compositions,
and serve exactly what PEFT computes; concurrent first requests share one load; bad directories are errors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from tests.api.conftest import MAX_MODEL_LEN, serve
from tests.api.test_errors import error_of
from tests.api.test_runtime_adapters import LOAD, PROMPT, _adapter, _complete, _peft_greedy, _tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        _adapter(tiny_llama, root / name, seed=10 + seed)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    (root / "plain").mkdir()  # no adapter_config.json: not an adapter
    return root


@pytest.fixture(scope="module")
def served(tiny_llama, adapters):
    engine = Engine(EngineConfig(model=tiny_llama, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                                 max_num_batched_tokens=256, seed=0, max_loaded_modules=3, max_rank=8,
                                 lora_resolver_dir=str(adapters)))
    with serve(engine) as served, httpx.Client(base_url=served.url, timeout=60) as http:
        yield served, http


def test_an_adapter_named_as_the_model_loads_on_first_use_and_serves_what_peft_computes(served, tiny_llama,
                                                                                       adapters):
    server, http = served
    expected = _peft_greedy(tiny_llama, str(adapters / "alpha"), PROMPT, 8)
    tokens = _tokens(_complete(http, "alpha"))
    assert tokens == [server.engine.tokenizer.decode([t]) for t in expected]
    assert "alpha" in [card["id"] for card in http.get("/v1/models").json()["data"]]
    assert _tokens(_complete(http, "alpha")) == tokens  # served from the library now, not loaded again
    explicit = http.post("/v1/completions", json={"model": server.backbone, "modules": {"alpha": 1.0}, "prompt": PROMPT,
                                                   "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                                   "logprobs": 0})
    assert _tokens(explicit) == tokens


def test_explicit_compositions_load_every_adapter_they_name(served):
    server, http = served
    response = http.post("/v1/completions", json={"model": server.backbone, "modules": {"alpha": 0.5, "beta": 0.5},
                                                   "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    composition = json.loads(response.headers["x-tessera-composition"])
    assert sorted(composition["modules"]) == ["alpha", "beta"]


def test_concurrent_first_requests_share_one_load(served):
    server, http = served
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: _complete(http, "gamma"), range(6)))
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses if r.status_code != 200]
    assert len({tuple(_tokens(r)) for r in responses}) == 1 and "gamma" in server.engine.library.modules


def test_what_the_directory_cannot_serve_is_an_error_and_the_load_endpoint_stays_off(served, adapters):
    _, http = served
    error = error_of(_complete(http, "broken"), 400)
    assert error["code"] == "invalid_adapter" and error["param"] == "model" and "broken" in error["message"]
    for name in ("plain", "missing", "../alpha"):
        assert error_of(_complete(http, name), 404)["code"] == "model_not_found", name
    refused = http.post(LOAD, json={"lora_name": "delta", "lora_path": str(adapters / "alpha")})
    assert error_of(refused, 400)["code"] == "runtime_modules_off"


def test_a_resolver_dir_that_is_not_a_directory_fails_at_start_up(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="lora_resolver_dir"):
        Engine(EngineConfig(model=tiny_llama, num_kv_blocks=8, lora_resolver_dir=str(tmp_path / "nowhere")))

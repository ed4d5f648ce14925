"""PEFT adapters loaded and unloaded while serving, through vLLM's endpoints, on a real uvicorn server."""

from __future__ import annotations

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engine.engine import Engine
from tests.api.conftest import make_engine, serve
from tests.api.test_errors import error_of
from tests.router.helpers import random_peft_adapter

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
PROMPT = [5, 6, 7, 8, 9, 10, 11, 40, 41, 42]
"""Prompt token ids, sent as they are (no tokenisation on either side)."""
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _engine(model: str, library: str | None, runtime: bool = True, process: bool = False) -> Engine:
    return make_engine(model, library, runtime_modules=runtime, max_loaded_modules=2, max_rank=8,
                       engine_process=process)


def _base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _adapter(model_dir, out, seed: int, rank: int = 4) -> str:
    """A real PEFT LoRA on the tiny model with random non-zero weights on every projection."""
    return random_peft_adapter(model_dir, out, seed, ALL_TARGETS, rank=rank, std=0.3)


def _peft_greedy(model_dir, adapter, ids: list[int], num_tokens: int) -> list[int]:
    model = PeftModel.from_pretrained(_base(model_dir), adapter).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                             do_sample=False)
    return out[0, len(ids):].tolist()


def _complete(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                 "temperature": 0, "ignore_eos": True, "logprobs": 0})


def _tokens(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["tokens"]


@pytest.fixture(scope="module")
def served(tiny_llama, library_dir):
    with serve(_engine(tiny_llama, library_dir)) as served, httpx.Client(base_url=served.url, timeout=60) as http:
        yield served, http


def test_a_loaded_adapter_serves_exactly_what_peft_computes_then_unloads(served, tiny_llama, tmp_path):
    server, http = served
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    adapters = {name: _adapter(tiny_llama, tmp_path / name, seed) for name, seed in (("sql", 1), ("poem", 2))}
    before = {c["id"] for c in http.get("/v1/models").json()["data"]}
    backbone = _tokens(_complete(http, server.backbone))
    for name, path in adapters.items():
        loaded = http.post(LOAD, json={"lora_name": name, "lora_path": path})
        assert loaded.status_code == 200 and name in loaded.text, loaded.text
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert set(cards) == before | set(adapters) and cards["sql"]["tessera"]["kind"] == "module"

    served_tokens = {}
    for name, path in adapters.items():
        expected = _peft_greedy(tiny_llama, path, PROMPT, 8)
        served_tokens[name] = _tokens(_complete(http, name))
        assert served_tokens[name] == [tokenizer.decode([t]) for t in expected], name
    assert served_tokens["sql"] != served_tokens["poem"] != backbone
    # the pool has two slots: a library task's modules evict the adapters, which reload on the next request
    assert _complete(http, "reverse").status_code == 200
    assert _tokens(_complete(http, "sql")) == served_tokens["sql"]
    mixed = http.post("/v1/completions", json={"model": server.backbone, "prompt": PROMPT, "max_tokens": 8,
                                               "temperature": 0, "modules": {"sql": 0.5, "m0": 0.5}})
    assert mixed.status_code == 200, mixed.text

    assert http.post(UNLOAD, json={"lora_name": "sql"}).status_code == 200
    assert error_of(_complete(http, "sql"), 404)["code"] == "model_not_found"
    assert {c["id"] for c in http.get("/v1/models").json()["data"]} == before | {"poem"}
    # the same name loads again with other weights, and those are what is served (no stale slot)
    reloaded = http.post(LOAD, json={"lora_name": "sql", "lora_path": adapters["poem"]})
    assert reloaded.status_code == 200, reloaded.text
    assert _tokens(_complete(http, "sql")) == served_tokens["poem"]
    metrics = http.get("/metrics").text
    loads = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("tessera_module_loads_total"))
    assert loads >= 4, "sql, poem, the library task's modules after them and sql again after its eviction"
    assert "tessera_module_slots_total 2.0" in metrics and "tessera_modules_resident" in metrics
    # vLLM's load_inplace swaps the weights under a loaded name; without it the name is taken
    again = {"lora_name": "poem", "lora_path": adapters["sql"]}
    assert "already exists" in error_of(http.post(LOAD, json=again), 400)["message"]
    assert http.post(LOAD, json=again | {"load_inplace": True}).status_code == 200
    assert _tokens(_complete(http, "poem")) == served_tokens["sql"]
    for name in ("sql", "poem"):
        assert http.post(UNLOAD, json={"lora_name": name}).status_code == 200
    assert {c["id"] for c in http.get("/v1/models").json()["data"]} == before
    # the library's own tasks are unchanged by all of this
    assert server.engine.runtime_modules == set()


def test_bad_loads_and_unloads_are_openai_errors_and_change_nothing(served, tiny_llama, tmp_path):
    server, http = served
    good = _adapter(tiny_llama, tmp_path / "good", 3)
    big = _adapter(tiny_llama, tmp_path / "big", 4, rank=16)
    before = http.get("/v1/models").json()["data"]
    cases = [
        ({"lora_name": "x", "lora_path": str(tmp_path / "missing")}, 400, "not a directory"),
        ({"lora_name": "x", "lora_path": big}, 400, "max_rank 8"),
        ({"lora_name": "reverse", "lora_path": good}, 400, "already names"),
        ({"lora_name": "m0", "lora_path": good}, 400, "already exists"),
        ({"lora_name": "bad name!", "lora_path": good}, 400, "invalid"),
        ({"lora_name": "x"}, 400, "lora_path"),
    ]
    for body, status, message in cases:
        error = error_of(http.post(LOAD, json=body), status)
        assert message in error["message"], (body, error)
    three = {"model": server.backbone, "prompt": PROMPT, "max_tokens": 2, "modules": {"m0": 1, "m1": 1, "m2": 1}}
    error = error_of(http.post("/v1/completions", json=three), 400)
    assert error["code"] == "invalid_composition" and "--max-loaded-modules 3" in error["message"]
    assert _complete(http, "m0").status_code == 200, "the refused request must hold up nothing"
    assert error_of(http.post(UNLOAD, json={"lora_name": "ghost"}), 404)["code"] == "module_not_found"
    assert "came with the library" in error_of(http.post(UNLOAD, json={"lora_name": "m0"}), 400)["message"]
    assert [c["id"] for c in http.get("/v1/models").json()["data"]] == [c["id"] for c in before]


def test_loading_is_off_unless_asked_and_works_without_a_library(tiny_llama, tmp_path):
    adapter = _adapter(tiny_llama, tmp_path / "a", 5)
    with serve(_engine(tiny_llama, None, runtime=False)) as server, httpx.Client(base_url=server.url) as http:
        error = error_of(http.post(LOAD, json={"lora_name": "a", "lora_path": adapter}), 400)
        assert "--runtime-modules" in error["message"] and error["code"] == "runtime_modules_off"
    with serve(_engine(tiny_llama, None)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post(LOAD, json={"lora_name": "a", "lora_path": adapter}).status_code == 200
        expected = _peft_greedy(tiny_llama, adapter, PROMPT, 8)
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
        assert _tokens(_complete(http, "a")) == [tokenizer.decode([t]) for t in expected]


def test_lora_modules_at_start_up_serve_like_vllm_names_them(tiny_llama, library_dir, tmp_path):
    adapter = _adapter(tiny_llama, tmp_path / "sql", 7)
    engine = make_engine(tiny_llama, library_dir, lora_modules=(f"sql={adapter}",))
    controller = engine.library.controller
    assert all("sql" not in controller.gates_for_task(task).module_ids for task in controller.tasks)
    with serve(engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
        assert cards["sql"]["tessera"]["kind"] == "module" and "reverse" in cards
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
        expected = _peft_greedy(tiny_llama, adapter, PROMPT, 8)
        assert _tokens(_complete(http, "sql")) == [tokenizer.decode([t]) for t in expected]
        assert error_of(http.post(UNLOAD, json={"lora_name": "sql"}), 400)["code"] == "runtime_modules_off"

"""`model: "auto"`: untagged prompts routed by the library's text router, via a real server and the openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from transformers import AutoConfig, AutoTokenizer

from router.compose import compose
from router.library import fingerprint_from_hf_config, random_library
from router.text import TextRouterSettings
from tests.api.conftest import Served, make_engine, serve
from tests.router.prompts import TASKS, trained_head

MIN_CONFIDENCE = 0.9
REVERSE_CHAT = [
    {"role": "system", "content": "you are a careful assistant"},
    {"role": "user", "content": "convert apple to uppercase"},
    {"role": "assistant", "content": "APPLE"},
    {"role": "user", "content": "now reverse the letters of thunder"},
]
ARITHMETIC = "how much is 12 times 30?"
OFF_TOPIC = "tell me a joke about cats"


@pytest.fixture(scope="module")
def routed_library(tiny_llama, tmp_path_factory) -> str:
    """A library (tasks reverse, uppercase, arithmetic) with a trained text router."""
    fingerprint = fingerprint_from_hf_config(AutoConfig.from_pretrained(tiny_llama))
    library = random_library(fingerprint, num_modules=4, tasks=TASKS, rank=8, std=0.2, seed=0)
    library = library.with_text_router(trained_head()[0], TextRouterSettings(min_confidence=MIN_CONFIDENCE))
    return str(library.write(tmp_path_factory.mktemp("routed") / "lib"))


@pytest.fixture(scope="module")
def routed(tiny_llama, routed_library) -> Iterator[Served]:
    """A server of `routed_library`."""
    with serve(make_engine(tiny_llama, routed_library)) as served:
        yield served


@pytest.fixture(scope="module")
def client(routed) -> openai.OpenAI:
    return routed.client()


def inferred(library, task: str) -> dict:
    """The echo a request routed to `task` must carry: the tagged composition, with source `inferred`."""
    return compose(library, task=task).as_dict() | {"source": "inferred"}


def chat(client, model, messages=REVERSE_CHAT, **kwargs):
    kwargs = {"max_tokens": 6, "temperature": 0} | kwargs
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, **kwargs)
    return raw.parse(), json.loads(raw.headers["x-tessera-composition"])


def test_models_list_auto_only_with_a_text_router(routed, client, server):
    cards = {m.id: m.to_dict() for m in client.models.list()}
    assert cards["auto"]["tessera"] == {
        "kind": "router", "encoder": "all-MiniLM-L6-v2", "tasks": list(TASKS), "min_confidence": MIN_CONFIDENCE,
    }
    assert cards["auto"]["parent"] == routed.backbone
    assert "auto" not in {m.id for m in server.client().models.list()}


def test_auto_chat_routes_the_last_user_message(routed, client):
    response, header = chat(client, "auto")
    expected = inferred(routed.library, "reverse")
    assert header == response.to_dict()["tessera"]["composition"] == expected and expected["modules"]
    assert response.model == "auto"
    tagged, tagged_header = chat(client, "reverse")
    assert tagged_header == expected | {"source": "tag"}
    assert response.choices[0].message.content == tagged.choices[0].message.content


@pytest.mark.parametrize("route", ["backbone:auto", "body", "header"])
def test_auto_routes_are_equivalent(routed, client, route):
    backbone = routed.backbone
    kwargs = {
        "backbone:auto": {"model": f"{backbone}:auto"},
        "body": {"model": backbone, "extra_body": {"task": "auto"}},
        "header": {"model": backbone, "extra_headers": {"X-Tessera-Task": "auto"}},
    }[route]
    response, header = chat(client, **kwargs)
    assert header == response.to_dict()["tessera"]["composition"] == inferred(routed.library, "reverse")


def test_auto_completions_string_ids_and_stream(routed, client):
    expected = inferred(routed.library, "arithmetic")
    by_text = client.completions.create(model="auto", prompt=ARITHMETIC, max_tokens=5, temperature=0)
    assert by_text.to_dict()["tessera"]["composition"] == expected
    ids = AutoTokenizer.from_pretrained(routed.engine.config.model).encode(ARITHMETIC)
    by_ids = client.completions.create(model="auto", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.to_dict()["tessera"]["composition"] == expected
    assert by_ids.choices[0].text == by_text.choices[0].text
    chunks = list(client.completions.create(model="auto", prompt=ARITHMETIC, max_tokens=5, temperature=0, stream=True))
    assert chunks[-1].to_dict()["tessera"]["composition"] == expected
    assert "".join(c.choices[0].text for c in chunks if c.choices) == by_text.choices[0].text


def requests_finished(served: Served, task: str) -> float:
    """tessera_requests_total{task=task, status="length"} from GET /metrics."""
    text = httpx.get(served.url + "/metrics", timeout=30).text
    line = f'tessera_requests_total{{status="length",task="{task}"}} '
    return next((float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)), 0.0)


def test_metrics_label_the_predicted_task(routed, client):
    before = requests_finished(routed, "arithmetic")
    client.completions.create(model="auto", prompt=ARITHMETIC, max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    assert requests_finished(routed, "arithmetic") == before + 1


def test_low_confidence_is_a_400(routed, client):
    confidence = routed.library.controller.text_router.classify([OFF_TOPIC])[0][1]
    assert confidence < MIN_CONFIDENCE, "the off-topic prompt must sit under the library's floor"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "auto", messages=[{"role": "user", "content": OFF_TOPIC}])
    error = caught.value.body
    assert error["code"] == "low_routing_confidence" and error["param"] == "model"
    assert f"under the library's min_confidence {MIN_CONFIDENCE}; tag the task explicitly" in error["message"]


def test_auto_request_errors(routed, client):
    with pytest.raises(openai.BadRequestError, match="routes one prompt per request, got 2"):
        client.completions.create(model="auto", prompt=[ARITHMETIC, "write river backwards"], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="routes by the last user message, and there is none"):
        chat(client, "auto", messages=[{"role": "system", "content": "reverse the letters of apple"}])
    with pytest.raises(openai.BadRequestError, match=r"conflicting task tags: \['auto', 'uppercase'\]"):
        chat(client, "auto", extra_body={"task": "uppercase"})
    with pytest.raises(openai.BadRequestError, match="give either a task or explicit module weights"):
        chat(client, "auto", extra_body={"modules": {"m0": 1.0}})


def test_auto_without_a_text_router_is_a_404(server):
    client = server.client()
    for kwargs in ({"model": "auto"}, {"model": server.backbone, "extra_body": {"task": "auto"}}):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=2, **kwargs)
        error = caught.value.body
        assert error["code"] == "model_not_found"
        assert "the module library has no text router, so 'auto' cannot route prompts" in error["message"]

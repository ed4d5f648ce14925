"""Every error in OpenAI's shape, with the right status and `param`; API-key checks on a second server."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.api.conftest import MAX_MODEL_LEN, make_engine, serve

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hello"}]
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict:
    """The `error` object of an OpenAI-shaped error response, after checking its status and keys."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def chat_body(server, **fields) -> dict:
    return {"model": server.backbone, "messages": MESSAGES, "max_tokens": 4} | fields


@pytest.mark.parametrize("fields, header, param, code", [
    ({"model": "no-such-task"}, None, "model", "model_not_found"),
    ({"model": "BACKBONE:no-such-task"}, None, "model", "model_not_found"),
    ({"task": "no-such-task"}, None, "task", "model_not_found"),
    ({}, "no-such-task", "task", "model_not_found"),
    ({"modules": {"m0": 0.5, "no-such-module": 0.5}}, None, "modules", "module_not_found"),
    ({"model": "reverse+no-such-task"}, None, "model", "model_not_found"),
])
def test_unknown_task_or_module_is_404_never_the_backbone(server, http, fields, header, param, code):
    body = chat_body(server, **fields)
    body["model"] = body["model"].replace("BACKBONE", server.backbone)
    headers = {"X-Tessera-Task": header} if header else {}
    error = error_of(http.post(CHAT, json=body, headers=headers), 404)
    assert (error["param"], error["code"], error["type"]) == (param, code, "not_found_error")
    assert "no-such" in error["message"]


@pytest.mark.parametrize("fields, header, param", [
    ({"model": "reverse", "task": "uppercase"}, None, "task"),
    ({"task": "reverse"}, "uppercase", "task"),
    ({"model": "m0", "task": "reverse"}, None, "task"),
    ({"model": "m0", "modules": {"m1": 1.0}}, None, "modules"),
    ({"task": "reverse", "modules": {"m1": 1.0}}, None, "modules"),
    ({"task": "reverse+reverse"}, None, "task"),
])
def test_conflicting_or_invalid_tags_are_400(server, http, fields, header, param):
    headers = {"X-Tessera-Task": header} if header else {}
    error = error_of(http.post(CHAT, json=chat_body(server, **fields), headers=headers), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_a_weight_that_is_not_finite_is_400(server, http):
    body = json.dumps(chat_body(server)).replace('"max_tokens"', '"modules": {"m0": 1e400}, "max_tokens"')
    response = http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    error = error_of(response, 400)
    assert error["param"] == "modules" and "finite" in error["message"], error


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
    ({"logit_bias": {"twelve": 5}}, "logit_bias"),
    ({"logit_bias": {"12": 101}}, "logit_bias"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stop": ["a"] * 9}, "stop"),
    ({"modules": {}}, "modules"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": ""}, "model"),
    ({"model": None}, "model"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),  # auto: no call parser
    ({"tools": [{"type": "nope"}]}, "tools.0.type"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
])
def test_invalid_chat_parameters_are_400_naming_the_parameter(server, http, fields, param):
    error = error_of(http.post(CHAT, json=chat_body(server, **fields)), 400)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("fields, param", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [-1, 3]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"logprobs": 50}, "logprobs"),
    ({"suffix": "x"}, "suffix"),
    ({"prompt": list(range(10)) * (MAX_MODEL_LEN // 10 + 1)}, "prompt"),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
])
def test_invalid_completion_parameters_are_400(server, http, fields, param):
    body = {"model": server.backbone, "prompt": "hello", "max_tokens": 4} | fields
    error = error_of(http.post(COMPLETIONS, json=body), 400)
    assert error["param"] == param, error


def test_context_overflow_names_the_length_parameter(server, http):
    error = error_of(http.post(CHAT, json=chat_body(server, max_completion_tokens=MAX_MODEL_LEN)), 400)
    assert (error["param"], error["code"]) == ("max_completion_tokens", "context_length_exceeded")
    assert str(MAX_MODEL_LEN) in error["message"]
    long_messages = [{"role": "user", "content": "hello " * MAX_MODEL_LEN}]
    error = error_of(http.post(CHAT, json=chat_body(server, messages=long_messages, max_tokens=None)), 400)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")


@pytest.mark.parametrize("content", [b"{not json", b'{"model": "x",', b"[1, 2]", b'"text"', b""])
def test_malformed_json_is_400(http, content):
    response = http.post(CHAT, content=content, headers={"Content-Type": "application/json"})
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error"


def test_unknown_route_and_method_use_the_error_shape(http):
    assert error_of(http.get("/v1/nothing-here"), 404)["code"] == "not_found"
    error_of(http.get(CHAT), 405)


def test_health_ping_and_version(http):
    response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert http.get("/ping").status_code == 200 and http.post("/ping").status_code == 200
    from importlib.metadata import version

    assert http.get("/version").json() == {"version": version("tessera-serve")}


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_404(server):
    client = server.client()
    listed = {m.id: m for m in client.models.list()}
    time.sleep(1.05)  # a card says when the server started, not when it was asked: the same a second later
    for name in ("reverse", server.backbone):
        assert client.models.retrieve(name) == listed[name]
    with pytest.raises(Exception) as caught:
        client.models.retrieve("no-such-model")
    assert type(caught.value).__name__ == "NotFoundError" and caught.value.body["code"] == "model_not_found"


@pytest.fixture(scope="module")
def keyed(tiny_llama):
    """A second server, backbone only, that requires an API key."""
    with serve(make_engine(tiny_llama, None), api_key=KEY) as served:
        yield served


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("GET", "/v1/models/x"), ("POST", CHAT), ("POST", COMPLETIONS), ("GET", "/metrics"),
    ("GET", "/nowhere"),
])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", KEY, f"Bearer {KEY}x", "Basic abc"])
def test_api_key_required_everywhere_but_health(keyed, method, path, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, keyed.url + path, headers=headers, json={}, timeout=30)
    error = error_of(response, 401)
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")


def test_api_key_accepted(keyed):
    for path in ("/health", "/ping", "/version"):  # probes need no key
        assert httpx.get(keyed.url + path, timeout=30).status_code == 200
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(keyed.url + "/metrics", headers=headers, timeout=30).status_code == 200
    assert [m.id for m in keyed.client(KEY).models.list()] == [keyed.backbone]
    response = keyed.client(KEY).chat.completions.create(model=keyed.backbone, messages=MESSAGES, max_tokens=3)
    assert response.usage.completion_tokens >= 1
    with pytest.raises(Exception) as caught:
        keyed.client("wrong").models.list()
    assert type(caught.value).__name__ == "AuthenticationError"


def _failing_launch(engine, message: str):
    """The runner's launch, made to raise `message` once: a fault injected where a device error would surface."""
    launch, calls = engine.runner.launch, []

    def launch_once(plan):
        if not plan.is_empty and not calls:
            calls.append(plan)
            raise RuntimeError(message)
        return launch(plan)

    engine.runner.launch = launch_once


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(tiny_llama):
    with serve(make_engine(tiny_llama, None)) as served:
        http = httpx.Client(base_url=served.url, timeout=30)
        _failing_launch(served.engine, "out of memory in a step")
        error = error_of(http.post(CHAT, json=chat_body(served)), 500)
        assert error["code"] == "internal_error" and "out of memory in a step" in error["message"]
        assert http.get("/health").status_code == 200
        assert http.post(CHAT, json=chat_body(served)).status_code == 200


def test_an_unrecoverable_device_error_ends_the_engine_and_health_says_so(tiny_llama):
    with serve(make_engine(tiny_llama, None)) as served:
        http = httpx.Client(base_url=served.url, timeout=30)
        assert http.get("/health").status_code == 200
        _failing_launch(served.engine, "CUDA error: an illegal memory access was encountered")
        error_of(http.post(CHAT, json=chat_body(served)), 500)  # the step that hit it
        health = error_of(http.get("/health"), 503)
        assert health["code"] == "engine_dead" and "illegal memory access" in health["message"]
        for _ in range(2):  # later requests are refused at once, streamed or not, never left waiting
            assert error_of(http.post(CHAT, json=chat_body(served)), 503)["code"] == "engine_dead"
        with http.stream("POST", COMPLETIONS, json={"model": served.backbone, "prompt": "a", "stream": True}) as r:
            last = [line for line in r.iter_lines() if line.startswith("data: ")][-1]
        assert '"engine_dead"' in last


def test_finished_requests_are_logged_one_line_each_when_asked(tiny_llama, caplog):
    import logging

    from server.api.background import serve_in_background

    engine = make_engine(tiny_llama, None)
    with caplog.at_level(logging.INFO, logger="server.api.serving"):
        for asked, request_id in ((True, "logged-1"), (False, "quiet-1")):
            with serve_in_background(make_engine(tiny_llama, None), log_requests=asked) as url:
                httpx.post(url + CHAT, json={"model": engine.model_name, "messages": MESSAGES, "max_tokens": 3,
                                             "ignore_eos": True}, headers={"X-Request-Id": request_id}, timeout=30)
    lines = [r.getMessage() for r in caplog.records if "(logged-1)" in r.getMessage()]
    assert len(lines) == 1 and " length: model " in lines[0] and "3 generated tokens" in lines[0], lines
    assert not [r for r in caplog.records if "(quiet-1)" in r.getMessage()]  # off unless asked


def test_calls_past_max_concurrent_requests_are_429_until_one_finishes(tiny_llama):
    import threading

    from server.api.background import serve_in_background

    engine = make_engine(tiny_llama, None)
    long = {"model": engine.model_name, "prompt": "a", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with serve_in_background(engine, max_concurrent_requests=1) as url:
        started, finished = threading.Event(), []

        def stream():
            with httpx.stream("POST", url + COMPLETIONS, json=long, timeout=60) as response:
                for line in response.iter_lines():
                    started.set()
                    finished.append(line)

        worker = threading.Thread(target=stream)
        worker.start()
        assert started.wait(30)
        refused = httpx.post(url + CHAT, json={"model": engine.model_name, "messages": MESSAGES, "max_tokens": 2},
                             timeout=30)
        error = error_of(refused, 429)
        assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
        assert refused.headers["retry-after"] == "1"
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert 'tessera_requests_rejected_total{code="overloaded",status="429"} 1.0' in metrics
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 200  # only generation calls count
        worker.join(60)
        assert "data: [DONE]" in finished
        for _ in range(100):  # the slot comes back once the server has sent the stream's end (just after [DONE])
            served = httpx.post(url + CHAT, json={"model": engine.model_name, "messages": MESSAGES, "max_tokens": 2},
                                timeout=30)
            if served.status_code != 429:
                break
            time.sleep(0.02)
        assert served.status_code == 200

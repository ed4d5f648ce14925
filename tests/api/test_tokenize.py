"""vLLM's /tokenize and /detokenize: the same token ids the completion endpoints count."""

from __future__ import annotations

import httpx
import pytest

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: abc"}]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_tokenize_counts_what_the_completion_endpoints_count(server, http):
    client = server.client()
    text = "the quick brown fox"
    tokens = http.post("/tokenize", json={"model": server.backbone, "prompt": text}).json()
    completion = client.completions.create(model=server.backbone, prompt=text, max_tokens=1)
    assert tokens["count"] == len(tokens["tokens"]) == completion.usage.prompt_tokens
    assert tokens["max_model_len"] == server.engine.max_model_len and tokens["token_strs"] is None
    chat = http.post("/tokenize", json={"model": "reverse", "messages": MESSAGES, "return_token_strs": True}).json()
    reply = client.chat.completions.create(model="reverse", messages=MESSAGES, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens and len(chat["token_strs"]) == chat["count"]
    bare = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["tokens"] == chat["tokens"][: bare["count"]] and bare["count"] < chat["count"]
    back = http.post("/detokenize", json={"model": server.backbone, "tokens": tokens["tokens"]}).json()
    assert back == {"prompt": server.engine.tokenizer.decode(tokens["tokens"])} and text in back["prompt"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, None),
    ("/tokenize", {}, None),
    ("/tokenize", {"messages": []}, "messages"),
    ("/detokenize", {"tokens": [1, -2]}, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
])
def test_bad_bodies_are_400_in_the_openai_shape(http, path, body, param):
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param

"""Structured outputs through the official `openai` client: OpenAI's response_format and vLLM's structured_outputs."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

MESSAGES = [{"role": "user", "content": "pick a color"}]


class Pick(BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_parse_with_a_pydantic_model_returns_the_parsed_object(client):
    """The SDK's `parse` sends a strict json_schema response_format and validates the reply itself."""
    for model in ("reverse", "uppercase"):
        completion = client.chat.completions.parse(model=model, messages=MESSAGES, response_format=Pick,
                                                   max_tokens=60, temperature=1.0, seed=7)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pick)
        assert Pick.model_validate_json(choice.message.content) == choice.message.parsed


def test_vllm_structured_outputs_choice_regex_and_grammar(client, server):
    both = client.chat.completions.create(model="reverse", messages=MESSAGES, n=2, max_tokens=20, temperature=1.0,
                                          seed=1, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert all(c.message.content in ("yes", "no") and c.finish_reason == "stop" for c in both.choices)
    stream = client.completions.create(model=server.backbone, prompt="the code is", max_tokens=20, stream=True,
                                       extra_body={"structured_outputs": {"regex": "[A-F]{2}-[0-9]{3}"}})
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert re.fullmatch("[A-F]{2}-[0-9]{3}", text), text
    ebnf = 'root ::= "[" num ("," num)* "]"\nnum ::= [1-9]'
    listed = client.completions.create(model=server.backbone, prompt="a list:", max_tokens=30, temperature=1.0,
                                       seed=2, extra_body={"structured_outputs": {"grammar": ebnf}})
    text = listed.choices[0].text
    complete = listed.choices[0].finish_reason == "stop"  # else max_tokens cut it: a prefix of the language
    assert re.fullmatch(r"\[[1-9](,[1-9])*\]" if complete else r"\[[1-9](,[1-9])*,?", text), text
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"],
              "additionalProperties": False}
    by_schema = client.chat.completions.create(model=server.backbone, messages=MESSAGES, max_tokens=30,
                                               extra_body={"structured_outputs": {"json": schema}})
    assert json.loads(by_schema.choices[0].message.content)["n"] in (1, 2, 3)


def test_json_object_starts_a_json_value_and_free_text_is_unchanged(client, server):
    free = client.chat.completions.create(model="reverse", messages=MESSAGES, max_tokens=8, temperature=0)
    text_format = client.chat.completions.create(model="reverse", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 response_format={"type": "text"})
    assert text_format.choices[0].message.content == free.choices[0].message.content
    constrained = client.chat.completions.create(model="reverse", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 response_format={"type": "json_object"})
    content = constrained.choices[0].message.content
    assert content != free.choices[0].message.content and content.lstrip()[:1] in ("{", "[")


def test_a_bad_constraint_is_a_400_in_the_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="reverse", messages=MESSAGES, max_tokens=8,
                                       extra_body={"structured_outputs": {"regex": "[unclosed"}})
    error = caught.value.body
    assert error["code"] == "invalid_structured_output" and error["param"] == "structured_outputs"
    assert "invalid regex" in error["message"]
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "reverse", "messages": MESSAGES,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    scheduler = getattr(server.engine, "scheduler", None)  # (an engine in its own process keeps it there)
    assert scheduler is None or scheduler.num_structured == 0


@pytest.mark.parametrize(("legacy", "current"), [
    ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
    ({"guided_regex": "[A-F]{2}-[0-9]{3}"}, {"regex": "[A-F]{2}-[0-9]{3}"}),
    ({"guided_json": Pick.model_json_schema()}, {"json": Pick.model_json_schema()}),
    ({"guided_grammar": 'root ::= "[" [1-9] "]"'}, {"grammar": 'root ::= "[" [1-9] "]"'}),
])
def test_vllm_older_guided_fields_constrain_as_structured_outputs_do(client, legacy, current):
    """Clients written for vLLM before 0.12 still send guided_*; they are honoured, not ignored."""
    kwargs = dict(model="reverse", messages=MESSAGES, max_tokens=40, temperature=1.0, seed=5)
    old = client.chat.completions.create(**kwargs, extra_body=legacy).choices[0].message.content
    new = client.chat.completions.create(**kwargs, extra_body={"structured_outputs": current}).choices[0].message.content
    free = client.chat.completions.create(**kwargs).choices[0].message.content
    assert old == new != free


@pytest.mark.parametrize("fields", [
    {"guided_regex": "a", "guided_choice": ["a"]},
    {"guided_regex": "a", "structured_outputs": {"regex": "b"}},
])
def test_more_than_one_constraint_with_guided_fields_is_a_400(server, fields):
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": "reverse", "messages": MESSAGES,
                                                                     **fields}, timeout=30)
    assert response.status_code == 400 and "one structured-output constraint" in response.json()["error"]["message"]


TAG = {"structures": [{"begin": "<f>", "schema": {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}},
                                                  "required": ["n"], "additionalProperties": False}, "end": "</f>"}],
       "triggers": ["<f"]}


def test_structural_tags_in_each_form_vllm_takes_constrain_alike(client, server):
    """response_format {"type": "structural_tag", ...} (both forms), structured_outputs.structural_tag (text or
    object) and the older top-level structural_tag: the same tags, so the same seeded text; a logit bias towards the
    trigger makes the tiny model write tags, whose content keeps to their schema."""
    from tests.server.test_structured import check_tagged

    bias = {str(t): 30 for t in server.engine.tokenizer.encode("<f", add_special_tokens=False)}
    kwargs = dict(model="reverse", messages=MESSAGES, max_tokens=50, temperature=1.0, seed=3, logit_bias=bias)
    schema = TAG["structures"][0]["schema"]
    new_form = {"type": "triggered_tags", "triggers": ["<f"], "tags": [
        {"type": "tag", "begin": "<f>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</f>"}]}
    texts = [client.chat.completions.create(**kwargs, **request).choices[0].message.content for request in (
        {"response_format": {"type": "structural_tag", **TAG}},
        {"response_format": {"type": "structural_tag", "format": new_form}},
        {"extra_body": {"structured_outputs": {"structural_tag": json.dumps(TAG)}}},
        {"extra_body": {"structured_outputs": {"structural_tag": TAG}}},
        {"extra_body": {"structural_tag": json.dumps(TAG)}})]
    assert len(set(texts)) == 1 and check_tagged(texts[0]) >= 1, texts


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"response_format": {"type": "structural_tag", "triggers": ["<f"]}}, None, "either format, or structures"),
    ({"response_format": {"type": "json_object", "triggers": ["<f"]}}, None, "only go with type structural_tag"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "nope"}}}, "response_format",
     "invalid structural tag"),
    ({"structured_outputs": {"structural_tag": "{not json"}}, "structured_outputs", "not JSON"),
    ({"structural_tag": "{}", "guided_regex": "a"}, None, "got guided_regex, structural_tag"),
])
def test_a_bad_structural_tag_is_a_400_naming_it(server, body, param, message):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                          json={"model": "reverse", "messages": MESSAGES, "max_tokens": 4, **body})
    error = response.json()["error"]
    assert response.status_code == 400 and message in error["message"], error
    if param is not None:
        assert error["param"] == param and error["code"] == "invalid_structured_output"

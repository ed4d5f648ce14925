"""OpenAI's Responses API through the official client: the same tokens as the chat endpoint for the same
conversation, streamed events that add up to the response, function calls both ways, structured text, and
what a stateless server refuses."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api.test_errors import error_of
from tests.api.test_tools import WEATHER, _check_weather

GREEDY = {"temperature": 0.0, "max_output_tokens": 6}
RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _chat_text(client, messages, **fields) -> tuple[str, int]:
    reply = client.chat.completions.create(model="reverse", messages=messages, temperature=0, max_tokens=6,
                                           extra_body={"ignore_eos": True}, **fields)
    return reply.choices[0].message.content, reply.usage.prompt_tokens


def test_a_response_says_what_the_chat_endpoint_says_for_the_same_conversation(client):
    response = client.responses.create(model="reverse", input="reverse: abc", extra_body={"ignore_eos": True},
                                       **GREEDY)
    text, prompt_tokens = _chat_text(client, [{"role": "user", "content": "reverse: abc"}])
    assert response.output_text == text and response.usage.input_tokens == prompt_tokens
    assert response.usage.output_tokens == 6 and response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens" and response.id.startswith("resp_")
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"

    conversation = [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"},
                    {"role": "user", "content": [{"type": "input_text", "text": "again: xyz"}]}]
    turns = client.responses.create(model="reverse", instructions="be brief", input=conversation,
                                    extra_body={"ignore_eos": True}, **GREEDY)
    expected, _ = _chat_text(client, [{"role": "system", "content": "be brief"}, conversation[0], conversation[1],
                                      {"role": "user", "content": "again: xyz"}])
    assert turns.output_text == expected


def test_streamed_events_add_up_to_the_response(client):
    kwargs = dict(model="uppercase", input="the quick brown fox", temperature=0.0, max_output_tokens=8)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == f"response.{whole.status}"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    assert kinds.index("response.output_item.added") < kinds.index("response.content_part.added") < \
        kinds.index("response.output_text.delta") < kinds.index("response.output_text.done") < \
        kinds.index("response.output_item.done")


def test_function_calls_go_out_and_their_results_come_back(client):
    named = dict(model="reverse", input="what is the weather in paris?", tools=[RESPONSES_WEATHER],
                 tool_choice={"type": "function", "name": "get_weather"}, temperature=1.0, max_output_tokens=60)
    response = client.responses.create(**named, extra_body={"seed": 4})
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    _check_weather(call.arguments)
    events = list(client.responses.create(**named, extra_body={"seed": 4}, stream=True))
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and "".join(pieces) == call.arguments
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(d.arguments, d.name) for d in done] == [(call.arguments, "get_weather")]

    follow_up = [{"role": "user", "content": "what is the weather in paris?"},
                 {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},
                 {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees"}]
    answer = client.responses.create(model="reverse", input=follow_up, tools=[RESPONSES_WEATHER], tool_choice="none",
                                     extra_body={"ignore_eos": True}, **GREEDY)
    expected, _ = _chat_text(client, [follow_up[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 degrees"}], tools=[WEATHER], tool_choice="none")
    assert answer.output_text == expected


def test_text_format_json_schema_shapes_the_output(client):
    schema = {"type": "object", "properties": {"word": {"enum": ["yes", "no"]}}, "required": ["word"],
              "additionalProperties": False}
    response = client.responses.create(model="reverse", input="answer", max_output_tokens=30, temperature=1.0,
                                       text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    assert json.loads(response.output_text)["word"] in ("yes", "no") and response.status == "completed"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ({"input": []}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input"),
    ({"input": "hi", "truncation": "auto"}, 400, "truncation"),
    ({"input": "hi", "model": "nope"}, 404, "model"),
])
def test_what_a_stateless_server_cannot_serve_is_an_openai_error(server, body, status, param):
    response = httpx.post(server.url + "/v1/responses", json={"model": "reverse", **body}, timeout=30)
    assert error_of(response, status)["param"] == param


def test_output_text_logprobs_when_included(client):
    kwargs = dict(model="reverse", input="reverse: abc", include=["message.output_text.logprobs"], top_logprobs=2,
                  extra_body={"ignore_eos": True}, **GREEDY)
    response = client.responses.create(**kwargs)
    part = response.output[0].content[0]
    assert len(part.logprobs) == response.usage.output_tokens == 6
    assert "".join(lp.token for lp in part.logprobs) == response.output_text
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token == lp.token for lp in part.logprobs)  # greedy
    events = list(client.responses.create(**kwargs, stream=True))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [(lp.token, lp.logprob) for lp in streamed] == [(lp.token, lp.logprob) for lp in part.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert len(done.logprobs) == 6
    plain = client.responses.create(model="reverse", input="reverse: abc", **GREEDY)
    assert plain.output[0].content[0].logprobs == []

"""OpenAI's Responses API through the official client: the same tokens as the chat endpoint for the same
conversation, streamed events that add up to the response, function calls both ways, structured text, stored
responses (continued by `previous_response_id`, read, listed and deleted), and what the server refuses."""

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
    ({"input": "hi", "previous_response_id": "resp_1"}, 404, "previous_response_id"),
    ({"input": []}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input"),
    ({"input": "hi", "truncation": "auto"}, 400, "truncation"),
    ({"input": "hi", "model": "nope"}, 404, "model"),
])
def test_what_the_server_cannot_serve_is_an_openai_error(server, body, status, param):
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


def _same_reply(a, b) -> None:
    assert (a.output_text, a.usage.input_tokens, a.usage.output_tokens) == \
        (b.output_text, b.usage.input_tokens, b.usage.output_tokens)


def test_a_conversation_continued_by_id_is_the_whole_conversation_sent_again(client):
    kwargs = dict(model="reverse", extra_body={"ignore_eos": True}, **GREEDY)
    first = client.responses.create(input="reverse: abc", instructions="be brief", **kwargs)
    assert first.store is True and first.previous_response_id is None
    second = client.responses.create(input="again: xyz", previous_response_id=first.id, **kwargs)
    history = [{"role": "user", "content": "reverse: abc"}, *[item.model_dump() for item in first.output]]
    _same_reply(second, client.responses.create(input=[*history, {"role": "user", "content": "again: xyz"}],
                                                **kwargs))  # instructions are not carried over, as OpenAI's
    assert second.previous_response_id == first.id
    events = list(client.responses.create(input="once more: q", previous_response_id=second.id, stream=True,
                                          **kwargs))
    third = events[-1].response
    assert third.store is True and client.responses.retrieve(third.id).output_text == third.output_text
    fourth = client.responses.create(input="and: r", previous_response_id=third.id, **kwargs)  # from a stream
    assert fourth.usage.input_tokens > third.usage.input_tokens > second.usage.input_tokens

    listed = client.responses.input_items.list(second.id)
    assert [item.content[0].text for item in listed.data] == ["again: xyz"] and listed.has_more is False
    assert client.responses.retrieve(first.id).output_text == first.output_text


def test_function_call_results_continue_the_stored_turn_that_called(client):
    named = dict(model="reverse", tools=[RESPONSES_WEATHER], temperature=1.0, max_output_tokens=60,
                 extra_body={"seed": 4})
    asked = client.responses.create(input="what is the weather in paris?", **named,
                                    tool_choice={"type": "function", "name": "get_weather"})
    (call,) = asked.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees"}
    follow = dict(model="reverse", tools=[RESPONSES_WEATHER], tool_choice="none", extra_body={"ignore_eos": True},
                  **GREEDY)
    by_id = client.responses.create(input=[result], previous_response_id=asked.id, **follow)
    whole = [{"role": "user", "content": "what is the weather in paris?"}, call.model_dump(), result]
    _same_reply(by_id, client.responses.create(input=whole, **follow))


def test_deleted_unstored_and_broken_conversations_are_404s(client):
    from openai import NotFoundError

    kwargs = dict(model="reverse", **GREEDY)
    unstored = client.responses.create(input="abc", store=False, **kwargs)
    assert unstored.store is False
    first = client.responses.create(input="abc", **kwargs)
    second = client.responses.create(input="def", previous_response_id=first.id, **kwargs)
    client.responses.delete(first.id)
    for response_id in (unstored.id, first.id):
        with pytest.raises(NotFoundError):
            client.responses.retrieve(response_id)
    with pytest.raises(NotFoundError) as caught:
        client.responses.create(input="ghi", previous_response_id=second.id, **kwargs)
    assert caught.value.body["code"] == "previous_response_not_found" and first.id in caught.value.body["message"]
    assert client.responses.retrieve(second.id).id == second.id  # still readable, no longer continuable
    with pytest.raises(NotFoundError):
        client.responses.delete(first.id)


def test_input_items_page_newest_first_unless_asked(client):
    items = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    response = client.responses.create(model="reverse", input=items, **GREEDY)
    newest = client.responses.input_items.list(response.id, limit=2)
    assert [i.content[0].text for i in newest.data] == ["turn 4", "turn 3"] and newest.has_more
    rest = client.responses.input_items.list(response.id, limit=10, after=newest.last_id)
    assert [i.content[0].text for i in rest.data] == ["turn 2", "turn 1", "turn 0"] and not rest.has_more
    oldest = client.responses.input_items.list(response.id, order="asc", limit=1)
    assert oldest.data[0].content[0].text == "turn 0" and len({i.id for i in newest.data + rest.data}) == 5


def test_the_store_keeps_the_most_recent_and_whole_chains():
    from server.api.errors import APIError
    from server.api.openai_responses import with_history
    from server.api.protocol import ResponsesRequest
    from server.api.response_store import MissingTurnError, ResponseStore

    store = ResponseStore(3)
    out = lambda i: {"id": f"r{i}", "output": [{"type": "message", "role": "assistant",  # noqa: E731
                                                  "content": [{"type": "output_text", "text": f"a{i}"}]}]}
    store.put(out(1), [{"role": "user", "content": "q1"}], None)
    store.put(out(2), [{"role": "user", "content": "q2"}], "r1")
    store.put(out(9), [{"role": "user", "content": "q9"}], None)
    assert [i.get("content") for i in store.conversation("r2")][::2] == ["q1", "q2"]  # r1 and r2 now recent
    store.put(out(3), [{"role": "user", "content": "q3"}], "r2")  # evicts r9, the least recently used
    assert store.get("r9") is None and len(store) == 3
    body = ResponsesRequest(model="m", input="q4", previous_response_id="r3")
    texts = [item.text() for item in with_history(body, store)[0].input]
    assert texts == ["q1", "a1", "q2", "a2", "q3", "a3", "q4"]
    store.put(out(4), [], "r3")  # evicts r1: the chain from r4 is broken
    with pytest.raises(MissingTurnError, match="r1"):
        store.conversation("r4")
    with pytest.raises(APIError) as caught:
        with_history(body, ResponseStore(0))
    assert caught.value.status == 400 and caught.value.param == "previous_response_id"

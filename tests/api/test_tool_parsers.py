"""The parsers of models' own tool-call formats (tool_choice auto): what each reads as calls and as text,
what a reply still being generated may stream, and the llama3_json and mistral parsers behind a real server."""

from __future__ import annotations

import json
import re

import pytest

from server.api.tool_parsers import PARSERS
from server.api.tools import auto_calls
from tests.api.test_tools import MESSAGES, TIME, WEATHER

NAMES = frozenset({"get_time", "get_weather"})


def _calls(parser: str, text: str) -> tuple[str | None, list[tuple[str, dict]] | None]:
    content, calls = auto_calls(PARSERS[parser], text, NAMES)
    return content, None if calls is None else [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                                for c in calls]


TIME_CALL = ("get_time", {"utc": True})
OSLO_CALL = ("get_weather", {"city": "oslo", "unit": "c"})


@pytest.mark.parametrize(("parser", "text", "content", "calls"), [
    ("llama3_json", '{"name": "get_time", "parameters": {"utc": true}}', None, [TIME_CALL]),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "arguments": {"utc": true}}', None, [TIME_CALL]),
    ("llama3_json", ' {"name": "get_time", "parameters": {"utc": true}}; {"name": "get_weather", '
                    '"parameters": {"city": "oslo", "unit": "c"}}\n', None, [TIME_CALL, OSLO_CALL]),
    ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {"utc": true}}, {"name": "get_weather", '
                '"arguments": {"city": "oslo", "unit": "c"}}]', None, [TIME_CALL, OSLO_CALL]),
    ("mistral", 'Checking. [TOOL_CALLS]get_time[ARGS]{"utc": true}[TOOL_CALLS]get_weather[ARGS]'
                '{"city": "oslo", "unit": "c"}', "Checking.", [TIME_CALL, OSLO_CALL]),
])
def test_each_format_reads_its_calls(parser, text, content, calls):
    assert _calls(parser, text) == (content, calls)


@pytest.mark.parametrize(("parser", "text"), [
    ("llama3_json", "It is noon."),
    ("llama3_json", 'The call would be {"name": "get_time", "parameters": {"utc": true}}'),  # not at the start
    ("llama3_json", '{"name": "get_time", "parameters": {"utc": true}} and then some text'),
    ("llama3_json", '{"name": "get_time", "parameters": {"utc": tr'),  # cut by max_tokens
    ("llama3_json", '{"name": "rm_rf", "parameters": {}}'),  # not a tool of the request
    ("llama3_json", '{"name": "get_time", "parameters": "utc"}'),  # arguments not an object
    ("llama3_json", '[1, 2]'),
    ("mistral", "no calls here"),
    ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {"utc": tr'),
    ("mistral", '[TOOL_CALLS]get_time[ARGS]{"utc": true'),
    ("mistral", '[TOOL_CALLS]["get_time"]'),
    ("mistral", '[TOOL_CALLS]'),
    ("hermes", '<tool_call>["get_time"]</tool_call>'),
])
def test_anything_else_stays_text(parser, text):
    assert _calls(parser, text) == (text, None)


def test_content_streams_up_to_where_a_call_may_begin():
    llama, mistral = PARSERS["llama3_json"].streamable, PARSERS["mistral"].streamable
    assert llama("It is") == "It is" and llama("  ") == "" and llama('{"name"') == "" and llama("<|pyth") == ""
    assert llama("<|python_tag|>{") == "" and llama("<b>bold</b>") == "<b>bold</b>"
    assert mistral("Checking. [TOOL") == "Checking. " and mistral("a [b] c") == "a [b] c"
    assert mistral("x[TOOL_CALLS]get") == "x"


def _forced(text: str) -> dict:
    """vLLM's structured_outputs regex that makes the tiny model write `text` (what a real model would say)."""
    return {"structured_outputs": {"regex": re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", text)}}


@pytest.mark.parametrize(("parser", "said"), [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "oslo", "unit": "c"}}'),
    ("mistral", 'On it.[TOOL_CALLS]get_weather[ARGS]{"city": "oslo", "unit": "c"}'),
])
def test_auto_reads_the_calls_through_a_real_server(tiny_llama, library_dir, parser, said):
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from tests.api.conftest import MAX_MODEL_LEN, serve

    engine = Engine(EngineConfig(model=tiny_llama, library=library_dir, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN,
                                 tool_call_parser=parser))
    with serve(engine) as served:
        client = served.client()
        ask = dict(model="reverse", messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=200, extra_body=_forced(said))
        choice = client.chat.completions.create(**ask).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == ("On it." if parser == "mistral" else None)
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [OSLO_CALL]
        chunks = list(client.chat.completions.create(**ask, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == ("On it." if parser == "mistral" else "")
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
        assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [OSLO_CALL]

        special = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
        forced = client.chat.completions.create(model="reverse", messages=MESSAGES, tools=[WEATHER], max_tokens=2,
                                                temperature=0, logit_bias={str(special): 100})
        kept = parser == "mistral"  # its markers are special tokens, so its replies keep them in the text
        assert forced.choices[0].message.content == ("<|im_start|>" * 2 if kept else "")

"""The parsers of models' own tool-call formats (tool_choice auto): what each reads as calls and as text,
what a reply still being generated may stream, and the llama3_json and mistral parsers behind a real server."""

from __future__ import annotations

import json
import re

import pytest

from server.api.tool_parsers import PARSERS
from server.api.tools import auto_calls
from tests.api.test_tools import MESSAGES, TIME, WEATHER

NAMES = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (TIME, WEATHER)}


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
    ("qwen3_coder", "Let me look.\n<tool_call>\n<function=get_time>\n<parameter=utc>\ntrue\n</parameter>\n"
                    "</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\noslo\n"
                    "</parameter>\n<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>", "Let me look.",
     [TIME_CALL, OSLO_CALL]),
    ("qwen3_coder", "<function=get_time><parameter=utc>false</parameter></function>", None,
     [("get_time", {"utc": False})]),  # without the tool_call wrapper
    ("pythonic", '[get_time(utc=True), get_weather(city="oslo", unit="c")]', None, [TIME_CALL, OSLO_CALL]),
    ("pythonic", '<|python_start|>[get_time(utc=True)]<|python_end|>\n', None, [TIME_CALL]),
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
    ("qwen3_coder", "no calls, just <b>markup</b>"),
    ("qwen3_coder", "<tool_call>\n<function=get_time>\n<parameter=utc>\ntrue"),  # cut by max_tokens
    ("qwen3_coder", "<function=rm_rf></function>"),  # not a tool of the request
    ("pythonic", "It is noon."),
    ("pythonic", "[1, 2]"),
    ("pythonic", '[get_time(utc=__import__("os").system("true"))]'),  # not a literal: never evaluated
    ("pythonic", "[get_time(True)]"),  # positional arguments have no names
    ("pythonic", '[get_time(utc=True)'),  # cut by max_tokens
    ("pythonic", "[]"),
])
def test_anything_else_stays_text(parser, text):
    assert _calls(parser, text) == (text, None)


def test_qwen3_coder_values_take_their_schemas_types():
    from server.api.tool_parsers import _typed

    assert _typed("3", {"type": "integer"}) == 3 and _typed("3.5", {"type": "integer"}) == "3.5"
    assert _typed(" 2.5 ", {"type": "number"}) == 2.5 and _typed("True", {"type": "boolean"}) is True
    assert _typed('{"a": [1]}', {"type": "object"}) == {"a": [1]} and _typed("[1, 2]", {"type": "array"}) == [1, 2]
    assert _typed("null", {"type": ["string", "null"]}) is None and _typed("7", {"type": ["integer", "null"]}) == 7
    assert _typed("007", {"type": "string"}) == "007" and _typed("007", None) == "007"  # text stays text
    assert _typed("not json", {"type": "object"}) == "not json"


def test_content_streams_up_to_where_a_call_may_begin():
    llama, mistral = PARSERS["llama3_json"].streamable, PARSERS["mistral"].streamable
    assert llama("It is") == "It is" and llama("  ") == "" and llama('{"name"') == "" and llama("<|pyth") == ""
    assert llama("<|python_tag|>{") == "" and llama("<b>bold</b>") == "<b>bold</b>"
    assert mistral("Checking. [TOOL") == "Checking. " and mistral("a [b] c") == "a [b] c"
    assert mistral("x[TOOL_CALLS]get") == "x"
    pythonic = PARSERS["pythonic"].streamable
    assert pythonic("[get_") == "" and pythonic("<|python_s") == "" and pythonic("Sure.") == "Sure."
    coder = PARSERS["qwen3_coder"].streamable
    assert coder("On it. <func") == "On it. " and coder("a <tool_") == "a " and coder("x<function=f>") == "x"


def _forced(text: str) -> dict:
    """vLLM's structured_outputs regex that makes the tiny model write `text` (what a real model would say)."""
    return {"structured_outputs": {"regex": re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", text)}}


@pytest.mark.parametrize(("parser", "said", "content"), [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "oslo", "unit": "c"}}', None),
    ("mistral", 'On it.[TOOL_CALLS]get_weather[ARGS]{"city": "oslo", "unit": "c"}', "On it."),
    ("qwen3_coder", "On it.\n<tool_call>\n<function=get_weather>\n<parameter=city>\noslo\n</parameter>\n"
                    "<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>", "On it."),
])
def test_auto_reads_the_calls_through_a_real_server(tiny_llama, library_dir, parser, said, content):
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
        assert choice.message.content == content
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [OSLO_CALL]
        chunks = list(client.chat.completions.create(**ask, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed.strip() == (content or "") and "<" not in streamed and "[" not in streamed
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
        assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [OSLO_CALL]

        special = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
        forced = client.chat.completions.create(model="reverse", messages=MESSAGES, tools=[WEATHER], max_tokens=2,
                                                temperature=0, logit_bias={str(special): 100})
        kept = parser == "mistral"  # its markers are special tokens, so its replies keep them in the text
        assert forced.choices[0].message.content == ("<|im_start|>" * 2 if kept else "")

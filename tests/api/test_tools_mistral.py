"""Mistral's tool calls under their structural tag: v3's `[TOOL_CALLS][{...}]` and v11's `[TOOL_CALLS]NAME[ARGS]{...}`,
whose markers are special tokens, on tiny checkpoints whose tokenizers have them (`TinyConfig.mistral_tools`)."""

from __future__ import annotations

import json

import pytest

from server.api.protocol import ChatCompletionRequest
from server.api.tool_parsers import PARSERS
from server.api.tools import call_tool_grammar, no_call_grammar
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from tests.api.conftest import MAX_MODEL_LEN, serve
from tests.api.test_tools import MESSAGES, TIME, WEATHER, _check_weather

PARSER = PARSERS["mistral"]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
CALLS = {  # one call to each tool, in each version's format
    "v3": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "oslo", "unit": "c"}}]',
           '[TOOL_CALLS][{"name": "get_time", "arguments": {"utc": true}}]'),
    "v11": ('[TOOL_CALLS]get_weather[ARGS]{"city": "oslo", "unit": "c"}', '[TOOL_CALLS]get_time[ARGS]{"utc": true}'),
}
BOTH = {"v3": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "oslo", "unit": "c"}}, '
              '{"name": "get_time", "arguments": {"utc": true}}]',
        "v11": CALLS["v11"][0] + CALLS["v11"][1]}


@pytest.fixture(scope="module", params=["v3", "v11"])
def mistral(request, tiny_checkpoints):
    version = request.param
    engine = Engine(EngineConfig(model=tiny_checkpoints("mistral", mistral_tools=version), num_kv_blocks=64,
                                 max_model_len=MAX_MODEL_LEN, tool_call_parser="mistral"))
    return version, engine


def _body(parallel: bool) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "tools": [WEATHER, TIME],
                                                 "parallel_tool_calls": parallel})


def test_the_format_is_the_one_the_chat_template_writes(mistral, tiny_llama):
    from transformers import AutoTokenizer

    version, engine = mistral
    assert PARSER.tag_format(engine.tokenizer) == f"mistral_{version}"
    without = AutoTokenizer.from_pretrained(tiny_llama)  # no `[TOOL_CALLS]` token: calls are read from free text
    assert PARSER.tag_format(without) is None and no_call_grammar(PARSER, without) is None
    assert call_tool_grammar(_body(False), PARSER, "auto", without) is None


def test_each_tool_mode_takes_calls_in_the_models_format_and_what_it_takes_parses(mistral):
    version, engine = mistral
    weather, time = CALLS[version]
    both = BOTH[version]
    assert PARSER.parse(both, SCHEMAS) == (None, [("get_weather", {"city": "oslo", "unit": "c"}),
                                                  ("get_time", {"utc": True})])
    eos = engine.tokenizer.eos_token_id

    def takes(mode: str, parallel: bool, text: str) -> bool:
        """Whether the mode's grammar takes `text`'s tokens (its markers as the special tokens they are), then EOS."""
        import xgrammar

        if mode == "none":
            spec = no_call_grammar(PARSER, engine.tokenizer)
        else:
            spec = call_tool_grammar(_body(parallel), PARSER, mode, engine.tokenizer)
        matcher = xgrammar.GrammarMatcher(engine.compile_grammar(spec))
        return all(matcher.accept_token(t) for t in engine.tokenizer.encode(text, add_special_tokens=False)) and \
            matcher.accept_token(eos) and matcher.is_terminated()

    wrong_city = weather.replace("oslo", "rome")
    for parallel in (False, True):
        assert takes("auto", parallel, "Sure. " + weather) and takes("auto", parallel, "plain text")
        assert takes("auto", parallel, both) == parallel and not takes("auto", parallel, wrong_city)
        assert takes("required", parallel, weather) and takes("required", parallel, time)
        assert takes("required", parallel, both) == parallel
        assert not takes("required", parallel, "Sure. " + weather) and not takes("required", parallel, "")
        assert takes("get_weather", parallel, weather) and not takes("get_weather", parallel, time)
        assert not takes("get_weather", parallel, both)
    assert takes("none", False, "plain text") and not takes("none", False, "Sure. " + weather)


def test_a_served_mistral_model_calls_tools_in_its_own_format(mistral):
    """Auto, with a bias towards `[TOOL_CALLS]`: a call in the model's format to a tool, arguments of its schema, read
    back by the parser; streamed, the same calls (v3's arguments in pieces as generated, v11's whole). Required and a
    named function: nothing but calls. None: the same bias opens no call."""
    version, engine = mistral
    with serve(engine) as served:
        client = served.client()
        (opening,) = engine.tokenizer.encode("[TOOL_CALLS]", add_special_tokens=False)
        kwargs = dict(model=served.backbone, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=200,
                      temperature=1.0, logit_bias={str(opening): 30})
        named = {"type": "function", "function": {"name": "get_weather"}}
        names = set()
        for seed in range(3):
            for tool_choice in ("auto", "required", named):
                asked = dict(kwargs, seed=seed, tool_choice=tool_choice, parallel_tool_calls=False)
                choice = client.chat.completions.create(**asked).choices[0]
                assert choice.finish_reason == ("stop" if tool_choice is named else "tool_calls"), choice
                assert choice.message.content is None
                (call,) = choice.message.tool_calls
                names.add(call.function.name)
                if call.function.name == "get_weather":
                    _check_weather(call.function.arguments)
                else:
                    assert tool_choice != named and isinstance(json.loads(call.function.arguments)["utc"], bool)
                deltas = [d for c in client.chat.completions.create(**asked, stream=True) if c.choices
                          for d in c.choices[0].delta.tool_calls or ()]
                assert deltas[0].function.name == call.function.name
                assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
                assert (len(deltas) > 2) == (version == "v3")  # v3's JSON calls stream their arguments in pieces
        assert names == {"get_weather", "get_time"}
        for seed in range(3):
            choice = client.chat.completions.create(**kwargs, seed=seed, tool_choice="none").choices[0]
            assert choice.message.tool_calls is None and "[TOOL_CALLS]" not in (choice.message.content or "")

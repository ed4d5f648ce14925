"""Tool calling through the official `openai` client: named and required tool choices generated under the
tools' schemas, streamed and not, and the requests Tessera refuses rather than guesses."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "what is the weather in paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "current weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["paris", "oslo"]}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _check_weather(arguments: str) -> None:
    value = json.loads(arguments)
    assert set(value) == {"city", "unit"} and value["city"] in ("paris", "oslo") and value["unit"] in ("c", "f")


def test_a_named_function_is_called_with_arguments_that_fit_its_schema(client):
    for model, seed in (("reverse", 1), ("uppercase", 2)):
        reply = client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER, TIME], seed=seed,
                                               tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                               max_tokens=60, temperature=1.0)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        _check_weather(call.function.arguments)
    streamed = list(client.chat.completions.create(
        model="reverse", messages=MESSAGES, tools=[WEATHER], stream=True, seed=1, max_tokens=60, temperature=1.0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [d for c in streamed if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert len(deltas) > 2, "the arguments stream in pieces"
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    arguments = "".join(d.function.arguments for d in deltas)
    _check_weather(arguments)
    first = client.chat.completions.create(model="reverse", messages=MESSAGES, tools=[WEATHER], seed=1,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=60, temperature=1.0)
    assert arguments == first.choices[0].message.tool_calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"


def test_required_picks_among_the_tools_and_streams_the_same_calls(client):
    kwargs = dict(model="reverse", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120,
                  temperature=1.0, seed=3, parallel_tool_calls=False)
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls  # parallel_tool_calls=False: exactly one
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        _check_weather(call.function.arguments)
    else:
        assert isinstance(json.loads(call.function.arguments)["utc"], bool)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert len(deltas) > 2, "the arguments stream in pieces"
    assert deltas[0].id.startswith("call_") and (deltas[0].function.name, deltas[0].function.arguments) == \
        (call.function.name, "")
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    several = dict(kwargs, parallel_tool_calls=True, seed=5, max_tokens=200)
    whole = client.chat.completions.create(**several).choices[0].message.tool_calls
    assert len(whole) == 2  # this seed calls both tools
    deltas = [d for c in client.chat.completions.create(**several, stream=True) if c.choices
              for d in c.choices[0].delta.tool_calls or ()]
    streamed = {}
    for d in deltas:
        name, arguments = streamed.get(d.index, (d.function.name, ""))
        streamed[d.index] = (name, arguments + d.function.arguments)
    assert [streamed[i] for i in sorted(streamed)] == [(c.function.name, c.function.arguments) for c in whole]


def test_required_calls_are_read_while_they_are_generated():
    from server.api.tools import required_calls_so_far

    text = '[{"name": "get_weather", "parameters": {"city": "pa\\"ris]", "unit": "c"}}, {"name": "get_time", ' \
           '"parameters": {"utc": true}}]'
    whole = [("get_weather", '{"city": "pa\\"ris]", "unit": "c"}', True), ("get_time", '{"utc": true}', True)]
    assert required_calls_so_far(text) == whole
    seen = [[], []]
    for end in range(len(text) + 1):
        for j, (name, arguments, done) in enumerate(required_calls_so_far(text[:end])):
            assert name in (None, whole[j][0]) and whole[j][1].startswith(arguments) and done <= whole[j][2]
            seen[j].append(arguments)
    assert seen[0][-1] == whole[0][1] and seen[1][-1] == whole[1][1]
    assert required_calls_so_far("not an array") == [] and required_calls_so_far('[{"name": "get_') == \
        [(None, "", False)]
    import random

    from server.api.tools import JsonCallsReader

    rng = random.Random(0)
    for _ in range(20):  # fed in pieces, the reader says at every piece what a fresh read of the text says
        reader, end = JsonCallsReader(), 0
        while end < len(text):
            step = rng.randint(1, 9)
            assert reader.feed(text[end : end + step]) == required_calls_so_far(text[: end + step])
            end += step
    assert required_calls_so_far('[{"name": "get_time", "parameters": {"n": -1.5e3, "ok": true}}]') == \
        [("get_time", '{"n": -1.5e3, "ok": true}', True)]


def test_a_conversation_with_calls_and_results_goes_on_and_none_gives_text(client):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "paris", "unit": "c"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, clear"},
    ]
    reply = client.chat.completions.create(model="reverse", messages=history, tools=[WEATHER], tool_choice="none",
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.tool_calls is None and isinstance(reply.choices[0].message.content, str)


@pytest.mark.parametrize(("fields", "message"), [
    ({"tools": [WEATHER]}, "tool_choice auto"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice auto"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "drop response"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "distinct"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "none"}, "name"),
    ({"tools": [WEATHER], "tool_choice": "none", "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]},
        {"role": "user", "content": "hi"}]}, "not JSON"),
])
def test_what_cannot_be_served_is_a_400_naming_why(server, fields, message):
    body = {"model": "reverse", "messages": MESSAGES, "max_tokens": 4} | fields
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_a_tool_schema_keyword_the_grammar_cannot_enforce_is_left_unenforced(client):
    """A function's parameters guide its calls (as OpenAI's non-strict functions): a keyword the grammar cannot hold
    them to (`not` here) is left out of the constraint, where in a response_format schema it is a 400."""
    odd = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["function"]["parameters"]
                                            | {"not": {"required": ["zone"]}}}}
    reply = client.chat.completions.create(model="reverse", messages=MESSAGES, tools=[odd], tool_choice="required",
                                           max_tokens=120, temperature=0, parallel_tool_calls=False)
    (call,) = reply.choices[0].message.tool_calls
    _check_weather(call.function.arguments)
    with pytest.raises(openai.BadRequestError, match="'not' at #"):
        client.chat.completions.create(model="reverse", messages=MESSAGES, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "w", "schema": odd["function"]["parameters"]}})
    best_effort = client.chat.completions.create(model="reverse", messages=MESSAGES, max_tokens=40, temperature=0,
                                                 response_format={"type": "json_schema", "json_schema": {
                                                     "name": "w", "schema": odd["function"]["parameters"],
                                                     "strict": False}})  # (OpenAI's non-strict mode)
    assert best_effort.choices[0].message.content is not None


def test_the_sdk_raises_bad_request_for_auto(client):
    with pytest.raises(openai.BadRequestError, match="tool_choice auto"):
        client.chat.completions.create(model="reverse", messages=MESSAGES, tools=[WEATHER], max_tokens=4)


def test_hermes_blocks_parse_into_calls_and_anything_else_stays_text():
    from server.api.tool_parsers import PARSERS
    from server.api.tools import auto_calls

    hermes, names = PARSERS["hermes"], {"get_time": {}, "get_weather": {}}
    content, calls = auto_calls(hermes, 'On it.\n<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n'
                                '</tool_call><tool_call>{"name": "get_weather", "arguments": {"city": "oslo"}}</tool_call>',
                                names)
    assert content == "On it." and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == [("get_time", {"utc": True}), ("get_weather", {"city": "oslo"})]
    for text in ("plain text", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                 "<tool_call>{not json}</tool_call>", '<tool_call>{"name": "get_time"}</tool_call>'):
        assert auto_calls(hermes, text, names) == (text, None), text
    streamable = hermes.streamable
    assert streamable("hello <tool") == "hello " and streamable("a < b") == "a < b"
    assert streamable("x <tool_call>{") == "x " and streamable("done") == "done"


FORCED = 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'


@pytest.fixture(scope="module")
def hermes(tiny_llama, library_dir):
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from tests.api.conftest import MAX_MODEL_LEN, serve

    engine = Engine(EngineConfig(model=tiny_llama, library=library_dir, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN,
                                 tool_call_parser="hermes"))
    with serve(engine) as served:
        yield served


def test_auto_with_the_hermes_parser_reads_the_calls_out_of_the_text(hermes):
    import re

    client = hermes.client()
    pattern = re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", FORCED)  # metacharacters escaped, nothing else
    force = {"structured_outputs": {"regex": pattern}}  # the tiny model says what a Qwen model would
    reply = client.chat.completions.create(model="reverse", messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=180,
                                           extra_body=force)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"utc": True}
    chunks = list(client.chat.completions.create(model="reverse", messages=MESSAGES, tools=[WEATHER, TIME],
                                                 max_tokens=180, extra_body=force, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip() == "Let me check." and "<tool" not in content
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [("get_time", {"utc": True})]
    plain = client.chat.completions.create(model="reverse", messages=MESSAGES, tools=[WEATHER], max_tokens=6,
                                           temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in ("stop", "length")


def test_auto_holds_each_call_the_model_starts_to_the_format_and_its_tools_schema(tiny_checkpoints, library_dir):
    """With `<tool_call>` a token (as in Qwen's tokenizers), a bias towards it makes the tiny model start calls; from
    there the structural tag writes a hermes call to one of the tools with arguments of its schema, and nothing
    after it unless parallel_tool_calls; with tool_choice none it opens none. The same bias with the tags off
    writes calls that do not parse, whatever the tool choice."""
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from tests.api.conftest import MAX_MODEL_LEN, serve

    model = tiny_checkpoints("llama", tool_tokens=True)
    config = dict(model=model, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN, tool_call_parser="hermes")
    with serve(Engine(EngineConfig(**config))) as served:
        (opening,) = served.engine.tokenizer.encode("<tool_call>", add_special_tokens=False)
        kwargs = dict(model=served.backbone, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=200, temperature=1.0,
                      logit_bias={str(opening): 30})
        client, names = served.client(), []
        for seed in range(3):
            for parallel in (False, True):
                choice = client.chat.completions.create(**kwargs, seed=seed, parallel_tool_calls=parallel).choices[0]
                # (parallel calls may go on until max_tokens: the complete ones are kept, and the reason is length)
                assert choice.finish_reason in ("tool_calls", "length" if parallel else "tool_calls"), choice
                assert choice.message.content is None and (len(choice.message.tool_calls) == 1 or parallel)
                for call in choice.message.tool_calls:
                    if call.function.name == "get_weather":
                        _check_weather(call.function.arguments)
                    else:
                        assert call.function.name == "get_time"
                        assert isinstance(json.loads(call.function.arguments)["utc"], bool)
                    names.append(call.function.name)
        assert set(names) == {"get_weather", "get_time"}  # (each tool is reachable)
        one = dict(kwargs, seed=1, parallel_tool_calls=False)  # streamed: the same call, its arguments in pieces
        whole = client.chat.completions.create(**one).choices[0]
        chunks = list(client.chat.completions.create(**one, stream=True))
        streamed = {}
        for d in (d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()):
            name, arguments = streamed.get(d.index, (d.function.name, ""))
            streamed[d.index] = (name, arguments + d.function.arguments)
        assert [streamed[j] for j in sorted(streamed)] == [(c.function.name, c.function.arguments)
                                                           for c in whole.message.tool_calls]
        assert sum(bool(c.choices and c.choices[0].delta.tool_calls) for c in chunks) > 2 * len(streamed)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
        for seed in range(3):  # tool_choice none: the same bias cannot open a call, the reply is text
            choice = client.chat.completions.create(**kwargs, seed=seed, tool_choice="none").choices[0]
            assert choice.message.tool_calls is None and "<tool_call>" not in choice.message.content, choice
            assert choice.finish_reason in ("stop", "length")
    with serve(Engine(EngineConfig(**config, tool_call_structural_tags=False))) as free:
        for tool_choice in ("auto", "none"):
            choice = free.client().chat.completions.create(**kwargs, seed=0, tool_choice=tool_choice).choices[0]
            assert choice.message.tool_calls is None and "<tool_call>" in choice.message.content


def test_the_forced_parts_of_a_call_are_drafted_so_it_takes_fewer_steps(tiny_checkpoints):
    """Under the hermes tag, the call's opening and keys are what the grammar forces: speculative decoding drafts
    them (on by default), giving the same reply in fewer engine steps than without drafts."""
    from server.api.protocol import ChatCompletionRequest
    from server.api.tool_parsers import PARSERS
    from server.api.tools import call_tool_grammar
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.request import Request, SamplingParams

    body = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "tools": [WEATHER, TIME],
                                                 "parallel_tool_calls": False})
    replies = {}
    for speculative in (None, '{"grammar_tokens": 0}'):
        steps = []
        engine = Engine(EngineConfig(model=tiny_checkpoints("llama", tool_tokens=True), num_kv_blocks=64,
                                     speculative_config=speculative), step_observer=steps.append)
        grammar = engine.compile_grammar(call_tool_grammar(body, PARSERS["hermes"], "auto"))
        (opening,) = engine.tokenizer.encode("<tool_call>", add_special_tokens=False)
        sampling = SamplingParams(max_tokens=120, temperature=1.0, seed=1, logit_bias=((opening, 30.0),))
        outputs = engine.generate_batch([Request("r", [5, 6, 7], sampling, grammar=grammar)])["r"]
        replies[speculative] = ("".join(o.text for o in outputs), len(steps))
    (drafted, fewer), (plain, steps) = replies.values()
    assert drafted == plain and PARSERS["hermes"].parse(plain, {}) is not None
    assert fewer < steps * 0.5, (fewer, steps)  # (15 against 52 when written)


@pytest.mark.parametrize(("parser_name", "good", "bad"), [
    ("hermes", 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "oslo", "unit": "c"}}\n</tool_call>',
     'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "rome", "unit": "c"}}\n</tool_call>'),
    ("qwen3_coder", "Sure.<tool_call>\n<function=get_time>\n<parameter=utc>\ntrue\n</parameter>\n</function>\n"
     "</tool_call>", "Sure.<tool_call>\n<function=get_date>\n"),
    ("llama3_json", '{"name": "get_time", "parameters": {"utc": false}}', '{"name": "get_time", "parameters": {"utc": 1}}'),
])
def test_the_structural_tag_of_each_format_takes_the_calls_its_parser_reads(setup_engine, parser_name, good, bad):
    """The tag accepts a reply its parser reads into a call that fits, also after a `<think>` block (a thinking
    model served without a reasoning parser still thinks), and refuses a call outside the schemas."""
    import xgrammar

    from server.api.protocol import ChatCompletionRequest
    from server.api.tool_parsers import PARSERS
    from server.api.tools import call_tool_grammar

    parser = PARSERS[parser_name]
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "tools": [WEATHER, TIME],
                                                 "parallel_tool_calls": False})
    grammar = setup_engine.compile_grammar(call_tool_grammar(body, parser, "auto"))
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
    content, calls = parser.parse(good, schemas)
    assert content == ("Sure." if good.startswith("Sure.") else None) and len(calls) == 1
    assert xgrammar.GrammarMatcher(grammar).accept_string(good)
    assert not xgrammar.GrammarMatcher(grammar).accept_string(bad)
    assert xgrammar.GrammarMatcher(grammar).accept_string("<think>which tool?</think>" + good)  # free text is free


@pytest.mark.parametrize(("parser_name", "call"), [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "oslo", "unit": "c"}}\n</tool_call>'),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\noslo\n</parameter>\n<parameter=unit>\nc\n"
     "</parameter>\n</function>\n</tool_call>"),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "oslo", "unit": "c"}}'),
])
def test_the_forced_tags_of_each_format_take_calls_and_nothing_else(setup_engine, parser_name, call):
    """tool_choice required: one call or more (joined by the format's separator only with parallel_tool_calls), no
    text around them; a named function: one call to it. What the tag takes, the parser reads back."""
    import xgrammar

    from server.api.protocol import ChatCompletionRequest
    from server.api.tool_parsers import PARSERS
    from server.api.tools import call_tool_grammar

    parser = PARSERS[parser_name]
    two = call + parser.call_separator + call
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
    assert parser.parse(call, schemas) == (None, [("get_weather", {"city": "oslo", "unit": "c"})])
    assert parser.parse(two, schemas) == (None, [("get_weather", {"city": "oslo", "unit": "c"})] * 2)

    def takes(mode: str, parallel: bool, text: str) -> bool:
        body = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "tools": [WEATHER, TIME],
                                                     "parallel_tool_calls": parallel})
        grammar = setup_engine.compile_grammar(call_tool_grammar(body, parser, mode))
        matcher = xgrammar.GrammarMatcher(grammar)
        return matcher.accept_string(text) and matcher.is_completed() if text else matcher.is_completed()

    for parallel in (False, True):
        assert takes("required", parallel, call) and takes("get_weather", parallel, call)
        assert takes("required", parallel, two) == parallel
        assert not takes("get_weather", parallel, two) and not takes("get_time", parallel, call)
        for other in ("", "Sure." + call, call + " done"):
            assert not takes("required", parallel, other) and not takes("get_weather", parallel, other)


@pytest.fixture(scope="module")
def setup_engine(tiny_llama):
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine

    return Engine(EngineConfig(model=tiny_llama, num_kv_blocks=8))


def test_an_unknown_parser_fails_at_start_up(tiny_llama, library_dir):
    from server.api.app import create_app
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine

    engine = Engine(EngineConfig(model=tiny_llama, num_kv_blocks=8, tool_call_parser="llama9"))
    with pytest.raises(ValueError, match="tool_call_parser must be one of hermes"):
        create_app(engine)


def test_required_and_named_calls_are_generated_in_the_parsers_own_format(tiny_checkpoints):
    """With a parser whose format has a structural tag (hermes here), required and named tool choices are written
    as the model's own calls (`<tool_call>` blocks), nothing else, so they read back into calls that fit the
    schemas; streamed, the same calls come, each one's arguments in pieces as they are generated; a reply cut
    before a call is complete is text. With the tags off, the calls are JSON, as without a parser."""
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from tests.api.conftest import MAX_MODEL_LEN, serve

    model = tiny_checkpoints("llama", tool_tokens=True)
    config = dict(model=model, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN, tool_call_parser="hermes")
    named = {"type": "function", "function": {"name": "get_weather"}}
    with serve(Engine(EngineConfig(**config))) as served:
        client = served.client()
        kwargs = dict(model=served.backbone, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=200, temperature=1.0,
                      logprobs=True)
        counts = set()
        for seed in range(3):
            for choice_of, parallel in (("required", False), ("required", True), (named, True)):
                asked = dict(kwargs, seed=seed, tool_choice=choice_of, parallel_tool_calls=parallel)
                choice = client.chat.completions.create(**asked).choices[0]
                assert "".join(t.token for t in choice.logprobs.content).startswith("<tool_call>\n{"), choice
                assert choice.message.content is None
                assert choice.finish_reason == ("stop" if choice_of is named else "tool_calls")
                calls = choice.message.tool_calls
                assert len(calls) == 1 or (parallel and choice_of == "required"), calls
                counts.add(len(calls))
                for call in calls:
                    if call.function.name == "get_weather":
                        _check_weather(call.function.arguments)
                    else:
                        assert call.function.name == "get_time" and choice_of == "required"
                        assert isinstance(json.loads(call.function.arguments)["utc"], bool)
                deltas = [d for c in client.chat.completions.create(**asked, stream=True) if c.choices
                          for d in c.choices[0].delta.tool_calls or ()]
                streamed, pieces = {}, 0
                for d in deltas:  # each call's id and name first, then its arguments in pieces as generated
                    if d.index not in streamed:
                        assert d.id.startswith("call_") and d.function.name and d.function.arguments == ""
                        streamed[d.index] = (d.function.name, "")
                    else:
                        assert d.id is None and d.function.name is None
                        streamed[d.index] = (streamed[d.index][0], streamed[d.index][1] + d.function.arguments)
                        pieces += 1
                assert [streamed[j] for j in sorted(streamed)] == [(c.function.name, c.function.arguments)
                                                                   for c in calls]
                assert pieces > len(calls)
        assert max(counts) > 1  # (parallel calls are reachable)
        cut = client.chat.completions.create(**dict(kwargs, max_tokens=3, tool_choice="required")).choices[0]
        assert cut.finish_reason == "length" and cut.message.tool_calls is None
        opening = cut.message.content[:11]
        assert opening and "<tool_call>".startswith(opening), cut
    with serve(Engine(EngineConfig(**config, tool_call_structural_tags=False))) as json_calls:
        choice = json_calls.client().chat.completions.create(**kwargs, seed=0, tool_choice="required").choices[0]
        assert choice.logprobs.content[0].token.startswith("[") and choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls[0].function.name in ("get_weather", "get_time")

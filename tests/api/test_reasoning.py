"""Reasoning parsers (`--reasoning-parser`): where a reply starts, how its reasoning and content split (whole and
while streaming), and a tiny reasoning model behind a real server, with a grammar that begins after `</think>`."""

from __future__ import annotations

import random

import httpx
import pytest

from server.api.reasoning import REASONING_PARSERS

QWEN3, R1 = REASONING_PARSERS["qwen3"], REASONING_PARSERS["deepseek_r1"]


@pytest.mark.parametrize(("parser", "prompt", "start"), [
    (R1, "<|im_start|>assistant\n<think>\n", "reasoning"),
    (QWEN3, "<|im_start|>assistant\n<think>\n", "reasoning"),
    (QWEN3, "<|im_start|>assistant\n<think>\n\n</think>\n\n", "answer"),  # enable_thinking false
    (R1, "<|im_start|>assistant\n<think>\n\n</think>\n\n", "answer"),
    (QWEN3, "<|im_start|>assistant\n", "detect"),
    (R1, "<|im_start|>assistant\n", "reasoning"),
    (QWEN3, "a<think>old</think>done<|im_end|>\n<|im_start|>assistant\n", "detect"),  # a closed block in history
])
def test_where_a_reply_starts_is_read_from_its_prompt(parser, prompt, start):
    assert parser.start(prompt) == start


@pytest.mark.parametrize(("start", "text", "reasoning", "content"), [
    ("reasoning", "\nlet me see\n</think>\n\nthe answer", "let me see", "the answer"),
    ("reasoning", "cut before the end", "cut before the end", ""),
    ("reasoning", "</think>yes", "", "yes"),
    ("answer", "<think>not parsed</think>x", "", "<think>not parsed</think>x"),
    ("detect", "<think>\nhmm\n</think>\n\nok", "hmm", "ok"),
    ("detect", "  <think>hmm", "hmm", ""),
    ("detect", "plain answer </think> with a tag", "", "plain answer </think> with a tag"),
    ("detect", "<thin", "", "<thin"),  # finished: what looked like a tag's start is the answer
])
def test_a_whole_reply_splits_into_reasoning_and_content(start, text, reasoning, content):
    assert QWEN3.split(text, start, finished=True) == (reasoning, content)


@pytest.mark.parametrize("start", ["reasoning", "detect"])
def test_streamed_splits_only_grow_and_end_as_the_whole_reply(start):
    rng = random.Random(0)
    for text in ("<think>\nfirst\nsecond\n\n</think>\n\nthe answer\n", "\nno end tag<", "<think></think>",
                 "ans</thi</think>wer", "<think>\n</think", "x <think>y"):
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), k=min(4, len(text) - 1)))
            sent = ("", "")
            for end in [*cuts, len(text)]:
                split = QWEN3.split(text[:end], start, finished=end == len(text))
                assert split[0].startswith(sent[0]) and split[1].startswith(sent[1]), (text, end, split, sent)
                sent = split
            assert sent == QWEN3.split(text, start, finished=True)


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1"])
def test_a_reasoning_stream_gives_what_each_split_of_the_whole_reply_gains(name):
    """`ReasoningStream` (the streamed chat path) keeps only what it has not given out, yet after every feed the
    reasoning and content it gave are the whole reply's split at that point: random replies built of tag pieces,
    newlines and text, fed in random pieces, from each start."""
    from server.api.reasoning import ReasoningStream

    parser, rng = REASONING_PARSERS[name], random.Random(7)
    atoms = ["<think>", "</think>", "<th", "</thi", "nk>", "\n", "\n\n", " ", "a", "bc", "<", "/", "x y", "</"]
    for _ in range(3000):
        start = rng.choice(["answer", "reasoning", "detect"])
        text, stream, given = "", ReasoningStream(parser, start), ("", "")
        pieces = ["".join(rng.choice(atoms) for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(8))]
        for i, piece in enumerate([*pieces, ""]):
            text, finished = text + piece, i == len(pieces)
            thought, content = stream.feed(piece, finished)
            given = (given[0] + thought, given[1] + content)
            assert given == parser.split(text, start, finished), (start, pieces[: i + 1], finished)
        assert stream.pending.strip("\n") == ""  # (a finished reply is given out but the newlines split drops)


@pytest.fixture(scope="module")
def thinker(tiny_checkpoints):
    """A tiny reasoning model (its template opens `<think>`) served with the deepseek_r1 parser."""
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from tests.api.conftest import MAX_MODEL_LEN, serve

    model = tiny_checkpoints("qwen3", thinking=True)
    engine = Engine(EngineConfig(model=model, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN,
                                 reasoning_parser="deepseek_r1"))
    with serve(engine) as served, httpx.Client(base_url=served.url, timeout=60) as http:
        yield served, http


MESSAGES = [{"role": "user", "content": "is the sky blue?"}]
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}


def _post(http, path: str, body: dict) -> dict:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _raw(served, http, **controls) -> str:
    """The reply's text without a parser: a completion of the same prompt tokens."""
    ids = _post(http, "/tokenize", {"messages": MESSAGES, **controls})["tokens"]
    return _post(http, "/v1/completions", {"model": served.backbone, "prompt": ids, **GREEDY})["choices"][0]["text"]


def test_a_reasoning_model_reply_is_reasoning_until_its_block_closes(thinker):
    served, http = thinker
    raw = _raw(served, http)
    assert raw.strip() and "</think>" not in raw  # the tiny model never closes its block in 8 tokens
    body = {"model": served.backbone, "messages": MESSAGES, **GREEDY}
    message = _post(http, "/v1/chat/completions", body)["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == raw.strip("\n") and message["content"] is None
    thought, content = "", ""
    for chunk in served.client().chat.completions.create(model=served.backbone, messages=MESSAGES, stream=True,
                                                         temperature=0, max_tokens=8, extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            thought += getattr(choice.delta, "reasoning", None) or ""
            content += choice.delta.content or ""
    assert thought == message["reasoning"] and content == ""

    off = {"chat_template_kwargs": {"enable_thinking": False}}
    answer = _post(http, "/v1/chat/completions", body | off)["choices"][0]["message"]
    assert answer["content"] == _raw(served, http, **off) and answer["reasoning"] is None


def test_a_grammar_shapes_the_answer_after_the_reasoning(thinker):
    served, http = thinker
    close = served.engine.tokenizer.convert_tokens_to_ids("</think>")
    choice = {"structured_outputs": {"choice": ["yes", "no"]}}
    body = {"model": served.backbone, "messages": MESSAGES, "temperature": 0.0, "max_tokens": 8}
    closed = _post(http, "/v1/chat/completions", body | choice | {"logit_bias": {str(close): 100}})["choices"][0]
    assert closed["message"]["content"] in ("yes", "no") and closed["message"]["reasoning"] is None
    assert closed["finish_reason"] == "stop"  # the grammar, once begun, ended it
    open_block = _post(http, "/v1/chat/completions", body | choice | {"ignore_eos": True})["choices"][0]
    assert open_block["message"]["reasoning"] == _raw(served, http).strip("\n")  # free until `</think>`
    assert open_block["message"]["content"] is None and open_block["finish_reason"] == "length"


def test_reasoning_tokens_are_the_generated_tokens_before_the_block_closes(thinker):
    served, http = thinker
    close = served.engine.tokenizer.convert_tokens_to_ids("</think>")
    client, counts = served.client(), set()
    for bias in range(1, 7):  # the larger the bias, the sooner the tiny model closes its block
        body = {"model": served.backbone, "messages": MESSAGES, **GREEDY, "logprobs": True,
                "logit_bias": {str(close): bias}}
        chat = _post(http, "/v1/chat/completions", body)
        tokens = [entry["token"] for entry in chat["choices"][0]["logprobs"]["content"]]
        expected = tokens.index("</think>") if "</think>" in tokens else len(tokens)
        assert chat["usage"]["completion_tokens_details"] == {"reasoning_tokens": expected}, (bias, tokens)
        streamed = [chunk.usage for chunk in client.chat.completions.create(
            model=served.backbone, messages=MESSAGES, stream=True, stream_options={"include_usage": True},
            temperature=0, max_tokens=8, logit_bias={str(close): bias}, extra_body={"ignore_eos": True})
            if chunk.usage is not None]
        assert streamed[-1].completion_tokens_details.reasoning_tokens == expected
        response = client.responses.create(model=served.backbone, input=MESSAGES, temperature=0.0, max_output_tokens=8,
                                           extra_body={"ignore_eos": True, "logit_bias": {str(close): bias}})
        assert response.usage.output_tokens_details.reasoning_tokens == expected
        counts.add(expected)
    assert 0 in counts and 8 in counts and counts - {0, 8}  # closed at once, never, and part way


def test_earlier_reasoning_reaches_the_template_and_echo_is_refused(thinker):
    served, http = thinker
    history = [*MESSAGES, {"role": "assistant", "content": "yes", "reasoning": "it scatters blue light"},
               {"role": "user", "content": "why?"}]
    ids = _post(http, "/tokenize", {"messages": history})["tokens"]
    assert "<think>\nit scatters blue light\n</think>\n\nyes" in served.engine.tokenizer.decode(ids)
    response = http.post("/v1/chat/completions", json={"model": served.backbone, "messages": MESSAGES, "echo": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "echo"


def test_the_responses_api_returns_the_reasoning_as_its_own_item(thinker):
    served, http = thinker
    client = served.client()
    chat = _post(http, "/v1/chat/completions", {"model": served.backbone, "messages": MESSAGES, **GREEDY})
    reasoning = chat["choices"][0]["message"]["reasoning"]
    kwargs = dict(model=served.backbone, input=MESSAGES, temperature=0.0, max_output_tokens=8,
                  extra_body={"ignore_eos": True})
    response = client.responses.create(**kwargs)
    (item,) = response.output
    assert item.type == "reasoning" and item.content[0].text == reasoning and response.output_text == ""
    assert response.usage.output_tokens_details.reasoning_tokens > 0
    events = list(client.responses.create(**kwargs, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == reasoning
    assert events[-1].response.output[0].content[0].text == reasoning


def test_tool_calls_are_read_from_the_answer_after_the_reasoning(tiny_checkpoints):
    import json
    import re

    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from tests.api.conftest import MAX_MODEL_LEN, serve
    from tests.api.test_tools import TIME

    engine = Engine(EngineConfig(model=tiny_checkpoints("qwen3", thinking=True), num_kv_blocks=64,
                                 max_model_len=MAX_MODEL_LEN, reasoning_parser="deepseek_r1", tool_call_parser="hermes"))
    said = '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'
    with serve(engine) as served:
        close = engine.tokenizer.convert_tokens_to_ids("</think>")
        reply = served.client().chat.completions.create(
            model=served.backbone, messages=MESSAGES, tools=[TIME], max_tokens=80, temperature=0,
            logit_bias={str(close): 100},  # the reasoning ends at once; the grammar then writes the call
            extra_body={"structured_outputs": {"regex": re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", said)}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"utc": True}


def test_an_unknown_reasoning_parser_fails_at_start_up(tiny_llama):
    from server.api.app import create_app
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine

    engine = Engine(EngineConfig(model=tiny_llama, num_kv_blocks=8, reasoning_parser="o1"))
    with pytest.raises(ValueError, match="reasoning_parser must be one of qwen3, deepseek_r1"):
        create_app(engine)

"""vLLM's request extensions over HTTP: chat-template controls, chat echo, prompt truncation, min_p,
stop_token_ids, include_stop_str_in_output, skip_special_tokens, allowed_token_ids, bad_words, continuous usage
stats, request ids and return_tokens_as_token_ids."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from transformers import AutoTokenizer

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest
from server.api.translate import chat_prompt

USER = {"role": "user", "content": "reverse: abc"}
GREEDY = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _post(http, path: str, body: dict) -> dict:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_continued_assistant_turn_is_echoed_and_continued_as_its_prompt_tokens_say(server, http):
    messages = [USER, {"role": "assistant", "content": "the quick"}]
    controls = {"add_generation_prompt": False, "continue_final_message": True}
    prompt = _post(http, "/tokenize", {"messages": messages, **controls})["tokens"]
    tokenizer = server.engine.tokenizer
    assert tokenizer.decode(prompt).endswith("assistant\nthe quick")  # open: no end-of-turn after it
    body = {"model": "reverse", "messages": messages, **controls, **GREEDY}
    reply = _post(http, "/v1/chat/completions", body)
    plain = _post(http, "/v1/completions", {"model": "reverse", "prompt": prompt, **GREEDY})
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    assert reply["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    echoed = _post(http, "/v1/chat/completions", body | {"echo": True})
    assert echoed["choices"][0]["message"]["content"] == "the quick" + plain["choices"][0]["text"]
    openai_fields = {k: body[k] for k in ("model", "messages", "temperature", "max_tokens")}
    stream = server.client().chat.completions.create(**openai_fields, n=2, stream=True, extra_body={
        "echo": True, "ignore_eos": True, **controls})
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [echoed["choices"][0]["message"]["content"]] * 2
    after_user = _post(http, "/v1/chat/completions", {"model": "reverse", "messages": [USER], "echo": True, **GREEDY})
    assert after_user["choices"][0]["message"]["content"] == _post(http, "/v1/chat/completions", {
        "model": "reverse", "messages": [USER], **GREEDY})["choices"][0]["message"]["content"]  # nothing to echo


def test_chat_template_kwargs_reach_the_template_and_its_refusals_are_400(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}{% endif %}"
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% if enable_thinking %}{{ ' <think>' }}{% endif %}"
        "{% endif %}")

    def rendered(**fields) -> str:
        return tokenizer.decode(chat_prompt(ChatCompletionRequest(model="m", **fields), tokenizer))

    assert rendered(messages=[USER]) == "user: reverse: abc\nassistant:"
    assert rendered(messages=[USER], chat_template_kwargs={"enable_thinking": True}).endswith("assistant: <think>")
    with pytest.raises(APIError) as refused:
        rendered(messages=[{"role": "system", "content": "hi"}, USER])
    assert refused.value.status == 400 and "start with a user turn" in refused.value.message
    assert refused.value.param == "messages"


def test_truncate_prompt_tokens_keeps_the_prompts_tail(server, http):
    ids = list(range(40, 80))
    tail = _post(http, "/v1/completions", {"model": "uppercase", "prompt": ids[-10:], **GREEDY})
    cut = _post(http, "/v1/completions", {"model": "uppercase", "prompt": ids, "truncate_prompt_tokens": 10, **GREEDY})
    assert cut["usage"]["prompt_tokens"] == 10 and cut["choices"][0]["text"] == tail["choices"][0]["text"]
    whole = _post(http, "/v1/completions", {"model": "uppercase", "prompt": ids, "truncate_prompt_tokens": -1,
                                            **GREEDY})
    assert whole["usage"]["prompt_tokens"] == 40  # -1: up to the context length, which this fits
    chat = _post(http, "/v1/chat/completions", {"model": "uppercase", "messages": [USER], "truncate_prompt_tokens": 3,
                                                **GREEDY})
    assert chat["usage"]["prompt_tokens"] == 3


def test_min_p_of_one_is_greedy_and_stop_and_special_token_controls_shape_the_text(server, http):
    sampled = {"model": "reverse", "prompt": "the quick", "max_tokens": 8, "ignore_eos": True, "seed": 1}
    greedy = _post(http, "/v1/completions", sampled | {"temperature": 0.0})["choices"][0]["text"]
    assert _post(http, "/v1/completions", sampled | {"temperature": 1.5, "min_p": 1.0})["choices"][0]["text"] == greedy
    stop = greedy[2:4]
    kept = _post(http, "/v1/completions", sampled | {"temperature": 0.0, "stop": [stop],
                                                      "include_stop_str_in_output": True})["choices"][0]
    assert kept["text"] == greedy[: greedy.index(stop) + len(stop)] and kept["stop_reason"] == stop

    special = server.engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    forced = sampled | {"temperature": 0.0, "max_tokens": 2, "logit_bias": {str(special): 100}}
    assert _post(http, "/v1/completions", forced)["choices"][0]["text"] == ""
    assert _post(http, "/v1/completions", forced | {"skip_special_tokens": False})["choices"][0]["text"] == \
        "<|im_start|>" * 2
    ended = _post(http, "/v1/completions", forced | {"stop_token_ids": [special], "skip_special_tokens": False})
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["choices"][0]["stop_reason"] == special
    assert ended["usage"]["completion_tokens"] == 1 and ended["choices"][0]["text"] == ""  # its text left out


def test_allowed_token_ids_and_bad_words_shape_the_reply(server, http):
    tokenizer = server.engine.tokenizer
    body = {"model": "reverse", "prompt": "the quick", "max_tokens": 8, "ignore_eos": True, "temperature": 0.0,
            "logprobs": 0}
    free = _post(http, "/v1/completions", body)["choices"][0]
    allowed = sorted({tokenizer.convert_tokens_to_ids(t) for t in ("a", "b", "c")})
    only = _post(http, "/v1/completions", body | {"allowed_token_ids": allowed})["choices"][0]
    assert only["text"] and set(only["text"]) <= {"a", "b", "c"}
    said = free["logprobs"]["tokens"]
    word = next(t for t in said if t.strip() and len(tokenizer.encode(t, add_special_tokens=False)) == 1)
    banned = _post(http, "/v1/completions", body | {"bad_words": [word]})["choices"][0]
    assert banned["text"] != free["text"] and word not in banned["logprobs"]["tokens"]
    reply = _post(http, "/v1/chat/completions", {"model": "reverse", "messages": [USER], **GREEDY,
                                                  "allowed_token_ids": allowed})["choices"][0]["message"]["content"]
    assert reply and set(reply) <= {"a", "b", "c"}


def test_continuous_usage_stats_count_every_chunk_and_end_at_the_final_usage(server):
    chunks = list(server.client().chat.completions.create(
        model="reverse", messages=[USER], n=2, stream=True, temperature=0, max_tokens=5,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    *streamed, final = chunks
    assert final.choices == [] and final.usage.completion_tokens == 10
    counts = [chunk.usage.completion_tokens for chunk in streamed]
    assert counts[:2] == [0, 0] and counts == sorted(counts) and counts[-1] == 10  # the role chunks first
    assert all(c.usage.prompt_tokens == final.usage.prompt_tokens and
               c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in streamed)
    plain = list(server.client().completions.create(model="reverse", prompt="abc", stream=True, max_tokens=3,
                                                    stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage.completion_tokens == 3


def test_a_clients_request_id_names_the_response_and_its_header(server):
    client = server.client()
    raw = client.chat.completions.with_raw_response.create(model="reverse", messages=[USER], max_tokens=2,
                                                           extra_headers={"X-Request-Id": "trace-7"})
    assert raw.headers["x-request-id"] == "trace-7" and raw.parse().id == "chatcmpl-trace-7"
    with ThreadPoolExecutor(2) as pool:  # the same id twice at once: both served, each its own choices
        same = list(pool.map(lambda prompt: client.completions.create(
            model="reverse", prompt=prompt, max_tokens=4, n=2, temperature=0, extra_body={"request_id": "trace-7"}),
            ["abc", "xyz"]))
    assert [s.id for s in same] == ["cmpl-trace-7"] * 2 and same[0].choices[0].text != same[1].choices[0].text
    response = client.responses.with_raw_response.create(model="reverse", input="abc", max_output_tokens=2,
                                                         extra_headers={"X-Request-Id": "trace-8"})
    assert response.parse().id == "resp_trace-8" and response.headers["x-request-id"] == "trace-8"
    mine = client.chat.completions.with_raw_response.create(model="reverse", messages=[USER], max_tokens=2)
    assert mine.parse().id == "chatcmpl-" + mine.headers["x-request-id"]


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(server, http):
    body = {"model": "reverse", "prompt": "the quick", "max_tokens": 5, "ignore_eos": True, "temperature": 0.0,
            "logprobs": 2}
    named = _post(http, "/v1/completions", body)["choices"][0]
    by_id = _post(http, "/v1/completions", body | {"return_tokens_as_token_ids": True})["choices"][0]
    ids = [int(t.removeprefix("token_id:")) for t in by_id["logprobs"]["tokens"]]
    assert [server.engine.tokenizer.decode([i]) for i in ids] == named["logprobs"]["tokens"]
    assert by_id["text"] == named["text"] and by_id["logprobs"]["text_offset"] == named["logprobs"]["text_offset"]
    assert all(all(k.startswith("token_id:") for k in top) and len(top) == 2
               for top in by_id["logprobs"]["top_logprobs"])
    chat = {"model": "reverse", "messages": [USER], **GREEDY, "logprobs": True, "top_logprobs": 1,
            "return_tokens_as_token_ids": True}
    entries = _post(http, "/v1/chat/completions", chat)["choices"][0]["logprobs"]["content"]
    streamed = [e for c in server.client().chat.completions.create(
        model="reverse", messages=[USER], stream=True, temperature=0, max_tokens=6, logprobs=True, top_logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}) for c in c.choices
        for e in (c.logprobs.content if c.logprobs else None) or ()]
    assert [e["token"] for e in entries] == [e.token for e in streamed]
    assert all(e["token"].startswith("token_id:") and e["bytes"] == list(e["token"].encode()) and
               e["top_logprobs"][0]["token"].startswith("token_id:") for e in entries)


def test_constraints_that_leave_no_token_are_a_400_for_that_request_only(server, http):
    eos = server.engine.tokenizer.eos_token_id
    conflict = {"model": "reverse", "messages": [USER], "max_tokens": 4, "allowed_token_ids": [eos], "min_tokens": 2}
    response = http.post("/v1/chat/completions", json=conflict)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "no_drawable_token" and "position 0" in error["message"], error
    assert "min_tokens" in error["message"] and "allowed_token_ids" in error["message"]
    with http.stream("POST", "/v1/chat/completions", json=conflict | {"stream": True}) as streamed:
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and '"no_drawable_token"' in events[-1]  # the stream had begun
    assert _post(http, "/v1/chat/completions", {"model": "reverse", "messages": [USER], **GREEDY})["choices"]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [USER], "allowed_token_ids": []}, "allowed_token_ids"),
    ({"messages": [USER], "allowed_token_ids": [10**9]}, "allowed_token_ids"),
    ({"messages": [USER], "bad_words": [" "]}, "bad_words"),
    ({"messages": [USER], "continue_final_message": True}, "continue_final_message"),
    ({"messages": [USER], "continue_final_message": True, "add_generation_prompt": False}, "messages"),
    ({"messages": [USER, {"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [USER], "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"messages": [USER], "min_p": 1.5}, "min_p"),
    ({"messages": [USER], "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"messages": [USER], "stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"messages": [USER], "priority": 1}, "priority"),  # the server schedules first come, first served
    ({"messages": [USER], "echo": True, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": "required"}, "echo"),
])
def test_bad_extensions_are_400_naming_the_parameter(http, body, param):
    response = http.post("/v1/chat/completions", json={"model": "reverse", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_priorities_are_served_under_the_priority_policy(tiny_llama, library_dir):
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from tests.api.conftest import MAX_MODEL_LEN, serve

    engine = Engine(EngineConfig(model=tiny_llama, library=library_dir, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN,
                                 scheduling_policy="priority"))
    with serve(engine) as served, httpx.Client(base_url=served.url, timeout=60) as http:
        body = {"model": "reverse", "prompt": "the quick", **GREEDY}
        texts = {p: _post(http, "/v1/completions", body | {"priority": p})["choices"][0]["text"] for p in (-3, 0, 7)}
        assert len(set(texts.values())) == 1  # priority orders the queue; it changes no token


def test_fields_nothing_reads_are_named_in_a_header_and_served_anyway(server, caplog):
    import logging

    client = server.client()
    with caplog.at_level(logging.WARNING, logger="server.api.app"):
        raw = client.chat.completions.with_raw_response.create(
            model="reverse", messages=[USER], max_tokens=2, extra_body={"guided_decoding_backend": "xgrammar",
                                                                      "no_such_field": 1})
        answered = client.responses.with_raw_response.create(model="reverse", input="abc", max_output_tokens=2,
                                                             extra_body={"frobnicate": True})
    assert raw.headers["x-tessera-ignored-fields"] == "guided_decoding_backend,no_such_field"
    assert raw.parse().choices[0].message.content is not None
    assert answered.headers["x-tessera-ignored-fields"] == "frobnicate"
    assert "ignored fields guided_decoding_backend, no_such_field" in caplog.text
    plain = client.completions.with_raw_response.create(model="reverse", prompt="abc", max_tokens=2)
    assert "x-tessera-ignored-fields" not in plain.headers


def test_cache_salt_keeps_cached_prefixes_within_one_salt(server):
    """vLLM's multi-tenant isolation: the same prompt under another salt (or none) is computed afresh."""
    client = server.client()
    prompt = "a prompt long enough to fill whole kv blocks, unique to the salt test: " * 2

    def cached(salt: str | None) -> int:
        extra = {"cache_salt": salt} if salt is not None else {}
        reply = client.completions.create(model="reverse", prompt=prompt, max_tokens=1, extra_body=extra)
        return reply.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-a") >= 16  # a full block of the same salt
    assert cached("tenant-b") == 0 and cached(None) == 0  # neither another salt nor none shares it
    assert cached(None) >= 16 and cached("tenant-b") >= 16


def test_the_models_generation_config_fills_the_sampling_fields_a_request_leaves_out(tiny_llama, tmp_path):
    """vLLM's --generation-config auto: the authors' recommended settings (here top_k 1, which makes sampling
    greedy, temperature 0.5 and max_new_tokens 5) apply where the request says nothing; `vllm` turns them off."""
    import json
    import shutil

    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from tests.api.conftest import MAX_MODEL_LEN, serve

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.5, "top_k": 1, "max_new_tokens": 5}))
    messages = [USER]
    for source in ("auto", "vllm"):
        engine = Engine(EngineConfig(model=str(model), num_kv_blocks=64, max_model_len=MAX_MODEL_LEN,
                                     generation_config=source))
        with serve(engine) as served:
            client = served.client()
            left_out = client.chat.completions.create(model=served.backbone, messages=messages, seed=3,
                                                      max_tokens=8, extra_body={"ignore_eos": True})
            greedy = client.chat.completions.create(model=served.backbone, messages=messages, temperature=0,
                                                    max_tokens=8, extra_body={"ignore_eos": True})
            asked = client.chat.completions.create(model=served.backbone, messages=messages, seed=3, max_tokens=8,
                                                   temperature=1.0, extra_body={"ignore_eos": True, "top_k": -1})
            unlimited = client.chat.completions.create(model=served.backbone, messages=messages, temperature=0,
                                                       extra_body={"ignore_eos": True})
            response = client.responses.create(model=served.backbone, input="abc", max_output_tokens=2)
        text = [r.choices[0].message.content for r in (left_out, greedy, asked)]
        if source == "auto":
            assert engine.sampling_defaults == {"temperature": 0.5, "top_k": 1, "max_new_tokens": 5}
            assert text[0] == text[1] != text[2]  # top_k 1 where unsaid; what a request says wins
            assert unlimited.usage.completion_tokens == 5 and response.temperature == 0.5
        else:
            assert engine.sampling_defaults == {} and text[0] != text[1]
            assert unlimited.usage.completion_tokens == MAX_MODEL_LEN - unlimited.usage.prompt_tokens
            assert response.temperature == 1.0


def test_a_generation_config_out_of_range_or_missing_is_a_start_up_error(tiny_llama, tmp_path):
    import json
    import shutil

    from server.engine.setup import sampling_defaults

    shutil.copytree(tiny_llama, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"top_k": 0, "top_p": 0.8}))
    assert sampling_defaults("auto", str(tmp_path / "m")) == {"top_k": -1, "top_p": 0.8}  # 0 is transformers' off
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"temperature": 3.0}))
    with pytest.raises(ValueError, match="out of range.*temperature"):
        sampling_defaults("auto", str(tmp_path / "m"))
    with pytest.raises(ValueError, match="auto, vllm or a directory"):
        sampling_defaults(str(tmp_path / "nowhere"), str(tmp_path / "m"))
    assert sampling_defaults("auto", tiny_llama) == {}  # no generation_config.json: OpenAI's defaults


def test_a_chat_template_given_at_start_up_replaces_the_tokenizers(tiny_llama, tmp_path):
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from tests.api.conftest import MAX_MODEL_LEN, serve

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    for given in (str(template), template.read_text()):
        engine = Engine(EngineConfig(model=tiny_llama, num_kv_blocks=16, max_model_len=MAX_MODEL_LEN,
                                     chat_template=given))
        with serve(engine) as served, httpx.Client(base_url=served.url, timeout=30) as http:
            ids = _post(http, "/tokenize", {"messages": [USER]})["tokens"]
            assert engine.tokenizer.decode(ids) == "[user] reverse: abc\n[assistant] "
            reply = _post(http, "/v1/chat/completions", {"model": served.backbone, "messages": [USER], **GREEDY})
            assert reply["usage"]["prompt_tokens"] == len(ids)
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        Engine(EngineConfig(model=tiny_llama, num_kv_blocks=16, chat_template=str(tmp_path / "missing.jinja")))


def test_add_special_tokens_as_vllm_has_it(tiny_llama, tmp_path):
    """With a tokenizer that adds BOS: a completion's text gets it unless add_special_tokens is false, a chat's
    rendered template only when it is true."""
    import shutil

    from tokenizers import processors
    from transformers import AutoTokenizer

    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from tests.api.conftest import MAX_MODEL_LEN, serve

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    bos = tokenizer.convert_tokens_to_ids(tokenizer.bos_token)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)])
    tokenizer.save_pretrained(model)
    engine = Engine(EngineConfig(model=str(model), num_kv_blocks=32, max_model_len=MAX_MODEL_LEN))
    with serve(engine) as served, httpx.Client(base_url=served.url, timeout=30) as http:
        def prompt_tokens(path: str, body: dict) -> int:
            return _post(http, path, {"model": served.backbone, "max_tokens": 1, **body})["usage"]["prompt_tokens"]

        text = {"prompt": "the quick"}
        plain = len(tokenizer.encode("the quick", add_special_tokens=False))
        assert prompt_tokens("/v1/completions", text) == plain + 1  # BOS by default
        assert prompt_tokens("/v1/completions", text | {"add_special_tokens": False}) == plain
        chat = {"messages": [USER]}
        rendered = _post(http, "/tokenize", chat)["tokens"]
        assert rendered[0] != bos and prompt_tokens("/v1/chat/completions", chat) == len(rendered)
        assert prompt_tokens("/v1/chat/completions", chat | {"add_special_tokens": True}) == len(rendered) + 1
        assert _post(http, "/tokenize", chat | {"add_special_tokens": True})["tokens"] == [bos, *rendered]


def test_reset_prefix_cache_makes_the_next_request_cold(server, http):
    body = {"model": "reverse", "prompt": "a prompt that fills whole kv blocks for the reset test " * 2,
            "max_tokens": 1}
    _post(http, "/v1/completions", body)
    assert _post(http, "/v1/completions", body)["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    forgotten = _post(http, "/reset_prefix_cache", {})["blocks_forgotten"]
    assert forgotten >= 1 and server.engine.stats().kv_blocks_cached == 0
    assert _post(http, "/v1/completions", body)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert _post(http, "/v1/completions", body)["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16

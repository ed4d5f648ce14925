"""The official `openai` client against a real server: chat and completions, streamed and not, every tagging route."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from router.compose import compose

MESSAGES = [{"role": "user", "content": "reverse the letters of this string: hello world"}]
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tokenizer(server):
    return AutoTokenizer.from_pretrained(server.engine.config.model)


def chat(client, model, **kwargs):
    """A greedy chat call; returns (parsed response, composition header as a dict)."""
    kwargs = {"max_tokens": 8, "temperature": 0} | kwargs
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **kwargs)
    return raw.parse(), json.loads(raw.headers["x-tessera-composition"])


def test_models_lists_backbone_tasks_and_modules(server, client):
    cards = {m.id: m.to_dict() for m in client.models.list()}
    assert cards[server.backbone]["tessera"]["kind"] == "backbone"
    for task in server.library.tasks.values():
        modules = compose(server.library, task=task.name).as_dict()["modules"]
        assert cards[task.name]["tessera"] == {"kind": "task", "description": task.description, "modules": modules}
    for module in server.library.modules:
        assert cards[module]["tessera"]["kind"] == "module"
    assert {card["owned_by"] for card in cards.values()} == {"tessera"}
    assert len(cards) == 1 + len(server.library.tasks) + len(server.library.modules)


def test_backbone_chat_usage_and_echo(server, client, tokenizer):
    response, header = chat(client, server.backbone)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == server.backbone
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == len(prompt_ids)
    if choice.finish_reason == "length":
        assert response.usage.completion_tokens == 8
    else:
        assert response.usage.completion_tokens < 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert header == response.to_dict()["tessera"]["composition"] == {"modules": {}, "source": "none", "task": None}


@pytest.mark.parametrize("route", ["model", "backbone:task", "body", "header"])
def test_task_tag_routes_are_equivalent(server, client, route):
    backbone, task = server.backbone, "reverse"
    kwargs = {
        "model": {"model": task},
        "backbone:task": {"model": f"{backbone}:{task}"},
        "body": {"model": backbone, "extra_body": {"task": task}},
        "header": {"model": backbone, "extra_headers": {"X-Tessera-Task": task}},
    }[route]
    response, header = chat(client, **kwargs)
    expected = compose(server.library, task=task).as_dict()
    assert header == response.to_dict()["tessera"]["composition"] == expected
    assert expected["source"] == "tag" and expected["modules"]
    tagged_text = response.choices[0].message.content
    backbone_text = chat(client, backbone)[0].choices[0].message.content
    assert tagged_text != backbone_text, "random modules must change the greedy output"
    assert tagged_text == chat(client, task)[0].choices[0].message.content


def test_explicit_modules_and_module_as_model(server, client):
    by_body, header = chat(client, server.backbone, extra_body={"modules": {"m1": 1.0}})
    assert header == {"modules": {"m1": 1.0}, "source": "explicit", "task": None}
    by_model, model_header = chat(client, "m1")
    assert model_header == header
    assert by_model.choices[0].message.content == by_body.choices[0].message.content
    two, two_header = chat(client, server.backbone, extra_body={"modules": {"m0": 0.5, "m2": 0.5}})
    assert two_header["modules"] == {"m0": 0.5, "m2": 0.5}
    assert two.choices[0].message.content != by_body.choices[0].message.content


def test_composite_task_tag_composes_both_tasks(server, client):
    response, header = chat(client, "reverse+uppercase")
    expected = compose(server.library, task="reverse+uppercase").as_dict()
    assert header == response.to_dict()["tessera"]["composition"] == expected
    assert expected["task"] == "reverse+uppercase" and sum(expected["modules"].values()) == pytest.approx(2.0)
    by_body, body_header = chat(client, server.backbone, extra_body={"task": "reverse+uppercase"})
    assert body_header == header and by_body.choices[0].message.content == response.choices[0].message.content


def test_task_weights_scale_and_subtract_tasks(server, client):
    weights = {"reverse": 1.0, "uppercase": -0.5}
    response, header = chat(client, server.backbone, extra_body={"tasks": weights})
    assert header == compose(server.library, tasks=weights).as_dict() and header["task"] == "reverse+uppercase"
    same = chat(client, server.backbone, extra_body={"modules": header["modules"]})[0]  # the gates it stands for
    assert response.choices[0].message.content == same.choices[0].message.content
    full = chat(client, server.backbone, extra_body={"tasks": {"reverse": 1.0, "uppercase": 1.0}})[1]
    assert full == compose(server.library, task="reverse+uppercase").as_dict()
    for extra, status in (({"tasks": weights, "task": "reverse"}, 400), ({"tasks": {"nope": 1.0}}, 404)):
        with pytest.raises(Exception) as caught:
            chat(client, server.backbone, extra_body=extra)
        assert caught.value.status_code == status and caught.value.body["param"] == "tasks"


def test_chat_stream_matches_non_stream_and_reports_usage(server, client):
    full, _ = chat(client, "reverse")
    raw = client.chat.completions.with_raw_response.create(
        model="reverse", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    assert json.loads(raw.headers["x-tessera-composition"])["task"] == "reverse"
    chunks = list(raw.parse())
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].to_dict()["tessera"]["composition"]["task"] == "reverse"
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached tokens differ: full ran first
    assert chunks[-1].choices == []
    assert [getattr(chunks[-1].usage, c) for c in counts] == [getattr(full.usage, c) for c in counts]


def test_a_shared_prefix_comes_from_the_cache_and_usage_says_how_much(server, client, tokenizer):
    system = {"role": "system", "content": "You answer in one short line and never explain yourself. " * 3}
    turns = [[system, {"role": "user", "content": text}] for text in ("reverse abc", "reverse xyz")]
    ids = [tokenizer.encode(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False) for m in turns]
    common = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    block = server.engine.config.block_size
    expected = min(common, len(ids[1]) - 1) // block * block
    assert expected >= block, "the shared system prompt must fill a KV block"
    calls = [client.chat.completions.create(model="reverse", messages=m, max_tokens=6, temperature=0) for m in turns]
    assert [c.usage.prompt_tokens for c in calls] == [len(i) for i in ids]
    assert [c.usage.prompt_tokens_details.cached_tokens for c in calls] == [0, expected]
    other_task = client.chat.completions.create(model="uppercase", messages=turns[1], max_tokens=6, temperature=0)
    assert other_task.usage.prompt_tokens_details.cached_tokens == 0, "another composition's KV is never reused"
    again = list(client.chat.completions.create(model="reverse", messages=turns[1], max_tokens=6, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in again if c.choices) == calls[1].choices[0].message.content
    assert again[-1].usage.prompt_tokens_details.cached_tokens == (len(ids[1]) - 1) // block * block


def test_n_with_seed_is_reproducible_and_uses_seed_plus_index(server, client):
    sampled = {"model": "uppercase", "temperature": 1.0, "max_tokens": 8, "seed": 123}
    both, _ = chat(client, n=2, **sampled)
    assert [c.index for c in both.choices] == [0, 1]
    texts = [c.message.content for c in both.choices]
    assert texts == [c.message.content for c in chat(client, n=2, **sampled)[0].choices]
    assert texts[0] == chat(client, **sampled)[0].choices[0].message.content
    assert texts[1] == chat(client, **(sampled | {"seed": 124}))[0].choices[0].message.content
    assert texts[0] != texts[1]
    single = chat(client, **sampled)[0].usage
    assert both.usage.prompt_tokens == single.prompt_tokens, "a prompt shared by n choices counts once"
    assert single.completion_tokens < both.usage.completion_tokens <= 2 * 8
    assert both.usage.total_tokens == both.usage.prompt_tokens + both.usage.completion_tokens


def test_chat_logprobs(client):
    response, _ = chat(client, "summarize", logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens
    for entry in entries:
        tops = [top.logprob for top in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob <= 0 and entry.logprob == pytest.approx(tops[0], abs=1e-4)
    assert chat(client, "summarize")[0].choices[0].logprobs is None


def test_completions_string_and_token_prompts(server, client, tokenizer):
    ids = tokenizer.encode(PROMPT)
    by_text = client.completions.create(model="reverse", prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="reverse", prompt=ids, max_tokens=6, temperature=0)
    assert by_text.object == "text_completion"
    assert by_text.usage.prompt_tokens == len(ids) == by_ids.usage.prompt_tokens
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.choices[0].finish_reason in ("stop", "length")
    assert by_text.to_dict()["tessera"]["composition"]["task"] == "reverse"
    backbone = client.completions.create(model=server.backbone, prompt=PROMPT, max_tokens=6, temperature=0)
    assert backbone.choices[0].text != by_text.choices[0].text


def test_completions_stream_logprobs_and_several_prompts(client):
    kwargs = {"model": "reverse", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    full = client.completions.create(prompt=PROMPT, **kwargs)
    logprobs = full.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == full.usage.completion_tokens
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    several = client.completions.create(prompt=[PROMPT, "hello"], n=2, **(kwargs | {"logprobs": None}))
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == full.choices[0].text


def test_penalties_logit_bias_and_min_tokens(server, client, tokenizer):
    forced = tokenizer.encode("z", add_special_tokens=False)[0]
    biased = client.completions.create(model=server.backbone, prompt=PROMPT, max_tokens=6, temperature=0,
                                       logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert biased.choices[0].text == tokenizer.decode([forced] * 6)
    plain = client.completions.create(model="reverse", prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    penalized = client.completions.create(model="reverse", prompt=PROMPT, max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=1.0,
                                          extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    assert penalized.choices[0].text != plain.choices[0].text
    eos = tokenizer.eos_token_id
    ended = client.completions.create(model=server.backbone, prompt=PROMPT, max_tokens=10, temperature=0,
                                      logit_bias={str(eos): 100}, extra_body={"min_tokens": 3})
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 4


def test_echo_with_logprobs_scores_the_prompt_as_the_merged_model_does(server, client, tokenizer):
    """lm-eval-harness's loglikelihood request: echo, logprobs, greedy; the prompt's tokens come back scored."""
    import torch

    from tests.router.helpers import merged_model

    composition = compose(server.library, task="reverse")
    ids = tokenizer.encode(PROMPT)
    kwargs = dict(model="reverse", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    reply = client.completions.create(**kwargs)
    choice = reply.choices[0]
    plain = client.completions.create(**(kwargs | {"echo": False})).choices[0]
    assert choice.text == PROMPT + plain.text
    lp = choice.logprobs
    assert lp.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert lp.tokens[len(ids):] == plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    model = merged_model(server.engine.config.model, server.library, composition)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [len, vocab]
    expected = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])  # keyed by text: two ids may decode alike
    streamed = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    assert streamed[0].choices[0].logprobs.token_logprobs[0] is None
    echoed = client.completions.create(model="reverse", prompt=[ids, ids[:3]], max_tokens=2, temperature=0, echo=True)
    assert [c.text[: len(tokenizer.decode(p))] for c, p in zip(echoed.choices, (ids, ids[:3]))] == \
        [tokenizer.decode(ids), tokenizer.decode(ids[:3])]
    assert echoed.choices[0].logprobs is None


def test_vllm_prompt_logprobs_give_each_prompt_tokens_logprob_and_rank(server, client, tokenizer):
    ids = tokenizer.encode(PROMPT)
    reply = client.completions.create(model="uppercase", prompt=PROMPT, max_tokens=2, temperature=0,
                                      extra_body={"prompt_logprobs": 3})
    scored = reply.choices[0].model_extra["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    for position, entry in enumerate(scored[1:], start=1):
        own = entry[str(ids[position])]
        assert own["decoded_token"] == tokenizer.decode([ids[position]]) and own["rank"] >= 1
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked[:3]] == [1, 2, 3] and len(entry) in (3, 4)
        assert ranked[0]["logprob"] >= own["logprob"] and (own["rank"] == 1) == (own["logprob"] >= ranked[0]["logprob"])
    echoed = client.completions.create(model="uppercase", prompt=PROMPT, max_tokens=2, temperature=0, echo=True,
                                       logprobs=1)
    assert echoed.choices[0].logprobs.token_logprobs[1 : len(ids)] == pytest.approx(
        [entry[str(ids[i])]["logprob"] for i, entry in enumerate(scored[1:], start=1)], abs=1e-5)
    chat = client.chat.completions.create(model="uppercase", messages=MESSAGES, max_tokens=2, n=2, temperature=0,
                                          extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) == \
        chat.usage.prompt_tokens


def test_stop_reason_names_the_stop_string_that_ended_the_text(server, client):
    kwargs = dict(model="reverse", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0]
    assert full.finish_reason == "length" and full.model_extra["stop_reason"] is None
    stop = full.text[3:5]
    cut = client.completions.create(**kwargs, stop=["never-there", stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.model_extra["stop_reason"] == stop
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = list(client.completions.create(**kwargs, stop=[stop], stream=True))
    assert [c.choices[0].model_extra.get("stop_reason") for c in streamed if c.choices][-1] == stop


def test_a_negative_weight_subtracts_its_module_exactly(server, client, tokenizer):
    """Task arithmetic's negation: the served tokens are the merged model's with that module's delta subtracted."""
    import torch

    from tests.router.helpers import merged_model

    ids = tokenizer.encode(PROMPT)
    texts = {}  # token ids, compared as ids: two byte-fallback tokens can decode alike
    for weights in ({"m0": -0.8, "m1": 0.6}, {"m0": 0.8, "m1": 0.6}):
        model = merged_model(server.engine.config.model, server.library, compose(server.library, modules=weights))
        model.generation_config.eos_token_id = None  # as ignore_eos: EOS may be drawn, and does not end it
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        reply = client.completions.create(model=server.backbone, prompt=ids, max_tokens=6, temperature=0, logprobs=0,
                                          extra_body={"modules": weights, "ignore_eos": True,
                                                      "return_tokens_as_token_ids": True})
        served = [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]
        assert served == out[0, len(ids):].tolist(), weights
        assert reply.model_extra["tessera"]["composition"]["modules"] == weights
        texts[weights["m0"]] = served
    assert texts[-0.8] != texts[0.8]

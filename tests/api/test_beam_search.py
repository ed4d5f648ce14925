"""Beam search (vLLM's `use_beam_search`) through the official client, against the same search written plainly
over the merged Hugging Face model's full forward passes."""

from __future__ import annotations

import httpx
import pytest
import torch

from router.compose import compose
from tests.router.helpers import merged_model

PROMPT = "the quick brown"


def _reference(model, prompt: list[int], width: int, max_tokens: int, ends: set[int],
               length_penalty: float) -> list[tuple[list[int], bool]]:
    """The search `server.api.beam_search` describes, one full forward per beam and step."""
    live, finished = [([], 0.0)], []
    for _ in range(max_tokens):
        candidates = []
        for tokens, total in live:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            values, ids = torch.log_softmax(logits, dim=-1).topk(2 * width)
            for value, token in zip(values.tolist(), ids.tolist()):
                grown = (tokens + [token], total + value)
                (finished if token in ends else candidates).append(grown)
        live = sorted(candidates, key=lambda beam: beam[1], reverse=True)[:width]
        if not live:
            break

    def score(beam):
        ended = bool(beam[0]) and beam[0][-1] in ends
        return beam[1] / max(len(beam[0]) - ended, 1) ** length_penalty

    best = sorted(finished + live, key=score, reverse=True)[:width]
    return [(tokens, bool(tokens) and tokens[-1] in ends) for tokens, _ in best]


@pytest.mark.parametrize(("model_name", "task", "width", "length_penalty", "ignore_eos"), [
    ("backbone", None, 3, 1.0, True),
    ("reverse", "reverse", 4, 0.5, False),
])
def test_beams_are_those_of_the_plain_search_on_the_merged_model(server, model_name, task, width, length_penalty,
                                                                 ignore_eos):
    tokenizer = server.engine.tokenizer
    name = server.backbone if model_name == "backbone" else model_name
    eos = tokenizer.eos_token_id
    stop = tokenizer.encode(" ", add_special_tokens=False)[0]  # a common token, so some beams end by it
    composition = compose(server.library, task=task) if task else compose(server.library)
    model = merged_model(server.engine.config.model, server.library, composition)
    prompt = tokenizer.encode(PROMPT)
    ends = {stop} | (set() if ignore_eos else {eos})
    expected = _reference(model, prompt, width, 6, ends, length_penalty)
    reply = server.client().completions.create(
        model=name, prompt=PROMPT, n=width, max_tokens=6, temperature=0.7,  # temperature does not apply
        extra_body={"use_beam_search": True, "length_penalty": length_penalty, "ignore_eos": ignore_eos,
                    "stop_token_ids": [stop]})
    assert [c.index for c in reply.choices] == list(range(width))
    for choice, (tokens, ended) in zip(reply.choices, expected, strict=True):
        assert choice.text == tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if ended else "length")
        assert choice.model_extra["stop_reason"] == (tokens[-1] if ended and tokens[-1] == stop else None)
    assert reply.usage.completion_tokens == sum(len(tokens) for tokens, _ in expected)
    assert len({c.text for c in reply.choices}) == width  # distinct beams


def test_chat_beams_and_several_prompts(server):
    client = server.client()
    chat = client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": "abc"}], n=2,
                                          max_tokens=4, extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and all(c.message.role == "assistant" for c in chat.choices)
    greedy = client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": "abc"}], n=1,
                                            max_tokens=4, extra_body={"use_beam_search": True})
    plain = client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": "abc"}],
                                           max_tokens=4, temperature=0)
    assert greedy.choices[0].message.content == plain.choices[0].message.content  # width 1 is greedy
    both = client.completions.create(model="reverse", prompt=["abc", "xyz"], n=2, max_tokens=3,
                                     extra_body={"use_beam_search": True})
    alone = client.completions.create(model="reverse", prompt="xyz", n=2, max_tokens=3,
                                      extra_body={"use_beam_search": True})
    assert len(both.choices) == 4 and [c.text for c in both.choices[2:]] == [c.text for c in alone.choices]


@pytest.mark.parametrize(("fields", "param"), [
    ({"stream": True}, "stream"),
    ({"n": 11}, "n"),
    ({"logprobs": 1}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"stop": ["x"]}, "stop"),
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
])
def test_what_beam_search_cannot_honour_is_a_400(server, fields, param):
    body = {"model": "reverse", "prompt": PROMPT, "max_tokens": 3, "use_beam_search": True, **fields}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text

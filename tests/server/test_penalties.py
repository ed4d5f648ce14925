"""Penalties, logit bias, min_tokens, allowed_token_ids and bad_words: the batched device math against a per-row
loop, and the engine against transformers `generate` with the same logits processors."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import (LogitsProcessor, LogitsProcessorList, NoBadWordsLogitsProcessor,
                          PrefixConstrainedLogitsProcessor, RepetitionPenaltyLogitsProcessor)

from router.composition import Composition
from router.library import ModuleLibrary
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.penalties import TokenCounts, history_window, needs_history, process
from server.engine.request import Request, SamplingParams
from tests.router.helpers import merged_model

VOCAB = 50
EOS = {3}


def _reference_row(logits: torch.Tensor, prompt: list[int], outputs: list[int], p: SamplingParams) -> torch.Tensor:
    """One row, token by token, as the penalties module's docstring states it."""
    row = logits.clone()
    for v in range(VOCAB):
        count = outputs.count(v)
        if v in prompt or count:
            row[v] = row[v] / p.repetition_penalty if row[v] > 0 else row[v] * p.repetition_penalty
        row[v] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    for token, bias in p.logit_bias:
        row[token] += bias
    if len(outputs) < p.min_tokens:
        for token in set(p.stop_token_ids) | (set() if p.ignore_eos else EOS):
            row[token] = float("-inf")
    if p.allowed_token_ids:
        for v in set(range(VOCAB)) - set(p.allowed_token_ids):
            row[v] = float("-inf")
    for word in p.bad_words:
        if len(outputs) >= len(word) - 1 and outputs[len(outputs) - len(word) + 1:] == list(word[:-1]):
            row[word[-1]] = float("-inf")
    return row


def test_batched_processing_equals_the_per_row_loop():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    counts = TokenCounts(VOCAB, torch.device("cpu"), rows=2)  # grows twice below
    rows, params, histories, count_rows = [], [], [], []
    logits = torch.randn(9, VOCAB, generator=gen) * 3  # [S, vocab]
    for i in range(7):
        p = SamplingParams(presence_penalty=rng.choice([0.0, 0.7, -0.4]), frequency_penalty=rng.choice([0.0, 0.3]),
                           repetition_penalty=rng.choice([1.0, 1.3, 0.8]), min_tokens=rng.choice([0, 5]),
                           logit_bias=tuple((rng.randrange(VOCAB), rng.uniform(-5, 5)) for _ in range(i % 3)),
                           stop_token_ids=(7,) if i % 2 else (), ignore_eos=i == 4,
                           allowed_token_ids=tuple(rng.sample(range(VOCAB), 30)) if i % 3 == 1 else ())
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 9))]
        outputs = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 9))]
        if i % 2:  # bad words: one token, and longer ones that end the output (banned) or do not (free)
            words = [(rng.randrange(VOCAB),), (*outputs[-2:], rng.randrange(VOCAB)), (*outputs[-1:], 49, 48)]
            p = SamplingParams(**{**p.__dict__, "bad_words": tuple(w for w in words if w)})
        counted = needs_history(p)
        if counted:
            counts.hold(f"r{i}", prompt, outputs, history_window(p))
        rows.append(i + 1)
        params.append(p)
        histories.append((prompt, outputs))
        count_rows.append(counts.row_of[f"r{i}"] if counted else None)
    counts.forget("r0")
    counts.hold("r0", *histories[0], history_window(params[0]))  # a reused row is rewritten whole
    count_rows[0] = counts.row_of.get("r0") if count_rows[0] is not None else None
    out = process(logits, rows, params, count_rows, [len(o) for _, o in histories], counts, EOS)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[8], logits[8])  # rows not asked stay
    for row, p, (prompt, outputs) in zip(rows, params, histories):
        assert torch.allclose(out[row], _reference_row(logits[row], prompt, outputs, p), atol=1e-5), row
    assert not torch.equal(out[1:8], logits[1:8])


def test_recorded_tokens_count_on_the_device():
    counts = TokenCounts(VOCAB, torch.device("cpu"), rows=1)
    counts.hold("a", [1, 2], [5])
    counts.hold("b", [], [])
    counts.record(["a", "b", "a"], torch.tensor([5, 9, 6]))
    assert counts.counts[counts.row_of["a"]].nonzero().flatten().tolist() == [5, 6]
    assert counts.counts[counts.row_of["a"], 5] == 2 and counts.counts[counts.row_of["b"], 9] == 1
    assert counts.in_prompt[counts.row_of["a"]].nonzero().flatten().tolist() == [1, 2]


def test_the_last_output_tokens_follow_the_draws_and_the_window_widens():
    counts = TokenCounts(VOCAB, torch.device("cpu"), rows=1)
    counts.hold("a", [1], [4, 5, 6, 7], window=2)
    assert counts.recent[counts.row_of["a"]].tolist() == [6, 7]
    counts.hold("b", [], [8], window=3)  # wider: the older rows keep their tokens, -1 in front
    assert counts.recent[counts.row_of["a"]].tolist() == [-1, 6, 7]
    assert counts.recent[counts.row_of["b"]].tolist() == [-1, -1, 8]
    counts.record(["b", "a"], torch.tensor([9, 10]))
    counts.record(["b"], torch.tensor([11]))
    assert counts.recent[counts.row_of["a"]].tolist() == [6, 7, 10]
    assert counts.recent[counts.row_of["b"]].tolist() == [8, 9, 11]


class _OpenAIPenalties(LogitsProcessor):
    """presence/frequency penalties over the generated tokens, recounted from input_ids at every step."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for row in range(scores.shape[0]):
            counts = torch.bincount(input_ids[row, self.prompt_len :], minlength=scores.shape[1]).to(scores.dtype)
            scores[row] -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        return scores


class _Bias(LogitsProcessor):
    def __init__(self, bias: tuple[tuple[int, float], ...]):
        self.bias = bias

    def __call__(self, input_ids, scores):
        for token, value in self.bias:
            scores[:, token] += value
        return scores


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [13, 14, 15, 16, 17]]
PENALTIES = [
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.5),
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.9,
                   logit_bias=((40, 2.0), (41, -3.0))),
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.2, frequency_penalty=2.0),
]
COMPOSITIONS = [Composition(("m0",), (1.0,), "explicit"), Composition(), Composition(("m1", "m2"), (0.6, 0.4), "explicit")]


def _engine(setup, **overrides) -> Engine:
    model_dir, library = setup
    values = dict(model=model_dir, library=library, device="cpu", dtype="float32", block_size=4,
                  max_num_batched_tokens=16, num_kv_blocks=64, max_loaded_modules=3)
    return Engine(EngineConfig(**(values | overrides)))


def _tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def _requests(prefix: str = "r", free: bool = True) -> list[Request]:
    requests = [Request(f"{prefix}{i}", p, s, c) for i, (p, s, c) in enumerate(zip(PROMPTS, PENALTIES, COMPOSITIONS))]
    if free:  # a neighbour without any: its tokens must not change
        requests.append(Request(f"{prefix}free", PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.0,
                                                                            ignore_eos=True), COMPOSITIONS[0]))
    return requests


def test_greedy_with_penalties_equals_transformers_generate_with_the_same_processors(setup):
    model_dir, library_dir = setup
    library = ModuleLibrary.load(library_dir)
    outputs = _engine(setup).generate_batch(_requests())
    for i, (prompt, p, composition) in enumerate(zip(PROMPTS, PENALTIES, COMPOSITIONS)):
        processors = LogitsProcessorList()
        if p.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
        processors.append(_OpenAIPenalties(len(prompt), p.presence_penalty, p.frequency_penalty))
        processors.append(_Bias(p.logit_bias))
        model = merged_model(model_dir, library, composition)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             logits_processor=processors)
        assert _tokens(outputs[f"r{i}"]) == out[0, len(prompt) :].tolist(), i
    plain = merged_model(model_dir, library, COMPOSITIONS[0]).generate(
        torch.tensor([PROMPTS[0]]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert _tokens(outputs["rfree"]) == plain[0, len(PROMPTS[0]) :].tolist()
    assert _tokens(outputs["rfree"]) != _tokens(outputs["r0"])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("overrides", [{"async_scheduling": "on"}, {"num_kv_blocks": 9}])
def test_async_scheduling_and_preemption_keep_the_counts(setup, overrides, temperature):
    """Readmitted after a preemption, a request's counts are rebuilt from its tokens; overlapped steps count
    the tokens still on the device."""
    sampled = [Request(r.request_id, r.prompt_token_ids, SamplingParams(
        **{**r.sampling.__dict__, "temperature": temperature, "seed": 4}), r.composition) for r in _requests()]
    free = _tokens(_engine(setup).generate_batch([sampled[-1]])[sampled[-1].request_id])
    banned = dataclasses.replace(sampled[-1].sampling, bad_words=((free[3], free[4]), (free[5], free[6], free[7])))
    sampled.append(Request("rbad", sampled[-1].prompt_token_ids, banned, sampled[-1].composition))
    expected = _engine(setup).generate_batch(sampled)
    assert _tokens(expected["rbad"]) != free
    engine = _engine(setup, **overrides)
    preempted = []
    engine.step_observer = lambda stats: preempted.append(stats.num_preempted)
    outputs = engine.generate_batch(sampled)
    assert sum(preempted) > 0 or "num_kv_blocks" not in overrides, "the KV pool was meant to run out"
    assert {k: _tokens(v) for k, v in outputs.items()} == {k: _tokens(v) for k, v in expected.items()}


def test_min_tokens_holds_back_eos_and_stop_tokens(setup):
    engine = _engine(setup)
    eos = min(engine.scheduler.eos_ids)
    forced = SamplingParams(max_tokens=10, temperature=0.0, logit_bias=((eos, 100.0),))
    early = engine.generate_batch([Request("early", PROMPTS[0], forced)])["early"]
    assert early[-1].finish_reason == "stop" and early[-1].num_output_tokens == 1  # EOS drawn at once
    held = engine.generate_batch([Request("held", PROMPTS[0], SamplingParams(
        **{**forced.__dict__, "min_tokens": 4}))])["held"]
    tokens = _tokens(held)
    assert held[-1].finish_reason == "stop" and len(tokens) == 5 and eos not in tokens[:4]
    stop = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(40,), logit_bias=((40, 100.0),),
                          min_tokens=3)
    stopped = engine.generate_batch([Request("stop", PROMPTS[1], stop)])["stop"]
    assert stopped[-1].finish_reason == "stop" and 40 not in _tokens(stopped)[:3] and len(_tokens(stopped)) == 4


def test_bad_words_and_allowed_tokens_equal_transformers_generate(setup):
    """Banned sequences picked from the free reply (a one-token word, a two-token one) and an allowed set that
    leaves out some of its tokens change it, the same way transformers' processors do; a neighbour keeps its
    own tokens."""
    model_dir, library_dir = setup
    engine = _engine(setup, async_scheduling="on")
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    free = _tokens(engine.generate_batch([Request("free", PROMPTS[1], greedy, COMPOSITIONS[2])])["free"])
    words = ((free[1], free[2]), (free[6],))
    allowed = tuple(t for t in range(VOCAB) if t not in free[8:])
    asked = {"bad": dataclasses.replace(greedy, bad_words=words), "allowed": dataclasses.replace(greedy, allowed_token_ids=allowed),
             "both": dataclasses.replace(greedy, bad_words=words, allowed_token_ids=allowed)}
    outputs = engine.generate_batch([Request(name, PROMPTS[1], p, COMPOSITIONS[2]) for name, p in asked.items()]
                                    + [Request("free", PROMPTS[1], greedy, COMPOSITIONS[2])])
    model = merged_model(model_dir, ModuleLibrary.load(library_dir), COMPOSITIONS[2])
    for name, p in asked.items():
        processors = LogitsProcessorList()
        if p.bad_words:
            processors.append(_OutputOnly(len(PROMPTS[1]), NoBadWordsLogitsProcessor([list(w) for w in p.bad_words])))
        if p.allowed_token_ids:
            processors.append(PrefixConstrainedLogitsProcessor(lambda batch, ids: list(allowed), num_beams=1))
        out = model.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             logits_processor=processors)
        assert _tokens(outputs[name]) == out[0, len(PROMPTS[1]):].tolist(), name
        assert _tokens(outputs[name]) != free, name
    assert _tokens(outputs["free"]) == free
    bad = _tokens(outputs["bad"])
    assert free[6] not in bad and all(bad[j:j + 2] != list(words[0]) for j in range(len(bad) - 1))
    assert not set(_tokens(outputs["allowed"])) - set(allowed)


class _OutputOnly(LogitsProcessor):
    """A processor that sees the generated tokens only (vLLM's bad words look at the output, not the prompt)."""

    def __init__(self, prompt_len: int, inner: LogitsProcessor):
        self.prompt_len, self.inner = prompt_len, inner

    def __call__(self, input_ids, scores):
        return self.inner(input_ids[:, self.prompt_len:], scores)

"""Differential tests over random engine settings and request mixes (penalties, bad words, grammars, stops,
min_tokens, logprobs, seeds, modules), every output, error and logprob token compared: any settings (async
scheduling, padded graphs, prefix caching, small budgets and caches that chunk prefills and preempt) against a
roomy synchronous reference, and speculation against plain decoding."""

from __future__ import annotations

import json
import random

import pytest

from router.composition import Composition
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.engine.structured import GrammarSpec

pytestmark = pytest.mark.usefixtures("one_thread")

COMPOSITIONS = [Composition(), Composition(("m0",), (1.0,), "explicit"),
                Composition(("m1", "m2"), (0.6, 0.4), "explicit")]
VOCAB = 380
"""Token ids drawn here stay below the tiny tokenizer's vocabulary."""
TRIALS = (0, 19, 26, 50, 79, 102, 112, 150, 173, 224, 256, 273)
"""Seeds of the generator below. NOTE: of its first 300 trials, trial 102 alone fails when a request left nothing
to draw loses the drafts kept before that row; 23 fail (19, 26, 50, 79, 112, 150, 173, 224, 256 and 273 among them)
when a draft's row does not count the drafts before it for penalties, and 83 (102, 112, 150, 173, ...) when a
grammar masks a draft's row without them; 0 is the first."""


def _settings(rng: random.Random) -> dict:
    block_size = rng.choice([1, 2, 4, 16])
    max_model_len = rng.choice([32, 64])
    return dict(block_size=block_size, max_num_batched_tokens=rng.choice([8, 16, 64, 512]),
                max_model_len=max_model_len, max_num_seqs=rng.choice([2, 4, 8]),
                num_kv_blocks=max(rng.choice([8, 16, 64, 200]), -(-max_model_len // block_size) + 1),
                async_scheduling=rng.choice(["on", "off"]), enable_prefix_caching=rng.random() < 0.7,
                cuda_graphs=rng.choice(["off", "padded"]), max_loaded_modules=3)


def _sampling(rng: random.Random, eos: int) -> SamplingParams:
    values = dict(max_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 0.0, 0.7, 1.2]),
                  seed=rng.choice([None, 5, 9]), ignore_eos=rng.random() < 0.7)
    extras = {"presence_penalty": 0.5, "repetition_penalty": 1.3, "logprobs": rng.choice([0, 2]), "top_k": 5,
              "top_p": 0.8, "stop_token_ids": (rng.randrange(3, VOCAB),),
              "bad_words": ((rng.randrange(3, VOCAB), rng.randrange(3, VOCAB)), (rng.randrange(3, VOCAB),)),
              "min_tokens": rng.randint(0, 5)}
    values |= {name: value for name, value in extras.items() if rng.random() < 0.2}
    if "min_tokens" in values:
        values["logit_bias"] = ((eos, 50.0),)  # EOS as soon as min_tokens allows it
    return SamplingParams(**values)


def _requests(seed: int, eos: int, grammars: list, predictions: dict | None = None) -> list[Request]:
    rng = random.Random(seed)
    requests = []
    for i in range(rng.randint(1, 8)):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 20))]
        if rng.random() < 0.3:
            prompt = prompt[:4] * 4  # a prompt that repeats itself: n-gram lookup finds drafts
        sampling = _sampling(rng, eos)
        grammar = rng.choice(grammars) if rng.random() < 0.25 else None
        requests.append(Request(f"r{i}", prompt, sampling, rng.choice(COMPOSITIONS), grammar=grammar,
                                prediction=tuple((predictions or {}).get(f"r{i}", ()))))
    return requests


def _flat(outputs: dict) -> dict:
    """Per request: token ids, text, finish and stop reasons, logprob token ids, and its errors' messages."""
    flat = {}
    for request_id, items in outputs.items():
        good = [o for o in items if not isinstance(o, BaseException)]
        flat[request_id] = ([t for o in good for t in o.token_ids], "".join(o.text for o in good),
                            good[-1].finish_reason if good else None, good[-1].stop_reason if good else None,
                            [lp.token_id for o in good for lp in o.logprobs or ()],
                            [str(o) for o in items if isinstance(o, BaseException)])
    return flat


def _predictions(mode: str, tokens: dict[str, list[int]]) -> dict | None:
    return {"exact": tokens, "edited": {r: t[:3] + [7, 8] + t[5:] for r, t in tokens.items()}, "ngram": None,
            "wrong": {r: [x % VOCAB + 1 for x in t] for r, t in tokens.items()}}[mode]


@pytest.mark.parametrize("trial", TRIALS)
def test_random_settings_and_requests_give_the_plain_output(setup, trial):
    pytest.importorskip("xgrammar")
    model_dir, library = setup
    rng = random.Random(trial)
    settings = _settings(rng)
    plain = json.dumps({"prediction_tokens": 0, "grammar_tokens": 0})  # no drafts at all
    engine = Engine(EngineConfig(model=model_dir, library=library, device="cpu", speculative_config=plain,
                                 **settings))
    eos = min(engine.scheduler.eos_ids)
    grammars = [engine.compile_grammar(GrammarSpec("regex", r"[a-z]{2,8}( [a-z]{1,5}){0,3}")),
                engine.compile_grammar(GrammarSpec("choice", json.dumps(["yes", "no", "not sure"])))]
    want = _flat(engine.generate_batch(_requests(trial * 7, eos, grammars)))
    mode = rng.choice(["exact", "edited", "ngram", "wrong"])
    speculation = {"prediction_tokens": rng.choice([1, 4, 16])}
    if mode == "ngram" or rng.random() < 0.5:
        speculation |= {"method": "ngram", "num_speculative_tokens": rng.choice([1, 3, 6]), "prompt_lookup_max": 3,
                        "prompt_lookup_min": 1}
    engine = Engine(EngineConfig(model=model_dir, library=library, device="cpu",
                                 speculative_config=json.dumps(speculation), **settings))
    predictions = _predictions(mode, {request_id: flat[0] for request_id, flat in want.items()})
    assert _flat(engine.generate_batch(_requests(trial * 7, eos, grammars, predictions))) == want


SPECULATION = (None, '{"grammar_tokens": 0}', '{"disable_by_batch_size": 2}')
"""Forced-token drafts (every step read back while structured requests run), none (asynchronously, their sampling
waits for the step before), or none while more than two requests run."""
REFERENCE = dict(block_size=4, max_num_batched_tokens=4096, max_model_len=64, max_num_seqs=16, num_kv_blocks=512,
                 async_scheduling="off", enable_prefix_caching=False, cuda_graphs="off", max_loaded_modules=3)
"""A synchronous, eager engine with room for every request at once: no chunked prefill, no preemption."""


@pytest.mark.parametrize("trial", (0, 3, 6, 11, 42, 44, 97, 150))
def test_random_settings_give_the_reference_output(setup, trial):
    """NOTE: 600 trials of this generator (exploration, 2026-12-06) found no difference; nor did 400 after it drew
    `SPECULATION` too, 72 of them with sampling deferred for grammar masks (6 and 44 among them)."""
    pytest.importorskip("xgrammar")
    model_dir, library = setup
    rng = random.Random(10_000 + trial)
    settings = _settings(rng) | {"max_model_len": 64, "max_loaded_modules": rng.choice([2, 3])}
    settings["num_kv_blocks"] = max(settings["num_kv_blocks"], -(-64 // settings["block_size"]) + 1)
    settings["speculative_config"] = rng.choice(SPECULATION)
    engines = [Engine(EngineConfig(model=model_dir, library=library, device="cpu", **values))
               for values in (REFERENCE, settings)]
    eos = min(engines[0].scheduler.eos_ids)
    grammars = [engines[0].compile_grammar(GrammarSpec("regex", r"[a-z]{2,8}( [a-z]{1,5}){0,3}")),
                engines[0].compile_grammar(GrammarSpec("choice", json.dumps(["yes", "no", "not sure"])))]
    want, got = (_flat(engine.generate_batch(_requests(trial * 13, eos, grammars))) for engine in engines)
    assert got == want

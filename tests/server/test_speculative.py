"""Speculative decoding: n-gram lookup and predictions propose drafts, the scheduler runs them within the request's
limits, and the engine's output is exactly the output without speculation, in fewer steps."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from router.composition import Composition
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.kv_pool import BlockPool
from server.engine.module_pool import ModulePool
from server.engine.plan import LOGIT_ROWS, StepResult
from server.engine.request import NoDrawableTokenError, Request, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig, Status
from server.engine.speculative import Drafter, SpeculativeConfig, accepted
from server.engine.structured import GrammarSpec


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the config -------------------------------------------------------------------------------------


def test_the_config_reads_vllms_json_with_its_defaults():
    assert SpeculativeConfig.from_json(None) == SpeculativeConfig()
    assert SpeculativeConfig().num_speculative_tokens == 0  # no lookup unless asked; predictions still draft
    config = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}')
    assert (config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max) == (5, 3, 3)
    config = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 2}')
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (5, 5)
    config = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2}')
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (2, 2)
    assert SpeculativeConfig.from_json('{"prediction_tokens": 0}').prediction_tokens == 0
    config = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 8}')
    assert (config.num_speculative_tokens, config.disable_by_batch_size) == (2, 8)


@pytest.mark.parametrize("text,message", [
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method 'eagle' is not supported"),
    ('{"method": "ngram"}', "needs num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "draft_model": "x"}', "unknown keys ['draft_model']"),
    ('{"method": "ngram", "num_speculative_tokens": -1}', "num_speculative_tokens must be an integer >= 0"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
     "prompt_lookup_min <= prompt_lookup_max"),
    ('{"method": "ngram", "num_speculative_tokens": true}', "must be an integer"),
    ("ngram", "is not JSON"),
    ("[1]", "must be a JSON object"),
])
def test_a_bad_config_is_a_precise_error(text, message):
    with pytest.raises(ValueError, match="speculative_config") as error:
        SpeculativeConfig.from_json(text)
    assert message in str(error.value)


def test_a_bad_config_fails_the_engine_before_the_weights_load():
    with pytest.raises(ValueError, match="method 'medusa' is not supported"):
        Engine(EngineConfig(model="/nonexistent", device="cpu", speculative_config='{"method": "medusa"}'))


# -- proposing and accepting ------------------------------------------------------------------------

NGRAM = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1, prediction_tokens=4)


def _propose(drafter: Drafter, tokens: list[int], num_prompt: int, limit: int) -> list[int]:
    return drafter.propose(tokens, len(tokens), num_prompt, limit)


def test_lookup_takes_what_followed_the_most_recent_longest_match():
    drafter = Drafter(NGRAM)
    # the suffix [7, 8] occurred at 0 (followed by 1, 2, 3) and the suffix [8] last at 6 (followed by 9)
    assert _propose(drafter, [7, 8, 1, 2, 3, 4, 8, 9, 5, 7, 8], 2, limit=10) == [1, 2, 3]
    assert _propose(drafter, [7, 8, 1, 2, 3, 4, 8, 9, 5, 7, 8, 6, 8], 2, limit=10) == [6, 8]  # [6, 8] is too new
    assert _propose(Drafter(NGRAM), [4, 1, 2, 4, 3, 9, 4], 1, limit=10) == [3, 9, 4]  # n = 1: the latest 4 before
    assert _propose(Drafter(NGRAM), [1, 2, 3, 4, 5], 5, limit=10) == []  # nothing repeats
    assert _propose(Drafter(NGRAM), [1, 2, 3, 1, 2], 2, limit=2) == [3, 1]


def test_lookup_matches_whole_tokens_only():
    # token 2**24 is the bytes 00 00 00 01 and 0 is 00 00 00 00: token 1's bytes (01 00 00 00) occur across them
    assert _propose(Drafter(NGRAM), [2**24, 0, 0, 9, 1], 0, limit=3) == []
    assert _propose(Drafter(NGRAM), [2**24, 0, 1, 9, 5, 1], 0, limit=3) == [9, 5, 1]


def test_the_drafter_follows_the_tokens_as_they_grow():
    drafter = Drafter(NGRAM)
    tokens = [3, 4, 5, 6]
    assert _propose(drafter, tokens, 4, limit=3) == []
    tokens += [3, 4]
    assert _propose(drafter, tokens, 4, limit=3) == [5, 6, 3]


def test_a_prediction_is_drafted_from_its_start_then_from_where_the_output_meets_it():
    prediction = (10, 11, 12, 13, 14, 15, 16, 17, 18, 19)
    drafter = Drafter(replace(NGRAM, num_speculative_tokens=0), prediction)
    prompt = [1, 2, 3]
    assert _propose(drafter, prompt, 3, limit=8) == [10, 11, 12, 13]  # prediction_tokens per step
    assert _propose(drafter, prompt + [10, 11], 3, limit=8) == [12, 13, 14, 15]
    assert _propose(drafter, prompt + [10, 11, 12, 99], 3, limit=8) == []  # an edit the prediction lacks
    assert _propose(drafter, prompt + [10, 11, 12, 99, 14], 3, limit=2) == [15, 16]  # back on the prediction
    assert _propose(drafter, prompt + [10, 11, 12, 99, 14, 15, 16, 17, 18, 19], 3, limit=8) == []  # its end


def test_the_search_in_a_prediction_goes_forward_from_the_last_match():
    prediction = (5, 1, 5, 2, 5, 3)
    drafter = Drafter(replace(NGRAM, num_speculative_tokens=0, prompt_lookup_max=1), prediction)
    assert _propose(drafter, [9, 5], 1, limit=1) == [1]
    assert _propose(drafter, [9, 5, 1, 5], 1, limit=1) == [2]
    assert _propose(drafter, [9, 5, 1, 5, 2, 5], 1, limit=1) == [3]
    assert _propose(drafter, [9, 5, 1, 5, 2, 5, 3, 5], 1, limit=1) == [1]  # past the end: from the start again


def test_peeking_says_whether_a_proposal_would_come_and_changes_none():
    """`peek` (after each step read back) is True where `propose` finds drafts; the search through the prediction
    still goes forward from the last proposal, not from where a peek found a match."""
    prediction = (5, 1, 5, 2, 5, 3)
    drafter = Drafter(replace(NGRAM, num_speculative_tokens=0, prompt_lookup_max=1), prediction)
    assert drafter.hot  # not looked at yet
    assert _propose(drafter, [9, 5], 1, limit=1) == [1]
    assert drafter.peek([9, 5, 1, 5, 2, 5], 6, 1) and drafter.peek([9, 5, 1, 5], 4, 1)
    assert _propose(drafter, [9, 5, 1, 5], 1, limit=1) == [2]  # (a peek that moved the cursor would give 3)
    assert not drafter.peek([9, 5, 1, 5, 2, 5, 3, 7], 8, 1)  # 7 is nowhere in the prediction
    assert not drafter.peek([9, 5, 1, 5, 2, 5, 3, 7, 5], 8, 1)  # tokens past num_known are not looked at
    assert drafter.peek([9, 5, 1, 5, 2, 5, 3, 7, 5], 9, 1)
    lookup = Drafter(NGRAM)
    assert not lookup.peek([1, 2, 3, 4], 4, 2) and lookup.peek([1, 2, 3, 4, 2], 5, 2)
    assert _propose(lookup, [1, 2, 3, 4, 2], 2, limit=5) == [3, 4, 2]


def test_predictions_are_ignored_when_prediction_tokens_is_0():
    drafter = Drafter(SpeculativeConfig(prediction_tokens=0), (1, 2, 3))
    assert drafter.max_drafts == 0 and _propose(drafter, [7], 1, limit=5) == []


def test_a_step_keeps_its_draws_up_to_the_first_that_differs_from_its_draft():
    assert accepted([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]
    assert accepted([4, 5, 6], [4, 9, 6, 7]) == [4, 9]
    assert accepted([4, 5, 6], [8, 5, 6, 7]) == [8]
    assert accepted([], [3]) == [3]


# -- the scheduler ----------------------------------------------------------------------------------


def _scheduler(budget: int = 64, num_blocks: int = 64, max_model_len: int = 128, max_seqs: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, max_model_len), BlockPool(num_blocks, 4, caching=False),
                     ModulePool(2), {0}, SpeculativeConfig(prediction_tokens=6))


def _decoding(scheduler: Scheduler, *requests: Request) -> None:
    """Admit `requests`, prefill them whole in one step and read their first token (1)."""
    for request in requests:
        scheduler.add(request, 0)
    plan = scheduler.schedule()
    assert plan.samples == {r.request_id for r in requests}
    names = [r.request_id for r in requests]
    scheduler.update(plan, StepResult(names, [1] * len(names), [None] * len(names)))


def _request(name: str, max_tokens: int = 50, prediction=tuple(range(20, 40)), **sampling) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)
    return Request(name, [5, 6, 7], params, prediction=prediction)


def test_drafts_stay_inside_max_tokens_and_max_model_len():
    scheduler = _scheduler()
    scheduler.add(_request("a", max_tokens=4, prediction=(2, 1, 30, 31, 32, 33, 34)), 0)
    assert scheduler.schedule().drafts == {"a": [2, 1, 30]}  # with the prompt: no output yet, 4 at most
    scheduler = _scheduler()
    _decoding(scheduler, _request("a", max_tokens=4, prediction=(2, 1, 30, 31, 32, 33, 34)))
    assert scheduler.schedule().drafts == {"a": [30, 31]}  # 1 output, 4 at most: 2 drafts and the token after them
    scheduler = _scheduler(max_model_len=7)
    _decoding(scheduler, _request("a", prediction=(2, 1, 30, 31, 32, 33, 34)))
    assert scheduler.schedule().drafts == {"a": [30, 31]}  # 4 tokens known, 7 at most


def test_drafts_take_only_the_budget_left_after_real_work():
    scheduler = _scheduler(budget=6)
    _decoding(scheduler, *(_request(name, prediction=(2, 1, 30, 31, 32, 33, 34, 35)) for name in "ab"))
    scheduler.add(_request("c", prediction=()), 0)
    plan = scheduler.schedule()
    assert plan.num_scheduled_tokens == {"a": 2, "b": 1, "c": 3}  # c's prompt before a's drafts
    assert plan.drafts == {"a": [30]}
    scheduler = _scheduler(budget=9)
    _decoding(scheduler, *(_request(name, prediction=(2, 1, 30, 31, 32, 33, 34, 35, 36)) for name in "abc"))
    plan = scheduler.schedule()
    assert plan.num_scheduled_tokens == {"a": 3, "b": 3, "c": 3}  # the 6 left are shared equally
    scheduler = _scheduler(budget=9)
    _decoding(scheduler, _request("a", prediction=(2, 1, 30)),
              *(_request(name, prediction=(2, 1, 30, 31, 32, 33, 34, 35, 36)) for name in "bc"))
    plan = scheduler.schedule()
    assert plan.drafts == {"a": [30], "b": [30, 31, 32], "c": [30, 31]}  # what a does not use goes on


def test_a_step_samples_at_most_max_num_seqs_or_logit_rows_rows():
    """Each draft is a sampled row: [rows, vocab] logits. A step samples no more rows than a full batch or a chunk of
    prompt scoring (LOGIT_ROWS), whichever is more, however large the token budget."""
    scheduler = Scheduler(SchedulerConfig(8, 4096, 4096), BlockPool(1024, 4, caching=False), ModulePool(2), {0},
                          SpeculativeConfig(prediction_tokens=1000))
    prediction = (2, 1) + tuple(range(30, 1030))
    _decoding(scheduler, *(_request(name, max_tokens=2000, prediction=prediction) for name in "ab"))
    plan = scheduler.schedule()
    assert [len(plan.drafts[name]) for name in "ab"] == [(LOGIT_ROWS - 2) // 2] * 2


def test_drafts_take_only_free_blocks_and_never_preempt():
    scheduler = _scheduler(num_blocks=3)  # 12 slots: a and b take a block each for their prompts
    scheduler.add(_request("a", prediction=(2, 1) + tuple(range(30, 50))), 0)
    scheduler.add(_request("b", prediction=()), 0)
    plan = scheduler.schedule()
    assert plan.drafts == {"a": [2, 1, 30, 31, 32]}  # 3 + 5 tokens fill a's block and the one free
    assert [d.block_ids for d in plan.new] == [scheduler.states["a"].block_ids, scheduler.states["b"].block_ids]
    assert len(scheduler.states["a"].block_ids) == 2 and scheduler.blocks.num_free == 0
    scheduler.update(plan, StepResult(["a", "b"], [1, 1], [None, None]))  # a's drafts all rejected
    plan = scheduler.schedule()
    assert plan.drafts == {"a": [30, 31, 32, 33]}  # 4 known + 4 drafts fill a's 2 blocks; nothing is preempted
    assert scheduler.states["b"].status is Status.RUNNING and scheduler.num_preempted_last_step == 0


def test_update_keeps_the_accepted_drafts_and_counts_them_computed():
    scheduler = _scheduler()
    _decoding(scheduler, _request("a", prediction=(2, 1, 30, 31, 32)))  # the prompt's step drafted all 5
    plan = scheduler.schedule()
    state = scheduler.states["a"]
    assert plan.drafts == {"a": [30, 31, 32]} and state.num_computed_tokens == 4
    changed = scheduler.update(plan, StepResult(["a"], [40], [None], accepted={"a": ([30, 31], [None, None])}))
    assert changed == [state] and state.output_ids == [1, 30, 31, 40]
    assert state.num_computed_tokens == 6  # 1 and the two kept drafts; 40 runs next step
    assert (state.drafter.num_drafted, state.drafter.num_accepted, scheduler.take_accepted()) == (8, 2, 2)
    assert scheduler.take_accepted() == 0
    assert scheduler.schedule().num_scheduled_tokens["a"] == 1  # the prediction has nothing after 40


def test_a_stop_among_the_kept_tokens_ends_the_request_there():
    scheduler = _scheduler()
    _decoding(scheduler, _request("a", prediction=(2, 1, 30, 0, 32), ignore_eos=False))
    plan = scheduler.schedule()
    state = scheduler.states["a"]
    scheduler.update(plan, StepResult(["a"], [32], [None], accepted={"a": ([30, 0], [None, None])}))
    assert (state.status, state.finish_reason, state.output_ids) == (Status.FINISHED, "stop", [1, 30, 0])
    assert "a" not in scheduler.states and scheduler.num_drafting == 0 and not state.block_ids


# -- the engine: the same output in fewer steps -----------------------------------------------------

COMPOSITIONS = [Composition(), Composition(("m0",), (1.0,), "explicit"),
                Composition(("m1", "m2"), (0.6, 0.4), "explicit"), Composition(("m2",), (0.9,), "explicit")]
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [20, 21, 22, 23, 20, 21], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 30, 31],
           [40, 41, 40, 41, 40]]
NGRAM_JSON = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
                         "prompt_lookup_min": 1})
PLAIN = json.dumps({"prediction_tokens": 0, "grammar_tokens": 0})
"""No drafts at all: predictions and grammars' forced tokens are drafted by default."""


def _engine(setup, speculative: str | None = None, **overrides) -> tuple[Engine, list]:
    model_dir, library = setup
    values = dict(model=model_dir, library=library, device="cpu", block_size=4, max_num_batched_tokens=16,
                  num_kv_blocks=64, max_loaded_modules=3, max_model_len=40, speculative_config=speculative)
    steps = []
    return Engine(EngineConfig(**(values | overrides)), step_observer=steps.append), steps


def _requests(stop: tuple, predictions: dict[str, list[int]] | None = None) -> list[Request]:
    """Greedy and seeded rows, logprobs, a stop token, a stop string, a max_model_len cut, a row with every
    penalty, a one-token row, a row whose logit_bias forces EOS as soon as its min_tokens allow, a row with
    allowed_token_ids and one with bad words its free continuation would say, over mixed compositions."""
    params = [
        SamplingParams(max_tokens=14, temperature=0.0, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),  # ends at max_model_len
        SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=11, logprobs=0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.8, top_k=20, ignore_eos=True),  # the engine's seed
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop[0],), ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, stop=(stop[1],), ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.3,
                       repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=0.0, logit_bias=((stop[2], 100.0), (9, -5.0)), min_tokens=7),
        SamplingParams(max_tokens=10, temperature=0.7, seed=5, allowed_token_ids=tuple(range(40, 90)),
                       ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, bad_words=((stop[3][2], stop[3][3]), (stop[3][6],)),
                       ignore_eos=True),
    ]
    requests = []
    for i, sampling in enumerate(params):
        prediction = tuple((predictions or {}).get(f"r{i}", ()))
        row = 0 if i in (4, 5, 10) else i % 4  # the stops and bad words are met on PROMPTS[0] under COMPOSITIONS[0]
        requests.append(Request(f"r{i}", PROMPTS[row], sampling, COMPOSITIONS[row], prediction=prediction))
    return requests


def _flat(outputs) -> dict:
    """Per request: token ids, text, finish reason, output count, logprob token ids, logprob values."""
    flat = {}
    for request_id, outs in outputs.items():
        logprobs = [lp for o in outs for lp in o.logprobs or ()]
        flat[request_id] = ([t for o in outs for t in o.token_ids], "".join(o.text for o in outs),
                            outs[-1].finish_reason, outs[-1].stop_reason, outs[-1].num_output_tokens,
                            [(lp.token_id, [t for t, _ in lp.top]) for lp in logprobs],
                            [v for lp in logprobs for v in (lp.logprob, *(x for _, x in lp.top))])
    return flat


def _assert_same(got: dict, want: dict) -> None:
    """Equal tokens, text, finish and logprob ids; logprob values to 1e-4 (a multi-token pass rounds a row's
    logits differently from a one-token pass, ~1e-6 on the CPU)."""
    assert got.keys() == want.keys()
    for request_id in want:
        assert got[request_id][:-1] == want[request_id][:-1], request_id
        assert got[request_id][-1] == pytest.approx(want[request_id][-1], abs=1e-4), request_id


@pytest.fixture(scope="module")
def free(setup) -> list[int]:
    """The greedy continuation of PROMPTS[0] under COMPOSITIONS[0], 12 tokens, stopped by nothing."""
    engine, _ = _engine(setup, PLAIN)
    outs = engine.generate_batch([Request("free", PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.0,
                                                                             ignore_eos=True), COMPOSITIONS[0])])
    return [t for o in outs["free"] for t in o.token_ids]


@pytest.fixture(scope="module")
def stop(setup, free) -> tuple:
    """A stop token and a stop string that the free continuation meets midway, the EOS id, and the free
    continuation (whose tokens the bad words of `_requests` ban)."""
    engine, _ = _engine(setup, PLAIN)
    text = engine.tokenizer.decode(free)
    assert len(text) >= 6, f"the tiny model's greedy text is too short to cut: {text!r}"
    return free[4], text[len(text) // 2 : len(text) // 2 + 2], min(engine.scheduler.eos_ids), free


@pytest.fixture(scope="module")
def plain(setup, stop) -> tuple[dict, int]:
    """The requests without speculation, and the steps they took."""
    engine, steps = _engine(setup, PLAIN)
    outputs = _flat(engine.generate_batch(_requests(stop)))
    assert not any(s.num_draft_tokens for s in steps)
    assert (outputs["r8"][2], outputs["r8"][4]) == ("stop", 8)  # 7 tokens, then the EOS the bias forces
    assert outputs["r4"][3] == stop[0] and outputs["r5"][3] == stop[1]  # both stops are met
    assert outputs["r10"][0][:3] == stop[3][:3] and outputs["r10"][0][3] != stop[3][3]  # the two-token word bites
    assert len(outputs["r4"][0]) <= 5 and len(outputs["r5"][0]) < 12
    return outputs, len(steps)


def _edited(tokens: list[int]) -> list[int]:
    """A prediction with an edit in the middle: two tokens replaced, one inserted."""
    return tokens[:3] + [3, 4, 4] + tokens[5:]


@pytest.mark.parametrize("mode", ["exact", "edited", "ngram", "ngram+exact"])
@pytest.mark.parametrize("engine_options", [{}, {"async_scheduling": "on", "cuda_graphs": "padded"},
                                            {"num_kv_blocks": 14, "enable_prefix_caching": False}],
                         ids=["sync", "async-padded", "preempting"])
def test_speculation_gives_the_plain_output(setup, stop, free, plain, mode, engine_options):
    """The stopped rows are predicted their free continuation: their drafts run past the stop token and the stop
    string, and the output must end where plain decoding ends it."""
    want, plain_steps = plain
    tokens = {request_id: flat[0] for request_id, flat in want.items()} | {"r4": free, "r5": free}
    predictions = {"exact": tokens, "ngram+exact": tokens, "edited": {r: _edited(t) for r, t in tokens.items()},
                   "ngram": None}[mode]
    engine, steps = _engine(setup, NGRAM_JSON if mode.startswith("ngram") else None, **engine_options)
    outputs = engine.generate_batch(_requests(stop, predictions))
    _assert_same(_flat(outputs), want)
    kept = sum((o[-1].speculation or (0, 0))[1] for o in outputs.values())
    assert sum(s.num_accepted_tokens for s in steps) == kept
    if mode != "ngram":  # a random model's output rarely repeats its prompt: n-gram alone may accept nothing
        assert sum(s.num_accepted_tokens for s in steps) > 0
    if engine_options.get("async_scheduling") == "on":  # the next step waits for the one in flight only when a
        # request with a token in it is likely to draft: always with an exact prediction, not while lookup finds none
        waits = engine.num_token_waits
        if mode == "exact":
            assert waits >= len(steps) - 2, (waits, len(steps))
        elif mode == "ngram":
            assert 0 < waits < 0.6 * len(steps), (waits, len(steps))
    else:
        assert engine.num_token_waits == 0
    if mode in ("exact", "ngram+exact") and "num_kv_blocks" not in engine_options:
        assert len(steps) < plain_steps * 0.75, (len(steps), plain_steps)
        for request_id in ("r0", "r1", "r2", "r3", "r6", "r8", "r9", "r10"):  # an exact prediction: all kept
            drafted, kept = outputs[request_id][-1].speculation
            assert kept == drafted > 0, request_id


@pytest.mark.parametrize("mode", ["exact", "edited", "ngram"])
@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_verify_steps_replay_graphs_and_give_the_plain_output(setup, stop, free, plain, mode, async_scheduling):
    """Steps that run drafts take the verify graphs (graphs.py) where every sequence's rows fit: here 4 rows a
    sequence (3 drafts), buckets up to 16 sequences in the 64-token budget, padded and run eagerly on the CPU."""
    want, _ = plain
    tokens = {request_id: flat[0] for request_id, flat in want.items()} | {"r4": free, "r5": free}
    predictions = {"exact": tokens, "edited": {r: _edited(t) for r, t in tokens.items()}, "ngram": None}[mode]
    speculation = json.loads(NGRAM_JSON) if mode == "ngram" else {}
    engine, steps = _engine(setup, json.dumps(speculation | {"prediction_tokens": 3, "grammar_tokens": 0}),
                            cuda_graphs="padded", max_num_batched_tokens=64, async_scheduling=async_scheduling)
    graphs = engine.runner.graphs
    assert graphs.query_len == 4 and graphs.verify_buckets == (1, 2, 4, 8, 16)
    _assert_same(_flat(engine.generate_batch(_requests(stop, predictions))), want)
    verify_steps = sum(s.num_drafts > 0 and s.num_tokens == s.num_seqs + s.num_draft_tokens for s in steps)
    assert verify_steps > 0 and graphs.num_verify_replays == verify_steps  # each (decode + drafts) step: a graph


@pytest.mark.parametrize("include_stop", [False, True])
def test_a_stop_met_inside_kept_drafts_ends_the_output_where_plain_decoding_does(setup, stop, free, include_stop):
    """Predicted their free continuation, the stopped rows keep drafts past their stop token and stop string in one
    step: the output must still end at the stop, with plain decoding's tokens, text and stop reason."""
    requests = [r for r in _requests(stop) if r.request_id in ("r4", "r5")]
    requests = [replace(r, sampling=replace(r.sampling, include_stop_str_in_output=include_stop)) for r in requests]
    engine, _ = _engine(setup, PLAIN)
    want = _flat(engine.generate_batch([replace(r) for r in requests]))
    engine, _ = _engine(setup)
    outputs = engine.generate_batch([replace(r, prediction=tuple(free)) for r in requests])
    _assert_same(_flat(outputs), want)
    for request_id, outs in outputs.items():
        assert outs[-1].speculation[1] >= len(want[request_id][0]), request_id  # kept past the stop
    assert len(outputs["r5"]) < len(want["r5"][0])  # several tokens came in one increment


SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "size": {"type": "string", "pattern": "^[a-z]{1,6}$"}},
          "required": ["color", "size"], "additionalProperties": False}
GRAMMARS = {
    "schema": GrammarSpec("json_schema", json.dumps(SCHEMA)),
    "regex": GrammarSpec("regex", r"[a-z]{3,10}(, [a-z]{2,6}){1,3}"),
    "choice": GrammarSpec("choice", json.dumps(["yes", "no", "not sure"])),
}


@pytest.mark.parametrize("mode", ["forced", "exact", "edited", "ngram"])
def test_speculation_under_a_grammar_gives_the_plain_output(setup, free, mode):
    """Structured outputs: the tokens a grammar forces are drafted (`forced`: no other source), drafts are cut to
    what the grammar allows, each draft's row is masked as the grammar stands after the drafts before it, and only
    kept tokens advance it; one grammar begins only after a token the free continuation draws midway (a reasoning
    model's `grammar_after`), so drafts cross its start."""
    pytest.importorskip("xgrammar")
    engine, _ = _engine(setup, PLAIN, max_model_len=128)
    grammars = {name: engine.compile_grammar(spec) for name, spec in GRAMMARS.items()}

    def requests(predictions: dict | None) -> list[Request]:
        rows = [("schema", PROMPTS[2], SamplingParams(max_tokens=80, temperature=0.0), COMPOSITIONS[1], None),
                ("regex", PROMPTS[3], SamplingParams(max_tokens=30, temperature=0.8, seed=3), COMPOSITIONS[2], None),
                ("choice", PROMPTS[0], SamplingParams(max_tokens=20, temperature=0.0), COMPOSITIONS[0], free[4])]
        return [Request(name, prompt, sampling, composition, grammar=grammars[name], grammar_after=after,
                        prediction=tuple((predictions or {}).get(name, ())))
                for name, prompt, sampling, composition, after in rows]

    want = _flat(engine.generate_batch(requests(None)))
    assert [want[name][2] for name in GRAMMARS] == ["stop", "stop", "stop"]  # every grammar completed
    assert want["choice"][0][:5] == free[:5]  # free up to the grammar's start
    tokens = {name: flat[0] for name, flat in want.items()}
    predictions = {"exact": tokens, "edited": {r: _edited(t) for r, t in tokens.items()}, "ngram": None,
                   "forced": None}[mode]
    engine, steps = _engine(setup, NGRAM_JSON if mode == "ngram" else None, max_model_len=128)
    outputs = engine.generate_batch(requests(predictions))
    _assert_same(_flat(outputs), want)
    if mode == "exact":
        for name, outs in outputs.items():
            drafted, kept = outs[-1].speculation
            assert kept == drafted > 0, name
    if mode == "edited":
        assert sum(s.num_accepted_tokens for s in steps) > 0
    if mode == "forced":  # the schema's keys and punctuation, drafted by the grammar alone: kept where the model
        drafted, kept = outputs["schema"][-1].speculation  # tokenizes them as xgrammar does (20 of 21 here)
        assert kept >= 9 and kept >= drafted - 3


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_no_drafts_while_more_requests_run_than_disable_by_batch_size(setup, stop, plain, async_scheduling):
    want, _ = plain
    predictions = {request_id: flat[0] for request_id, flat in want.items()}
    config = json.dumps({"prediction_tokens": 8, "disable_by_batch_size": 3})
    engine, steps = _engine(setup, config, async_scheduling=async_scheduling)
    outputs = engine.generate_batch(_requests(stop, predictions))
    _assert_same(_flat(outputs), want)
    assert all(s.num_draft_tokens == 0 for s in steps if s.num_running > 3)
    assert any(s.num_draft_tokens for s in steps) and any(s.num_running > 3 for s in steps)


def test_a_row_left_nothing_to_draw_fails_the_request_where_plain_decoding_does(setup):
    """A grammar that is complete allows only EOS, which min_tokens holds back: the row after it has nothing to
    draw. Predicted past that point, the drafts before the row stand and the request fails at it, as without them."""
    pytest.importorskip("xgrammar")
    engine, _ = _engine(setup, PLAIN)
    sampling = SamplingParams(max_tokens=14, temperature=0.0, min_tokens=12)
    grammar = engine.compile_grammar(GRAMMARS["choice"])

    def run(engine: Engine, prediction: tuple[int, ...]) -> tuple[list[int], list]:
        outputs = engine.generate_batch([Request("r", PROMPTS[1], sampling, COMPOSITIONS[1], grammar=grammar,
                                                 prediction=prediction)])["r"]
        return [t for o in outputs if not isinstance(o, BaseException) for t in o.token_ids], outputs

    tokens, plain = run(engine, ())
    assert isinstance(plain[-1], NoDrawableTokenError) and plain[-1].position == len(tokens) > 0
    engine, steps = _engine(setup)
    got, outputs = run(engine, tuple(tokens) + (5, 6))
    assert got == tokens and isinstance(outputs[-1], NoDrawableTokenError)
    assert outputs[-1].position == plain[-1].position and sum(s.num_accepted_tokens for s in steps) > 0


def test_the_kv_of_kept_drafts_serves_later_requests_from_the_prefix_cache(setup, plain, stop):
    """Blocks filled by kept drafts are registered like any other: a request repeating prompt + output reuses
    them and continues as the plain engine does."""
    want, _ = plain
    tokens = want["r1"][0]
    engine, _ = _engine(setup, PLAIN, max_model_len=64)
    follow = Request("follow", PROMPTS[1] + tokens, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                     COMPOSITIONS[1])
    expected = _flat(engine.generate_batch([follow]))["follow"]
    engine, _ = _engine(setup, max_model_len=64)
    first = Request("r1", PROMPTS[1], SamplingParams(max_tokens=len(tokens), temperature=0.0, ignore_eos=True),
                    COMPOSITIONS[1], prediction=tuple(tokens))
    assert _flat(engine.generate_batch([first]))["r1"][0] == tokens
    outs = engine.generate_batch([replace(follow)])["follow"]
    assert outs[-1].num_cached_tokens >= 4 * ((len(PROMPTS[1]) + len(tokens) - 1) // 4) - 4
    assert _flat({"follow": outs})["follow"][:-1] == expected[:-1]


@pytest.mark.gpu
@pytest.mark.parametrize("verify", ["graphs", "eager"])
def test_speculation_gives_the_plain_output_on_cuda(setup, stop, free, verify):
    """On CUDA: plain decode steps replay graphs and overlap the next step's planning; steps that verify drafts
    replay captured verify graphs (4 rows a sequence in a 64-token budget), or run eagerly where no verify graph
    fits (17 rows a sequence in a 16-token budget), on the Triton kernels (split-context attention over cached
    blocks, composed_lora on every draft)."""
    options = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=64)
    engine, _ = _engine(setup, PLAIN, **options)
    want = _flat(engine.generate_batch(_requests(stop)))
    tokens = {request_id: flat[0] for request_id, flat in want.items()} | {"r4": free, "r5": free}
    if verify == "graphs":
        speculation = json.dumps(json.loads(NGRAM_JSON) | {"prediction_tokens": 3, "grammar_tokens": 0})
        engine, steps = _engine(setup, speculation, max_num_batched_tokens=64, **options)
    else:
        engine, steps = _engine(setup, NGRAM_JSON, **options)
    _assert_same(_flat(engine.generate_batch(_requests(stop, tokens))), want)
    assert sum(s.num_accepted_tokens for s in steps) > 0
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.capture and graphs.num_replays > 0
    assert (graphs.num_verify_replays > 0) == (verify == "graphs")

"""Automatic prefix caching: KV blocks reused across requests of one composition, never across two."""

from __future__ import annotations

import pytest

from router.composition import Composition
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.kv_pool import BlockPool, block_hashes, composition_root
from server.engine.module_pool import ModulePool
from server.engine.plan import StepResult
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig

ROOT = composition_root((), (), ())


# -- the block pool ---------------------------------------------------------------------------------


def test_hashes_name_the_whole_prefix_under_its_composition():
    tokens = list(range(12))
    hashes = block_hashes(ROOT, tokens, 0, 3, 4)
    assert len(set(hashes)) == 3
    assert block_hashes(ROOT, tokens, 1, 3, 4, parent=hashes[0]) == hashes[1:]
    assert block_hashes(ROOT, [0, 1, 2, 3, 4, 5, 6, 7, 99], 0, 2, 4) == hashes[:2]  # only full blocks count
    changed = block_hashes(ROOT, [1] + tokens[1:], 0, 3, 4)
    assert all(a != b for a, b in zip(changed, hashes))  # an early token changes every later block
    other = composition_root(("m0",), (1.0,), (0,))
    assert block_hashes(other, tokens, 0, 3, 4)[0] != hashes[0]
    assert composition_root(("m0",), (1.0,), (1,)) != other  # a replaced module is another module
    assert composition_root(("m0",), (0.9999999999,), (0,)) != other
    with pytest.raises(ValueError, match="previous block"):
        block_hashes(ROOT, tokens, 1, 3, 4)


def test_pool_shares_blocks_by_reference_and_evicts_cached_ones_last():
    pool = BlockPool(4, 4)
    a = pool.allocate(2)
    pool.register(a[0], b"h0")
    pool.register(a[1], b"h1")
    assert pool.lookup([b"h0", b"h1", b"h2"]) == a and pool.lookup([b"h1"]) == [a[1]]
    assert pool.lookup([b"x", b"h0"]) == []  # a prefix, not any match
    pool.take(a)  # a second request shares them
    pool.free(a)
    assert pool.num_free == 2 and pool.num_free_among(a) == 0
    pool.free(a)
    assert pool.num_free == 4 and pool.num_cached == 2 and pool.num_free_among(a) == 2
    fresh = pool.allocate(2)
    assert not set(fresh) & set(a) and pool.num_cached == 2  # uncached blocks go first
    assert pool.allocate(1) == [a[1]] and pool.lookup([b"h0", b"h1"]) == [a[0]]  # then the tail of a prefix
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([a[0]])
    with pytest.raises(RuntimeError, match="4 KV blocks, 1 free"):
        pool.allocate(4)


def test_a_hash_keeps_its_first_block_and_reset_forgets_every_prefix():
    pool = BlockPool(3, 2)
    first, second = pool.allocate(2)
    pool.register(first, b"same")
    pool.register(second, b"same")  # computed twice in one step: the second copy stays uncached
    assert pool.lookup([b"same"]) == [first] and pool.num_cached == 1
    with pytest.raises(RuntimeError, match="not cached"):
        pool.take([second])
    assert pool.reset_cache() == 1 and pool.lookup([b"same"]) == [] and pool.num_used == 2
    off = BlockPool(2, 2, caching=False)
    block = off.allocate(1)[0]
    off.register(block, b"h")
    assert off.lookup([b"h"]) == [] and off.num_cached == 0


# -- the scheduler ----------------------------------------------------------------------------------


def _scheduler(num_blocks: int = 16, caching: bool = True, max_seqs: int = 4, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, 128), BlockPool(num_blocks, 4, caching), ModulePool(2), {0})


def _request(request_id: str, prompt: list[int], composition: Composition = Composition(), max_tokens: int = 4):
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), composition)


def _run(scheduler: Scheduler, token: int = 50):
    plan = scheduler.schedule()
    ids = [r for r in plan.num_scheduled_tokens if r in plan.samples]
    scheduler.update(plan, StepResult(ids, [token] * len(ids), [None] * len(ids)))
    return plan


PROMPT = list(range(1, 11))  # 10 tokens: two full blocks of 4 and a partial one


def test_a_later_request_starts_from_the_full_blocks_an_earlier_one_computed():
    scheduler = _scheduler()
    a = scheduler.add(_request("a", PROMPT), 1)
    _run(scheduler)
    scheduler.add(_request("b", PROMPT[:8] + [77, 78, 79]), 2)
    plan = _run(scheduler)
    (new,) = plan.new
    assert new.num_computed_tokens == 8 and new.block_ids[:2] == a.block_ids[:2]
    assert new.block_ids[2] not in a.block_ids and plan.num_scheduled_tokens == {"a": 1, "b": 3}
    assert scheduler.prefix_queries_last_step == 11 and scheduler.prefix_hits_last_step == 8
    assert scheduler.states["b"].num_cached_tokens == 8 and a.num_cached_tokens == 0


def test_the_last_prompt_token_is_always_computed():
    scheduler = _scheduler()
    scheduler.add(_request("a", PROMPT[:8]), 1)
    _run(scheduler)
    scheduler.add(_request("b", PROMPT[:8]), 2)
    plan = _run(scheduler)
    assert plan.new[0].num_computed_tokens == 4 and plan.num_scheduled_tokens["b"] == 4


def test_a_request_shares_the_blocks_an_earlier_one_fills_in_the_same_step():
    scheduler = _scheduler()
    scheduler.add(_request("a", PROMPT), 1)
    scheduler.add(_request("b", PROMPT), 2)
    plan = _run(scheduler)
    assert [d.num_computed_tokens for d in plan.new] == [0, 8]  # b computes only its last, partial block
    assert plan.new[1].block_ids[:2] == plan.new[0].block_ids[:2] and plan.num_scheduled_tokens == {"a": 10, "b": 2}
    assert plan.new[1].block_ids[2] != plan.new[0].block_ids[2]
    chunked = _scheduler(budget=6)  # a's prefill in two chunks; b arrives with its second
    chunked.add(_request("a", PROMPT), 1)
    assert _run(chunked).num_scheduled_tokens == {"a": 6}
    chunked.add(_request("b", PROMPT), 2)
    plan = chunked.schedule()  # a fills its second block in this step, and b starts after it
    assert plan.num_scheduled_tokens == {"a": 4, "b": 2} and plan.new[0].num_computed_tokens == 8


def test_a_failed_step_forgets_the_blocks_it_was_to_fill():
    scheduler = _scheduler()
    scheduler.add(_request("a", PROMPT), 1)
    scheduler.schedule()
    assert scheduler.blocks.num_cached == 2
    scheduler.cancel_in_flight()  # the engine's reaction to a step that raised
    scheduler.finish("a", "error")
    scheduler.add(_request("b", PROMPT), 2)
    assert scheduler.schedule().new[0].num_computed_tokens == 0


@pytest.mark.parametrize("other", [
    Composition(),
    Composition(("m0",), (0.5,), "explicit"),
    Composition(("m1",), (1.0,), "explicit"),
    Composition(("m0", "m1"), (1.0, 0.0), "explicit"),
])
def test_no_block_is_shared_across_compositions(other):
    scheduler = _scheduler()
    scheduler.add(_request("a", PROMPT, Composition(("m0",), (1.0,), "explicit")), 1)
    _run(scheduler)
    scheduler.add(_request("b", PROMPT, other), 2)
    assert _run(scheduler).new[0].num_computed_tokens == 0


def test_a_module_forgotten_and_loaded_again_misses_the_cache():
    scheduler = _scheduler()
    composition = Composition(("m0",), (1.0,), "explicit")
    scheduler.add(_request("a", PROMPT, composition, max_tokens=1), 1)
    _run(scheduler)
    assert not scheduler.has_work()
    scheduler.add(_request("b", PROMPT, composition, max_tokens=1), 2)
    assert _run(scheduler).new[0].num_computed_tokens == 8
    scheduler.modules.forget("m0")  # its weights changed (a replaced runtime module)
    scheduler.add(_request("c", PROMPT, composition), 3)
    assert _run(scheduler).new[0].num_computed_tokens == 0


def test_finished_requests_leave_their_prompt_and_output_blocks_cached():
    scheduler = _scheduler()
    a = scheduler.add(_request("a", PROMPT[:6], max_tokens=4), 1)
    for token in (41, 42, 43, 44):
        _run(scheduler, token)
    assert a.finish_reason == "length" and a.output_ids == [41, 42, 43, 44] and scheduler.blocks.num_used == 0
    # KV exists for the prompt and the first 3 outputs (the last sampled token was never fed): 9 tokens
    history = PROMPT[:6] + [41, 42, 43, 44]
    scheduler.add(_request("b", history + [7, 8, 9]), 2)
    assert _run(scheduler).new[0].num_computed_tokens == 8  # both full blocks, the second one filled by decodes
    assert scheduler.blocks.num_cached == 3  # and b registered its own third block


def test_a_preempted_request_is_readmitted_from_its_own_cached_blocks():
    scheduler = _scheduler(num_blocks=3, max_seqs=2)
    scheduler.add(_request("a", PROMPT[:4] + [9, 9, 9, 9], max_tokens=8), 1)
    scheduler.add(_request("b", PROMPT[:4], max_tokens=8), 2)
    _run(scheduler)  # a holds 2 blocks, b 1; all three are used
    _run(scheduler)  # a grows into a third block: b is preempted, its block stays cached
    b = scheduler.states["b"]
    assert b.status.value == "waiting" and scheduler.num_preempted_last_step == 1
    scheduler.finish("a", "abort")
    plan = _run(scheduler)
    assert plan.new[0].request_id == "b" and plan.new[0].num_computed_tokens == 4
    assert plan.num_scheduled_tokens["b"] == len(b.token_ids) - 4 - 1


def test_caching_off_never_reuses_a_block():
    scheduler = _scheduler(caching=False)
    scheduler.add(_request("a", PROMPT), 1)
    _run(scheduler)
    scheduler.add(_request("b", PROMPT), 2)
    assert _run(scheduler).new[0].num_computed_tokens == 0
    assert scheduler.prefix_queries_last_step == 0 and scheduler.blocks.num_cached == 0


# -- the engine, against itself with caching off -----------------------------------------------------

SYSTEM = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]  # a shared "system prompt" of 11 tokens


def _engine(setup, caching: bool, async_scheduling: str) -> Engine:
    model_dir, library = setup
    return Engine(EngineConfig(model=model_dir, library=library, device="cpu", dtype="float32", block_size=4,
                               max_num_batched_tokens=16, num_kv_blocks=40, max_loaded_modules=3,
                               enable_prefix_caching=caching, async_scheduling=async_scheduling))


def _rounds() -> list[list[Request]]:
    m0 = Composition(("m0",), (1.0,), "explicit")
    mix = Composition(("m1", "m2"), (0.6, 0.4), "explicit")
    greedy = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, logprobs=2)
    sampled = SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True, logprobs=2)
    first = [Request("a", SYSTEM + [5, 6, 7], greedy, m0), Request("h", SYSTEM + [11], sampled, m0),
             Request("b", SYSTEM + [8], sampled, mix), Request("c", SYSTEM + [9, 10], greedy)]
    second = [Request("d", SYSTEM + [20, 21, 22, 23, 24], greedy, m0), Request("e", SYSTEM + [8], sampled, mix),
              Request("f", SYSTEM + [9, 10], greedy, m0), Request("g", SYSTEM[:6], sampled)]
    return [first, second]


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_cached_prefixes_change_no_token_and_no_logprob(setup, async_scheduling):
    results = {}
    for caching in (False, True):
        engine = _engine(setup, caching, async_scheduling)
        outputs = {}
        for requests in _rounds():
            outputs |= engine.generate_batch(requests)
        results[caching] = outputs
        assert engine.scheduler.blocks.num_used == 0
    for request_id, outs in results[True].items():
        plain = results[False][request_id]
        assert [t for o in outs for t in o.token_ids] == [t for o in plain for t in o.token_ids], request_id
        ours = [lp for o in outs for lp in o.logprobs]
        theirs = [lp for o in plain for lp in o.logprobs]
        assert [lp.token_id for lp in ours] == [lp.token_id for lp in theirs]
        assert [lp.logprob for lp in ours] == pytest.approx([lp.logprob for lp in theirs], abs=1e-4)
        assert plain[-1].num_cached_tokens == 0
    cached = {request_id: outs[-1].num_cached_tokens for request_id, outs in results[True].items()}
    # h shares SYSTEM (two full blocks) with a under m0, admitted in the step where a computes them; d and f
    # share them later; e repeats b whole: two blocks, never the last token; g's 6 tokens hold one full
    # block, which c computed without modules. f shares nothing with c (another composition).
    assert cached == {"a": 0, "h": 8, "b": 0, "c": 0, "d": 8, "e": 8, "f": 8, "g": 4}


def test_a_multi_turn_chat_reuses_its_history(setup):
    engine = _engine(setup, True, "off")
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    turn = SYSTEM + [5, 6]
    first = engine.generate_batch([Request("t1", turn, greedy)])["t1"]
    answer = [t for o in first for t in o.token_ids]
    follow_up = turn + answer + [7, 8, 9]
    second = engine.generate_batch([Request("t2", follow_up, greedy)])["t2"]
    assert second[-1].num_cached_tokens == (len(turn) + len(answer) - 1) // 4 * 4 == 16
    fresh = _engine(setup, False, "off").generate_batch([Request("t2", follow_up, greedy)])["t2"]
    assert [t for o in second for t in o.token_ids] == [t for o in fresh for t in o.token_ids]

"""Scheduler, block pool and module pool: budgets, chunked prefill, preemption, abort, residency."""

from __future__ import annotations

from router.composition import Composition
from server.engine.kv_pool import BlockPool
from server.engine.module_pool import ModulePool
from server.engine.plan import StepResult
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig, Status


def _scheduler(num_blocks=16, block_size=4, max_seqs=4, budget=8, slots=2):
    return Scheduler(SchedulerConfig(max_seqs, budget, 128), BlockPool(num_blocks, block_size, caching=False), ModulePool(slots), {0})


def _request(rid, n, max_tokens=4, modules=()):
    composition = Composition(tuple(modules), (1.0,) * len(modules), "explicit")
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, temperature=0.0), composition)


def _step(scheduler, token=7):
    plan = scheduler.schedule()
    samplers = [r for r in plan.num_scheduled_tokens if r in plan.samples]
    scheduler.update(plan, StepResult(samplers, [token] * len(samplers), [None] * len(samplers)))
    return plan


def test_long_prompt_is_prefilled_in_chunks_under_the_budget():
    scheduler = _scheduler(budget=8)
    scheduler.add(_request("a", 20), seed=0)
    plans = [_step(scheduler) for _ in range(3)]
    assert [p.num_scheduled_tokens["a"] for p in plans] == [8, 8, 4]
    assert [("a" in p.samples) for p in plans] == [False, False, True]
    assert len(plans[0].new) == 1 and [len(p.running) for p in plans[1:]] == [1, 1]
    assert scheduler.states["a"].num_computed_tokens == 20 and scheduler.states["a"].token_ids[-1] == 7


def test_admission_stops_at_max_seqs_and_budget():
    scheduler = _scheduler(max_seqs=2, budget=100)
    for rid in "abc":
        scheduler.add(_request(rid, 3), seed=0)
    plan = _step(scheduler)
    assert set(plan.num_scheduled_tokens) == {"a", "b"} and len(scheduler.waiting) == 1
    scheduler = _scheduler(max_seqs=8, budget=5)
    for rid in "ab":
        scheduler.add(_request(rid, 3), seed=0)
    assert _step(scheduler).num_scheduled_tokens == {"a": 3, "b": 2}


def test_admission_waits_for_free_blocks():
    scheduler = _scheduler(num_blocks=2, block_size=4, budget=100)
    scheduler.add(_request("a", 8, max_tokens=1), seed=0)
    scheduler.add(_request("b", 4), seed=0)
    plan = _step(scheduler)
    assert list(plan.num_scheduled_tokens) == ["a"]  # b waited: a held both blocks
    assert scheduler.states.get("a") is None  # finished after one token, blocks back
    assert scheduler.blocks.num_free == 2 and list(_step(scheduler).num_scheduled_tokens) == ["b"]


def test_preemption_by_recompute_when_blocks_run_out():
    scheduler = _scheduler(num_blocks=4, block_size=2, budget=100)
    # 3 + 5 tokens fill the whole pool: each request fits alone, as the engine's max_model_len ensures.
    scheduler.add(_request("a", 3, max_tokens=5), seed=0)
    scheduler.add(_request("b", 3, max_tokens=5), seed=0)
    _step(scheduler)  # both prefilled (3 tokens): 2 blocks each, pool empty
    _step(scheduler)  # both decode their 4th token, still within 2 blocks
    assert scheduler.blocks.num_free == 0
    plan = _step(scheduler)  # each needs a 3rd block for its 5th token: b (admitted last) is preempted
    assert scheduler.num_preempted_last_step == 1
    b = scheduler.states["b"]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert list(plan.num_scheduled_tokens) == ["a"] and b.token_ids == [1, 2, 3, 7, 7]
    while scheduler.states.get("a"):
        _step(scheduler)
    plan = _step(scheduler)
    assert plan.new and plan.new[0].request_id == "b" and plan.new[0].token_ids == [1, 2, 3, 7, 7]
    assert plan.num_scheduled_tokens["b"] == 5


def test_abort_frees_blocks_at_once_and_tells_the_runner():
    scheduler = _scheduler()
    scheduler.add(_request("a", 6, max_tokens=50, modules=("m0",)), seed=0)
    _step(scheduler)
    assert scheduler.blocks.num_used == 2 and scheduler.modules.num_pinned == 1
    scheduler.finish("a", "abort")
    assert scheduler.blocks.num_used == 0 and scheduler.modules.num_pinned == 0 and not scheduler.has_work()
    assert scheduler.schedule().dropped == ["a"]


def test_stop_conditions():
    scheduler = _scheduler()
    scheduler.add(_request("eos", 2, max_tokens=10), seed=0)
    plan = scheduler.schedule()
    scheduler.update(plan, StepResult(["eos"], [0], [None]))
    assert "eos" not in scheduler.states
    scheduler.add(_request("len", 2, max_tokens=2), seed=0)
    _step(scheduler)
    assert "len" in scheduler.states
    _step(scheduler)
    assert "len" not in scheduler.states


def test_module_pool_pins_evicts_lru_and_makes_requests_wait():
    pool = ModulePool(2)
    slots_a, loads_a = pool.acquire(("m0", "m1"))
    assert sorted(slots_a) == [0, 1] and len(loads_a) == 2
    assert pool.acquire(("m2",)) is None  # every slot pinned: wait
    pool.release(("m0", "m1"))
    slots, loads = pool.acquire(("m1",))
    assert loads == [] and slots == (pool.slot_of("m1"),)  # still resident, no reload
    slots, loads = pool.acquire(("m2",))
    assert loads == [(slots[0], "m2")] and pool.slot_of("m0") is None  # m0 was least recently used


def test_module_pool_never_evicts_a_module_of_the_request_it_makes_room_for():
    pool = ModulePool(2)
    pool.acquire(("m0",))
    pool.acquire(("m1",))
    pool.release(("m0",))
    pool.release(("m1",))  # both idle, m0 the least recently used
    slots, loads = pool.acquire(("m2", "m0"))  # m0 is resident: only m1 may make room for m2
    assert loads == [(slots[0], "m2")] and pool.slot_of("m0") == slots[1] and pool.slot_of("m1") is None
    assert sorted(slots) == [0, 1]


def test_request_waits_for_module_slots():
    scheduler = _scheduler(slots=1)
    scheduler.add(_request("a", 2, max_tokens=3, modules=("m0",)), seed=0)
    scheduler.add(_request("b", 2, max_tokens=3, modules=("m1",)), seed=0)
    plan = _step(scheduler)
    assert list(plan.num_scheduled_tokens) == ["a"] and plan.module_loads == [(0, "m0")]
    while "a" in scheduler.states:
        _step(scheduler)
    plan = _step(scheduler)
    assert list(plan.num_scheduled_tokens) == ["b"] and plan.module_loads == [(0, "m1")]


def test_the_modules_of_running_and_waiting_requests_are_known_at_every_step():
    scheduler = _scheduler(num_blocks=4, block_size=2, budget=100, max_seqs=2, slots=3)
    scheduler.add(_request("a", 3, max_tokens=5, modules=("m0",)), seed=0)
    scheduler.add(_request("b", 3, max_tokens=5, modules=("m1", "m0")), seed=0)
    scheduler.add(_request("c", 1, max_tokens=1, modules=("m2",)), seed=0)  # over max_seqs: waits
    assert sorted(scheduler.waiting_module_ids()) == ["m0", "m1", "m2"] and scheduler.modules.pinned == ()
    _step(scheduler)
    assert sorted(scheduler.modules.pinned) == ["m0", "m1"] and scheduler.waiting_module_ids() == ("m2",)
    _step(scheduler)
    _step(scheduler)  # b is preempted for blocks: its modules wait again
    assert scheduler.states["b"].status is Status.WAITING
    assert sorted(scheduler.waiting_module_ids()) == ["m0", "m1", "m2"] and scheduler.modules.pinned == ("m0",)
    scheduler.finish("c", "abort")  # a waiting request that leaves takes its module with it
    assert sorted(scheduler.waiting_module_ids()) == ["m0", "m1"]
    while scheduler.has_work():
        _step(scheduler)
    assert scheduler.waiting_module_ids() == () and scheduler.modules.pinned == ()


def _prioritized(rid, n, priority, max_tokens=4):
    request = _request(rid, n, max_tokens)
    return Request(request.request_id, request.prompt_token_ids, request.sampling, request.composition,
                   priority=priority)


def test_the_priority_policy_admits_by_priority_then_arrival():
    order = {}
    for policy in ("fcfs", "priority"):
        scheduler = Scheduler(SchedulerConfig(1, 8, 128, policy), BlockPool(16, 4, caching=False), ModulePool(2), {0})
        for rid, priority in (("late", 5), ("first", 0), ("second", 0)):
            scheduler.add(_prioritized(rid, 3, priority, max_tokens=1), seed=0)
        admitted = []
        while scheduler.has_work():
            admitted += [d.request_id for d in _step(scheduler).new]
        order[policy] = admitted
    assert order == {"fcfs": ["late", "first", "second"], "priority": ["first", "second", "late"]}


def test_the_priority_policy_preempts_the_lowest_ranked_request_not_the_last_admitted():
    waiting = {}
    for policy in ("fcfs", "priority"):
        scheduler = Scheduler(SchedulerConfig(2, 100, 128, policy), BlockPool(4, 2, caching=False), ModulePool(2), {0})
        scheduler.add(_prioritized("low", 3, 1, max_tokens=5), seed=0)
        _step(scheduler)  # low runs alone first
        scheduler.add(_prioritized("high", 3, 0, max_tokens=5), seed=0)
        _step(scheduler)  # high prefilled, low decodes: the pool is full
        _step(scheduler)  # someone needs a third block
        waiting[policy] = [rid for rid, state in scheduler.states.items() if state.status is Status.WAITING]
        while scheduler.has_work():
            _step(scheduler)
        assert not scheduler.states and scheduler.blocks.num_used == 0
    assert waiting == {"fcfs": ["high"], "priority": ["low"]}


def test_an_unknown_policy_or_a_negative_wait_is_refused():
    import pytest

    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, priority"):
        SchedulerConfig(1, 8, 128, "lifo")
    with pytest.raises(ValueError, match="module_wait_steps must be >= 0"):
        SchedulerConfig(1, 8, 128, "fcfs", -1)


def test_requests_whose_modules_are_resident_pass_one_waiting_for_slots_but_it_cannot_starve():
    scheduler = _scheduler(slots=1, budget=64, num_blocks=64)
    wait_steps = scheduler.config.module_wait_steps
    scheduler.add(_request("a", 2, max_tokens=200, modules=("m0",)), seed=0)
    scheduler.add(_request("b", 2, max_tokens=3, modules=("m1",)), seed=0)  # no slot while a runs
    scheduler.add(_request("c", 2, max_tokens=3, modules=("m0",)), seed=0)
    plan = _step(scheduler)
    assert sorted(plan.num_scheduled_tokens) == ["a", "c"]  # c went past b: its module is resident
    assert scheduler.states["b"].status is Status.WAITING and scheduler.states["b"].module_waits == 1
    arrivals, steps = 0, 1
    while steps <= wait_steps:  # a stream of m0 requests keeps m0 pinned ...
        scheduler.add(_request(f"m0-{arrivals}", 2, max_tokens=3, modules=("m0",)), seed=0)
        arrivals += 1
        _step(scheduler)
        steps += 1
    assert scheduler.states["b"].module_waits == wait_steps + 1
    late = _request("late", 2, max_tokens=3, modules=("m0",))
    scheduler.add(late, seed=0)
    plan = _step(scheduler)  # ... until b has been passed over long enough: now it holds the line
    assert "late" not in plan.num_scheduled_tokens and scheduler.states["late"].status is Status.WAITING
    scheduler.finish("a", "abort")
    while "b" in scheduler.states and scheduler.states["b"].status is Status.WAITING:
        plan = _step(scheduler)
    assert scheduler.states["late"].status is Status.WAITING  # b goes first once the m0 requests drain
    while scheduler.has_work():
        _step(scheduler)

"""Asynchronous scheduling: step N+1 planned and launched before step N's tokens are read gives exactly
the outputs of the synchronous loop, and its placeholder bookkeeping frees and drops what it must."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from router.composition import Composition
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.kv_pool import BlockPool
from server.engine.module_pool import ModulePool
from server.engine.plan import PLACEHOLDER, StepResult
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig, Status

COMPOSITIONS = [
    Composition(("m0",), (1.0,), "explicit"),
    Composition(("m1", "m2"), (0.6, 0.4), "explicit"),
    Composition(),
    Composition(("m2", "m0", "m1"), (0.2, 0.5, 0.3), "explicit"),
    Composition(("m1",), (0.9,), "explicit"),
    Composition(("m0", "m2"), (0.5, 0.5), "explicit"),
]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34], [40, 41, 42, 43, 44, 45, 46],
           [50, 51], [60, 61, 62, 63]]
MAX_MODEL_LEN = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def _engine(setup, mode: str, **overrides) -> Engine:
    model_dir, library = setup
    values = dict(model=model_dir, library=library, device="cpu", block_size=4, max_num_batched_tokens=16,
                  num_kv_blocks=64, max_loaded_modules=3, max_model_len=MAX_MODEL_LEN, async_scheduling=mode)
    return Engine(EngineConfig(**(values | overrides)))


def _tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def _assert_same_outputs(got: dict[str, list], want: dict[str, list]) -> None:
    """Every increment equal: ids, text, finish, token counts, logprob token ids; logprob values to 1e-4.

    NOTE: the overlapped loop batches differently (a request that ends on step N's token still has a row in
    N+1, which also takes a token of the budget from a prefill chunk), and the CPU kernels round a row's
    logits differently in other batch shapes: logprobs then differ by ~1e-6, never the tokens.
    """
    assert got.keys() == want.keys()
    for request_id, outputs in want.items():
        plain = [(o.token_ids, o.text, o.finished, o.finish_reason, o.num_prompt_tokens, o.num_output_tokens)
                 for o in outputs]
        assert [(o.token_ids, o.text, o.finished, o.finish_reason, o.num_prompt_tokens, o.num_output_tokens)
                for o in got[request_id]] == plain, request_id
        assert [o.logprobs is None for o in got[request_id]] == [o.logprobs is None for o in outputs]
        mine = [lp for o in got[request_id] for lp in o.logprobs or ()]
        theirs = [lp for o in outputs for lp in o.logprobs or ()]
        assert [(lp.token_id, [t for t, _ in lp.top]) for lp in mine] == \
               [(lp.token_id, [t for t, _ in lp.top]) for lp in theirs]
        values = [v for lp in mine for v in (lp.logprob, *(x for _, x in lp.top))]
        assert values == pytest.approx([v for lp in theirs for v in (lp.logprob, *(x for _, x in lp.top))], abs=1e-4)


def _mixed_requests(stop_id: int, stop_text: str) -> list[Request]:
    """Greedy and seeded rows (two seeds on one prompt, as the API sends n=2), logprobs, a stop token, a
    stop string, short max_tokens and one run into max_model_len, over mixed module compositions."""
    params = [
        SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),  # ends at max_model_len
        SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11, logprobs=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=12, logprobs=0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_id,), ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.0, stop=(stop_text,), ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=1.2, top_k=5, seed=3),
    ]
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[2], PROMPTS[2], PROMPTS[0], PROMPTS[0], PROMPTS[4]]
    compositions = [COMPOSITIONS[i % len(COMPOSITIONS)] for i in (0, 1, 3, 3, 0, 0, 2)]
    return [Request(f"r{i}", p, s, c) for i, (p, s, c) in enumerate(zip(prompts, params, compositions))]


@pytest.fixture(scope="module")
def stops(setup) -> tuple[int, str]:
    """A stop token id and a stop string that PROMPTS[0]'s greedy continuation hits midway."""
    free = _engine(setup, "off").generate_batch([Request("free", PROMPTS[0], SamplingParams(
        max_tokens=10, temperature=0.0, ignore_eos=True), COMPOSITIONS[0])])["free"]
    ids, text = _tokens(free), "".join(o.text for o in free)
    assert len(text) >= 6, f"the tiny model's greedy text is too short to cut: {text!r}"
    return ids[3], text[len(text) // 2 : len(text) // 2 + 2]


@pytest.fixture(scope="module")
def sync_outputs(setup, stops) -> dict[str, list]:
    """The mixed requests run by the synchronous loop (eager decode steps)."""
    return _engine(setup, "off").generate_batch(_mixed_requests(*stops))


async def _collect(engine: Engine, request: Request, stop_after_tokens: int | None = None) -> list:
    """The request's increments; with `stop_after_tokens`, the reader leaves once they hold that many tokens (one
    increment may hold several: those that gathered while the reader was behind)."""
    outputs = []
    async for output in engine.generate(request):
        outputs.append(output)
        if stop_after_tokens is not None and len(_tokens(outputs)) >= stop_after_tokens:
            break
    return outputs


async def _running(engine: Engine, num_running: int) -> None:
    deadline = time.monotonic() + 30
    while engine.stats().num_running < num_running:
        assert time.monotonic() < deadline, f"{num_running} requests never ran together"
        await asyncio.sleep(0.005)


def _assert_idle(engine: Engine) -> None:
    """Within 5 s: no step pending, no request queued or running, every block and module pin free."""
    def counts() -> tuple[int, int, int]:
        stats = engine.stats()  # published after the step that emitted the last output
        return stats.num_running, stats.num_waiting, stats.kv_blocks_used

    deadline = time.monotonic() + 5
    while (engine.has_work() or counts() != (0, 0, 0)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_work(), "a step was left pending after the last request"
    assert counts() == (0, 0, 0)
    assert engine.scheduler.modules.num_pinned == 0


@pytest.mark.parametrize("graphs", ["off", "padded"])
def test_async_outputs_equal_the_synchronous_ones(setup, stops, sync_outputs, graphs):
    requests, sync = _mixed_requests(*stops), sync_outputs
    engine = _engine(setup, "on", cuda_graphs=graphs, cuda_graph_max_batch=4)
    overlapped = engine.generate_batch(requests)
    _assert_same_outputs(overlapped, sync)
    reasons = {k: v[-1].finish_reason for k, v in sync.items()}
    assert reasons == {"r0": "length", "r1": "length", "r2": "length", "r3": "length", "r4": "stop",
                       "r5": "stop", "r6": "length"}
    assert sync["r1"][-1].num_prompt_tokens + sync["r1"][-1].num_output_tokens == MAX_MODEL_LEN
    assert _tokens(sync["r2"]) != _tokens(sync["r3"])  # two seeds, two samples
    assert engine.async_scheduling and not engine.has_work()
    assert engine.scheduler.blocks.num_used == 0 and engine.scheduler.modules.num_pinned == 0
    if graphs == "padded":
        assert engine.runner.graphs.num_replays > 0


def test_async_preemption_and_recompute_give_the_synchronous_outputs(setup):
    requests = [Request(f"p{i}", p, SamplingParams(max_tokens=14, temperature=[0.0, 0.8][i % 2], seed=i, logprobs=1,
                                                    ignore_eos=True), c)
                for i, (p, c) in enumerate(zip(PROMPTS, COMPOSITIONS))]
    sync = _engine(setup, "off").generate_batch(requests)
    engine = _engine(setup, "on", num_kv_blocks=10)  # 40 token slots for 6 requests of up to 23 tokens
    preempted = []
    engine.step_observer = lambda stats: preempted.append(stats.num_preempted)
    overlapped = engine.generate_batch(requests)
    assert sum(preempted) > 0, "the pool was meant to run out"
    _assert_same_outputs(overlapped, sync)
    assert engine.scheduler.blocks.num_used == 0 and not engine.has_work()


def test_threaded_loop_with_arrivals_mid_decode_and_an_abort(setup):
    greedy = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (16, 6, 9)]
    requests = [Request(f"a{i}", PROMPTS[i], greedy[i], COMPOSITIONS[i]) for i in range(3)]
    expected = {k: _tokens(v) for k, v in _engine(setup, "off", max_model_len=None).generate_batch(requests).items()}
    doomed = Request("doomed", PROMPTS[5], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                     COMPOSITIONS[5])
    prefix = Request("doomed", doomed.prompt_token_ids, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True),
                     doomed.composition)
    doomed_alone = _tokens(_engine(setup, "off", max_model_len=None).generate_batch([prefix])["doomed"])
    engine = _engine(setup, "on", max_model_len=None)

    async def main():
        first = asyncio.create_task(_collect(engine, requests[0]))
        doomed_task = asyncio.create_task(_collect(engine, doomed, stop_after_tokens=4))
        await _running(engine, 2)  # both decoding before the others arrive
        later = await asyncio.gather(*(_collect(engine, r) for r in requests[1:]))
        return [await first, *later], await doomed_task

    engine.start()
    try:
        streams, doomed_outputs = asyncio.run(main())
        _assert_idle(engine)
    finally:
        engine.shutdown()
    assert {r.request_id: _tokens(s) for r, s in zip(requests, streams)} == expected
    got = _tokens(doomed_outputs)  # 4 tokens, or a few more where the last increment gathered several
    assert 4 <= len(got) <= 64 and got == doomed_alone[: len(got)] and not any(o.finished for o in doomed_outputs)


def test_a_failed_step_fails_its_requests_and_leaves_nothing_pending(setup):
    long = Request("long", PROMPTS[0], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    broken = Request("broken", PROMPTS[1], SamplingParams(max_tokens=4), Composition(("m0",), (1.0,), "explicit"))
    after = Request("after", PROMPTS[2], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), COMPOSITIONS[1])
    expected = _tokens(_engine(setup, "off").generate_batch([after])["after"])
    engine = _engine(setup, "on", max_model_len=None)
    load = engine.runner.load_module

    def load_failing_once(module_id):  # the module's weights fail to load once (a disk error, say)
        if module_id == "m0" and not failed:
            failed.append(module_id)
            raise OSError("disk went away")
        return load(module_id)

    failed: list[str] = []
    engine.runner.load_module = load_failing_once

    async def main():
        running = asyncio.create_task(_collect(engine, long))
        await _running(engine, 1)  # a step of "long" is in flight when "broken" fails to load its module
        with pytest.raises(RuntimeError, match="engine step failed"):
            await _collect(engine, broken)
        with pytest.raises(RuntimeError, match="engine step failed"):
            await running
        _assert_idle(engine)
        return await _collect(engine, after)  # the engine serves on: no stale step in its pipeline

    engine.start()
    try:
        assert _tokens(asyncio.run(main())) == expected
        _assert_idle(engine)
    finally:
        engine.shutdown()


def test_a_step_failing_while_the_next_waits_to_sample_leaves_that_sampling_behind(setup):
    """Reading step N back fails while N+1's sampling waits for it (a structured request's mask): the requests
    fail, and N+1's sampling is dropped with them instead of failing the next requests' step."""
    pytest.importorskip("xgrammar")
    from server.engine.structured import GrammarSpec

    after = Request("after", PROMPTS[2], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), COMPOSITIONS[1])
    expected = _tokens(_engine(setup, "off").generate_batch([after])["after"])
    engine = _engine(setup, "on", speculative_config='{"grammar_tokens": 0}')
    shaped = Request("shaped", PROMPTS[0], SamplingParams(max_tokens=20, temperature=0.0),
                     grammar=engine.compile_grammar(GrammarSpec("regex", "[a-z]{20}")))
    launch, failed = engine.runner.launch, []

    def launch_then_read_badly(plan):  # reading step N back fails once, after N+1's sampling began to wait for it
        step = launch(plan)
        read = step.result

        def result():
            if engine.runner.num_deferred_samples and not failed:
                failed.append(plan.step_id)
                raise RuntimeError("reading the step went wrong")
            return read()

        step.result = result
        return step

    engine.runner.launch = launch_then_read_badly

    async def main():
        with pytest.raises(RuntimeError, match="engine step failed"):
            await _collect(engine, shaped)
        _assert_idle(engine)
        return await _collect(engine, after)

    engine.start()
    try:
        assert _tokens(asyncio.run(main())) == expected and failed
        _assert_idle(engine)
    finally:
        engine.shutdown()


@pytest.mark.gpu
def test_cuda_decode_launches_never_wait_for_the_device(setup, stops):
    """On CUDA with captured decode graphs, launching a decode step (fill, late-token copy, replay, sampling,
    logprob gathering) makes no host sync, and the outputs still equal the synchronous loop's."""
    requests = _mixed_requests(*stops)
    sync = _engine(setup, "off", device="cuda", dtype="float32").generate_batch(requests)
    engine = _engine(setup, "on", device="cuda", dtype="float32", cuda_graphs="auto", cuda_graph_max_batch=8)
    launch, checked = engine.runner.launch, []

    def launch_without_syncs(plan):
        if plan.new or plan.module_loads or any(n != 1 for n in plan.num_scheduled_tokens.values()):
            return launch(plan)  # prefill steps run eagerly, outside this check
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = launch(plan)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(len(plan.num_scheduled_tokens))
        return pending

    engine.runner.launch = launch_without_syncs
    _assert_same_outputs(engine.generate_batch(requests), sync)
    assert len(checked) >= 5 and engine.runner.graphs.num_replays >= len(checked)


def _scheduler(num_blocks=16, block_size=4, max_model_len=128) -> Scheduler:
    return Scheduler(SchedulerConfig(4, 64, max_model_len), BlockPool(num_blocks, block_size, caching=False), ModulePool(2), {0})


def _add(scheduler: Scheduler, request_id: str, num_prompt: int, max_tokens: int) -> None:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    scheduler.add(Request(request_id, list(range(1, num_prompt + 1)), sampling), seed=0)


def _result(plan, token: int) -> StepResult:
    samplers = [r for r in plan.num_scheduled_tokens if r in plan.samples]
    return StepResult(samplers, [token] * len(samplers), [None] * len(samplers))


def test_request_finished_on_step_n_is_dropped_from_n_plus_1_and_freed():
    scheduler = _scheduler()
    _add(scheduler, "a", 6, max_tokens=10)
    first = scheduler.schedule()
    second = scheduler.schedule()  # before the first step's token is known
    state = scheduler.states["a"]
    assert second.num_scheduled_tokens == {"a": 1} and "a" in second.samples
    assert state.token_ids[-2:] == [PLACEHOLDER, PLACEHOLDER] and state.output_ids == []
    changed = scheduler.update(first, _result(first, 0))  # EOS: "a" ends on step 1's token
    assert changed == [state] and state.finish_reason == "stop" and state.output_ids == [0]
    assert state.token_ids == [1, 2, 3, 4, 5, 6, 0] and scheduler.blocks.num_used == 0
    assert scheduler.update(second, _result(second, 9)) == []  # its row of step 2 is ignored
    assert state.token_ids == [1, 2, 3, 4, 5, 6, 0]
    assert scheduler.schedule().dropped == ["a"] and not scheduler.has_work()


def test_requests_that_will_reach_max_tokens_or_max_model_len_are_not_scheduled_again():
    scheduler = _scheduler(max_model_len=9)
    _add(scheduler, "one", 3, max_tokens=1)
    _add(scheduler, "two", 3, max_tokens=2)
    _add(scheduler, "ctx", 7, max_tokens=50)  # 7 + 2 tokens reach max_model_len 9
    plans = [scheduler.schedule() for _ in range(3)]
    assert [sorted(p.num_scheduled_tokens) for p in plans] == [["ctx", "one", "two"], ["ctx", "two"], []]
    for plan, token in zip(plans, (7, 8, 9)):
        scheduler.update(plan, _result(plan, token))
    assert not scheduler.has_work() and scheduler.blocks.num_used == 0


def test_request_preempted_with_a_token_in_flight_gets_it_while_waiting_and_is_readmitted_in_full():
    scheduler = _scheduler(num_blocks=4, block_size=2)
    _add(scheduler, "a", 3, max_tokens=5)
    _add(scheduler, "b", 3, max_tokens=5)
    prefill = scheduler.schedule()
    scheduler.update(prefill, _result(prefill, 7))  # both hold 2 blocks: the pool is empty
    decode = scheduler.schedule()
    grow = scheduler.schedule()  # "a" needs a third block: "b" is preempted with its token in flight
    b = scheduler.states["b"]
    assert list(grow.num_scheduled_tokens) == ["a"] and b.status is Status.WAITING
    assert b.token_ids == [1, 2, 3, 7, PLACEHOLDER] and b.num_computed_tokens == 0
    scheduler.finish("a", "abort")  # blocks for "b" now, but its placeholder is not read yet
    blocked = scheduler.schedule()
    assert blocked.is_empty and b.status is Status.WAITING
    changed = scheduler.update(decode, _result(decode, 8))
    assert changed == [b] and b.token_ids == [1, 2, 3, 7, 8] and b.output_ids == [7, 8]
    for plan in (grow, blocked):
        assert scheduler.update(plan, _result(plan, 9)) == []
    readmit = scheduler.schedule()
    assert [d.token_ids for d in readmit.new] == [[1, 2, 3, 7, 8]] and readmit.num_scheduled_tokens == {"b": 5}


def test_updates_must_follow_the_schedule_order():
    scheduler = _scheduler()
    _add(scheduler, "a", 3, max_tokens=5)
    first, second = scheduler.schedule(), scheduler.schedule()
    with pytest.raises(RuntimeError, match="step 2 updated before step 1"):
        scheduler.update(second, _result(second, 7))
    scheduler.update(first, _result(first, 7))
    with pytest.raises(RuntimeError, match="step 1 is not in flight"):
        scheduler.update(first, _result(first, 7))


def test_async_scheduling_setting():
    assert not EngineConfig(model="m").async_scheduling_on("cpu")
    assert EngineConfig(model="m").async_scheduling_on("cuda:0")
    assert EngineConfig(model="m", async_scheduling="on").async_scheduling_on("cpu")
    assert not EngineConfig(model="m", async_scheduling="off").async_scheduling_on("cuda")
    with pytest.raises(ValueError, match="async_scheduling must be auto, on or off, got 'yes'"):
        EngineConfig(model="m", async_scheduling="yes").async_scheduling_on("cpu")

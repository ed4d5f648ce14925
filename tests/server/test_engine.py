"""The engine on its own thread, driven through asyncio as the API drives it: concurrency, seeds, stops,
preemption and abort give the same tokens and free everything."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from router.composition import Composition
from router.library import ModuleLibrary
from server.engine.config import EngineConfig
from server.engine.engine import Engine, Increments
from server.engine.request import Request, RequestOutput, SamplingParams
from server.engine.setup import module_loader

COMPOSITIONS = [
    Composition(("m0",), (1.0,), "explicit"),
    Composition(("m1", "m2"), (0.6, 0.4), "explicit"),
    Composition(),
    Composition(("m2", "m0", "m1"), (0.2, 0.5, 0.3), "explicit"),
]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34], [40, 41, 42, 43, 44, 45, 46]]


def _engine(setup, **overrides) -> Engine:
    model_dir, library = setup
    values = dict(model=model_dir, library=library, device="cpu", block_size=4, max_num_batched_tokens=16,
                  num_kv_blocks=64, max_loaded_modules=3)
    return Engine(EngineConfig(**(values | overrides)))


def _requests(sampling: SamplingParams, prefix: str = "r") -> list[Request]:
    return [Request(f"{prefix}{i}", p, sampling, c) for i, (p, c) in enumerate(zip(PROMPTS, COMPOSITIONS))]


def _tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


async def _collect(engine: Engine, request: Request) -> list:
    return [output async for output in engine.generate(request)]


def _run_concurrently(engine: Engine, requests: list[Request]) -> dict[str, list]:
    async def main():
        results = await asyncio.gather(*(_collect(engine, r) for r in requests))
        return {r.request_id: out for r, out in zip(requests, results)}

    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


def test_concurrent_streams_equal_the_inline_batch_and_seeded_sampling_is_reproducible(setup):
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    inline = _engine(setup).generate_batch(_requests(greedy))
    streamed = _run_concurrently(_engine(setup), _requests(greedy))
    assert {k: _tokens(v) for k, v in streamed.items()} == {k: _tokens(v) for k, v in inline.items()}
    for outputs in streamed.values():
        assert outputs[-1].finished and outputs[-1].finish_reason == "length"
        assert [o.num_output_tokens for o in outputs][-1] == 8 and not any(o.finished for o in outputs[:-1])

    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=123, ignore_eos=True)
    together = _run_concurrently(_engine(setup), _requests(seeded))
    alone = _engine(setup).generate_batch([_requests(seeded)[1]])
    assert _tokens(together["r1"]) == _tokens(alone["r1"])
    other_seed = SamplingParams(max_tokens=8, temperature=1.0, seed=124, ignore_eos=True)
    assert _tokens(_engine(setup).generate_batch([_requests(other_seed)[1]])["r1"]) != _tokens(alone["r1"])


def test_preemption_by_recompute_gives_the_same_tokens(setup):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    roomy = _engine(setup).generate_batch(_requests(greedy))
    tight = _engine(setup, num_kv_blocks=8)  # 32 token slots for 4 requests of up to 21 tokens
    preempted = []
    tight.step_observer = lambda stats: preempted.append(stats.num_preempted)
    outputs = tight.generate_batch(_requests(greedy))
    assert sum(preempted) > 0, "the pool was meant to run out"
    assert {k: _tokens(v) for k, v in outputs.items()} == {k: _tokens(v) for k, v in roomy.items()}
    assert tight.scheduler.blocks.num_used == 0


def test_stats_published_between_steps_repeat_no_step_counts(setup):
    """An abort publishes the engine's state, not the last step's preemptions again (metrics add them up)."""
    engine = _engine(setup, num_kv_blocks=8)
    seen = []
    engine.step_observer = seen.append
    for request in _requests(SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)):
        engine._add(request, lambda output: None)
    while engine.scheduler.num_preempted_last_step == 0:
        engine.step()
    engine.abort("r0")
    engine._drain_inbox()
    assert seen[-2].num_preempted > 0 and seen[-2].num_seqs > 0
    assert (seen[-1].num_preempted, seen[-1].num_seqs, seen[-1].num_module_loads) == (0, 0, 0)


def test_stops_and_logprobs(setup):
    engine = _engine(setup)
    free = engine.generate_batch([Request("free", PROMPTS[0], SamplingParams(max_tokens=8, temperature=0.0,
                                                                               ignore_eos=True))])["free"]
    ids = _tokens(free)
    stop_id = ids[3]
    first = ids.index(stop_id)
    by_id = engine.generate_batch([Request("id", PROMPTS[0], SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_id,), logprobs=2))])["id"]
    assert _tokens(by_id) == ids[: first + 1] and by_id[-1].finish_reason == "stop"
    logprobs = [lp for o in by_id for lp in o.logprobs]
    assert [lp.token_id for lp in logprobs] == _tokens(by_id)
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in logprobs)  # greedy: the best one

    text = "".join(o.text for o in free)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    by_text = engine.generate_batch([Request("text", PROMPTS[0], SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, stop=(stop,)))])["text"]
    assert "".join(o.text for o in by_text) == text[: text.index(stop)]
    assert by_text[-1].finish_reason == "stop" and engine.scheduler.blocks.num_used == 0


def test_leaving_a_stream_early_aborts_and_frees_blocks(setup):
    engine = _engine(setup)
    request = Request("long", PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                      COMPOSITIONS[1])

    async def main():
        seen = 0
        async for _ in engine.generate(request):
            seen += 1
            if seen == 3:
                break
        for _ in range(200):
            stats = engine.stats()
            if (stats.num_running, stats.kv_blocks_used) == (0, 0):
                return seen
            await asyncio.sleep(0.01)
        raise AssertionError(f"blocks not freed after the abort: {engine.stats()}")

    engine.start()
    try:
        assert asyncio.run(main()) == 3
        assert engine.scheduler.modules.num_pinned == 0
    finally:
        engine.shutdown()


def test_a_reader_that_falls_behind_gets_what_accumulated_as_one_increment(setup):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    engine = _engine(setup)
    ran, done = threading.Event(), threading.Event()

    def observe(stats):  # every step's stats, in order: the request ran, then nothing runs
        if stats.num_running:
            ran.set()
        elif ran.is_set():
            done.set()

    engine.step_observer = observe
    engine.start()
    try:
        keeping_up = asyncio.run(_collect(engine, Request("fast", PROMPTS[0], params, COMPOSITIONS[1])))
        ran.clear()
        done.clear()

        async def behind():
            outputs = []
            async for output in engine.generate(Request("slow", PROMPTS[0], params, COMPOSITIONS[1])):
                outputs.append(output)
                if len(outputs) == 1:  # the engine finishes meanwhile
                    assert await asyncio.to_thread(done.wait, 30)
            return outputs

        fell_behind = asyncio.run(behind())
    finally:
        engine.shutdown()
    assert len(fell_behind) == 2 and fell_behind[-1].finished and fell_behind[-1].finish_reason == "length"
    assert _tokens(fell_behind) == _tokens(keeping_up)
    assert "".join(o.text for o in fell_behind) == "".join(o.text for o in keeping_up)
    assert [lp for o in fell_behind for lp in o.logprobs] == [lp for o in keeping_up for lp in o.logprobs]
    assert fell_behind[0].prompt_logprobs == keeping_up[0].prompt_logprobs is not None
    assert fell_behind[1].prompt_logprobs is None
    assert fell_behind[-1].num_output_tokens == 24 and len(fell_behind[-1].token_ids) == 23


def test_stream_interval_gathers_tokens_per_increment_with_the_first_and_the_last_at_once(setup):
    params = SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True, logprobs=0)
    every = _run_concurrently(_engine(setup), [Request("r", PROMPTS[1], params, COMPOSITIONS[3])])["r"]
    gathered = _run_concurrently(_engine(setup, stream_interval=5), [Request("r", PROMPTS[1], params,
                                                                             COMPOSITIONS[3])])["r"]
    assert _tokens(gathered) == _tokens(every) and len(_tokens(every)) == 23
    assert "".join(o.text for o in gathered) == "".join(o.text for o in every)
    assert [lp for o in gathered for lp in o.logprobs] == [lp for o in every for lp in o.logprobs]
    assert all(len(o.token_ids) >= 5 for o in gathered[1:-1]) and gathered[-1].finished
    assert 2 <= len(gathered) <= 6  # 1 + 22 tokens in fives: 1, 5, 5, 5, 5, 2 when the reader keeps up


def test_increments_wake_the_reader_for_the_first_token_then_per_interval_and_at_the_end():
    def output(i, finished=False):
        return RequestOutput("r", str(i), (i,), None, finished, "length" if finished else None, 3, i + 1)

    async def taken(increments):
        try:
            return await asyncio.wait_for(increments.get(), 0.05)
        except asyncio.TimeoutError:
            return None

    async def main():
        increments = Increments(asyncio.get_running_loop(), interval=3)
        increments.put(output(0))
        first = await taken(increments)
        increments.put(output(1))
        increments.put(output(2))
        held = await taken(increments)  # 2 tokens < 3: the reader sleeps on
        increments.put(output(3))
        third = await taken(increments)
        increments.put(output(4, finished=True))
        last = await taken(increments)
        return first, held, third, last

    first, held, third, last = asyncio.run(main())
    assert first.token_ids == (0,) and held is None and third.token_ids == (1, 2, 3) and third.text == "123"
    assert last.token_ids == (4,) and last.finished


def test_a_stream_interval_below_one_is_refused(setup):
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="stream_interval must be an integer >= 1"):
            _engine(setup, stream_interval=bad)


def test_increments_deliver_the_output_before_the_error_that_ends_it():
    async def main():
        increments = Increments(asyncio.get_running_loop())
        outputs = [RequestOutput("r", text, (i,), None, False, None, 3, i + 1) for i, text in enumerate("abc")]
        failure = RuntimeError("the step failed")
        producer = threading.Thread(target=lambda: [increments.put(item) for item in (*outputs, failure)])
        producer.start()
        producer.join()
        merged = await increments.get()
        with pytest.raises(RuntimeError, match="the step failed"):
            await increments.get()
        return merged

    merged = asyncio.run(main())
    assert (merged.text, merged.token_ids, merged.num_output_tokens, merged.logprobs) == ("abc", (0, 1, 2), 3, None)


def test_stop_text_and_special_tokens_follow_the_request(setup):
    engine = _engine(setup)
    greedy = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
    ids = _tokens(engine.generate_batch([Request("free", PROMPTS[1], SamplingParams(**greedy))])["free"])
    stop_id = next(t for i, t in enumerate(ids) if i >= 2 and t not in ids[:i])
    first = ids.index(stop_id)
    decode = engine.tokenizer.decode
    for include in (False, True):
        out = engine.generate_batch([Request("id", PROMPTS[1], SamplingParams(
            **greedy, stop_token_ids=(stop_id,), include_stop_str_in_output=include))])["id"]
        assert _tokens(out) == ids[: first + 1] and out[-1].stop_reason == stop_id
        assert "".join(o.text for o in out) == decode(ids[: first + 1 if include else first])

    text = decode(ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = engine.generate_batch([Request("s", PROMPTS[1], SamplingParams(**greedy, stop=(stop,),
                                                                        include_stop_str_in_output=True))])["s"]
    assert "".join(o.text for o in out) == text[: text.index(stop) + len(stop)] and out[-1].stop_reason == stop

    special = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")  # a special token, forced by its bias
    forced = dict(greedy, max_tokens=3, logit_bias=((special, 100.0),))
    shown, hidden = (engine.generate_batch([Request("sp", PROMPTS[1], SamplingParams(
        **forced, skip_special_tokens=skip))])["sp"] for skip in (False, True))
    assert _tokens(shown) == _tokens(hidden) == [special] * 3
    assert "".join(o.text for o in shown) == "<|im_start|>" * 3 and "".join(o.text for o in hidden) == ""


def test_step_stats_name_the_modules_of_running_and_waiting_requests(setup):
    engine = _engine(setup, max_num_seqs=1)
    seen = []
    engine.step_observer = lambda stats: seen.append((stats.running_modules, stats.waiting_modules))
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.generate_batch([Request("a", PROMPTS[1], greedy, COMPOSITIONS[0]),
                           Request("b", PROMPTS[2], greedy, COMPOSITIONS[1])])
    assert seen[0] == (("m0",), ("m1", "m2"))  # b waits: one sequence at a time
    assert (tuple(sorted(seen[-2][0])), seen[-2][1]) == (("m1", "m2"), ())
    assert seen[-1] == ((), ())


def test_requests_passing_one_that_waits_for_module_slots_change_no_token(setup):
    sampled = SamplingParams(max_tokens=6, temperature=0.9, seed=4, ignore_eos=True)
    compositions = [Composition(("m0",), (1.0,), "explicit"), Composition(("m1",), (1.0,), "explicit"),
                    Composition(("m2",), (1.0,), "explicit"), Composition(("m0",), (0.5,), "explicit"),
                    Composition(), Composition(("m1",), (1.0,), "explicit")]
    requests = lambda: [Request(f"r{i}", PROMPTS[i % 4] + [60 + i], sampled, c)  # noqa: E731
                        for i, c in enumerate(compositions)]
    reference = _engine(setup, max_loaded_modules=3).generate_batch(requests())
    for overrides in ({"async_scheduling": "on"}, {"async_scheduling": "off", "module_wait_steps": 0},
                      {"async_scheduling": "on", "max_cpu_modules": 1}):  # (host copies converted again too)
        loads = []
        engine = _engine(setup, max_loaded_modules=1, max_num_seqs=4, **overrides)
        engine.step_observer = lambda stats: loads.append(stats.num_module_loads)
        outputs = engine.generate_batch(requests())
        assert {r: _tokens(o) for r, o in outputs.items()} == {r: _tokens(o) for r, o in reference.items()}
        assert sum(loads) >= 3, "one slot for three modules: they were swapped"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_module_loader_converts_once_and_keeps_the_most_recently_loaded(setup, device):
    """Host copies in the pool's dtype (pinned on CUDA, so slot writes are queued copies), at most `capacity`."""
    library = ModuleLibrary.load(setup[1])
    load = module_loader(library, torch.float16, device, capacity=2)
    first = load("m0")
    weights, scale = first
    assert scale == library.modules["m0"].scale and weights.keys() == library.module_weights("m0").keys()
    for point, (a, b) in weights.items():
        want_a, want_b = library.module_weights("m0")[point]
        assert a.device.type == b.device.type == "cpu" and a.is_pinned() == b.is_pinned() == (device == "cuda")
        assert a.dtype == b.dtype == torch.float16
        assert torch.equal(a, want_a.half()) and torch.equal(b, want_b.half())
    assert load("m0") is first  # converted once
    old_m1 = load("m1")
    assert load("m0") is first and load("m2")[1] == library.modules["m2"].scale  # m1: least recently loaded, dropped
    assert load("m0") is first and load("m1") is not old_m1
    with pytest.raises(ValueError, match="max_cpu_modules must be at least 1, got 0"):
        module_loader(library, capacity=0)


def test_only_errors_that_leave_the_device_unusable_are_fatal():
    import torch

    from server.engine.engine import EngineDeadError, is_fatal

    assert is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_fatal(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_fatal(EngineDeadError("gone"))
    assert not is_fatal(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_fatal(ValueError("a bad request"))

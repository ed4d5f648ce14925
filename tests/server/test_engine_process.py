"""The engine in a process of its own (`server.engine.process`) without the web stack: the same tokens as the engine
on a thread, for mixed compositions and seeded sampling, on the CPU and (under the `gpu` marker) on CUDA, where
the child process starts CUDA itself."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.process import EngineProcess
from server.engine.request import SamplingParams
from tests.server.test_engine import _collect, _engine, _requests, _run_concurrently, _tokens

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_the_engine_process_gives_the_threads_tokens(setup, device):
    dtype = "float32" if device == "cpu" else "bfloat16"
    sampling = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)]
    threaded = _engine(setup, device=device, dtype=dtype)
    expected = {i: _run_concurrently(threaded, _requests(s, f"s{i}-")) for i, s in enumerate(sampling)}
    del threaded
    if device == "cuda":
        torch.cuda.empty_cache()
    model_dir, library = setup
    process = EngineProcess(EngineConfig(model=model_dir, library=library, device=device, dtype=dtype, block_size=4,
                                         max_num_batched_tokens=16, num_kv_blocks=64, max_loaded_modules=3))
    try:
        for i, params in enumerate(sampling):
            requests = _requests(params, f"s{i}-")

            async def main():
                return await asyncio.gather(*(_collect(process, r) for r in requests))

            got = {r.request_id: out for r, out in zip(requests, asyncio.run(main()))}
            assert {r: _tokens(o) for r, o in got.items()} == {r: _tokens(o) for r, o in expected[i].items()}
            assert all(o[-1].finished and o[-1].num_output_tokens == 8 for o in got.values())
        stats = process.stats()
        assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
    finally:
        process.shutdown()
    assert not process._process.is_alive()

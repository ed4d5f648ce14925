"""Modules added and removed while the engine serves: between steps, never under a request that uses them."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from router.composition import Composition
from router.errors import LibraryError, UnknownModuleError
from router.info import ModuleInfo
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from tests.router.helpers import merged_model

PROMPT = [5, 6, 7, 8, 9, 10, 11]


def _engine(setup, **overrides) -> Engine:
    model_dir, library = setup
    values = dict(model=model_dir, library=library, device="cpu", block_size=4, max_num_batched_tokens=16,
                  num_kv_blocks=64, max_loaded_modules=2, max_rank=8, max_model_len=128, runtime_modules=True)
    return Engine(EngineConfig(**(values | overrides)))


def _module(engine: Engine, name: str, seed: int, rank: int = 4):
    gen = torch.Generator().manual_seed(seed)
    backbone = engine.library.backbone
    info = ModuleInfo(name, rank, 2.0 * rank, "test", ("q_proj", "down_proj"), (0, 1))
    weights = {(layer, t): (torch.randn(rank, backbone.shape(t)[0], generator=gen) * 0.3,  # [rank, in]
                            torch.randn(backbone.shape(t)[1], rank, generator=gen) * 0.3)  # [out, rank]
               for layer in info.layers for t in info.targets}
    return info, weights


def _greedy(engine: Engine, composition: Composition, request_id: str = "r") -> list:
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return engine.generate_batch([Request(request_id, PROMPT, sampling, composition)])[request_id]


def _merged_greedy(model_dir, library, composition) -> list[int]:
    model = merged_model(model_dir, library, composition)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_added_module_serves_exactly_and_no_task_picks_it(setup, device):
    """On CUDA the decode graphs are captured at start-up, before the module exists: replays must use it."""
    engine = _engine(setup, device=device, dtype="float32", block_size=4 if device == "cpu" else 16)
    tasks_before = {t: engine.library.controller.gates_for_task(t) for t in engine.library.tasks}
    engine.add_module(*_module(engine, "new", 1)).result(timeout=5)
    assert "new" in engine.library.modules and engine.runtime_modules == {"new"}
    assert {t: engine.library.controller.gates_for_task(t) for t in engine.library.tasks} == tasks_before
    mixed = Composition(("new", "m1"), (0.7, 0.3), "explicit")
    for name, composition in (("alone", Composition(("new",), (1.0,), "explicit")), ("mixed", mixed)):
        served = [t for o in _greedy(engine, composition, name) for t in o.token_ids]
        assert served == _merged_greedy(setup[0], engine.library, composition), name
    plain = [t for o in _greedy(engine, Composition(), "p") for t in o.token_ids]
    assert plain != served
    with pytest.raises(LibraryError, match="already exists"):
        engine.add_module(*_module(engine, "new", 2)).result(timeout=5)
    with pytest.raises(LibraryError, match="already exists"):  # replace swaps only modules added while serving
        engine.add_module(*_module(engine, "m0", 2), replace=True).result(timeout=5)
    alone = Composition(("new",), (1.0,), "explicit")
    assert _greedy(engine, alone, "again")[-1].num_cached_tokens == 4  # PROMPT's full block, from "alone"
    engine.add_module(*_module(engine, "new", 2), replace=True).result(timeout=5)
    swapped_outputs = _greedy(engine, alone, "swapped")
    assert swapped_outputs[-1].num_cached_tokens == 0  # the old weights' KV is never reused
    swapped = [t for o in swapped_outputs for t in o.token_ids]
    assert swapped == _merged_greedy(setup[0], engine.library, Composition(("new",), (1.0,), "explicit"))
    assert list(engine.library.modules).count("new") == 1 and engine.runtime_modules == {"new"}
    with pytest.raises(ValueError, match="max_rank 8"):
        engine.add_module(*_module(engine, "wide", 3, rank=16)).result(timeout=5)
    with pytest.raises(ValueError, match="only modules added while serving"):
        engine.remove_module("m0").result(timeout=5)
    engine.remove_module("new").result(timeout=5)
    assert "new" not in engine.library.modules and engine.scheduler.modules.slot_of("new") is None


def test_a_request_composed_before_its_module_left_fails_alone(setup):
    engine = _engine(setup)
    engine.add_module(*_module(engine, "gone", 4)).result(timeout=5)
    stale = Composition(("gone",), (1.0,), "explicit")
    engine.remove_module("gone").result(timeout=5)
    outputs = _greedy(engine, stale)
    assert len(outputs) == 1 and isinstance(outputs[0], UnknownModuleError) and "gone" in str(outputs[0])
    assert len(_greedy(engine, Composition(("m0",), (1.0,), "explicit"), "ok")) >= 1


def test_removing_a_module_in_use_is_refused_until_its_requests_finish(setup):
    engine = _engine(setup)
    engine.add_module(*_module(engine, "busy", 5)).result(timeout=5)
    request = Request("long", PROMPT, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True),
                      Composition(("busy",), (1.0,), "explicit"))

    async def main():
        outputs = []

        async def collect():
            async for output in engine.generate(request):
                outputs.append(output)

        running = asyncio.create_task(collect())
        deadline = time.monotonic() + 30
        while not outputs:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        with pytest.raises(ValueError, match="in use by 1 waiting or running requests"):
            await asyncio.wrap_future(engine.remove_module("busy"))
        await running
        await asyncio.wrap_future(engine.remove_module("busy"))
        return outputs

    engine.start()
    try:
        outputs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert outputs[-1].finished and outputs[-1].num_output_tokens == 100
    assert "busy" not in engine.library.modules


def test_off_unless_configured(setup):
    engine = _engine(setup, runtime_modules=False)
    with pytest.raises(ValueError, match="--runtime-modules"):
        engine.add_module(*_module(engine, "x", 6)).result(timeout=5)
    assert "x" not in engine.library.modules


def test_a_vllm_export_served_as_lora_modules_gives_each_tasks_tokens(setup, tmp_path):
    """The deployment round trip: `export-vllm`'s adapters, served the way vLLM serves them (one LoRA per
    request, by name), generate what the library generates for each task tag."""
    from router.compose import compose
    from router.library import ModuleLibrary
    from router.vllm_export import export_vllm

    model_dir, library_dir = setup
    library = ModuleLibrary.load(library_dir)
    done = export_vllm(library, tmp_path / "vllm")
    tagged = _engine(setup, runtime_modules=False)
    as_vllm = _engine((model_dir, None), runtime_modules=False, max_rank=16,
                      lora_modules=tuple(f"{a.name}={done.path / a.path}" for a in done.adapters))
    assert list(as_vllm.library.modules) == list(library.tasks) and not as_vllm.library.tasks
    outputs = {}
    for task in library.tasks:
        want = [t for o in _greedy(tagged, compose(library, task=task), task) for t in o.token_ids]
        got = [t for o in _greedy(as_vllm, Composition((task,), (1.0,), "explicit"), task) for t in o.token_ids]
        assert got == want, task
        outputs[task] = got
    assert len(set(map(tuple, outputs.values()))) > 1, "the tasks must generate differently"


def test_a_composition_larger_than_the_pool_is_refused_and_holds_up_nothing(setup):
    engine = _engine(setup, runtime_modules=False)  # 2 slots, 3 library modules
    sampling = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    too_big = Request("big", PROMPT, sampling, Composition(("m0", "m1", "m2"), (0.3, 0.3, 0.4), "explicit"))
    after = Request("after", PROMPT, sampling, Composition(("m0", "m1"), (0.5, 0.5), "explicit"))
    outputs = engine.generate_batch([too_big, after])
    assert len(outputs["big"]) == 1 and "uses 3 modules but the module pool has 2 slots" in str(outputs["big"][0])
    assert outputs["after"][-1].finished and outputs["after"][-1].num_output_tokens == 3

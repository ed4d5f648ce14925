"""The runner's vectorised `_fill` writes exactly the buffers a plain token-by-token fill writes: checked on
every step of a real engine run with mixed prefill + decode steps, chunked prefills, module compositions
and placeholders from asynchronous scheduling."""

from __future__ import annotations

import pytest
import torch

from tessera_kernels import NO_MODULE
from router.composition import Composition
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.host_rows import HostRows
from server.engine.plan import PLACEHOLDER, NewRequestData, StepPlan
from server.engine.request import Request, SamplingParams

COMPOSITIONS = [
    Composition(("m0",), (1.0,), "explicit"),
    Composition(("m1", "m2"), (0.6, 0.4), "explicit"),
    Composition(),
    Composition(("m2", "m0", "m1"), (0.2, 0.5, 0.3), "explicit"),
]
PROMPT_LENS = [11, 3, 6, 9, 2, 14]


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_fill(runner, plan: StepPlan, order: list[str]) -> dict:
    """The step's buffers filled one token at a time, late tokens read from their pending steps."""
    block_size, max_k = runner.config.block_size, runner.config.max_k
    want = {key: [] for key in ("input_ids", "positions", "slot_mapping", "seq_lens", "logits_indices",
                                "token_slots", "token_gates")}
    cu = [0]
    tables = torch.zeros(len(order), runner.config.max_blocks_per_seq, dtype=torch.int32)
    for i, request_id in enumerate(order):
        held = runner.held[request_id]
        start, count = held.num_computed_tokens, plan.num_scheduled_tokens[request_id]
        drafts = plan.drafts.get(request_id, [])
        for position in range(start, start + count):
            known = position < len(held.token_ids)
            token = held.token_ids[position] if known else drafts[position - len(held.token_ids)]
            if token == PLACEHOLDER:
                step, row = held.pending[position]
                token = int(step.sampled[row])
            want["input_ids"].append(token)
            want["positions"].append(position)
            want["slot_mapping"].append(held.block_ids[position // block_size] * block_size + position % block_size)
            padding = max_k - len(held.data.module_slots)
            want["token_slots"].append(list(held.data.module_slots) + [NO_MODULE] * padding)
            want["token_gates"].append(list(held.data.gates) + [0.0] * padding)
        cu.append(cu[-1] + count)
        want["seq_lens"].append(start + count)
        tables[i, : len(held.block_ids)] = torch.tensor(held.block_ids, dtype=torch.int32)
        if request_id in plan.samples:  # a request with drafts samples at each of them too
            want["logits_indices"] += range(cu[-1] - 1 - len(drafts), cu[-1])
    want["cu_query_lens"], want["block_tables"] = cu, tables
    return want


def _assert_buffers(meta, want: dict) -> None:
    n, s = len(want["input_ids"]), len(want["seq_lens"])
    assert (meta.num_tokens, meta.num_seqs) == (n, s)
    assert meta.max_query_len == max(b - a for a, b in zip(want["cu_query_lens"], want["cu_query_lens"][1:]))
    assert meta.max_seq_len == max(want["seq_lens"])
    for key in ("input_ids", "positions", "slot_mapping", "seq_lens", "cu_query_lens"):
        got = getattr(meta, key)
        assert got[: len(want[key])].tolist() == want[key], key
    assert meta.logits_indices[: len(want["logits_indices"])].tolist() == want["logits_indices"]
    assert torch.equal(meta.block_tables[:s], want["block_tables"])
    applies = any(slot != NO_MODULE for row in want["token_slots"] for slot in row)
    assert meta.has_modules == applies
    if applies:
        slots = torch.full_like(meta.modules.token_slots, NO_MODULE)
        slots[:n] = torch.tensor(want["token_slots"], dtype=torch.int32)
        gates = torch.zeros_like(meta.modules.token_gates)
        gates[:n] = torch.tensor(want["token_gates"], dtype=torch.float32)
        assert torch.equal(meta.modules.token_slots, slots)
        assert torch.equal(meta.modules.token_gates, gates)
        assert meta.modules.num_tokens == n


def _checked_fill(runner, seen: dict):
    """`runner._fill`, with every step's buffers compared to the reference fill."""
    real = runner._fill

    def fill(plan: StepPlan, order: list[str]) -> tuple[list[int], int]:
        want = _reference_fill(runner, plan, order)
        sampling_rows, num_logit_rows = real(plan, order)
        _assert_buffers(runner.meta, want)
        assert sampling_rows == [i for i, r in enumerate(order) if r in plan.samples]
        assert num_logit_rows == len(want["logits_indices"])
        seen["drafts"] += bool(plan.drafts)
        counts = [plan.num_scheduled_tokens[r] for r in order]
        starts = [runner.held[r].num_computed_tokens for r in order]
        seen["mixed"] += 1 in counts and max(counts) > 1
        seen["chunked"] += any(c > 1 and s > 0 for c, s in zip(counts, starts))
        seen["late"] += any(runner.held[r].token_ids[s] == PLACEHOLDER for r, s in zip(order, starts))
        seen["modules"] += runner.meta.has_modules
        seen["steps"] += 1
        return sampling_rows, num_logit_rows

    return fill


@pytest.mark.parametrize("mode", ["on", "off", "drafts"])
def test_fill_equals_a_token_by_token_fill_on_every_step(setup, mode):
    """`drafts`: requests with a prediction (their prompt) run drafts, each sampled."""
    model_dir, library = setup
    engine = Engine(EngineConfig(model=model_dir, library=library, device="cpu", block_size=4,
                                 max_num_batched_tokens=12, num_kv_blocks=64, max_loaded_modules=3,
                                 max_model_len=32, async_scheduling="off" if mode == "drafts" else mode))
    seen = dict.fromkeys(("mixed", "chunked", "late", "modules", "steps", "drafts"), 0)
    engine.runner._fill = _checked_fill(engine.runner, seen)
    prompts = [[5 + i + j for j in range(length)] for i, length in enumerate(PROMPT_LENS)]
    requests = [
        Request(f"r{i}", prompt,
                SamplingParams(max_tokens=5 + i % 3, temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True),
                COMPOSITIONS[i % len(COMPOSITIONS)], prediction=tuple(prompt) if mode == "drafts" else ())
        for i, prompt in enumerate(prompts)
    ]
    outputs = engine.generate_batch(requests)
    assert all(sum(len(o.token_ids) for o in outputs[r.request_id]) == r.sampling.max_tokens for r in requests)
    assert seen["mixed"] and seen["chunked"] and seen["modules"] and seen["steps"] > 5
    assert bool(seen["late"]) == (mode == "on")
    assert bool(seen["drafts"]) == (mode == "drafts")


def _new(request_id: str, block_ids: list[int], module_slots: tuple[int, ...]) -> NewRequestData:
    return NewRequestData(request_id, [1, 2, 3, 4, 5], block_ids, 0, module_slots, (1.0,) * len(module_slots),
                          SamplingParams(temperature=0.0), seed=0)


def test_fill_names_a_request_without_the_blocks_it_runs_into(setup):
    model_dir, library = setup
    engine = Engine(EngineConfig(model=model_dir, library=library, device="cpu", block_size=4,
                                 num_kv_blocks=16, max_loaded_modules=3, max_model_len=16, max_k=2))
    runner = engine.runner
    with pytest.raises(RuntimeError, match=r"request 'short' runs a token in block 1 but holds 1 blocks"):
        runner.launch(StepPlan(new=[_new("short", [3], ())], num_scheduled_tokens={"short": 5}, samples={"short"}))
    with pytest.raises(RuntimeError, match=r"request 'long' would hold 5 KV blocks; the block table has 4"):
        runner.launch(StepPlan(new=[_new("long", [0, 1, 2, 3, 4], ())], num_scheduled_tokens={"long": 5}))
    with pytest.raises(ValueError, match=r"request 'wide' composes 3 modules with 3 gates; max_k is 2"):
        runner.launch(StepPlan(new=[_new("wide", [0, 1], (0, 1, 2))], num_scheduled_tokens={"wide": 5}))


def test_host_rows_grow_keep_their_rows_and_reset_a_reused_one():
    host = HostRows(capacity=2, max_blocks_per_seq=3, max_k=2)
    rows = [host.take(f"r{i}", (i,) if i % 2 else (), (0.5,) if i % 2 else ()) for i in range(5)]
    for i, row in enumerate(rows):
        host.add_blocks(f"r{i}", row, [10 + i, 20 + i])
    assert len(set(rows)) == 5 and len(host.tables) >= 5
    for i, row in enumerate(rows):
        assert host.tables[row].tolist() == [10 + i, 20 + i, 0]
        assert host.module_slots[row].tolist() == ([i, NO_MODULE] if i % 2 else [NO_MODULE, NO_MODULE])
        assert host.module_gates[row].tolist() == ([0.5, 0.0] if i % 2 else [0.0, 0.0])
    host.release(rows[1])
    again = host.take("new", (), ())
    assert again == rows[1]
    assert host.tables[again].tolist() == [0, 0, 0] and host.num_blocks[again] == 0
    assert host.module_slots[again].tolist() == [NO_MODULE, NO_MODULE]

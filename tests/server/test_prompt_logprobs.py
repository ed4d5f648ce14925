"""Prompt logprobs (scoring): every prompt token's logprob given the tokens before it, exactly what the
merged-weights transformers model assigns, across prefill chunks, the prefix cache and preemption."""

from __future__ import annotations

import pytest
import torch

from router.composition import Composition
from router.library import ModuleLibrary
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from tests.router.helpers import merged_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [30, 31], [40] * 9]
COMPOSITIONS = [Composition(("m0",), (1.0,), "explicit"), Composition(), Composition(("m1", "m2"), (0.6, 0.4),
                                                                                     "explicit")]


def _engine(setup, **overrides) -> Engine:
    model_dir, library = setup
    values = dict(model=model_dir, library=library, device="cpu", dtype="float32", block_size=4,
                  max_num_batched_tokens=8, num_kv_blocks=64, max_loaded_modules=3)  # the long prompt runs in 3 chunks
    return Engine(EngineConfig(**(values | overrides)))


def _expected(setup, prompt: list[int], composition: Composition) -> torch.Tensor:
    model = merged_model(setup[0], ModuleLibrary.load(setup[1]), composition)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()  # [len, vocab]
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("overrides", [{}, {"async_scheduling": "on"}, {"num_kv_blocks": 7}])
def test_prompt_logprobs_equal_the_merged_model_in_chunks_and_after_preemption(setup, overrides):
    engine = _engine(setup, **overrides)
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    warm = engine.generate_batch([Request("warm", PROMPTS[0], SamplingParams(max_tokens=1), COMPOSITIONS[0])])
    assert warm["warm"][-1].prompt_logprobs is None  # not asked
    requests = [Request(f"r{i}", p, sampling, c) for i, (p, c) in enumerate(zip(PROMPTS, COMPOSITIONS))]
    preempted = []
    engine.step_observer = lambda stats: preempted.append(stats.num_preempted)
    outputs = engine.generate_batch(requests)
    assert sum(preempted) > 0 or "num_kv_blocks" not in overrides, "the KV pool was meant to run out"
    for i, (prompt, composition) in enumerate(zip(PROMPTS, COMPOSITIONS)):
        outs = outputs[f"r{i}"]
        assert [o.prompt_logprobs is not None for o in outs] == [True] + [False] * (len(outs) - 1)
        scored = outs[0].prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None
        assert outs[-1].num_cached_tokens == 0  # r0 shares the warm request's blocks, yet computes them
        logp = _expected(setup, prompt, composition)
        for position, entry in enumerate(scored[1:], start=1):
            assert entry.token_id == prompt[position]
            assert entry.logprob == pytest.approx(logp[position - 1, prompt[position]].item(), abs=1e-4)
            top_values, top_ids = logp[position - 1].topk(2)
            assert [t for t, _ in entry.top] == top_ids.tolist()
            assert [v for _, v in entry.top] == pytest.approx(top_values.tolist(), abs=1e-4)

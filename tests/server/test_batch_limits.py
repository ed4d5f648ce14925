"""max_num_seqs and max_num_batched_tokens: vLLM's defaults by device (a large GPU, a smaller one, the CPU) unless
given, and what the engine is built with."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine import Engine


def test_the_defaults_follow_the_device(monkeypatch):
    assert EngineConfig(model="m").batch_limits("cpu") == (64, 512)
    memory = {"bytes": 80 << 30}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=memory["bytes"]))
    assert EngineConfig(model="m").batch_limits("cuda") == (1024, 8192)  # H100, A100-80GB
    memory["bytes"] = 24 << 30
    assert EngineConfig(model="m").batch_limits("cuda:1") == (256, 2048)  # L4, A10
    assert EngineConfig(model="m", max_num_seqs=8, max_num_batched_tokens=96).batch_limits("cuda") == (8, 96)


@pytest.mark.parametrize("field,value", [("max_num_seqs", 0), ("max_num_batched_tokens", -1), ("max_num_seqs", 2.5)])
def test_bad_limits_are_refused_before_the_model_loads(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1, got {value!r}"):
        Engine(EngineConfig(model="/no/such/model", device="cpu", **{field: value}))


def test_the_engine_is_built_with_the_limits(tiny_llama):
    engine = Engine(EngineConfig(model=tiny_llama, device="cpu", dtype="float32", num_kv_blocks=16))
    assert (engine.scheduler.config.max_num_seqs, engine.scheduler.config.max_num_batched_tokens) == (64, 512)
    assert (engine.runner.config.max_num_seqs, engine.runner.config.max_num_batched_tokens) == (64, 512)
    engine = Engine(EngineConfig(model=tiny_llama, device="cpu", dtype="float32", num_kv_blocks=16, max_num_seqs=3,
                                 max_num_batched_tokens=40))
    assert (engine.runner.config.max_num_seqs, engine.scheduler.config.max_num_batched_tokens) == (3, 40)

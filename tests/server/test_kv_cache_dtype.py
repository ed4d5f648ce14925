"""kv_cache_dtype fp8: float8 e4m3 keys and values (vLLM's --kv-cache-dtype fp8): the cache holds exactly the
rounded values a model-dtype cache would hold, the memory budget holds proportionally more blocks, and bad values or
GPUs without float8 are refused before anything loads."""

from __future__ import annotations

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 256, 300, 12, 64]


def _engine(model_dir: str, **overrides) -> Engine:
    device = overrides.get("device", "cpu")
    return Engine(EngineConfig(**({"model": model_dir, "device": device, "dtype": "float32",
                                   "block_size": 4 if device == "cpu" else 16, "max_num_batched_tokens": 32}
                                  | overrides)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_fp8_cache_holds_the_rounded_values_of_the_model_dtype_cache(tiny_llama, device):
    """On CUDA the fp8 cache is written by the Triton write_kv (its own rounding), the other by torch's cast."""
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 e4m3 needs compute capability 8.9+")
    caches = {}
    for kv in ("auto", "fp8"):
        engine = _engine(tiny_llama, device=device, num_kv_blocks=16, kv_cache_dtype=kv, enable_prefix_caching=False,
                         cuda_graphs="off")
        engine.generate_batch([Request("r", PROMPT, SamplingParams(max_tokens=1, temperature=0.0))])
        caches[kv] = engine.runner.kv_caches[0]  # layer 0: its keys and values do not depend on earlier attention
    assert caches["fp8"][0].dtype == torch.float8_e4m3fn
    for wide, narrow in zip(caches["auto"], caches["fp8"]):
        assert wide.abs().sum() > 0
        rounded = wide.clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(narrow.view(torch.uint8), rounded.view(torch.uint8))


def test_the_memory_budget_holds_more_fp8_blocks(tiny_llama):
    wide = _engine(tiny_llama, kv_cache_memory_gb=0.01)
    narrow = _engine(tiny_llama, kv_cache_memory_gb=0.01, kv_cache_dtype="fp8")
    model = wide.runner.model
    assert model.kv_cache_bytes_per_block(4, torch.float8_e4m3fn) * 4 == model.kv_cache_bytes_per_block(4)
    per_block = model.kv_cache_bytes_per_block(4)
    budget = int(0.01 * (1 << 30))
    assert wide.runner.config.num_kv_blocks == budget // per_block
    assert narrow.runner.config.num_kv_blocks == budget // (per_block // 4)  # an fp32 model: a quarter of the bytes
    assert narrow.runner.kv_cache_bytes() <= budget and narrow.runner.kv_cache_bytes() > budget - per_block // 4


def test_bad_values_and_gpus_without_float8_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be auto or fp8 \(fp8_e4m3\), got 'int8'"):
        Engine(EngineConfig(model="/no/such/model", device="cpu", kv_cache_dtype="int8"))  # before the model loads
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"compute capability 8.9 or newer .*A100-SXM4-80GB has 8.0: use "
                                         r"kv_cache_dtype auto"):
        EngineConfig(model="m", kv_cache_dtype="fp8").kv_dtype("cuda", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert EngineConfig(model="m", kv_cache_dtype="fp8").kv_dtype("cuda:0", torch.bfloat16) == torch.float8_e4m3fn
    assert EngineConfig(model="m").kv_dtype("cuda", torch.bfloat16) == torch.bfloat16

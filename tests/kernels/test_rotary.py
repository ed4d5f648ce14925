"""Triton rotary against the plain-torch oracle, bit for bit: GQA head counts, unsorted positions, q and
k as strided views of a fused qkv output. On CPU the kernel runs in Triton's interpreter
(tests/kernels/conftest.py); the `gpu` cases use Llama-3-8B heads, bf16 and a CUDA-graph replay."""

import os

import pytest
import torch

from tessera_kernels.rotary import reference, rotary
from tessera_kernels.rotary import triton as backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tables(max_positions: int, head_dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [max_positions, head_dim] tables whose two halves differ (general: not only cat(f, f))."""
    angles = torch.rand(max_positions, head_dim, generator=gen) * 6.3  # [max_positions, head_dim]
    return angles.cos().to(DEVICE), (angles.sin() * 1.1).to(DEVICE)


def _case(num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """qkv [tokens, (heads + 2 kv_heads) * head_dim] with q and k as views, unsorted positions, tables."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 3).to(DEVICE, dtype)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    positions = torch.randint(0, 300, (num_tokens,), generator=gen).to(DEVICE)
    cos, sin = _tables(300, head_dim, gen)
    return qkv, q, k, positions, cos, sin


def _check(num_tokens, heads, kv_heads, head_dim, dtype, seed=0):
    qkv, q, k, positions, cos, sin = _case(num_tokens, heads, kv_heads, head_dim, dtype, seed)
    expected = qkv.clone()
    q_ref = expected[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k_ref = expected[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    reference.rotary(q_ref, k_ref, positions, cos, sin)
    before = qkv.clone()
    backend.rotary(q, k, positions, cos, sin)
    assert not torch.equal(qkv, before), "the kernel left q and k unchanged"
    assert torch.equal(qkv, expected), f"max diff {(qkv.float() - expected.float()).abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (8, 1)], ids=lambda h: f"h{h[0]}-kv{h[1]}")
@pytest.mark.parametrize("head_dim", [16, 34])
def test_rotary_matches_reference_bitwise(dtype, num_tokens, heads, head_dim):
    _check(num_tokens, *heads, head_dim, dtype, seed=num_tokens + head_dim)


def test_int32_positions_and_rope_tables():
    """Default RoPE tables (cat(freqs, freqs), theta 10000, as RotaryEmbedding builds them), int32 positions."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float) / 32))  # [16]
    freqs = torch.outer(torch.arange(512, dtype=torch.float), inv_freq)  # [512, 16]
    emb = torch.cat((freqs, freqs), dim=-1)  # [512, 32]
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(11, 8 * 32, generator=gen).to(DEVICE, torch.float16)
    q, k = qkv[:, :128].view(11, 4, 32), qkv[:, 128:192].view(11, 2, 32)
    positions = torch.randperm(512, generator=gen)[:11].int().to(DEVICE)
    expected_q, expected_k = q.clone(), k.clone()
    reference.rotary(expected_q, expected_k, positions, cos, sin)
    backend.rotary(q, k, positions, cos, sin)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)


def test_bad_inputs_are_named():
    _, q, k, positions, cos, sin = _case(5, 4, 2, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="must be \\[num_tokens, heads, head_dim\\] alike"):
        rotary(q, k[:, :, :8], positions, cos, sin)
    with pytest.raises(ValueError, match="must be even"):
        rotary(q[..., :15], k[..., :15], positions, cos[:, :15], sin[:, :15])
    with pytest.raises(ValueError, match="positions must be int32/int64 \\[5\\]"):
        rotary(q, k, positions.float(), cos, sin)
    with pytest.raises(ValueError, match="must be \\[max_positions, 16\\]"):
        rotary(q, k, positions, cos[:, :8], sin[:, :8])
    with pytest.raises(ValueError, match="must share a dtype"):
        rotary(q, k.double(), positions, cos, sin)


def test_interpreter_runs_on_cpu():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert type(backend._rotary_kernel).__name__ == "InterpretedFunction"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 2048])
@pytest.mark.parametrize("heads", [(32, 8), (40, 8), (28, 4)], ids=lambda h: f"h{h[0]}-kv{h[1]}")
def test_rotary_matches_reference_gpu(dtype, num_tokens, heads):
    _check(num_tokens, *heads, 128, dtype, seed=num_tokens)


@pytest.mark.gpu
def test_rotary_cuda_graph_replays_new_positions():
    qkv, q, k, positions, cos, sin = _case(64, 32, 8, 128, torch.bfloat16, seed=2)
    source = qkv.clone()
    backend.rotary(q, k, positions, cos, sin)  # warm up: compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.rotary(q, k, positions, cos, sin)
    for seed in (3, 4):
        gen = torch.Generator().manual_seed(seed)
        positions.copy_(torch.randint(0, 300, (64,), generator=gen))
        qkv.copy_(source)
        graph.replay()
        expected = source.clone()
        reference.rotary(expected[:, :4096].view(64, 32, 128), expected[:, 4096:5120].view(64, 8, 128),
                         positions, cos, sin)
        assert torch.equal(qkv, expected)

"""Triton rms_norm against the plain-torch oracle: odd widths, 1-64 tokens, with and without residual,
strided per-head views (Qwen3's q/k norm). On CPU the kernel runs in Triton's interpreter
(tests/kernels/conftest.py); the `gpu` cases use Llama-3-8B widths, bf16 and a CUDA-graph replay."""

import os

import pytest
import torch

from tessera_kernels.rms_norm import reference, rms_norm
from tessera_kernels.rms_norm import triton as backend
from tests.kernels.tolerances import assert_elementwise_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(num_tokens: int, width: int, dtype: torch.dtype, seed: int):
    """x and residual with row scales spread over two decades, and a weight around 1 (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(num_tokens, 1, generator=gen))  # [num_tokens, 1]
    x = torch.randn(num_tokens, width, generator=gen) * scales  # [num_tokens, width]
    residual = torch.randn(num_tokens, width, generator=gen) * 2.0
    weight = torch.rand(width, generator=gen) + 0.5  # [width]
    return tuple(t.to(DEVICE, dtype) for t in (x, residual, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("width", [33, 128, 257])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(dtype, num_tokens, width, with_residual):
    x, residual, weight = _inputs(num_tokens, width, dtype, seed=num_tokens * 1000 + width)
    if not with_residual:
        assert_elementwise_close(backend.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
        return
    out, summed = backend.rms_norm(x, weight, 1e-5, residual)
    expected_out, expected_sum = reference.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(summed, expected_sum), "x + residual must round exactly as torch's add"
    assert_elementwise_close(out, expected_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_head_norm_of_a_fused_projection_view(dtype):
    """q and k as strided [tokens, heads, head_dim] views of a qkv output, as Qwen3's q/k norm sees them."""
    heads, kv_heads, head_dim, num_tokens = 4, 2, 32, 9
    qkv, _, weight = _inputs(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype, seed=3)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    for view in (q, k):
        assert not view.is_contiguous()
        w = weight[:head_dim].contiguous()
        assert_elementwise_close(backend.rms_norm(view, w, 1e-6), reference.rms_norm(view, w, 1e-6))


def test_residual_may_be_a_strided_view():
    x, residual, weight = _inputs(5, 40, torch.float32, seed=9)
    wide = torch.cat([residual, residual], dim=1)  # [5, 80]
    out, summed = backend.rms_norm(x, weight, 1e-6, wide[:, 40:])
    expected_out, expected_sum = reference.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(summed, expected_sum)
    assert_elementwise_close(out, expected_out)


def test_bad_inputs_are_named():
    x, residual, weight = _inputs(3, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"weight has shape \[8\]"):
        rms_norm(x, weight[:8], 1e-6)
    with pytest.raises(ValueError, match="must share a dtype"):
        rms_norm(x, weight.double(), 1e-6)
    with pytest.raises(ValueError, match=r"residual \[3, 15\]"):
        rms_norm(x, weight, 1e-6, residual[:, :15])
    with pytest.raises(ValueError, match="2 or 3 dims"):
        rms_norm(x[None, None], weight, 1e-6)


def test_interpreter_runs_on_cpu():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert type(backend._rms_norm_kernel).__name__ == "InterpretedFunction"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 2048])
@pytest.mark.parametrize("width", [4096, 5120, 257])
def test_rms_norm_matches_reference_gpu(dtype, num_tokens, width):
    x, residual, weight = _inputs(num_tokens, width, dtype, seed=num_tokens + width)
    assert_elementwise_close(rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5))
    out, summed = rms_norm(x, weight, 1e-5, residual)
    expected_out, expected_sum = reference.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(summed, expected_sum)
    assert_elementwise_close(out, expected_out)


@pytest.mark.gpu
def test_rms_norm_cuda_graph_replays_new_inputs():
    x, residual, weight = _inputs(64, 4096, torch.bfloat16, seed=5)
    rms_norm(x, weight, 1e-5, residual)  # warm up: compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, summed = rms_norm(x, weight, 1e-5, residual)
    for seed in (6, 7):
        new_x, new_residual, _ = _inputs(64, 4096, torch.bfloat16, seed=seed)
        x.copy_(new_x)
        residual.copy_(new_residual)
        graph.replay()
        expected_out, expected_sum = reference.rms_norm(x, weight, 1e-5, residual)
        assert torch.equal(summed, expected_sum)
        assert_elementwise_close(out, expected_out)

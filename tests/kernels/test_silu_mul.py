"""Triton silu_mul against the plain-torch oracle (`F.silu(gate) * up`): odd widths, 1-64 tokens, a
strided gate_up. On CPU the kernel runs in Triton's interpreter (tests/kernels/conftest.py); the `gpu`
cases use Llama-3-8B's intermediate width, bf16 and a CUDA-graph replay."""

import os

import pytest
import torch

from tessera_kernels.silu_mul import reference, silu_mul
from tessera_kernels.silu_mul import triton as backend
from tests.kernels.tolerances import assert_elementwise_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gate_up(num_tokens: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[num_tokens, 2 * width], gates spread over the range where silu bends and saturates."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, 2 * width, generator=gen) * 4).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("width", [33, 257, 1500])
def test_silu_mul_matches_reference(dtype, num_tokens, width):
    gate_up = _gate_up(num_tokens, width, dtype, seed=num_tokens * 7 + width)
    out = backend.silu_mul(gate_up)
    assert out.is_contiguous()
    assert_elementwise_close(out, reference.silu_mul(gate_up))


def test_strided_gate_up():
    """gate_up as a column slice of a wider buffer (row stride larger than 2 I)."""
    wide = _gate_up(6, 50, torch.float16, seed=2)  # [6, 100]
    gate_up = wide[:, :90]
    assert gate_up.stride(0) == 100
    assert_elementwise_close(backend.silu_mul(gate_up), reference.silu_mul(gate_up))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"gate_up \[num_tokens, 2 \* intermediate\], got \[4, 7\]"):
        silu_mul(torch.ones(4, 7, device=DEVICE))
    with pytest.raises(ValueError, match=r"got \[8\]"):
        silu_mul(torch.ones(8, device=DEVICE))


def test_interpreter_runs_on_cpu():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert type(backend._silu_mul_kernel).__name__ == "InterpretedFunction"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 2048])
@pytest.mark.parametrize("width", [14336, 11008, 257])
def test_silu_mul_matches_reference_gpu(dtype, num_tokens, width):
    gate_up = _gate_up(num_tokens, width, dtype, seed=num_tokens + width)
    assert_elementwise_close(silu_mul(gate_up), reference.silu_mul(gate_up))


@pytest.mark.gpu
def test_silu_mul_cuda_graph_replays_new_inputs():
    gate_up = _gate_up(64, 14336, torch.bfloat16, seed=1)
    silu_mul(gate_up)  # warm up: compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = silu_mul(gate_up)
    for seed in (2, 3):
        gate_up.copy_(_gate_up(64, 14336, torch.bfloat16, seed=seed))
        graph.replay()
        assert_elementwise_close(out, reference.silu_mul(gate_up))

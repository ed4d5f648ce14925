"""Triton silu_mul: gate and up read once, out written once (see the contract).

Grid (num_tokens, cdiv(I, BLOCK_N)). Per token in bf16: 4 I bytes read, 2 I written, where eager torch
writes silu(gate) and reads it back for the product (10 I bytes, two launches).

silu is computed in fp32 and rounded to the input dtype, then the product is formed in fp32 (exact for
fp16/bf16 factors) and rounded once: the rounding points of `F.silu(gate) * up`. Only exp (Triton's
fast exp2-based one) and the division can differ from torch's silu, by fp32 noise before the cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["silu_mul"]


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, width, stride_t, BLOCK_N: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < width
    row = gate_up_ptr + token * stride_t
    gate = tl.load(row + cols, mask=mask, other=0.0)  # [BLOCK_N]
    up = tl.load(row + width + cols, mask=mask, other=0.0)
    dtype = gate.dtype
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype)
    out = (act.to(tl.float32) * up.to(tl.float32)).to(dtype)
    tl.store(out_ptr + token * width + cols, out, mask=mask)


def _block_size(width: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps).

    NOTE: not timed on a GPU yet (no device in the session that wrote this); benchmarks/kernels/
    bench_fused.py measures it against eager torch and the copy floor.
    """
    block_n = min(1024, triton.next_power_of_2(width))
    return block_n, max(1, min(4, block_n // 256))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """One launch; the output has a static shape."""
    if gate_up.stride(1) != 1:
        raise ValueError("silu_mul needs gate_up's last dim contiguous")
    num_tokens, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, width, dtype=gate_up.dtype, device=gate_up.device)  # [num_tokens, I]
    if num_tokens == 0 or width == 0:
        return out
    block_n, num_warps = _block_size(width)
    _silu_mul_kernel[(num_tokens, triton.cdiv(width, block_n))](
        gate_up, out, width, gate_up.stride(0), BLOCK_N=block_n, num_warps=num_warps,
    )
    return out

"""Triton rotary: q and k of a step rotated in place by one launch (see the contract).

Grid (num_tokens, q head blocks + k head blocks): a program loads its token's cos/sin row once and
rotates BLOCK_H heads of q or of k. Per token in bf16 that is (Hq + Hk) * D * 2 bytes read and written
once plus the table row, where eager torch (RotaryEmbedding.forward before this op) also gathers and
casts the table rows and writes the negated half, the rotated copy, two products and their sum: about
5 times the bytes, in 7 launches per tensor.

Each half-product x * c and rotate_half(x) * s is formed in fp32 (exact for fp16/bf16 factors) and
rounded to x's dtype, then their sum is formed in fp32 and rounded once (the correctly rounded sum):
the three roundings of eager torch, bit for bit. The kernel compiles with fp-fusion off, so for fp32
inputs the compiler does not contract x * c + r * s into an FMA that eager torch does not use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rotary"]


@triton.jit
def _rotate_heads(x_ptr, cos_row, sin_row, token, head0, num_heads, stride_t, stride_h, half,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate heads head0 .. head0 + BLOCK_H of one token in place."""
    heads = head0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < half
    mask = (heads < num_heads)[:, None] & col_mask[None, :]
    first = x_ptr + token * stride_t + heads.to(tl.int64)[:, None] * stride_h + cols[None, :]  # [BLOCK_H, BLOCK_D]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + half, mask=mask, other=0.0)
    dtype = x1.dtype
    c1 = tl.load(cos_row + cols, mask=col_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    c2 = tl.load(cos_row + half + cols, mask=col_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    s1 = tl.load(sin_row + cols, mask=col_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    s2 = tl.load(sin_row + half + cols, mask=col_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    out1 = (a1 * c1).to(dtype).to(tl.float32) - (a2 * s1).to(dtype).to(tl.float32)
    out2 = (a2 * c2).to(dtype).to(tl.float32) + (a1 * s2).to(dtype).to(tl.float32)
    tl.store(first, out1.to(dtype), mask=mask)
    tl.store(first + half, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    num_q_heads, num_k_heads, stride_qt, stride_qh, stride_kt, stride_kh, head_dim,
    Q_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    position = tl.load(pos_ptr + token).to(tl.int64)
    cos_row = cos_ptr + position * head_dim
    sin_row = sin_ptr + position * head_dim
    half = head_dim // 2
    if block < Q_BLOCKS:
        _rotate_heads(q_ptr, cos_row, sin_row, token, block * BLOCK_H, num_q_heads, stride_qt, stride_qh, half,
                      BLOCK_H, BLOCK_D)
    else:
        _rotate_heads(k_ptr, cos_row, sin_row, token, (block - Q_BLOCKS) * BLOCK_H, num_k_heads, stride_kt,
                      stride_kh, half, BLOCK_H, BLOCK_D)


def _block_sizes(num_heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps): about 2K element pairs per program.

    NOTE: not timed on a GPU yet (no device in the session that wrote this); benchmarks/kernels/
    bench_fused.py measures it against eager torch and the copy floor.
    """
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 2048 // block_d))
    return block_h, block_d, min(8, max(1, block_h * block_d // 256))


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """One launch for q and k, in place; the grid depends on static shapes only."""
    if q.stride(2) != 1 or k.stride(2) != 1 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("rotary needs the last dim of q and k, and the cos/sin tables, contiguous")
    num_tokens, head_dim = q.shape[0], q.shape[2]
    if num_tokens == 0:
        return
    block_h, block_d, num_warps = _block_sizes(max(q.shape[1], k.shape[1]), head_dim // 2)
    q_blocks, k_blocks = triton.cdiv(q.shape[1], block_h), triton.cdiv(k.shape[1], block_h)
    _rotary_kernel[(num_tokens, q_blocks + k_blocks)](
        q, k, positions, cos, sin,
        q.shape[1], k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), head_dim,
        Q_BLOCKS=q_blocks, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
        enable_fp_fusion=False,
    )

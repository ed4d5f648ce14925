"""Triton rms_norm: one pass over a tile of rows, the optional residual add fused in (see the contract).

Per row of width N in bf16: without residual, x read and out written once (4 N bytes; the weight
stays in L2) where eager torch makes six passes with fp32 temporaries (cast, square, mean, scale, cast
back, times weight: about 36 N bytes); with residual, x and residual read, s and out written (8 N
bytes) where eager adds 6 N for `s = x + r`. A program owns BLOCK_M whole rows (BLOCK_N >= width, one
load each), so the sum of squares never leaves registers; narrow rows (Qwen3's per-head norm, 128
wide) share a program so that each program still moves a few KB.

Rounding follows HF exactly: s is rounded to x's dtype once (the fp32 sum of two fp16/bf16 values,
cast to their dtype, is their correctly rounded sum: fp32 has at least 2p + 2 bits of their p), the
normalised row is rounded to x's dtype once, and the product by weight is formed in fp32 (exact for
two fp16/bf16 factors) and rounded once. Only the sum of squares (another summation order) and rsqrt
(libdevice's; torch's CUDA kernel calls CUDA's rsqrtf) can differ from torch: fp32 rounding noise
before the single cast, which flips a rare element by one ulp of x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm"]


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    num_rows, width, heads, stride_xt, stride_xh, stride_rt, stride_rh, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid (cdiv(rows, BLOCK_M),). Row r is (token r // heads, head r % heads) of a strided view.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < width)[None, :]
    token, head = (rows // heads).to(tl.int64), (rows % heads).to(tl.int64)
    x = tl.load(x_ptr + (token * stride_xt + head * stride_xh)[:, None] + cols[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    out_offs = rows.to(tl.int64)[:, None] * width + cols[None, :]  # out and s are contiguous
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + (token * stride_rt + head * stride_rh)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)  # [BLOCK_M, BLOCK_N], x's dtype
        tl.store(sum_ptr + out_offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / width + eps)  # [BLOCK_M] fp32
    normed = (xf * rstd[:, None]).to(dtype)
    w = tl.load(w_ptr + cols, mask=cols < width, other=0.0)
    out = (w.to(tl.float32)[None, :] * normed.to(tl.float32)).to(dtype)
    tl.store(out_ptr + out_offs, out, mask=mask)


def _layout(t: torch.Tensor) -> tuple[int, int, int]:
    """(heads, token stride, head stride) of a [rows, width] or [tokens, heads, width] view."""
    if t.dim() == 2:
        return 1, t.stride(0), 0
    return t.shape[1], t.stride(0), t.stride(1)


def _block_sizes(width: int, num_rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, about 4K elements per program.

    NOTE: not timed on a GPU yet (no device in the session that wrote this); benchmarks/kernels/
    bench_fused.py measures it against eager torch and the copy floor.
    """
    block_n = triton.next_power_of_2(width)
    block_m = min(max(1, 4096 // block_n), triton.next_power_of_2(num_rows))
    num_warps = min(16, max(1, block_m * block_n // 512))
    return block_m, block_n, num_warps


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One launch; outputs allocated with x's static shape (see the contract)."""
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1) or not weight.is_contiguous():
        raise ValueError("rms_norm needs the last dim of x and residual, and weight, contiguous")
    width = x.shape[-1]
    num_rows = x.numel() // width if width else 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # x's shape, contiguous
    summed = torch.empty_like(out) if residual is not None else out
    if num_rows == 0:
        return out if residual is None else (out, summed)
    heads, stride_xt, stride_xh = _layout(x)
    _, stride_rt, stride_rh = _layout(residual) if residual is not None else (1, 0, 0)
    block_m, block_n, num_warps = _block_sizes(width, num_rows)
    _rms_norm_kernel[(triton.cdiv(num_rows, block_m),)](
        x, residual if residual is not None else x, weight, out, summed,
        num_rows, width, heads, stride_xt, stride_xh, stride_rt, stride_rh, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out if residual is None else (out, summed)

"""rms_norm: the root-mean-square norm of every row, optionally after adding the residual stream.

Semantics:
    Without residual, for every row x_r of x (the last dim):

        out_r = weight * (xf_r * rsqrt(mean(xf_r ** 2) + eps)).to(x.dtype)        xf_r = x_r.float()

    the rounding points of Hugging Face's LlamaRMSNorm: mean of squares, rsqrt and the product in fp32,
    one cast to x's dtype, then the product by weight in x's dtype.
    With residual, first s = x + residual in x's dtype (HF's `hidden = residual + hidden`), and the op
    returns (rms_norm(s), s): the next layer receives its residual stream without another pass over it.
    Rows may be any width (odd ones too). A [tokens, heads, head_dim] view normalises every head on its
    own (Qwen3's q/k norm).

Shape:
    x:        [rows, width] or [tokens, heads, width]; last dim contiguous, other strides free (a view of
              a fused projection's output is fine)
    residual: x's shape and dtype (any strides of the same kind)
    weight:   [width], x's dtype
    out, s:   new contiguous tensors of x's shape and dtype (static shapes: CUDA-graph safe)
"""

from __future__ import annotations

import torch

from tessera_kernels import use_triton

__all__ = ["rms_norm"]


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    """Shape and dtype checks on host metadata only (no device sync)."""
    if x.dim() not in (2, 3):
        raise ValueError(
            f"rms_norm takes x of 2 or 3 dims ([rows, width] or [tokens, heads, width]), got {list(x.shape)}"
        )
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight has shape {list(weight.shape)}, rows of x have width {x.shape[-1]}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight is {weight.dtype}, x is {x.dtype}: they must share a dtype")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {list(residual.shape)} {residual.dtype} does not match x {list(x.shape)} {x.dtype}"
        )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`out`, or `(out, s)` with a residual (see the module docstring)."""
    _check(x, weight, residual)
    if use_triton(x):
        from tessera_kernels.rms_norm import triton as backend
    else:
        from tessera_kernels.rms_norm import reference as backend
    return backend.rms_norm(x, weight, eps, residual)

"""Plain-torch rms_norm: the oracle for the Triton kernel and the CPU path (HF LlamaRMSNorm's ops)."""

from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Norm of every row in fp32, cast once to x's dtype, times weight; with a residual, of x + residual."""
    summed = x if residual is None else x + residual  # x's dtype, one rounding
    xf = summed.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if residual is None else (out, summed)

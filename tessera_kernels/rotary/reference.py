"""Plain-torch rotary: the oracle for the Triton kernel and the CPU path (RotaryEmbedding's own ops)."""

from __future__ import annotations

import torch


def _rotated(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    c = cos[positions].to(x.dtype)[:, None, :]  # [num_tokens, 1, head_dim]
    s = sin[positions].to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [num_tokens, heads, head_dim]
    return x * c + rotated * s


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q and k in place, each product and the sum rounded to their dtype."""
    q.copy_(_rotated(q, positions, cos, sin))
    k.copy_(_rotated(k, positions, cos, sin))

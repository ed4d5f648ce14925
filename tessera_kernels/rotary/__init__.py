"""rotary: rotate the queries and keys of a step in place by each token's position (RoPE, rotate-half).

Semantics:
    For every token t, head h of q (and of k), with p = positions[t], d = head_dim, c = cos[p] and
    s = sin[p] cast to x's dtype:

        x[t, h] <- x[t, h] * c + rotate_half(x[t, h]) * s      rotate_half(v) = cat(-v[d/2:], v[:d/2])

    each product and the sum rounded to x's dtype, exactly as eager torch evaluates that line (the
    rounding points of RotaryEmbedding.forward and of HF's apply_rotary_pos_emb). q and k may have
    different head counts (GQA); both are rotated by one call. Nothing is allocated.

Shape:
    q:          [num_tokens, num_heads, head_dim]      fp16 / bf16 / fp32, head_dim even, updated in place
    k:          [num_tokens, num_kv_heads, head_dim]   q's dtype, updated in place
    positions:  int32 / int64 [num_tokens], each < max_positions (not checked: no device sync)
    cos, sin:   fp32 [max_positions, head_dim]
    q and k may be views of a fused projection's output: last dim contiguous, other strides free.
"""

from __future__ import annotations

import torch

from tessera_kernels import use_triton

__all__ = ["rotary"]


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Shape and dtype checks on host metadata only (no device sync)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} must be [num_tokens, heads, head_dim] alike")
    if q.dtype != k.dtype:
        raise ValueError(f"q is {q.dtype}, k is {k.dtype}: they must share a dtype")
    head_dim = q.shape[2]
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for the rotate-half convention")
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [{q.shape[0]}], got {positions.dtype} {list(positions.shape)}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
        raise ValueError(f"cos {list(cos.shape)} and sin {list(sin.shape)} must be [max_positions, {head_dim}]")


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q and k in place (see the module docstring)."""
    _check(q, k, positions, cos, sin)
    if use_triton(q):
        from tessera_kernels.rotary import triton as backend
    else:
        from tessera_kernels.rotary import reference as backend
    backend.rotary(q, k, positions, cos, sin)

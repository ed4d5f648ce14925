"""fused_moe: the sparse mixture-of-experts SwiGLU MLP of Mixtral and Qwen3-MoE, over each token's routed experts.

Semantics:
    Routing (`route`), for every token t, from the router's logits (x @ router_weight.T in x's dtype):

        p = softmax(logits[t]) in fp32
        ids[t] = the top_k experts by p (torch.topk's order and ties), weights[t] = p[ids[t]]
        weights[t] /= sum(weights[t])                 only when renormalize (Mixtral; Qwen3-MoE's norm_topk_prob)

    Experts (`fused_moe`), for every token t, with W1[e] and W3[e] the gate and up halves of w13[e]:

        y[t] = sum_{j < top_k} weights[t, j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t])),   e = ids[t, j]

    Both projections accumulate in fp32. The activation silu(g) * u is computed in fp32 and rounded once to x's
    dtype, the input the down projection reads (as an eager half-precision MLP has it, up to that MLP's extra
    rounding of g and u). The weighted sum over the top_k experts is fp32, rounded once to x's dtype.
    transformers applies the same function expert by expert, rounding each expert's weighted output before
    adding it; the two agree to fp32 rounding in fp32, to a few half-precision ulps otherwise.

Shape:
    x:       [num_tokens, hidden]                    fp16 / bf16 (fp32 on CPU); rows contiguous
    w13:     [num_experts, 2 * inter, hidden]        x's dtype (gate rows first, then up: transformers' gate_up_proj)
    w2:      [num_experts, hidden, inter]            x's dtype (transformers' down_proj)
    weights: [num_tokens, top_k] fp32                ids: [num_tokens, top_k] int64, each in [0, num_experts)
    out:     [num_tokens, hidden]                    new contiguous tensor, x's dtype (static shapes, no host
                                                     sync on the Triton path: CUDA-graph safe)
"""

from __future__ import annotations

import torch

from tessera_kernels import use_triton

__all__ = ["fused_moe", "route"]


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [num_tokens, top_k], ids int64 [num_tokens, top_k]) from the router's logits [num_tokens,
    num_experts] (see the module docstring). Plain torch on every device: no host sync."""
    if logits.dim() != 2 or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"route takes logits [num_tokens, num_experts] and 1 <= top_k <= num_experts, got "
                         f"{list(logits.shape)} and top_k {top_k}")
    probs = torch.softmax(logits.float(), dim=-1)  # [num_tokens, num_experts]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # each [num_tokens, top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"fused_moe takes x [num_tokens, hidden], w13 [experts, 2 * inter, hidden] and w2 [experts, "
                         f"hidden, inter], got {list(x.shape)}, {list(w13.shape)} and {list(w2.shape)}")
    experts, double_inter, hidden = w13.shape
    if (hidden != x.shape[1] or double_inter % 2 or tuple(w2.shape) != (experts, hidden, double_inter // 2)):
        raise ValueError(f"fused_moe: shapes disagree: x {list(x.shape)}, w13 {list(w13.shape)}, w2 {list(w2.shape)}")
    if weights.shape != ids.shape or weights.dim() != 2 or weights.shape[0] != x.shape[0]:
        raise ValueError(f"fused_moe takes weights and ids [num_tokens, top_k] for {x.shape[0]} tokens, got "
                         f"{list(weights.shape)} and {list(ids.shape)}")
    if weights.dtype != torch.float32 or ids.dtype != torch.int64:
        raise ValueError(f"fused_moe takes fp32 weights and int64 ids, got {weights.dtype} and {ids.dtype}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"fused_moe: expert weights must have x's dtype {x.dtype}, got {w13.dtype} and {w2.dtype}")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """The routed experts' weighted SwiGLU outputs [num_tokens, hidden] (see the module docstring)."""
    _check(x, w13, w2, weights, ids)
    if use_triton(x):
        from tessera_kernels.fused_moe import triton as backend
    else:
        from tessera_kernels.fused_moe import reference as backend
    return backend.fused_moe(x, w13, w2, weights, ids)

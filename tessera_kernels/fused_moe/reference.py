"""Plain-torch fused_moe: the oracle for the Triton kernels and the CPU path. Expert by expert over the tokens
routed to it, as transformers' own loop, but with the contract's fp32 accumulation (one host sync: the tokens
per expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    num_experts, top_k = w13.shape[0], ids.shape[1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [num_tokens, hidden]
    flat = ids.flatten()  # [num_tokens * top_k]: pair p is token p // top_k's j = p % top_k
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        tokens = pairs // top_k
        gate_up = x[tokens].float() @ w13[expert].float().T  # [count, 2 * inter]
        gate, up = gate_up.chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(x.dtype)  # [count, inter], the down projection's input
        down = act.float() @ w2[expert].float().T  # [count, hidden]
        out.index_add_(0, tokens, down * weights.flatten()[pairs, None])
    return out.to(x.dtype)

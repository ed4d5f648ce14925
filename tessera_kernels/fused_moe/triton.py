"""Triton fused_moe: two grouped GEMMs over (token, expert) pairs sorted by expert (see the contract).

Pair p = t * top_k + j is token t's j-th routed expert. `align` sorts the pairs by expert on the device and pads
every expert's run to a multiple of BLOCK_M, so each row block belongs to one expert: a program reads that
expert's weights once for BLOCK_M pairs (for a prefill, many tokens share an expert's block; in a decode step
most experts see one or two tokens, and the weights are the bytes that must move either way). The padding has a
static upper bound, pairs + min(experts, pairs) * (BLOCK_M - 1) rows, so every buffer and grid depends on the
token count only: no host sync, and a decode step is CUDA-graph capturable; blocks past the last expert's run
exit at once.

1. `_gate_up_kernel`, grid (row blocks, cdiv(I, BLOCK_N)): act[p] = silu(x[t] @ W1[e].T) * (x[t] @ W3[e].T),
   both products in fp32 from one pass over x's row, the activation rounded once to x's dtype.
2. `_down_kernel`, grid (row blocks, cdiv(hidden, BLOCK_N)): out_pairs[p] = weights[p] * (act[p] @ W2[e].T) in fp32.
Then y[t] = sum_j out_pairs[t * top_k + j] in fp32, rounded once (torch, one reduction).

NOTE: the block sizes are untuned (no GPU in the session that wrote this); a fused single-kernel variant and
tuned configs per shape are the next steps once benchmarks/kernels can time it on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["align", "fused_moe"]


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs [rows] int64, block_expert [rows / block_m] int64) for ids [num_tokens, top_k].

    sorted_pairs lists the pairs expert by expert (within an expert in pair order), each expert's run padded to a
    multiple of block_m with the sentinel num_pairs; block_expert[b] is the expert of rows [b * block_m, (b + 1)
    * block_m), num_experts for blocks past the last run. rows = num_pairs + min(num_experts, num_pairs) *
    (block_m - 1), rounded up to block_m: static in the token count. Device ops only, no host sync."""
    flat = ids.flatten()
    num_pairs, device = flat.numel(), flat.device
    rows = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    run_ends = torch.cumsum(padded, 0)  # [experts]
    order = torch.argsort(flat, stable=True)  # pairs by expert
    experts_sorted = flat[order]
    first = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    rank = torch.arange(num_pairs, device=device) - first[experts_sorted]
    sorted_pairs = torch.full((rows,), num_pairs, dtype=torch.int64, device=device)
    sorted_pairs[run_ends[experts_sorted] - padded[experts_sorted] + rank] = order
    block_starts = torch.arange(0, rows, block_m, device=device)
    block_expert = torch.searchsorted(run_ends, block_starts, right=True)  # num_experts past the end
    return sorted_pairs, block_expert


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, act_ptr, sorted_pairs_ptr, block_expert_ptr, num_experts, num_pairs, top_k,
                    hidden, inter, stride_xt, stride_we, stride_wn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    valid = pairs < num_pairs
    tokens = tl.where(valid, pairs // top_k, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # intermediate columns
    col_ok = cols < inter
    w_base = w13_ptr + expert.to(tl.int64) * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        xs = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :], mask=valid[:, None] & k_ok[None, :],
                     other=0.0)  # [BLOCK_M, BLOCK_K]
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        w_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None], mask=w_mask, other=0.0)
        acc_gate = tl.dot(xs, w_gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(xs, w_up, acc_up, input_precision=PRECISION)
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    out = act_ptr + pairs.to(tl.int64)[:, None] * inter + cols[None, :]
    tl.store(out, act.to(act_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(act_ptr, w2_ptr, weights_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, num_experts, num_pairs,
                 hidden, inter, stride_we, stride_wn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
    valid = pairs < num_pairs
    safe = tl.where(valid, pairs, 0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden columns
    col_ok = cols < hidden
    w_base = w2_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(act_ptr + safe[:, None] * inter + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    acc = acc * tl.load(weights_ptr + safe, mask=valid, other=0.0)[:, None]
    tl.store(out_ptr + safe[:, None] * hidden + cols[None, :], acc, mask=valid[:, None] & col_ok[None, :])


def _config(num_pairs: int, num_experts: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). A row block reads its expert's weights once, so the block should hold
    about as many pairs as an expert gets: 16 rows while experts average at most 16 pairs (decode over many experts:
    Qwen3-30B-A3B at 256 tokens averages 16), 64 above (prefills; Mixtral's 8 experts at 256 tokens average 64).
    Untuned (see the module NOTE)."""
    if num_pairs <= 16 * num_experts:
        return 16, 64, 64, 4
    return 64, 64, 32, 4


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """Two launches plus the device-side sort; static shapes throughout."""
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe needs x, w13 and w2 contiguous in their last dim")
    num_tokens, hidden = x.shape
    num_experts, inter, top_k = w13.shape[0], w13.shape[1] // 2, ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    block_m, block_n, block_k, num_warps = _config(num_pairs, num_experts)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays exact (the experts are the whole MLP)
    sorted_pairs, block_expert = align(ids, num_experts, block_m)
    blocks = block_expert.numel()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [pairs, inter]
    _gate_up_kernel[(blocks, triton.cdiv(inter, block_n))](
        x, w13, act, sorted_pairs, block_expert, num_experts, num_pairs, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, num_warps=num_warps,
    )
    out_pairs = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)  # [pairs, hidden]
    _down_kernel[(blocks, triton.cdiv(hidden, block_n))](
        act, w2, weights.contiguous(), out_pairs, sorted_pairs, block_expert, num_experts, num_pairs, hidden, inter,
        w2.stride(0), w2.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, num_warps=num_warps,
    )
    return out_pairs.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)

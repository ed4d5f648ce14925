"""Triton race_sample: the whole batch's draw in one launch (see the contract).

A program owns BLOCK_S whole rows (one for a Llama-3 row; small vocabularies pack several) and walks
them in blocks of BLOCK_V tokens: loads p (4 bytes a token), draws U from Philox keyed by the row's
seed with the token index as counter (`tl.randint`: ten rounds of 32-bit mulhi, no memory traffic, the
same bits whatever the tile), scores p / -log(U) (p itself on greedy rows) and keeps a per-lane running
maximum with its index (strict `>`, so within a lane the earliest index wins); one reduction at the end
picks the best lane, the lowest index among equal maxima. Traffic: S * V * 4 bytes read, 8 S written;
at S = 256, V = 128256 that is 131 MB, about 40 us at H100 bandwidth. The grid is static and nothing is
read back on the host, so the launch can sit in a CUDA graph and run ahead of the host.

It replaces a torch.Generator per row, reseeded per token: a handful of launches a row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["race_sample"]


@triton.jit
def _race_sample_kernel(
    probs_ptr, seeds_ptr, greedy_ptr, out_ptr, num_rows, vocab, stride_row,
    BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Grid (cdiv(S, BLOCK_S),): a program owns rows [pid * BLOCK_S, +BLOCK_S) of probs, whole.
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < num_rows
    seeds = tl.load(seeds_ptr + rows, mask=row_mask, other=0)[:, None]  # [BLOCK_S, 1] int64 Philox keys
    greedy = (tl.load(greedy_ptr + rows, mask=row_mask, other=1) != 0)[:, None]  # [BLOCK_S, 1]
    base = probs_ptr + rows.to(tl.int64)[:, None] * stride_row
    cols = tl.arange(0, BLOCK_V)[None, :]
    best = tl.full([BLOCK_S, BLOCK_V], float("-inf"), tl.float32)  # per-lane best score
    best_idx = tl.zeros([BLOCK_S, BLOCK_V], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        offs = tl.broadcast_to(start + cols, [BLOCK_S, BLOCK_V])  # token index = Philox counter
        mask = row_mask[:, None] & (offs < vocab)
        p = tl.load(base + offs, mask=mask, other=float("-inf"))  # [BLOCK_S, BLOCK_V] fp32
        bits = tl.randint(seeds, offs).to(tl.uint32, bitcast=True)  # elementwise in (seed, v)
        uniform = ((bits >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # (2k + 1) * 2**-24
        score = tl.where(greedy, p, p / -tl.log(uniform))  # masked lanes stay -inf
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, offs, best_idx)
    top = tl.max(best, axis=1)  # [BLOCK_S]
    winner = tl.min(tl.where(best == top[:, None], best_idx, vocab), axis=1)
    tl.store(out_ptr + rows, winner.to(tl.int64), mask=row_mask)


def _blocks(num_rows: int, vocab: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_V, num_warps): tiles of about 2K tokens; a Llama-3 row (128K) gets a program of its
    own, small vocabularies pack several rows into one program.

    NOTE: not tuned on a GPU by the session that wrote this; benchmarks/kernels/bench_sampling.py times it.
    """
    block_v = min(2048, triton.next_power_of_2(vocab))
    block_s = min(triton.next_power_of_2(num_rows), max(1, 2048 // block_v))
    return block_s, block_v, max(1, min(8, block_s * block_v // 256))


def race_sample(
    probs: torch.Tensor, seeds: torch.Tensor, greedy: torch.Tensor, blocks: tuple[int, int] | None = None
) -> torch.Tensor:
    """One launch over the batch. `blocks` = (BLOCK_S, BLOCK_V), powers of two, overrides the tile (tests
    use it to cross block boundaries on small vocabularies); a row's token never depends on the tile."""
    if probs.stride(1) != 1 or not seeds.is_contiguous() or not greedy.is_contiguous():
        raise ValueError("race_sample needs probs rows contiguous, and seeds and greedy contiguous")
    rows, vocab = probs.shape
    out = torch.empty(rows, dtype=torch.int64, device=probs.device)  # [S]
    if rows == 0:
        return out
    block_s, block_v, num_warps = _blocks(rows, vocab)
    if blocks is not None:
        if any(b < 1 or b & (b - 1) for b in blocks) or blocks[1] < 16:
            raise ValueError(f"blocks must be powers of two (BLOCK_S, BLOCK_V >= 16), got {blocks}")
        block_s, block_v = blocks
    _race_sample_kernel[(triton.cdiv(rows, block_s),)](
        probs, seeds, greedy.view(torch.uint8), out, rows, vocab, probs.stride(0),
        BLOCK_S=block_s, BLOCK_V=block_v, num_warps=num_warps,
    )
    return out

"""paged_attention: causal attention of a mixed batch over a paged KV cache.

Semantics:
    Sequence i contributes the query tokens q[cu_query_lens[i] : cu_query_lens[i + 1]]; they are the
    last n_i = cu_query_lens[i + 1] - cu_query_lens[i] positions of a context of seq_lens[i] tokens
    whose keys and values already sit in the cache (this step's included, see `write_kv`). Token
    position p of the context lives at block block_tables[i, p // block_size], offset p % block_size.
    A query at position p attends to context positions p' <= p (and p' > p - sliding_window when a
    window is set). Query head h reads KV head h // (num_heads // num_kv_heads) (GQA).
    Decode is n_i = 1; prefill and chunked prefill are n_i > 1 over a context that may hold earlier
    chunks. Rows past cu_query_lens[num_seqs] of the output are left untouched.

Shape:
    q:             [num_tokens, num_heads, head_dim]
    k_cache:       [num_blocks, block_size, num_kv_heads, head_dim]   (v_cache likewise)
    block_tables:  int32 [>= num_seqs, max_blocks_per_seq]
    seq_lens:      int32 [>= num_seqs]
    cu_query_lens: int32 [>= num_seqs + 1]
    out:           [num_tokens, num_heads, head_dim], same dtype as q; softmax in fp32

write_kv:
    k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: int64 [>= num_tokens], the flat cache
    index block * block_size + offset of every token (negative: skip, for padding rows).

KV cache dtype:
    The caches hold the model's dtype, or float8 e4m3 (torch.float8_e4m3fn: vLLM's --kv-cache-dtype fp8 without
    scales). Into an fp8 cache write_kv stores each value rounded to nearest e4m3, saturated at +-448; attention
    reads those values exactly (every e4m3 value is a bf16 and fp16 value) and computes as over a cache of q's
    dtype: the queries are never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera_kernels import use_triton

__all__ = ["AttentionMeta", "paged_attention", "write_kv"]


@dataclass
class AttentionMeta:
    """The slice of a step's batch metadata that attention reads."""

    block_tables: torch.Tensor
    """int32 [max_seqs, max_blocks_per_seq]."""
    seq_lens: torch.Tensor
    """int32 [max_seqs]: context length of each sequence after this step's tokens."""
    cu_query_lens: torch.Tensor
    """int32 [max_seqs + 1]: cumulative query tokens per sequence."""
    num_seqs: int
    """Live sequences in the step."""
    max_query_len: int
    """Largest n_i in the step (host value, for grid sizing)."""
    max_seq_len: int
    """Largest seq_lens[i] in the step (host value, for grid sizing)."""


def _backend(t: torch.Tensor):
    if use_triton(t):
        from tessera_kernels.paged_attention import triton as backend
    else:
        from tessera_kernels.paged_attention import reference as backend
    return backend


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys and values at their cache slots."""
    _backend(k).write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    sliding_window: int | None = None,
) -> None:
    """Write attention of every query token into `out` (see the module docstring)."""
    _backend(q).paged_attention(out, q, k_cache, v_cache, meta, scale, sliding_window)

"""Plain-torch paged attention: the oracle for the Triton kernels and the CPU path."""

from __future__ import annotations

import torch

from tessera_kernels.paged_attention import AttentionMeta


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k and v rows into the flattened caches; negative slots are padding and skipped."""
    num_tokens = k.shape[0]
    slots = slot_mapping[:num_tokens].long()
    keep = slots >= 0
    flat_k = k_cache.view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, kv_heads, head_dim]
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k[slots[keep]] = k[keep].to(k_cache.dtype)
    flat_v[slots[keep]] = v[keep].to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [nb, block_size, kv_heads, head_dim]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]  # [seq_len, kv_heads, head_dim]


def paged_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    sliding_window: int | None = None,
) -> None:
    """One sequence at a time: gather its context, mask causally (and by window), softmax in fp32."""
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[2]
    cu = meta.cu_query_lens[: meta.num_seqs + 1].tolist()
    seq_lens = meta.seq_lens[: meta.num_seqs].tolist()
    for i, seq_len in enumerate(seq_lens):
        start, end = cu[i], cu[i + 1]
        if end == start:
            continue
        keys = _gather_context(k_cache, meta.block_tables[i], seq_len).float()
        values = _gather_context(v_cache, meta.block_tables[i], seq_len).float()
        keys = keys.repeat_interleave(group, dim=1)  # [seq_len, heads, head_dim]
        values = values.repeat_interleave(group, dim=1)
        query = q[start:end].float()  # [n, heads, head_dim]
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]  # [n, 1]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]  # [1, seq_len]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = torch.einsum("qhd,khd->hqk", query, keys) * scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values).to(out.dtype)

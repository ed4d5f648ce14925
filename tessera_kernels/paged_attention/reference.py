"""Plain-torch paged attention: the oracle for the Triton kernels and the CPU path."""

from __future__ import annotations

import torch

from tessera_kernels.paged_attention import AttentionMeta

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


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
    if k_cache.dtype == torch.float8_e4m3fn:  # saturate: an overflowing cast to e4m3 gives NaN
        k, v = k.clamp(-FP8_MAX, FP8_MAX), v.clamp(-FP8_MAX, FP8_MAX)
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
    """Decode tokens (one query token per sequence) in batches, the other sequences one at a time; softmax in
    fp32. Both are plain masked softmax attention; the decode batches only save the CPU path a dozen small ops
    per sequence per layer (`attend_one` on its own gives the same numbers)."""
    cu = meta.cu_query_lens[: meta.num_seqs + 1].tolist()
    seq_lens = meta.seq_lens[: meta.num_seqs].tolist()
    decodes = []
    for i in range(meta.num_seqs):
        if cu[i + 1] - cu[i] > 1:
            attend_one(out, q, k_cache, v_cache, meta, scale, sliding_window, i)
        elif cu[i + 1] - cu[i] == 1:
            decodes.append(i)
    decodes.sort(key=seq_lens.__getitem__)  # batches of similar lengths pad less
    per_position = k_cache.shape[2] * k_cache.shape[3]
    batch: list[int] = []
    for i in decodes:
        if batch and (len(batch) + 1) * per_position * seq_lens[i] > _DECODE_BATCH_ELEMENTS:
            _attend_decodes(out, q, k_cache, v_cache, meta, scale, sliding_window, batch, cu, seq_lens)
            batch = []
        batch.append(i)
    if batch:
        _attend_decodes(out, q, k_cache, v_cache, meta, scale, sliding_window, batch, cu, seq_lens)


_DECODE_BATCH_ELEMENTS = 1 << 24
"""Gathered keys (in elements, fp32) one decode batch may hold: 64 MB, so a large model's long contexts go in
several batches instead of one allocation of gigabytes."""


def _attend_decodes(out, q, k_cache, v_cache, meta, scale, sliding_window, seqs, cu, seq_lens) -> None:
    """Sequences `seqs`, each with one query token (row cu[i] of q, context seq_lens[i]), in one batch."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    tokens, lens = [cu[i] for i in seqs], [seq_lens[i] for i in seqs]
    longest = max(lens)
    index = torch.tensor(seqs, device=q.device)
    tables = meta.block_tables[index, : -(-longest // block_size)].long().clamp(0, k_cache.shape[0] - 1)
    keys = k_cache[tables].flatten(1, 2)[:, :longest].float()  # [seqs, longest, kv_heads, head_dim]
    values = v_cache[tables].flatten(1, 2)[:, :longest].float()
    rows = torch.tensor(tokens, device=q.device)
    query = q[rows].float().unflatten(1, (kv_heads, -1))  # [seqs, kv_heads, group, head_dim]
    length = torch.tensor(lens, device=q.device)[:, None]
    position = torch.arange(longest, device=q.device)[None, :]
    allowed = position < length  # the query sits at position length - 1
    if sliding_window is not None:
        allowed &= position > length - 1 - sliding_window
    scores = torch.einsum("skgd,slkd->skgl", query, keys) * scale
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    attended = torch.einsum("skgl,slkd->skgd", torch.softmax(scores, dim=-1), values)
    out[rows] = attended.flatten(1, 2).to(out.dtype)


def attend_one(out, q, k_cache, v_cache, meta: AttentionMeta, scale: float, sliding_window: int | None,
               i: int) -> None:
    """Sequence i's query tokens: gather its context, mask causally (and by window), softmax in fp32."""
    group = q.shape[1] // k_cache.shape[2]
    start, end = int(meta.cu_query_lens[i]), int(meta.cu_query_lens[i + 1])
    seq_len = int(meta.seq_lens[i])
    if end == start:
        return
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

"""Triton paged attention: write_kv, a split-context decode kernel and a chunked-prefill kernel.

Both attention kernels give one program the query heads that share a KV head (GQA), stacked as rows
of one tile, so every K/V cache block is read once per (sequence, KV head, query tile) instead of once
per query head. Scores, the running max and the running sum stay in fp32 (online softmax, exp2).

    decode   grid (num_seqs, num_kv_heads x query tiles, num_splits): up to SPLIT_QUERIES query tokens per
             sequence (one for plain decode, a few more with speculative drafts), a tile of them x group
             heads per program; the context is cut into `num_splits` partitions (flash-decoding) whose
             partial (max, sum, acc) a small reduce kernel merges per query token. One split writes `out`
             directly.
    prefill  grid (num_seqs, num_kv_heads, query tiles): BLOCK_M rows = BLOCK_M // group query tokens
             x group heads; causal over the cached context, decode rows (n_i = 1) included.

Both walk the context in tiles of BLOCK_N positions (TILES), each position looking its KV block up in
the block table, so the tile is chosen for the tensor cores, not by the cache's block size.

Grids come from host values already in AttentionMeta (num_seqs, max_query_len, max_seq_len); a
program with no work exits. For CUDA-graph capture, set max_seq_len to the largest context the graph
will replay with (it sizes the decode splits). The decode partials live in a grow-only cache.
"""

import math

import torch
import triton
import triton.language as tl

from tessera_kernels.paged_attention import AttentionMeta

__all__ = ["paged_attention", "write_kv"]

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: exp2 never sees inf - inf
FP8_MAX = tl.constexpr(448.0)  # float8 e4m3's largest finite value


@triton.jit
def _round_e4m3(x):
    """fp32 x rounded to nearest (ties to even) float8 e4m3 value, saturated at +-448, still in fp32: the cast that
    follows is exact. Done by hand because Triton's interpreter rounds a cast whose mantissa carries into the
    exponent wrongly (1.96 -> 1.0); on the GPU this is a few integer ops in a copy kernel."""
    x = tl.clamp(x, -FP8_MAX, FP8_MAX)
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1  # keep 3 of fp32's 23 mantissa bits
    normal = ((bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding it rounds x * 2^9 to an integer (to even), e4m3's subnormal spacing
    subnormal = tl.abs(((x * 512.0 + magic) - magic) / 512.0)
    subnormal = tl.where(bits < 0, -subnormal, subnormal)  # the sign bit's: a negative that rounds to zero is -0.0
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)  # below 2^-6, e4m3's smallest normal


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr, KV_FP8: tl.constexpr):
    # Grid (num_tokens,). Reads one token's k and v rows (kv_heads * head_dim each), writes them once.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
    if KV_FP8:
        k, v = _round_e4m3(k.to(tl.float32)), _round_e4m3(v.to(tl.float32))
    tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, q_pos, lo, hi, window,
            stride_cb, stride_ct, stride_ch, qk_scale, head_dim,
            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold context positions [lo, hi) into the online softmax of the rows of q ([rows, BLOCK_D]), BLOCK_N
    positions a step. Each position looks its KV block up in the table, so a tile may span several
    blocks (or part of one): the tile is a speed choice, independent of the cache's block size. K and V are
    read in q's dtype (the compute dtype: the cache's, or the queries' over an fp8 cache), P @ V in it too."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    for start in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        k_pos = start + offs_n  # [BLOCK_N]
        in_range = (k_pos >= lo) & (k_pos < hi)
        block = tl.load(table_ptr + k_pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)  # [BLOCK_N]
        kv_mask = in_range[:, None] & d_mask[None, :]
        kv_row = block * stride_cb + (k_pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch  # [BLOCK_N]
        kv_off = kv_row[:, None] + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [rows, BLOCK_N], log2 units
        allowed = (k_pos[None, :] <= q_pos[:, None]) & in_range[None, :]
        if window > 0:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, cu_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_tab, stride_cb, stride_ct, stride_ch,
    qk_scale, window, head_dim,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr,
):
    # Per program: BLOCK_M // GROUP queries x GROUP heads of q read once, the causal (windowed) part of
    # the context read once per KV head (K and V, block by block), out written once.
    seq, kv_head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    QUERIES: tl.constexpr = BLOCK_M // GROUP
    q_start = tl.load(cu_ptr + seq)
    n = tl.load(cu_ptr + seq + 1) - q_start
    if tile * QUERIES >= n:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    qi = tile * QUERIES + rows // GROUP  # query index inside the sequence
    valid = (rows < QUERIES * GROUP) & (qi < n)
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = valid[:, None] & (offs_d < head_dim)[None, :]
    token = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
    q_pos = seq_len - n + qi
    hi = seq_len - n + tl.minimum(tile * QUERIES + QUERIES, n)
    lo = tl.where(window > 0, tl.maximum(seq_len - n + tile * QUERIES - window + 1, 0), 0)
    m_i = tl.full((BLOCK_M,), _NEG, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i, l_i, acc = _attend(q if KV_FP8 else q.to(k_cache_ptr.dtype.element_ty), m_i, l_i, acc, k_cache_ptr, v_cache_ptr,
                            tables_ptr + seq * stride_tab, kv_head, q_pos, lo, hi, window,
                            stride_cb, stride_ct, stride_ch, qk_scale, head_dim, BLOCK_SIZE, BLOCK_N, BLOCK_D)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _decode_kernel(
    out_ptr, part_ptr, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, cu_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_tab, stride_cb, stride_ct, stride_ch,
    qk_scale, window, head_dim, partition, num_heads, num_splits, q_tiles,
    GROUP: tl.constexpr, QUERIES: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, KV_FP8: tl.constexpr,
):
    # Per program: QUERIES query tokens x the GROUP query heads of one KV head, stacked as rows (query-major),
    # read once; K and V of one context partition read once; writes those rows of out (or of the fp32
    # partials, plus max and sum, when split).
    seq, head_tile, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head, tile = head_tile // q_tiles, head_tile % q_tiles
    q_start = tl.load(cu_ptr + seq)
    n = tl.load(cu_ptr + seq + 1) - q_start
    if tile * QUERIES >= n:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_H)
    qi = tile * QUERIES + rows // GROUP  # query index inside the sequence
    valid = (rows < QUERIES * GROUP) & (qi < n)
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = valid[:, None] & (offs_d < head_dim)[None, :]
    token = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=io_mask,
                other=0.0)  # [BLOCK_H, BLOCK_D]
    q_pos = seq_len - n + qi
    lo = split * partition
    hi = tl.minimum(lo + partition, seq_len - n + tl.minimum(tile * QUERIES + QUERIES, n))  # causal end of the tile
    if window > 0:
        lo = tl.maximum(lo, seq_len - n + tile * QUERIES - window + 1)
    m_i = tl.full((BLOCK_H,), _NEG, tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    m_i, l_i, acc = _attend(q if KV_FP8 else q.to(k_cache_ptr.dtype.element_ty), m_i, l_i, acc, k_cache_ptr, v_cache_ptr,
                            tables_ptr + seq * stride_tab, kv_head, q_pos, lo, hi, window,
                            stride_cb, stride_ct, stride_ch, qk_scale, head_dim, BLOCK_SIZE, BLOCK_N, BLOCK_D)
    if SPLIT:
        part = (token * num_heads + head) * num_splits + split  # [BLOCK_H]
        tl.store(part_ptr + part[:, None] * (BLOCK_D + 2) + offs_d[None, :], acc, mask=io_mask)
        tl.store(part_ptr + part * (BLOCK_D + 2) + BLOCK_D, m_i, mask=valid)
        tl.store(part_ptr + part * (BLOCK_D + 2) + BLOCK_D + 1, l_i, mask=valid)
    else:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_off = token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _decode_reduce_kernel(out_ptr, part_ptr, cu_ptr, stride_ot, stride_oh, head_dim, num_heads, num_splits,
                          BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid (num_seqs, num_heads, max_query_len). Reads num_splits x (BLOCK_D + 2) fp32 partials of one query
    # token and head, writes its out row.
    seq, head, qi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_ptr + seq)
    if q_start + qi >= tl.load(cu_ptr + seq + 1):
        return
    token = (q_start + qi).to(tl.int64)
    splits = tl.arange(0, BLOCK_SPLITS)
    s_mask = splits < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    part = ((token * num_heads + head) * num_splits + splits) * (BLOCK_D + 2)  # [BLOCK_SPLITS]
    m = tl.load(part_ptr + part + BLOCK_D, mask=s_mask, other=_NEG)
    l = tl.load(part_ptr + part + BLOCK_D + 1, mask=s_mask, other=0.0)
    acc = tl.load(part_ptr + part[:, None] + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # [BLOCK_SPLITS]
    total = tl.sum(w * l, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_off = token * stride_ot + head * stride_oh + offs_d
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


_PART_CACHE: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown partials stay alive: a captured CUDA graph may still use them
_PARTITION = 256  # context tokens per decode split at least
_TARGET_PROGRAMS = 512  # split the context until the decode grid has about this many programs
SPLIT_QUERIES = 32
"""Steps whose sequences have at most this many query tokens each take the split-context decode kernel: a
decode step with speculative drafts is a few query tokens per sequence over a long context, which the
prefill kernel (one program per sequence, KV head and query tile, the whole context each) would run on a few
dozen programs at small batch. NOTE: chosen from that argument, not timed on a GPU yet."""
SPLIT_ROWS = 64
"""Rows (query tokens x the heads of one KV head) of one decode program at most, as the prefill kernel's BLOCK_M:
a sequence with more query tokens than fit takes several programs per KV head (query tiles)."""
TILES = (32, 64)
"""Context positions per step of the (decode, prefill) kernels: what FlashAttention-style kernels use for
tensor-core tiles (the prefill tile was the 16-token KV block before). NOTE: not timed on a GPU yet;
`benchmarks/kernels/bench_paged_attention.py --tiles` measures each choice against SDPA."""


def _fp8(cache: torch.Tensor) -> bool:
    """Whether `cache` holds float8 e4m3 (the kernels then saturate on write and compute in the queries' dtype)."""
    return cache.dtype == torch.float8_e4m3fn


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """One program per token copies its k and v rows to their cache slot; negative slots are skipped."""
    num_tokens = k.shape[0]
    row = k.shape[1] * k.shape[2]
    if num_tokens == 0:
        return
    if k.stride(2) != 1 or k.stride(1) != k.shape[2] or v.stride(2) != 1 or v.stride(1) != v.shape[2]:
        raise ValueError("k and v rows must be contiguous over [num_kv_heads, head_dim]")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    _write_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    ROW=row, BLOCK=triton.next_power_of_2(row), KV_FP8=_fp8(k_cache))


def _num_splits(meta: AttentionMeta, programs: int) -> int:
    """Host arithmetic only: enough context partitions to fill the GPU, each at least _PARTITION long, for a grid
    of `programs` (sequences x KV heads x query tiles) before splitting."""
    by_length = triton.cdiv(max(meta.max_seq_len, 1), _PARTITION)
    by_occupancy = triton.cdiv(_TARGET_PROGRAMS, programs)
    return max(1, min(by_length, by_occupancy))


def _query_tile(max_query_len: int, group: int) -> tuple[int, int]:
    """(query tokens per decode program, BLOCK_H): as many of a sequence's query tokens as fit SPLIT_ROWS rows of
    `group` heads each (at least one), and the power-of-two row count (>= 16, for tl.dot) that holds them."""
    fit = max(1, SPLIT_ROWS // triton.next_power_of_2(group))
    queries = min(triton.next_power_of_2(max_query_len), fit)
    return queries, max(16, triton.next_power_of_2(queries * group))


def _decode(out, q, k_cache, v_cache, meta, common: dict, group: int, block_d: int, tile: int) -> None:
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    queries, block_h = _query_tile(meta.max_query_len, group)
    q_tiles = triton.cdiv(meta.max_query_len, queries)
    num_splits = _num_splits(meta, meta.num_seqs * num_kv_heads * q_tiles)
    partition = triton.cdiv(triton.cdiv(max(meta.max_seq_len, 1), num_splits), tile) * tile  # whole tiles
    part = out
    if num_splits > 1:  # fp32 [tokens, heads, splits, D + 2]; every token index is below num_seqs * max_query_len
        numel = meta.num_seqs * meta.max_query_len * num_heads * num_splits * (block_d + 2)
        part = _PART_CACHE.get(q.device)
        if part is None or part.numel() < numel:
            _RETIRED.extend([part] if part is not None else [])
            part = _PART_CACHE[q.device] = torch.empty(numel, dtype=torch.float32, device=q.device)
    _decode_kernel[(meta.num_seqs, num_kv_heads * q_tiles, num_splits)](
        out, part, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_query_lens,
        **common, partition=partition, num_heads=num_heads, num_splits=num_splits, q_tiles=q_tiles,
        GROUP=group, QUERIES=queries, BLOCK_H=block_h, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=tile, BLOCK_D=block_d, SPLIT=num_splits > 1, KV_FP8=_fp8(k_cache),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(meta.num_seqs, num_heads, meta.max_query_len)](
            out, part, meta.cu_query_lens, out.stride(0), out.stride(1), q.shape[2], num_heads, num_splits,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )


def paged_attention(out, q, k_cache, v_cache, meta: AttentionMeta, scale: float, sliding_window=None,
                    tiles: tuple[int, int] | None = None) -> None:
    """The split-context decode kernel when no sequence has more than SPLIT_QUERIES query tokens (decode, and
    decode with speculative drafts), else the chunked-prefill kernel. `tiles` (decode, prefill), powers of two
    >= 16, overrides TILES (the benchmark sweeps them)."""
    if meta.num_seqs == 0:
        return
    if tiles is None:
        tiles = TILES
    elif len(tiles) != 2 or any(t < 16 or t & (t - 1) for t in tiles):  # checked only when overridden
        raise ValueError(f"tiles must be two powers of two >= 16 (decode, prefill), got {tuple(tiles)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or q.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("k_cache and v_cache must share strides; head_dim must be the contiguous axis")
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[2]
    block_d = max(16, triton.next_power_of_2(head_dim))
    common = dict(
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_tab=meta.block_tables.stride(0), stride_cb=k_cache.stride(0), stride_ct=k_cache.stride(1),
        stride_ch=k_cache.stride(2), qk_scale=scale * math.log2(math.e), window=sliding_window or 0,
        head_dim=head_dim,
    )
    if meta.max_query_len <= SPLIT_QUERIES:
        _decode(out, q, k_cache, v_cache, meta, common, group, block_d, tiles[0])
        return
    block_m = max(64, triton.next_power_of_2(group))
    grid = (meta.num_seqs, k_cache.shape[2], triton.cdiv(meta.max_query_len, block_m // group))
    _prefill_kernel[grid](
        out, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_query_lens, **common,
        GROUP=group, BLOCK_M=block_m, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=tiles[1], BLOCK_D=block_d,
        KV_FP8=_fp8(k_cache),
    )

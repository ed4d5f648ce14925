"""Triton composed_lora: a segment-major shrink and a token-major expand (see the contract).

    shrink   u[s, e, :]  = gate[e] * scale[slot] * A_s[slot] @ x[token(e)]    e = t * max_k + j
    expand   y[t, slice s] += sum_j B_s[slot[t, j]] @ u[s, t * max_k + j]       fp32, cast once

Shrink walks the slot segments of `ModuleBatchMeta` (tokens sorted by slot), so a tile of up to BLOCK_M
entries of one module reads that module's A once; decode-sized steps, with few such tiles, also split
hidden across programs (split-K) and sum the partials in a third small launch. Expand owns a tile of
BLOCK_M tokens taken in composition order (`token_order`: tokens of one composition are neighbours, so a
decode tile of 16 tokens over 8 modules holds one or two modules, not seven) and one block of output
columns, and sums all k modules of those tokens in fp32 registers before a single read-modify-write of
y. A segment-major expand would race: with k > 1 a token sits in k segments, so its y row would need
fp32 atomics into a [tokens, sum n_s] scratch (940 MB for Llama-3-8B gate_up at 8192 tokens) or k bf16
roundings of y, which the contract forbids. Inside a token tile, expand loops over the distinct slots of
each column j (one iteration for a prefill chunk, whose tokens share one composition), so B is read once
per (token tile, distinct slot), not once per token. y rows are gathered through the order; each row's
BLOCK_N columns stay one contiguous access.

Grids come from static shapes only (rows of x, max_k, max_slots, the stack's widths); programs with no
work exit at once, so a step can be captured in a CUDA graph and replayed with new compositions. The
fp32 intermediate and the per-stack pointer tables are cached: repeated shapes allocate nothing (warm
up once before capturing a graph). Padded rank is masked off the A and B loads (ranks[slot]), which
saves their memory traffic; the tensor-core tiles still span the pool's padded max_rank.
"""

import torch
import triton
import triton.language as tl

from tessera_kernels.composed_lora import LoraStack
from tessera_kernels.composed_lora.meta import ModuleBatchMeta

__all__ = ["composed_lora"]


@triton.jit
def _segment_tile(counts_ptr, tile_id, BLOCK_M: tl.constexpr, MAX_SLOTS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Map a flat tile id onto (slot, first row inside its segment, segment length)."""
    idx = tl.arange(0, BLOCK_S)
    counts = tl.load(counts_ptr + idx, mask=idx < MAX_SLOTS, other=0)  # NO_MODULE count excluded
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)  # inclusive prefix of tiles per slot
    slot = tl.sum((cum <= tile_id).to(tl.int32))  # == BLOCK_S past the last tile: count is then 0
    first = tl.sum(tl.where(idx == slot, cum - tiles, 0))
    count = tl.sum(tl.where(idx == slot, counts, 0))
    return slot, (tile_id - first) * BLOCK_M, count


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptrs, scale_ptr, ranks_ptr, gates_ptr, entries_ptr, counts_ptr, starts_ptr, u_ptr,
    hidden, stride_xm, max_rank, num_entries, k_per_split,
    MAX_K: tl.constexpr, MAX_SLOTS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grid (segment tiles upper bound, num_slices, splits of hidden). Per program: BLOCK_M gathered rows of
    # x and one module's A [rank, k_per_split] read once; writes BLOCK_M x BLOCK_R fp32 of u, or of its
    # split's partial sums (u_ptr then holds one [num_slices, entries, BLOCK_R] block per split).
    slot, row0, count = _segment_tile(counts_ptr, tl.program_id(0), BLOCK_M, MAX_SLOTS, BLOCK_S)
    if row0 >= count:
        return
    sl, split = tl.program_id(1), tl.program_id(2)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, hidden)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    entry = tl.load(entries_ptr + tl.load(starts_ptr + slot) + offs_m, mask=m_mask, other=0)
    token = (entry // MAX_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < tl.load(ranks_ptr + slot)
    a_ptr = tl.load(a_ptrs + sl).to(tl.pointer_type(x_ptr.dtype.element_ty))
    a_rows = a_ptr + slot.to(tl.int64) * max_rank * hidden + offs_r[:, None] * hidden  # [BLOCK_R, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        xt = tl.load(x_ptr + token[:, None] * stride_xm + offs_k[None, :],
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        at = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(xt, tl.trans(at))  # [BLOCK_M, BLOCK_R]
    weight = tl.load(gates_ptr + entry, mask=m_mask, other=0.0) * tl.load(scale_ptr + slot)
    acc = acc * weight[:, None]
    block = (split * tl.num_programs(1) + sl).to(tl.int64)  # this (split, slice)'s [entries, BLOCK_R]
    u_rows = u_ptr + block * num_entries * BLOCK_R + entry.to(tl.int64)[:, None] * BLOCK_R
    tl.store(u_rows + offs_r[None, :], acc, mask=m_mask[:, None])


@triton.jit
def _sum_splits_kernel(part_ptr, u_ptr, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    # Grid (cdiv(numel, BLOCK),): u = the sum of the SPLITS partial blocks, in split order (deterministic).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(u_ptr + offs, acc, mask=mask)


@triton.jit
def _slice_of(table_ptr, pid_n, NUM_SLICES: tl.constexpr, BLOCK_SL: tl.constexpr):
    """Which output slice a flat column-block id falls in: (slice, its first block, width, y offset)."""
    idx = tl.arange(0, BLOCK_SL)
    starts = tl.load(table_ptr + idx, mask=idx <= NUM_SLICES, other=2**30)  # row 0: block starts
    sl = tl.sum((starts <= pid_n).to(tl.int32)) - 1
    first = tl.sum(tl.where(idx == sl, starts, 0))
    width = tl.load(table_ptr + BLOCK_SL + sl)  # row 1: widths
    y_off = tl.load(table_ptr + 2 * BLOCK_SL + sl)  # row 2: column offsets in y
    return sl, first, width, y_off


@triton.jit
def _expand_kernel(
    y_ptr, u_ptr, b_ptrs, table_ptr, slots_ptr, ranks_ptr, order_ptr,
    num_rows, stride_ym, max_rank, num_entries,
    MAX_K: tl.constexpr, MAX_SLOTS: tl.constexpr, NUM_SLICES: tl.constexpr, BLOCK_SL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Grid (token tiles, column blocks of all slices). Per program: u [BLOCK_M, k, BLOCK_R] fp32, one
    # B tile [BLOCK_N, rank] per distinct slot of the tile, y [BLOCK_M, BLOCK_N] read and written once.
    sl, first, width, y_off = _slice_of(table_ptr, tl.program_id(1), NUM_SLICES, BLOCK_SL)
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in composition order
    m_mask = pos < num_rows
    offs_m = tl.load(order_ptr + pos, mask=m_mask, other=0)  # [BLOCK_M] token ids
    offs_n = (tl.program_id(1) - first) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    offs_r = tl.arange(0, BLOCK_R)
    b_ptr = tl.load(b_ptrs + sl).to(tl.pointer_type(y_ptr.dtype.element_ty))
    b_offs = offs_n[None, :] * max_rank + offs_r[:, None]  # [BLOCK_R, BLOCK_N] int32, inside one module
    u_base = u_ptr + sl.to(tl.int64) * num_entries * BLOCK_R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    live = offs_m < 0
    for j in tl.static_range(MAX_K):
        slots = tl.load(slots_ptr + offs_m * MAX_K + j, mask=m_mask, other=-1)  # [BLOCK_M]
        pending = slots >= 0
        live = live | pending
        u_rows = u_base + (offs_m * MAX_K + j).to(tl.int64) * BLOCK_R  # [BLOCK_M] row pointers
        while tl.max(pending.to(tl.int32), 0) > 0:
            slot = tl.min(tl.where(pending, slots, MAX_SLOTS), 0)
            hit = pending & (slots == slot)
            r_mask = offs_r < tl.load(ranks_ptr + slot)
            u = tl.load(u_rows[:, None] + offs_r[None, :], mask=hit[:, None] & r_mask[None, :], other=0.0)
            b_module = b_ptr + slot.to(tl.int64) * width * max_rank  # scalar: this module's B of the slice
            bt = tl.load(b_module + b_offs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
            acc += tl.dot(u, bt.to(tl.float32))
            pending = pending & (slots != slot)
    io_mask = (m_mask & live)[:, None] & n_mask[None, :]
    y_rows = y_ptr + offs_m.to(tl.int64) * stride_ym + y_off  # [BLOCK_M] row pointers
    y_tile = y_rows[:, None] + offs_n[None, :]
    y = tl.load(y_tile, mask=io_mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + acc).to(y.dtype), mask=io_mask)


_BLOCK_K = 64  # shrink's step along hidden
_MIN_SPLIT_K = 4 * _BLOCK_K  # a split walks at least this much of hidden
_MAX_SPLITS = 16
_SHRINK_PROGRAMS = 1024  # split-K until the shrink grid has about this many programs
_U_CACHE: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers stay alive: a captured CUDA graph may still use them
_TABLE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}


def _intermediate(device: torch.device, numel: int) -> torch.Tensor:
    """A grow-only fp32 scratch per device; never zeroed (every live entry is written before read)."""
    buf = _U_CACHE.get(device)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.empty(numel, dtype=torch.float32, device=device)
        _U_CACHE[device] = buf
    return buf[:numel]


def _tables(lora_a, lora_b, block_n: int):
    """Per stack: int64 A/B pointers per slice, and int32 rows (block starts, widths, y offsets)."""
    key = (tuple(a.data_ptr() for a in lora_a), tuple(b.data_ptr() for b in lora_b), block_n)
    if key not in _TABLE_CACHE:
        widths = [b.shape[1] for b in lora_b]
        block_sl = triton.next_power_of_2(len(widths) + 1)
        starts, offsets = [0], [0]
        for w in widths:
            starts.append(starts[-1] + triton.cdiv(w, block_n))
            offsets.append(offsets[-1] + w)
        pad = lambda row: row + [0] * (block_sl - len(row))  # noqa: E731
        table = torch.tensor(pad(starts) + pad(widths) + pad(offsets), dtype=torch.int32)
        ptrs = torch.tensor([[a.data_ptr() for a in lora_a], [b.data_ptr() for b in lora_b]], dtype=torch.int64)
        _TABLE_CACHE[key] = (ptrs.to(lora_a[0].device), table.to(lora_a[0].device), starts[-1])
    return _TABLE_CACHE[key]


def _shrink_splits(num_programs: int, hidden: int) -> tuple[int, int]:
    """(splits, k_per_split): cut hidden into splits until the shrink grid has about _SHRINK_PROGRAMS programs.

    A decode step has few segment tiles (B = 32 over 8 modules: 8 busy tiles per slice), and each would
    walk all of hidden in BLOCK_K steps one after another; split-K gives the GPU enough programs. Partial
    sums go to a scratch and one small kernel adds them in split order, so results stay deterministic.
    NOTE: not timed on a GPU yet.
    """
    most = triton.cdiv(hidden, _MIN_SPLIT_K)
    splits = min(most, _MAX_SPLITS, triton.next_power_of_2(triton.cdiv(_SHRINK_PROGRAMS, num_programs)))
    k_per_split = triton.cdiv(triton.cdiv(hidden, splits), _BLOCK_K) * _BLOCK_K
    return triton.cdiv(hidden, k_per_split), k_per_split


def _block_sizes(num_entries: int, block_r: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): small token tiles for decode, larger ones for prefill.

    NOTE: not timed on a GPU yet (no device in the sessions that wrote this). Decode-sized steps use
    16-row tiles so a module's few tokens do not pad a 64-row tile; the B tile [BLOCK_R, BLOCK_N] is cast
    to fp32 in registers, so BLOCK_N shrinks as the rank grows (128 up to rank 32, 64 up to 64, 32 above),
    and 64-row (prefill) tiles take 64 columns. These are the largest tiles that `tessera
    compile-check` finds spill-free on sm_90 (Triton 3.6 and 3.9): wider ones spilled 32-160
    bytes a thread.
    """
    if num_entries <= 1024:
        return 16, (128 if block_r <= 32 else 64 if block_r <= 64 else 32)
    return 64, 64


@torch.library.custom_op("tessera::composed_lora", mutates_args=("y",))
def _composed_lora_op(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scale: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
    token_gates: torch.Tensor,
    sorted_entries: torch.Tensor,
    slot_counts: torch.Tensor,
    slot_starts: torch.Tensor,
    token_order: torch.Tensor,
) -> None:
    num_rows, hidden = x.shape
    max_k, max_slots = token_slots.shape[1], slot_counts.shape[0] - 1
    max_rank = lora_a[0].shape[1]
    num_entries = num_rows * max_k
    block_r = max(16, triton.next_power_of_2(max_rank))
    block_m, block_n = _block_sizes(num_entries, block_r)
    ptrs, table, num_col_blocks = _tables(lora_a, lora_b, block_n)
    # Sum over slots of cdiv(count, BLOCK_M) <= cdiv(entries, BLOCK_M) + (non-empty slots).
    num_tiles = triton.cdiv(num_entries, block_m) + min(max_slots, num_entries)
    splits, k_per_split = _shrink_splits(num_tiles * len(lora_a), hidden)
    numel = len(lora_a) * num_entries * block_r
    scratch = _intermediate(x.device, (splits + (splits > 1)) * numel)
    u = scratch[-numel:]  # [num_slices, entries, block_r]; the partials [splits, ...] before it
    _shrink_kernel[(num_tiles, len(lora_a), splits)](
        x, ptrs[0], scale, ranks, token_gates, sorted_entries, slot_counts, slot_starts, scratch,
        hidden, x.stride(0), max_rank, num_entries, k_per_split,
        MAX_K=max_k, MAX_SLOTS=max_slots, BLOCK_S=triton.next_power_of_2(max_slots + 1),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=_BLOCK_K, num_warps=4 if block_m == 16 else 8,
    )
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(numel, 1024),)](scratch, u, numel, SPLITS=splits, BLOCK=1024)
    _expand_kernel[(triton.cdiv(num_rows, block_m), num_col_blocks)](
        y, u, ptrs[1], table, token_slots, ranks, token_order,
        num_rows, y.stride(0), max_rank, num_entries,
        MAX_K=max_k, MAX_SLOTS=max_slots, NUM_SLICES=len(lora_b),
        BLOCK_SL=triton.next_power_of_2(len(lora_b) + 1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4 if block_m == 16 else 8,
    )


@_composed_lora_op.register_fake
def _composed_lora_fake(y, x, lora_a, lora_b, scale, ranks, token_slots, token_gates,
                        sorted_entries, slot_counts, slot_starts, token_order) -> None:
    return None


def _check(y: torch.Tensor, x: torch.Tensor, stack: LoraStack, meta: ModuleBatchMeta) -> None:
    """Shape checks on host metadata only (no device sync)."""
    if not meta.num_tokens <= x.shape[0] <= meta.token_slots.shape[0]:
        # the expand walks rows through token_order, which may name any row < num_tokens
        raise ValueError(f"x has {x.shape[0]} rows; the step has {meta.num_tokens} tokens and the metadata "
                         f"holds {meta.token_slots.shape[0]}")
    if y.shape[0] < x.shape[0] or y.shape[1] != sum(stack.slice_widths) or y.stride(1) != 1:
        raise ValueError(f"y {list(y.shape)} does not match x rows {x.shape[0]} and widths {stack.slice_widths}")
    weights = (*stack.lora_a, *stack.lora_b)
    if x.stride(1) != 1 or not all(w.is_contiguous() and w.dtype == x.dtype for w in weights):
        raise ValueError("x rows and the stack's A/B must be contiguous and share x's dtype")


def composed_lora(y: torch.Tensor, x: torch.Tensor, stack: LoraStack, meta: ModuleBatchMeta) -> None:
    """Add every token's module composition to `y` in place (two launches, no host sync).

    Every row of x is treated as live; rows past `meta.num_tokens` carry NO_MODULE (`fill` resets
    them), so a CUDA graph captured for n rows replays correctly for any step of at most n tokens.
    """
    if x.shape[0] == 0:
        return
    _check(y, x, stack, meta)
    torch.ops.tessera.composed_lora(
        y, x, list(stack.lora_a), list(stack.lora_b), stack.scale, stack.ranks,
        meta.token_slots, meta.token_gates, meta.sorted_entries, meta.slot_counts, meta.slot_starts,
        meta.token_order,
    )

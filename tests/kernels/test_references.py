"""The oracles themselves: ModuleBatchMeta's segments and the plain-torch references against dense math."""

from __future__ import annotations

import math

import pytest
import torch

from tessera_kernels import NO_MODULE
from tessera_kernels.composed_lora import LoraStack, ModuleBatchMeta
from tessera_kernels.composed_lora.reference import composed_lora
from tessera_kernels.paged_attention import AttentionMeta
from tessera_kernels.paged_attention.reference import paged_attention, write_kv


def test_meta_segments_match_running_example():
    meta = ModuleBatchMeta.allocate(max_tokens=3, max_k=2, max_slots=4, device="cpu")
    slots = torch.tensor([[2, 0], [2, NO_MODULE], [1, 2]], dtype=torch.int32)
    gates = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5]])
    meta.fill(slots, gates)
    assert meta.sorted_entries.tolist() == [1, 4, 0, 2, 5, 3]
    assert meta.slot_counts.tolist() == [1, 1, 3, 0, 1]
    assert meta.slot_starts.tolist() == [0, 1, 2, 5, 5]
    assert meta.token_order.tolist() == [2, 0, 1]


def test_token_order_groups_equal_compositions_and_puts_padding_last():
    meta = ModuleBatchMeta.allocate(max_tokens=8, max_k=2, max_slots=3, device="cpu")
    slots = torch.tensor([[2, 1], [0, NO_MODULE], [2, 1], [NO_MODULE, NO_MODULE], [0, 2], [2, 0]],
                         dtype=torch.int32)
    meta.fill(slots, torch.ones(6, 2))
    assert meta.token_order.tolist() == [4, 1, 5, 0, 2, 3, 6, 7]  # (0,2) (0,-) (2,0) (2,1) (2,1) then none
    with pytest.raises(ValueError, match="must be < 2"):
        ModuleBatchMeta.allocate(max_tokens=1, max_k=4, max_slots=2**16, device="cpu")


def test_meta_fill_clears_stale_rows():
    meta = ModuleBatchMeta.allocate(max_tokens=4, max_k=3, max_slots=2, device="cpu")
    meta.fill(torch.ones(4, 3, dtype=torch.int32), torch.ones(4, 3))
    meta.fill(torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1))
    assert meta.num_tokens == 1
    assert meta.token_slots.tolist() == [[0, -1, -1]] + [[-1, -1, -1]] * 3
    assert meta.slot_counts.tolist() == [1, 0, 11]


def _random_stack(in_features, widths, ranks, seed):
    gen = torch.Generator().manual_seed(seed)
    stack = LoraStack.allocate(in_features, widths, len(ranks), max(ranks), torch.float32, "cpu")
    modules = []
    for slot, rank in enumerate(ranks):
        pairs = tuple(
            (torch.randn(rank, in_features, generator=gen), torch.randn(width, rank, generator=gen))
            for width in widths
        )
        scale = 2.0 / rank
        stack.write_slot(slot, pairs, scale)
        modules.append((pairs, scale))
    return stack, modules


@pytest.mark.parametrize("k", [1, 2, 3])
def test_composed_lora_reference_equals_dense_per_row(k):
    widths, ranks, num_tokens, in_features = (12, 5, 5), (4, 8, 2, 8), 9, 16
    stack, modules = _random_stack(in_features, widths, ranks, seed=k)
    gen = torch.Generator().manual_seed(100 + k)
    slots = torch.stack([torch.randperm(len(ranks), generator=gen)[:k] for _ in range(num_tokens)]).int()
    slots[2] = NO_MODULE
    slots[5, -1] = NO_MODULE
    gates = torch.rand(num_tokens, k, generator=gen)
    meta = ModuleBatchMeta.allocate(16, 4, len(ranks), "cpu")
    meta.fill(slots, gates)
    x = torch.randn(num_tokens, in_features, generator=gen)
    y0 = torch.randn(num_tokens, sum(widths), generator=gen)
    y = y0.clone()
    composed_lora(y, x, stack, meta)
    for t in range(num_tokens):
        expected = y0[t].clone()
        for j in range(k):
            slot = int(slots[t, j])
            if slot == NO_MODULE:
                continue
            pairs, scale = modules[slot]
            delta = torch.cat([b @ (a @ x[t]) for a, b in pairs])
            expected += gates[t, j] * scale * delta
        torch.testing.assert_close(y[t], expected, atol=1e-4, rtol=1e-4)
    assert not torch.equal(y, y0)


def test_paged_attention_reference_equals_dense_causal():
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, block_size = 4, 2, 8, 4
    seq_lens, query_lens = [7, 5, 1], [1, 3, 1]
    num_blocks = 12
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.tensor([[3, 8], [5, 1], [0, 2]], dtype=torch.int32)
    ks, vs = [], []
    for i, n in enumerate(seq_lens):
        k = torch.randn(n, kv_heads, head_dim, generator=gen)
        v = torch.randn(n, kv_heads, head_dim, generator=gen)
        pos = torch.arange(n)
        slot = tables[i, pos // block_size].long() * block_size + pos % block_size
        write_kv(k, v, k_cache, v_cache, slot)
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=gen)
    cu = torch.tensor([0, 1, 4, 5], dtype=torch.int32)
    meta = AttentionMeta(tables, torch.tensor(seq_lens, dtype=torch.int32), cu, 3, 3, 7)
    out = torch.zeros_like(q)
    scale = 1 / math.sqrt(head_dim)
    paged_attention(out, q, k_cache, v_cache, meta, scale)
    for i, (n, m) in enumerate(zip(seq_lens, query_lens)):
        query = q[cu[i] : cu[i + 1]].transpose(0, 1)  # [heads, m, head_dim]
        key = ks[i].repeat_interleave(2, dim=1).transpose(0, 1)
        value = vs[i].repeat_interleave(2, dim=1).transpose(0, 1)
        mask = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]
        dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        torch.testing.assert_close(out[cu[i] : cu[i + 1]], dense.transpose(0, 1), atol=1e-5, rtol=1e-5)

"""Triton composed_lora against the plain-torch oracle, over module popularity patterns (after Punica).

On CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py), so the CPU cases are small;
the `gpu` cases use Llama-like widths, bf16 and a CUDA graph replayed with new compositions.
"""

import os

import pytest
import torch

from tessera_kernels import NO_MODULE
from tessera_kernels.composed_lora import LoraStack, ModuleBatchMeta
from tessera_kernels.composed_lora import reference
from tessera_kernels.composed_lora import triton as backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATTERNS = ("distinct", "uniform", "zipf", "identical", "skewed")


def _slots(pattern: str, num_tokens: int, k: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """[num_tokens, k] int32 slots; within a token the k modules differ, as a top-k router gives."""
    if pattern == "distinct":
        flat = torch.arange(num_tokens * k) % num_slots
        return flat.view(num_tokens, k).int()
    if pattern == "identical":
        return torch.randperm(num_slots, generator=gen)[:k].repeat(num_tokens, 1).int()
    if pattern == "uniform":
        weights = torch.ones(num_slots)
    elif pattern == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1).float() ** 1.1
    else:  # skewed: one hot module takes most of the traffic
        weights = torch.full((num_slots,), 0.1 / (num_slots - 1))
        weights[num_slots // 2] = 0.9
    rows = [torch.multinomial(weights, k, replacement=False, generator=gen) for _ in range(num_tokens)]
    return torch.stack(rows).int()


def _make_case(pattern, num_tokens, k, ranks, widths, hidden, dtype, no_module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    stack = LoraStack.allocate(hidden, widths, len(ranks), max(ranks), dtype, DEVICE)
    for slot, rank in enumerate(ranks):
        pairs = tuple(
            (torch.randn(rank, hidden, generator=gen) / hidden**0.5, torch.randn(width, rank, generator=gen))
            for width in widths
        )
        stack.write_slot(slot, tuple((a.to(DEVICE, dtype), b.to(DEVICE, dtype)) for a, b in pairs), 2.0 / rank)
    slots = _slots(pattern, num_tokens, k, len(ranks), gen)
    signs = torch.randint(0, 2, (num_tokens, k), generator=gen) * 2 - 1  # negative gates subtract (task negation)
    gates = (torch.rand(num_tokens, k, generator=gen) + 0.1) * signs
    if no_module:
        slots[::3] = NO_MODULE
        slots[1::4, -1] = NO_MODULE
        gates[slots == NO_MODULE] = 0.0
    meta = ModuleBatchMeta.allocate(num_tokens + 5, 4, len(ranks), DEVICE)
    meta.fill(slots.to(DEVICE), gates.to(DEVICE))
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE, dtype)
    y = torch.randn(num_tokens, sum(widths), generator=gen).to(DEVICE, dtype)
    return stack, meta, x, y


def _expected(y, x, stack, meta):
    """The oracle in fp32 on the same (rounded) inputs."""
    stack32 = LoraStack(
        tuple(a.float() for a in stack.lora_a), tuple(b.float() for b in stack.lora_b), stack.scale, stack.ranks
    )
    out = y.to(torch.float32, copy=True)  # never y itself: an fp32 y would alias the oracle
    reference.composed_lora(out, x.float(), stack32, meta)
    return out


def _check_case(stack, meta, x, y, atol, rtol):
    expected = _expected(y, x, stack, meta)
    before = y.clone()
    backend.composed_lora(y, x, stack, meta)
    assert not torch.equal(y, before), "the kernel left y unchanged"
    torch.testing.assert_close(y.float(), expected, atol=atol, rtol=rtol)


SHAPES = [  # ranks per slot (8..128 mixed), output slice widths (unequal), odd in_features
    ((8, 16, 8, 32, 8, 16, 8), (136, 24, 24), 130),
    ((8, 16, 128, 32, 64), (72, 72), 45),
    ((32, 8, 16, 64), (17, 9, 200), 97),
]
CPU_CASES = [
    (pattern, 5 + 2 * (3 * p + k) % 19, k, *SHAPES[(p + k) % len(SHAPES)], no_module)
    for p, pattern in enumerate(PATTERNS)
    for k in (1, 2, 3, 4)
    for no_module in (False, True)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-t{c[1]}-k{c[2]}-nm{int(c[6])}")
def test_composed_lora_matches_reference(case, dtype):
    pattern, num_tokens, k, ranks, widths, hidden, no_module = case
    stack, meta, x, y = _make_case(pattern, num_tokens, k, ranks, widths, hidden, dtype, no_module)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _check_case(stack, meta, x, y, atol=tol, rtol=tol)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-t{c[1]}-k{c[2]}-nm{int(c[6])}")
def test_the_references_two_ways_agree(case, monkeypatch):
    """The CPU path applies a small step's modules all at once and walks the slots of a large one."""
    pattern, num_tokens, k, ranks, widths, hidden, no_module = case
    stack, meta, x, y = _make_case(pattern, num_tokens, k, ranks, widths, hidden, torch.float32, no_module)
    results = []
    for budget in (1 << 40, 0):  # every step at once; every step slot by slot
        monkeypatch.setattr(reference, "_AT_ONCE_WORK", budget)
        out = y.clone()
        reference.composed_lora(out, x, stack, meta)
        results.append(out)
    assert not torch.equal(results[0], y)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["zipf", "identical"])
def test_composed_lora_prefill_sized_tiles(pattern):
    """Over 1024 entries the launcher switches to 64-row tiles."""
    stack, meta, x, y = _make_case(pattern, 301, 4, (8, 64, 16, 32, 8), (40, 24), 37, torch.float32, True)
    _check_case(stack, meta, x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_tokens,k", [(5, 1), (12, 3)])
def test_split_k_shrink_sums_every_split(monkeypatch, num_tokens, k):
    """Decode-sized steps cut hidden into splits (here 4 of 64, the last one 8 wide) whose partial sums one
    more kernel adds; every split must count, the short last one included."""
    monkeypatch.setattr(backend, "_MIN_SPLIT_K", 64)
    assert backend._shrink_splits(8, 200) == (4, 64)
    stack, meta, x, y = _make_case("uniform", num_tokens, k, (8, 16, 32), (24, 40), 200, torch.float32, True)
    _check_case(stack, meta, x, y, atol=1e-4, rtol=1e-4)


def test_split_k_stays_off_when_the_grid_is_full_or_hidden_short():
    assert backend._shrink_splits(backend._SHRINK_PROGRAMS, 4096) == (1, 4096)
    assert backend._shrink_splits(8, 200) == (1, 256)  # 200 < one split's minimum
    assert backend._shrink_splits(72, 4096) == (16, 256)  # B = 256 decode, qkv: 24 tiles x 3 slices
    assert backend._shrink_splits(27, 14336) == (16, 896)  # down_proj: at most 16 splits


def test_interpreter_runs_on_cpu():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert type(backend._expand_kernel).__name__ == "InterpretedFunction"


def test_padding_rows_untouched_and_new_composition_applies():
    """Graph-style use: x has more rows than the step's tokens; refilling the same meta changes y."""
    stack, meta, x, y = _make_case("uniform", 12, 2, (8, 16, 32), (24, 8, 8), 45, torch.float32, False)
    gen = torch.Generator().manual_seed(7)
    meta.fill(_slots("zipf", 9, 2, 3, gen).to(DEVICE), torch.rand(9, 2, generator=gen).to(DEVICE))
    before = y.clone()
    _check_case(stack, meta, x, y, atol=1e-4, rtol=1e-4)
    assert torch.equal(y[9:], before[9:])
    meta.fill(_slots("identical", 12, 1, 3, gen).to(DEVICE), torch.rand(12, 1, generator=gen).to(DEVICE))
    _check_case(stack, meta, x, y, atol=1e-4, rtol=1e-4)


def test_no_live_module_leaves_y_bitwise_equal():
    stack, meta, x, y = _make_case("uniform", 6, 2, (8, 16), (24, 8), 33, torch.float32, False)
    meta.fill(torch.full((6, 2), NO_MODULE, dtype=torch.int32, device=DEVICE), torch.zeros(6, 2, device=DEVICE))
    before = y.clone()
    backend.composed_lora(y, x, stack, meta)
    assert torch.equal(y, before)


def test_x_with_fewer_rows_than_the_step_is_refused():
    """The expand reaches rows through token_order, so x must cover every token of the step."""
    stack, meta, x, y = _make_case("uniform", 6, 2, (8, 16), (24, 8), 33, torch.float32, False)
    with pytest.raises(ValueError, match="the step has 6 tokens"):
        backend.composed_lora(y[:4], x[:4], stack, meta)


def test_custom_op_schema_and_fake():
    stack, meta, x, y = _make_case("skewed", 6, 2, (8, 16, 8), (24, 8), 33, torch.float32, True)
    args = (y, x, list(stack.lora_a), list(stack.lora_b), stack.scale, stack.ranks, meta.token_slots,
            meta.token_gates, meta.sorted_entries, meta.slot_counts, meta.slot_starts, meta.token_order)
    torch.library.opcheck(torch.ops.tessera.composed_lora.default, args, test_utils=("test_schema", "test_faketensor"))


GPU_CASES = [
    (pattern, num_tokens, k, (16, 64, 8, 128) * 4, (4096, 1024, 1024), 4096, no_module)
    for pattern in PATTERNS
    for num_tokens, k, no_module in ((7, 1, False), (64, 2, True), (300, 4, False), (2049, 2, True))
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-t{c[1]}-k{c[2]}-nm{int(c[6])}")
def test_composed_lora_matches_reference_gpu(case, dtype):
    pattern, num_tokens, k, ranks, widths, hidden, no_module = case
    stack, meta, x, y = _make_case(pattern, num_tokens, k, ranks, widths, hidden, dtype, no_module)
    _check_case(stack, meta, x, y, atol=5e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", PATTERNS)
def test_composed_lora_cuda_graph_replays_new_compositions(pattern):
    stack, meta, x, y = _make_case(pattern, 64, 2, (16, 64, 8, 32) * 4, (4096, 1024, 1024), 4096,
                                   torch.bfloat16, True)
    y0 = y.clone()
    backend.composed_lora(y, x, stack, meta)  # warm up: compile, cache buffers and pointer tables
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.composed_lora(y, x, stack, meta)
    gen = torch.Generator().manual_seed(11)
    for k in (1, 2, 4):
        meta.fill(_slots(pattern, 64, k, 16, gen).to(DEVICE), torch.rand(64, k, generator=gen).to(DEVICE))
        y.copy_(y0)
        graph.replay()
        torch.testing.assert_close(y.float(), _expected(y0, x, stack, meta), atol=5e-2, rtol=2e-2)

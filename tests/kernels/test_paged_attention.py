"""Triton paged attention and write_kv against the plain-torch oracle.

On CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py) on small shapes; the `gpu`
cases use Llama-3-8B attention shapes, bf16, and a decode step replayed from a CUDA graph.
"""

import math

import pytest
import torch

from tessera_kernels.paged_attention import AttentionMeta
from tessera_kernels.paged_attention import reference
from tessera_kernels.paged_attention import triton as backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _make_case(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """Random caches with each sequence's blocks scattered over the pool (spare blocks stay random)."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).int()
    tables = torch.zeros(len(seq_lens) + 2, max(per_seq) + 1, dtype=torch.int32)
    first = 0
    for i, count in enumerate(per_seq):
        tables[i, :count] = order[first : first + count]
        first += count
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    cu = torch.zeros(len(seq_lens) + 3, dtype=torch.int32)
    cu[1 : len(seq_lens) + 1] = torch.tensor(query_lens).cumsum(0)
    cu[len(seq_lens) + 1 :] = cu[len(seq_lens)]
    seq_lens_t = torch.zeros(len(seq_lens) + 2, dtype=torch.int32)
    seq_lens_t[: len(seq_lens)] = torch.tensor(seq_lens)
    meta = AttentionMeta(tables.to(DEVICE), seq_lens_t.to(DEVICE), cu.to(DEVICE), len(seq_lens),
                         max(query_lens), max(seq_lens))
    q = torch.randn(sum(query_lens) + 2, heads, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache, meta


def _check(q, k_cache, v_cache, meta, window, atol, tiles=None):
    num_live = int(meta.cu_query_lens[meta.num_seqs])
    scale = 1 / math.sqrt(q.shape[-1])
    expected = torch.full_like(q, 7.0)
    reference.paged_attention(expected, q, k_cache, v_cache, meta, scale, window)
    out = torch.full_like(q, 7.0)
    backend.paged_attention(out, q, k_cache, v_cache, meta, scale, window, tiles=tiles)
    torch.testing.assert_close(out[:num_live].float(), expected[:num_live].float(), atol=atol, rtol=atol)
    assert torch.all(out[num_live:] == 7.0), "rows past the live tokens were written"


@pytest.mark.parametrize("budget", [1 << 24, 1000])  # one decode batch; several (a batch per few sequences)
@pytest.mark.parametrize("heads, kv_heads, window", [(8, 2, None), (4, 4, 5), (6, 1, None)])
def test_the_references_decode_batches_equal_attention_one_sequence_at_a_time(budget, heads, kv_heads, window,
                                                                             monkeypatch):
    monkeypatch.setattr(reference, "_DECODE_BATCH_ELEMENTS", budget)
    seq_lens, query_lens = [1, 37, 9, 16, 60, 23, 3, 41], [1, 1, 4, 1, 1, 7, 1, 1]  # decodes among prefills
    q, k_cache, v_cache, meta = _make_case(seq_lens, query_lens, heads, kv_heads, 32, 8, torch.float32, seed=3)
    meta.block_tables[:, -1] = -1  # a table's unused tail may hold anything
    expected = torch.full_like(q, 7.0)
    for i in range(meta.num_seqs):
        reference.attend_one(expected, q, k_cache, v_cache, meta, 0.2, window, i)
    out = torch.full_like(q, 7.0)
    reference.paged_attention(out, q, k_cache, v_cache, meta, 0.2, window)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert torch.all(out[sum(query_lens):] == 7.0)


@pytest.fixture
def small_partitions(monkeypatch):
    """Force several decode splits on short contexts."""
    monkeypatch.setattr(backend, "_PARTITION", 32)
    monkeypatch.setattr(backend, "_TARGET_PROGRAMS", 1 << 20)


DECODE = [  # heads, kv_heads, head_dim, block_size, window
    (4, 4, 64, 16, None),
    (8, 2, 128, 32, None),
    (16, 2, 64, 16, 20),
    (8, 1, 64, 32, None),
]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("shape", DECODE, ids=lambda s: f"h{s[0]}-kv{s[1]}-d{s[2]}-b{s[3]}-w{s[4]}")
def test_decode(shape, split, request):
    if split:
        request.getfixturevalue("small_partitions")
    heads, kv_heads, head_dim, block_size, window = shape
    seq_lens = [37, 1, 70, 16]
    case = _make_case(seq_lens, [1] * 4, heads, kv_heads, head_dim, block_size, torch.float32)
    _check(*case, window, atol=1e-4)


PREFILL = [  # seq_lens, query_lens, heads, kv_heads, head_dim, block_size, window
    ([70, 9], [70, 9], 4, 4, 64, 16, None),  # fresh prefill, two query tiles
    ([50, 40], [7, 18], 8, 2, 64, 16, None),  # chunked prefill over cached blocks
    ([33, 5, 47, 2], [1, 5, 12, 1], 8, 1, 128, 32, None),  # mixed: decode rows among chunks
    ([60, 23], [20, 23], 16, 2, 64, 32, 13),  # sliding window
]


@pytest.fixture(params=["split", "prefill"])
def kernel(request, monkeypatch):
    """Both kernels on steps of several query tokens per sequence: the split-context decode kernel (as the
    backend picks it for up to SPLIT_QUERIES), and the prefill kernel (forced by lowering that to 1)."""
    if request.param == "prefill":
        monkeypatch.setattr(backend, "SPLIT_QUERIES", 1)
    return request.param


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("case", PREFILL, ids=["fresh", "chunked", "mixed", "window"])
def test_prefill(case, block_size, kernel):
    seq_lens, query_lens, heads, kv_heads, head_dim, _, window = case
    data = _make_case(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, torch.float32)
    _check(*data, window, atol=1e-4)


VERIFY = [  # heads, kv_heads, head_dim, window: GQA groups 4, 7 (not a power of two), 8 and 1
    (8, 2, 64, None),
    (14, 2, 32, None),
    (16, 2, 64, 23),
    (4, 4, 32, None),
]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("shape", VERIFY, ids=lambda s: f"h{s[0]}-kv{s[1]}-d{s[2]}-w{s[3]}")
def test_decode_with_drafts(shape, split, request):
    """Speculative verify steps: a sequence's last token plus up to 16 drafts (1-17 query tokens) over contexts
    longer than a split, through the decode kernel; groups of 7 and 8 heads need several query tiles."""
    if split:
        request.getfixturevalue("small_partitions")
    heads, kv_heads, head_dim, window = shape
    data = _make_case([90, 17, 130, 41, 5], [17, 17, 1, 9, 5], heads, kv_heads, head_dim, 16, torch.float32,
                      seed=4)
    assert data[3].max_query_len <= backend.SPLIT_QUERIES
    _check(*data, window, atol=1e-4)


@pytest.mark.parametrize(("max_query_len", "group", "queries", "rows"),
                         [(1, 4, 1, 16), (1, 32, 1, 32), (1, 128, 1, 128), (17, 4, 16, 64), (17, 7, 8, 64),
                          (17, 1, 32, 32), (3, 4, 4, 16), (5, 7, 8, 64)])
def test_query_tile(max_query_len, group, queries, rows):
    """Plain decode keeps one query token per program (the kernel it had), drafts fill up to SPLIT_ROWS rows."""
    assert backend._query_tile(max_query_len, group) == (queries, rows)


@pytest.mark.parametrize("tiles", [(16, 16), (16, 128), (64, 32)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_tiles_smaller_and_larger_than_a_block_give_the_same_attention(tiles, block_size, small_partitions):
    """A tile spans several KV blocks or part of one; decode splits stay whole tiles."""
    decode = _make_case([37, 1, 70, 16], [1] * 4, 8, 2, 64, block_size, torch.float32, seed=1)
    _check(*decode, None, atol=1e-4, tiles=tiles)
    mixed = _make_case([33, 5, 47, 2], [1, 5, 12, 1], 8, 2, 64, block_size, torch.float32, seed=2)
    _check(*mixed, 13, atol=1e-4, tiles=tiles)


@pytest.mark.parametrize("tiles", [(16,), (8, 64), (32, 48)])
def test_bad_tiles_are_refused(tiles):
    q, k_cache, v_cache, meta = _make_case([5], [5], 2, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="two powers of two >= 16"):
        backend.paged_attention(torch.empty_like(q), q, k_cache, v_cache, meta, 0.25, tiles=tiles)


@pytest.mark.parametrize("max_query_len", [1, 6])
def test_fp16(max_query_len):
    data = _make_case([29, 40], [1, max_query_len], 8, 2, 64, 16, torch.float16, seed=3)
    _check(*data, None, atol=2e-2)


def test_write_kv_matches_reference_and_skips_padding():
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.randn(6, 16, 2, 64, generator=gen).to(DEVICE)
    v_cache = torch.randn(6, 16, 2, 64, generator=gen).to(DEVICE)
    k = torch.randn(9, 2, 64, generator=gen).to(DEVICE)
    v = torch.randn(9, 2, 64, generator=gen).to(DEVICE)
    slots = torch.tensor([3, 17, 95, -1, 40, 0, -1, 64, 50, 11], dtype=torch.int64).to(DEVICE)
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    reference.write_kv(k, v, *caches[0], slots)
    backend.write_kv(k, v, *caches[1], slots)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert not torch.equal(caches[1][0], k_cache)


FP8 = torch.float8_e4m3fn


def _fp8_case(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """The case's caches rounded to float8 e4m3 (queries stay in `dtype`)."""
    q, k_cache, v_cache, meta = _make_case(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed)
    return q, k_cache.to(FP8), v_cache.to(FP8), meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["decode", "drafts", "prefill"])
def test_attention_over_an_fp8_cache_reads_its_values_in_the_queries_dtype(dtype, kind, monkeypatch):
    """Over an fp8 cache both paths attend to exactly the cached e4m3 values, computed in q's dtype (fp32 here:
    the reference's precision; fp16: the half-precision tolerance)."""
    if kind == "prefill":
        monkeypatch.setattr(backend, "SPLIT_QUERIES", 1)
    seq_lens, query_lens = {"decode": ([37, 1, 70, 16], [1] * 4), "drafts": ([90, 17, 41], [17, 17, 9]),
                            "prefill": ([50, 40, 33], [7, 18, 1])}[kind]
    data = _fp8_case(seq_lens, query_lens, 8, 2, 64, 16, dtype, seed=6)
    _check(*data, None, atol=1e-4 if dtype == torch.float32 else 2e-2)
    q, k_cache, v_cache, meta = data  # and the same attention as over a cache of q's dtype holding those values
    wide = torch.full_like(q, 7.0)
    reference.paged_attention(wide, q, k_cache.to(dtype), v_cache.to(dtype), meta, 0.125)
    narrow = torch.full_like(q, 7.0)
    backend.paged_attention(narrow, q, k_cache, v_cache, meta, 0.125)
    live = int(meta.cu_query_lens[meta.num_seqs])
    torch.testing.assert_close(narrow[:live].float(), wide[:live].float(), atol=1e-4 if dtype == torch.float32 else 2e-2,
                               rtol=1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_into_fp8_rounds_and_saturates_like_the_reference(dtype):
    gen = torch.Generator().manual_seed(7)
    k = (torch.randn(9, 2, 64, generator=gen) * 3).to(DEVICE, dtype)
    v = (torch.randn(9, 2, 64, generator=gen) * 3).to(DEVICE, dtype)
    k[0, 0, :4] = torch.tensor([500.0, -1000.0, 448.0, 1e-4])  # past e4m3's range, at its edge, under its subnormals
    slots = torch.tensor([3, 17, 95, -1, 40, 0, -1, 64, 50], dtype=torch.int64).to(DEVICE)
    caches = [tuple(torch.zeros(6, 16, 2, 64, device=DEVICE).to(FP8) for _ in range(2)) for _ in range(2)]
    reference.write_kv(k, v, *caches[0], slots)
    backend.write_kv(k, v, *caches[1], slots)
    for ours, theirs in zip(caches[1], caches[0]):
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))  # bit for bit
    stored = caches[1][0].view(-1, 2, 64)[3, 0, :4].float()
    assert stored.tolist() == [448.0, -448.0, 448.0, 0.0]
    assert not torch.isnan(caches[1][0].float()).any()
    torch.testing.assert_close(caches[1][1].view(-1, 2, 64)[17].float(), v[1].float(), atol=0.07, rtol=0.07)


def test_write_kv_rounds_every_e4m3_tie_and_subnormal_as_torch_does():
    """Ties to even between every pair of neighbouring e4m3 values (normal and subnormal), the values themselves,
    their neighbours in fp32, and log-spaced magnitudes: bit for bit torch's cast."""
    finite = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    finite = finite[torch.isfinite(finite)].unique()  # sorted, +-0 merged
    ties = (finite[1:] + finite[:-1]) / 2
    near = torch.cat([torch.nextafter(finite, finite + 1), torch.nextafter(finite, finite - 1)])
    spread = torch.logspace(-6, 2.7, 2000) * torch.where(torch.rand(2000) < 0.5, -1.0, 1.0)
    values = torch.cat([finite, ties, near, spread, torch.tensor([449.0, 464.0, 1e9, -1e9])])
    values = torch.cat([values, torch.zeros((-len(values)) % 64)]).view(-1, 1, 64).to(DEVICE)
    slots = torch.arange(values.shape[0], dtype=torch.int64, device=DEVICE)
    caches = [tuple(torch.zeros(values.shape[0], 1, 1, 64, device=DEVICE).to(FP8) for _ in range(2)) for _ in range(2)]
    reference.write_kv(values, values, *caches[0], slots)
    backend.write_kv(values, values, *caches[1], slots)
    assert torch.equal(caches[1][0].view(torch.uint8), caches[0][0].view(torch.uint8))


GPU_SHAPES = [(32, 8, 128, 16), (32, 32, 64, 32), (32, 4, 128, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"h{s[0]}-kv{s[1]}-d{s[2]}-b{s[3]}")
@pytest.mark.parametrize("kind", ["decode", "prefill", "chunked", "mixed", "drafts"])
@pytest.mark.parametrize("window", [None, 256])
def test_attention_gpu_bf16(shape, kind, window):
    heads, kv_heads, head_dim, block_size = shape
    seq_lens, query_lens = {
        "decode": ([1, 700, 4099, 33] * 4, [1] * 16),
        "prefill": ([513, 100, 1024], [513, 100, 1024]),
        "chunked": ([1500, 700], [256, 300]),
        "mixed": ([900, 17, 4000, 64], [1, 17, 128, 1]),
        "drafts": ([900, 17, 4000, 64, 2500], [17, 17, 5, 1, 9]),
    }[kind]
    data = _make_case(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, torch.bfloat16)
    _check(*data, window, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["decode", "prefill", "drafts"])
def test_attention_gpu_bf16_over_an_fp8_cache(kind):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 e4m3 needs compute capability 8.9+")
    seq_lens, query_lens = {"decode": ([1, 700, 4099, 33] * 4, [1] * 16), "prefill": ([513, 100, 1024], [513, 100, 1024]),
                            "drafts": ([900, 17, 4000, 64, 2500], [17, 17, 5, 1, 9])}[kind]
    _check(*_fp8_case(seq_lens, query_lens, 32, 8, 128, 16, torch.bfloat16), None, atol=2e-2)


@pytest.mark.gpu
def test_decode_cuda_graph_replays_new_lengths():
    q, k_cache, v_cache, meta = _make_case([300, 2000, 77, 1000], [1] * 4, 32, 8, 128, 16, torch.bfloat16)
    out = torch.zeros_like(q)
    scale = 1 / math.sqrt(128)
    backend.paged_attention(out, q, k_cache, v_cache, meta, scale)  # warm up: compile, cache partials
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.paged_attention(out, q, k_cache, v_cache, meta, scale)
    for lengths in ([299, 1999, 2, 1000], [1, 64, 77, 513]):
        meta.seq_lens[:4].copy_(torch.tensor(lengths, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        expected = torch.zeros_like(q)
        reference.paged_attention(expected, q, k_cache, v_cache, meta, scale)
        torch.testing.assert_close(out[:4].float(), expected[:4].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_decode_with_drafts_cuda_graph_replays_new_lengths():
    """A verify step captured at 17 query tokens per sequence replays with other draft counts and contexts."""
    q, k_cache, v_cache, meta = _make_case([300, 2000, 77, 1000], [17] * 4, 32, 8, 128, 16, torch.bfloat16)
    out = torch.zeros_like(q)
    scale = 1 / math.sqrt(128)
    meta.max_seq_len = 4096  # the graph's decode splits must cover every replayed context
    backend.paged_attention(out, q, k_cache, v_cache, meta, scale)  # warm up: compile, cache partials
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.paged_attention(out, q, k_cache, v_cache, meta, scale)
    for lengths, queries in (([299, 1999, 20, 1000], [17, 1, 3, 17]), ([18, 64, 77, 513], [2, 17, 17, 9])):
        meta.seq_lens[:4].copy_(torch.tensor(lengths, dtype=torch.int32))
        meta.cu_query_lens[1:5].copy_(torch.tensor(queries).cumsum(0).to(torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        expected = torch.zeros_like(q)
        reference.paged_attention(expected, q, k_cache, v_cache, meta, scale)
        live = sum(queries)
        torch.testing.assert_close(out[:live].float(), expected[:live].float(), atol=2e-2, rtol=2e-2)

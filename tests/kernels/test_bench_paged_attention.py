"""benchmarks/kernels/bench_paged_attention.py: the paged and the contiguous layouts hold the same keys and
values, so ours and SDPA agree (interpreter on the CPU, small shapes), and a wrong layout would show."""

import pytest
import torch

from benchmarks.kernels import bench_paged_attention as bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_heads(monkeypatch):
    monkeypatch.setattr(bench, "HEADS", 4)
    monkeypatch.setattr(bench, "KV_HEADS", 2)
    monkeypatch.setattr(bench, "HEAD_DIM", 16)


@pytest.mark.parametrize("tiles", [None, (16, 16), (64, 32)])
@pytest.mark.parametrize("mode,batch,length", [("decode", 3, 70), ("prefill", 2, 40), ("drafts", 2, 50)])
def test_ours_and_sdpa_agree_on_the_same_data(small_heads, mode, batch, length, tiles):
    make_ours, run_sdpa, _, moved = bench.setup(mode, batch, length, 16, torch.float16, DEVICE)
    _, err = make_ours(tiles)
    assert err < 2e-3
    assert moved > 0


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_an_fp8_cache_and_sdpa_on_its_values_agree(small_heads, mode):
    make_ours, _, _, moved = bench.setup(mode, 2, 40, 16, torch.float16, DEVICE, kv_dtype=torch.float8_e4m3fn)
    _, err = make_ours()
    assert err < 2e-3
    wide = bench.setup(mode, 2, 40, 16, torch.float16, DEVICE)[3]
    queries = {"decode": 2, "prefill": 80}[mode] * 4 * 16  # tokens x heads x head_dim
    assert wide - moved == 2 * 2 * 40 * 2 * 16 * (2 - 1)  # K and V: one byte an element instead of two
    assert moved == 2 * 2 * 40 * 2 * 16 + 2 * queries * 2


def test_a_misplaced_block_shows_in_the_error(small_heads, monkeypatch):
    real = bench._paged

    def shuffled(*args):
        tables, k_cache, v_cache, k, v = real(*args)
        return tables.flip(1).contiguous(), k_cache, v_cache, k, v  # the blocks in the wrong order

    monkeypatch.setattr(bench, "_paged", shuffled)
    make_ours, *_ = bench.setup("prefill", 2, 64, 16, torch.float16, DEVICE)  # causal: key order matters
    assert make_ours()[1] > 1e-2


def test_arguments_and_the_message_without_cuda():
    args = bench._parse_args([])
    assert args.block_sizes == [16, 32] and args.modes == ["decode", "prefill", "drafts"] and args.dtype == "bfloat16"
    assert args.tiles == [16, 32, 64] and args.kv_cache_dtype == "auto"
    with pytest.raises(SystemExit) as exit_info:
        bench._parse_args(["--tiles", "16", "24"])
    assert exit_info.value.code == 2
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            bench.main([])

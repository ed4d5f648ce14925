"""Paged attention on Llama-3-8B shapes (32 heads, 8 KV heads, head_dim 128) vs SDPA's flash backend.

    python benchmarks/kernels/bench_paged_attention.py --out results/paged_attention.json

The same keys and values are laid out twice: paged (block_size tokens per block, blocks scattered over
the pool) for ours, and contiguous [batch, heads, len, head_dim] for torch's scaled_dot_product_attention
with the flash backend (GQA through enable_gqa where the backend takes it, else KV repeated beforehand,
outside the timing). Decode is one query token per sequence; prefill is a fresh causal prompt; drafts is a
speculative verify step, the last DRAFT_QUERIES positions of each context as queries. The floor is K and V
read once plus q and out, over the copy bandwidth measured in this run.

Drafts rows also time the chunked-prefill kernel on the same step (SPLIT_QUERIES lowered to 1), the kernel
those steps took before the decode kernel learned several query tokens, so the rows say whether
SPLIT_QUERIES should stand. SDPA's flash backend has no bottom-right causal mask for fewer queries than keys:
its drafts time is the same attention without the mask (the same bytes and, within DRAFT_QUERIES keys, the
same FLOPs), and the error is measured against SDPA with the explicit mask.

`--kv-cache-dtype fp8` stores our caches as float8 e4m3 (EngineConfig.kv_cache_dtype fp8); SDPA then gets those
values in the model's dtype (the same attention), and the floor counts the fp8 bytes of K and V.
"""

import argparse
import json
import math
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tessera_kernels.paged_attention import AttentionMeta  # noqa: E402
from router.atomic import write_file  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DECODE = [(1, 4096), (8, 2048), (32, 1024), (64, 4096), (128, 512), (256, 2048)]  # (batch, context)
PREFILL = [(1, 2048), (1, 8192), (4, 1024), (8, 512)]  # (batch, prompt length)
DRAFTS = [(1, 4096), (8, 2048), (32, 1024)]  # (batch, context)
DRAFT_QUERIES = 17
"""Query tokens per sequence of a drafts row: the last token and the prediction source's 16 drafts."""
CASES = {"decode": DECODE, "prefill": PREFILL, "drafts": DRAFTS}


def _paged(batch: int, context: int, block_size: int, dtype, gen, device: str, kv_dtype=None) -> tuple:
    """Random caches (in `kv_dtype`, default `dtype`), a scattered block table, and the same K/V contiguous in
    `dtype`: [batch, kv_heads, ctx, D]."""
    per_seq = triton.cdiv(context, block_size)
    tables = torch.randperm(batch * per_seq, generator=gen).view(batch, per_seq).int().to(device)
    shape = (batch * per_seq, block_size, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=device, dtype=dtype).to(kv_dtype or dtype)
    v_cache = torch.randn(shape, device=device, dtype=dtype).to(kv_dtype or dtype)
    contiguous = lambda c: c[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).to(dtype).contiguous()  # noqa: E731
    return tables, k_cache, v_cache, contiguous(k_cache), contiguous(v_cache)


def _masked_sdpa(q, k, v) -> torch.Tensor:
    """q's rows as the last positions of the context (bottom-right causal), through whichever SDPA backend takes
    an explicit mask: the drafts rows' expected output."""
    query_len, context = q.shape[2], k.shape[2]
    allowed = torch.arange(context, device=q.device)[None, :] <= torch.arange(context - query_len, context,
                                                                             device=q.device)[:, None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


def _sdpa(q, k, v, causal: bool):
    """SDPA with the flash backend; returns the callable and whether GQA ran natively."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(kk, vv, gqa):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)

    try:
        run(k, v, True)
        return (lambda: run(k, v, True)), True
    except RuntimeError:
        k_rep, v_rep = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
        return (lambda: run(k_rep, v_rep, False)), False


def setup(mode: str, batch: int, length: int, block_size: int, dtype, device: str = "cuda", kv_dtype=None) -> tuple:
    """(ours(tiles) -> (run, max abs difference from SDPA's output), run SDPA, whether SDPA ran GQA natively,
    bytes moved)."""
    from tessera_kernels.paged_attention import triton as ours

    gen = torch.Generator().manual_seed(batch * 7 + length)
    tables, k_cache, v_cache, k, v = _paged(batch, length, block_size, dtype, gen, device, kv_dtype)
    query_len = {"decode": 1, "prefill": length, "drafts": DRAFT_QUERIES}[mode]
    q = torch.randn(batch * query_len, HEADS, HEAD_DIM, device=device, dtype=dtype)  # [tokens, heads, D]
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * query_len
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    meta = AttentionMeta(tables, seq_lens, cu, batch, query_len, length)
    scale = 1 / math.sqrt(HEAD_DIM)
    q_sdpa = q.view(batch, query_len, HEADS, HEAD_DIM).transpose(1, 2)
    run_sdpa, native_gqa = _sdpa(q_sdpa, k, v, causal=mode == "prefill")
    expected = (_masked_sdpa(q_sdpa, k, v) if mode == "drafts" else run_sdpa()).float()  # [batch, heads, query_len, D]

    def make_ours(tiles=None):
        out = torch.empty_like(q)
        run = lambda: ours.paged_attention(out, q, k_cache, v_cache, meta, scale, tiles=tiles)  # noqa: E731
        run()
        err = (out.view(batch, query_len, HEADS, HEAD_DIM).transpose(1, 2).float() - expected).abs().max()
        return run, err.item()

    moved = 2 * k.numel() * k_cache.element_size() + 2 * q.numel() * q.element_size()
    return make_ours, run_sdpa, native_gqa, moved


def _time(fn) -> tuple[float, float]:
    """Median microseconds, eager (L2 flushed) and under CUDA-graph replay."""
    return (1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"),
            1e3 * triton.testing.do_bench_cudagraph(fn, rep=25, return_mode="median"))


def _bench(mode: str, batch: int, length: int, block_size: int, dtype, bandwidth: float, tiles: list[int],
           kv_dtype=None):
    """One row per tile of the mode's kernel (the other mode's tile stays at TILES); SDPA timed once, and for
    drafts the prefill kernel at its default tile."""
    from tessera_kernels.paged_attention import triton as ours
    from tessera_kernels.paged_attention.triton import TILES

    make_ours, run_sdpa, native_gqa, moved = setup(mode, batch, length, block_size, dtype, kv_dtype=kv_dtype)
    sdpa_us, sdpa_graph_us = _time(run_sdpa)
    prefill_kernel = {}
    if mode == "drafts":
        split_queries, ours.SPLIT_QUERIES = ours.SPLIT_QUERIES, 1
        try:
            run_prefill, err = make_ours()
            prefill_kernel = dict(prefill_kernel_graph_us=_time(run_prefill)[1], prefill_kernel_err=err)
        finally:
            ours.SPLIT_QUERIES = split_queries
    rows = []
    for tile in tiles:
        pair = (TILES[0], tile) if mode == "prefill" else (tile, TILES[1])
        run_ours, err = make_ours(pair)
        ours_us, ours_graph_us = _time(run_ours)
        floor_us = 1e6 * moved / bandwidth
        rows.append(dict(mode=mode, batch=batch, length=length, block_size=block_size, tile=tile,
                         kv_cache_dtype=str(kv_dtype or dtype).removeprefix("torch."),
                         default_tile=tile == TILES[mode == "prefill"], native_gqa=native_gqa, max_abs_err=err,
                         ours_us=ours_us, ours_graph_us=ours_graph_us, sdpa_us=sdpa_us, sdpa_graph_us=sdpa_graph_us,
                         floor_us=floor_us, ours_over_sdpa=ours_graph_us / sdpa_graph_us,
                         ours_over_floor=ours_graph_us / floor_us, **prefill_kernel))
    return rows


def _copy_bandwidth() -> float:
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/kernels/results/paged_attention.json", help="JSON results path")
    parser.add_argument("--block-sizes", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--modes", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="our caches' dtype: auto (--dtype) or fp8 (float8 e4m3; needs compute capability 8.9+)")
    parser.add_argument("--tiles", nargs="+", type=int, default=[16, 32, 64],
                        help="context positions per kernel step to time (powers of two >= 16); the "
                             "default tile of each kernel (tessera_kernels.paged_attention.triton.TILES) is marked")
    args = parser.parse_args(argv)
    if any(t < 16 or t & (t - 1) for t in args.tiles):
        parser.error(f"--tiles must be powers of two >= 16, got {args.tiles}")
    return args


def main(argv=None) -> None:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_paged_attention needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else None
    bandwidth = _copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s  dtype {args.dtype}  "
          f"KV cache {args.kv_cache_dtype}")
    document = {"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bandwidth, "dtype": args.dtype,
                "kv_cache_dtype": args.kv_cache_dtype, "rows": []}
    for mode in args.modes:
        for block_size in args.block_sizes:
            for batch, length in CASES[mode]:
                for row in _bench(mode, batch, length, block_size, dtype, bandwidth, args.tiles, kv_dtype):
                    document["rows"].append(row)
                    write_file(args.out, json.dumps(document, indent=1))  # every row: a run cut short keeps them
                    print(f"{mode:>7} bs{block_size:<3} B{batch:<4} L{length:<5} tile{row['tile']:<4}"
                          f"{'*' if row['default_tile'] else ' '}| ours {row['ours_us']:8.1f} graph "
                          f"{row['ours_graph_us']:8.1f} | sdpa {row['sdpa_us']:8.1f} graph {row['sdpa_graph_us']:8.1f}"
                          f" | floor {row['floor_us']:7.1f} | ours/sdpa {row['ours_over_sdpa']:5.2f} "
                          f"ours/floor {row['ours_over_floor']:5.2f} | err {row['max_abs_err']:.1e}"
                          + (f" | prefill kernel graph {row['prefill_kernel_graph_us']:8.1f}" if mode == "drafts" else ""),
                          flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

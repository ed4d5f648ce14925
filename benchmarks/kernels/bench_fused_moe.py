"""fused_moe on the expert shapes of Qwen3-30B-A3B and Mixtral-8x7B: Tessera's Triton kernels vs transformers'
own expert loop and its grouped-GEMM path vs the floor.

    python benchmarks/kernels/bench_fused_moe.py --out results/fused_moe.json

For every model shape and token count (decode 1 / 16 / 64 / 256, prefill 2048) it routes random tokens with
`tessera_kernels.fused_moe.route` from random router logits, then times, with bench_composed_lora's helpers
(`triton.testing.do_bench`: CUDA events, warm-up, median, L2 flushed; and `do_bench_cudagraph`):

    ours      tessera_kernels.fused_moe (the device-side sort and both Triton GEMMs), eagerly and under CUDA-graph
              replay (the decode path: it never syncs with the host)
    loop      transformers' expert loop (`Qwen3MoeExperts.forward` with the "eager" experts implementation: one
              pass per expert hit, a host sync to find them), eagerly; it cannot be captured
    grouped   transformers' "grouped_mm" experts implementation (torch._grouped_mm over the sorted tokens), where
              this transformers and torch have it, eagerly and under replay when it captures
    floor     bytes that must move / copy bandwidth measured in this run: every expert some token is routed to
              read once (w13 and w2), x in and y out

Ratios: ours/loop, ours/grouped, ours/floor. The error columns compare ours and the loop with the fp32 reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from benchmarks.kernels.bench_composed_lora import _copy_bandwidth, _time  # noqa: E402
from benchmarks.kernels.bench_fused import _fmt  # noqa: E402
from router.atomic import write_file  # noqa: E402
from tessera_kernels.fused_moe import reference, route  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """One model's sparse MLP."""

    experts: int
    top_k: int
    hidden: int
    inter: int
    renormalize: bool


SHAPES = {
    "qwen3-30b-a3b": Shape(experts=128, top_k=8, hidden=2048, inter=768, renormalize=True),
    "mixtral-8x7b": Shape(experts=8, top_k=2, hidden=4096, inter=14336, renormalize=True),
}


def _hf_experts(shape: Shape, w13: torch.Tensor, w2: torch.Tensor, implementation: str):
    """transformers' Qwen3-MoE experts module (Mixtral's runs the same code) over the same weights, dispatching to
    `implementation` ("eager": the loop; "grouped_mm"). A transformers without that implementation fails at the
    call, which bench_case reports."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.inter, num_experts=shape.experts,
                            num_experts_per_tok=shape.top_k)
    config._experts_implementation = implementation
    with torch.device("meta"):
        experts = Qwen3MoeExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return experts


def _floor_bytes(shape: Shape, ids: torch.Tensor, tokens: int, element: int) -> int:
    hit = int(torch.unique(ids).numel())
    weights = hit * 3 * shape.inter * shape.hidden * element
    return weights + 2 * tokens * shape.hidden * element


def _error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected).abs().max() / expected.abs().max()).item()


def bench_case(name: str, shape: Shape, tokens: int, dtype: torch.dtype, bandwidth: float) -> dict:
    from tessera_kernels.fused_moe import triton as ours

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    w13 = torch.randn(shape.experts, 2 * shape.inter, shape.hidden, device="cuda", dtype=dtype, generator=gen)
    w13 *= shape.hidden**-0.5
    w2 = torch.randn(shape.experts, shape.hidden, shape.inter, device="cuda", dtype=dtype, generator=gen)
    w2 *= shape.inter**-0.5
    x = torch.randn(tokens, shape.hidden, device="cuda", dtype=dtype, generator=gen)
    logits = torch.randn(tokens, shape.experts, device="cuda", generator=gen)
    weights, ids = route(logits, shape.top_k, shape.renormalize)
    expected = reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    element = torch.empty((), dtype=dtype).element_size()
    row = {"model": name, "tokens": tokens, "experts_hit": int(torch.unique(ids).numel()),
           "floor_us": 1e6 * _floor_bytes(shape, ids, tokens, element) / bandwidth}
    run_ours = lambda: ours.fused_moe(x, w13, w2, weights, ids)  # noqa: E731
    row["ours_err"] = _error(run_ours(), expected)
    row["ours_us"] = _time(run_ours, graph=False)
    row["ours_graph_us"] = _time(run_ours, graph=True)
    hf_weights = weights.to(dtype)
    for label, implementation in (("loop", "eager"), ("grouped", "grouped_mm")):
        experts = _hf_experts(shape, w13, w2, implementation)
        run = lambda experts=experts: experts(x, ids, hf_weights)  # noqa: E731
        try:
            row[f"{label}_err"] = _error(run(), expected)
        except Exception as exc:  # noqa: BLE001 - a path this torch cannot run is reported, not fatal
            print(f"    {label}: {type(exc).__name__}: {exc}")
            row[f"{label}_us"] = row[f"{label}_graph_us"] = row[f"{label}_err"] = None
            continue
        row[f"{label}_us"] = _time(run, graph=False)
        row[f"{label}_graph_us"] = None if label == "loop" else _time(run, graph=True)  # the loop syncs
    best_ours = min(v for v in (row["ours_us"], row["ours_graph_us"]) if v is not None)
    for peer in ("loop", "grouped"):
        row[f"ours_over_{peer}"] = None if row[f"{peer}_us"] is None else row["ours_us"] / row[f"{peer}_us"]
    row["ours_over_floor"] = best_ours / row["floor_us"]
    return row


def _print_row(row: dict) -> None:
    print(f"{row['model']:>14} T{row['tokens']:<5} hit {row['experts_hit']:>3} | ours {_fmt(row['ours_us'])} "
          f"graph {_fmt(row['ours_graph_us'])} | loop {_fmt(row['loop_us'])} | grouped {_fmt(row['grouped_us'])} "
          f"graph {_fmt(row['grouped_graph_us'])} | floor {_fmt(row['floor_us'])} | ours/loop "
          f"{_fmt(row['ours_over_loop'], 5, 2)} ours/grouped {_fmt(row['ours_over_grouped'], 5, 2)} ours/floor "
          f"{_fmt(row['ours_over_floor'], 5, 2)} | err {row['ours_err']:.1e}", flush=True)


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/kernels/results/fused_moe.json", help="JSON results path")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 256, 2048])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.tokens):
        parser.error(f"--tokens must be positive, got {args.tokens}")
    return args


def main(argv=None) -> None:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_moe needs a CUDA device (the Triton kernels are timed on the GPU); none is "
                         "visible")
    dtype = getattr(torch, args.dtype)
    bandwidth = _copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s  dtype {args.dtype}")
    rows = []
    for name in args.models:
        for tokens in args.tokens:
            rows.append(bench_case(name, SHAPES[name], tokens, dtype, bandwidth))
            _print_row(rows[-1])
            write_file(args.out, json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bandwidth,
                                             "dtype": args.dtype, "rows": rows}, indent=1))
            torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Fused elementwise ops on Llama-3-8B shapes: each Triton op vs the eager torch sequence it replaces
vs the floor.

    python benchmarks/kernels/bench_fused.py --out results/fused.json

Shapes: hidden 4096, 32 query / 8 KV heads of 128, intermediate 14336 (Qwen3-style per-head q/k norm
on the same heads). For every op and token count it times, with bench_composed_lora's helpers
(`triton.testing.do_bench`: CUDA events, warm-up, median, L2 flushed; and `do_bench_cudagraph`):

    fused   the Triton op (tessera_kernels.rms_norm / rotary / silu_mul), eager launch and CUDA-graph replay
    eager   the torch sequence it replaces (the ops' reference.py: what the model ran before)
    floor   bytes that must move / copy bandwidth measured in this run

    op              fused                                 eager it replaces                  floor bytes
    rms_norm        norm(x)                               HF RMSNorm                         x in, out
    add_rms_norm    norm(x, residual) -> (out, x + r)     x + r, then HF RMSNorm             x, r in; s, out
    qk_norm         norm(q), norm(k), [T, heads, 128]     HF RMSNorm on each                 q, k in, out
    rotary          q and k in place, one launch          RotaryEmbedding.forward on each    q, k in, out; cos, sin
    silu_mul        silu(gate) * up from gate_up          F.silu(gate) * up                  gate_up in, out

The per-layer line sums what one decoder layer runs: two add_rms_norm, one rotary, one silu_mul.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from benchmarks.kernels.bench_composed_lora import _copy_bandwidth, _time  # noqa: E402
from tessera_kernels.rms_norm import reference as rms_reference  # noqa: E402
from tessera_kernels.rotary import reference as rotary_reference  # noqa: E402
from tessera_kernels.silu_mul import reference as silu_reference  # noqa: E402
from router.atomic import write_file  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336
MAX_POSITIONS = 8192
EPS = 1e-5
OPS = ("rms_norm", "add_rms_norm", "qk_norm", "rotary", "silu_mul")
LAYER_OPS = ("add_rms_norm", "add_rms_norm", "rotary", "silu_mul")


@dataclass
class OpCase:
    """One op at one token count, its inputs captured by the callables."""

    fused: Callable[[], object]
    """The Triton op."""
    eager: Callable[[], object]
    """The eager torch sequence it replaces."""
    floor_bytes: int
    """Bytes that must move at least."""
    outputs: Callable[[], tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]
    """(fused outputs, eager outputs) on the same inputs, for the error columns."""


def _tuple(value) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _case(fused, eager, floor_bytes: int) -> OpCase:
    return OpCase(fused, eager, floor_bytes, lambda: (_tuple(fused()), _tuple(eager())))


def _qkv(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused qkv output [T, (32 + 2 * 8) * 128] and q, k as strided views into it, like the model's."""
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=dtype)
    return qkv, *_views(qkv)


def _views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = qkv.shape[0]
    q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)  # [T, 32, 128]
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)  # [T, 8, 128]
    return q, k


def _norm_cases(tokens: int, dtype: torch.dtype, element: int) -> dict[str, OpCase]:
    from tessera_kernels.rms_norm import triton as fused

    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype)  # [T, hidden]
    r = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype)
    w = torch.rand(HIDDEN, device="cuda", dtype=dtype) + 0.5
    _, q, k = _qkv(tokens, dtype)
    wh = torch.rand(HEAD_DIM, device="cuda", dtype=dtype) + 0.5
    return {
        "rms_norm": _case(lambda: fused.rms_norm(x, w, EPS), lambda: rms_reference.rms_norm(x, w, EPS),
                          (2 * tokens * HIDDEN + HIDDEN) * element),
        "add_rms_norm": _case(lambda: fused.rms_norm(x, w, EPS, r), lambda: rms_reference.rms_norm(x, w, EPS, r),
                              (4 * tokens * HIDDEN + HIDDEN) * element),
        "qk_norm": _case(lambda: (fused.rms_norm(q, wh, EPS), fused.rms_norm(k, wh, EPS)),
                         lambda: (rms_reference.rms_norm(q, wh, EPS), rms_reference.rms_norm(k, wh, EPS)),
                         2 * tokens * (HEADS + KV_HEADS) * HEAD_DIM * element),
    }


def _rotary_case(tokens: int, dtype: torch.dtype, element: int) -> OpCase:
    from tessera_kernels.rotary import triton as fused

    qkv, q, k = _qkv(tokens, dtype)
    angles = torch.rand(MAX_POSITIONS, HEAD_DIM, device="cuda") * 6.3  # [max_positions, head_dim]
    cos, sin = angles.cos(), angles.sin()
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), device="cuda")  # unsorted

    def eager():
        return rotary_reference._rotated(q, positions, cos, sin), rotary_reference._rotated(k, positions, cos, sin)

    def outputs():
        copy_q, copy_k = _views(qkv.clone())
        fused.rotary(copy_q, copy_k, positions, cos, sin)
        return (copy_q, copy_k), eager()

    floor = 2 * tokens * (HEADS + KV_HEADS) * HEAD_DIM * element + tokens * (2 * HEAD_DIM * 4 + 8)
    return OpCase(lambda: fused.rotary(q, k, positions, cos, sin), eager, floor, outputs)


def _silu_case(tokens: int, dtype: torch.dtype, element: int) -> OpCase:
    from tessera_kernels.silu_mul import triton as fused

    gate_up = torch.randn(tokens, 2 * INTERMEDIATE, device="cuda", dtype=dtype)  # [T, 2 * intermediate]
    return _case(lambda: fused.silu_mul(gate_up), lambda: silu_reference.silu_mul(gate_up),
                 3 * tokens * INTERMEDIATE * element)


def _cases(tokens: int, dtype: torch.dtype) -> dict[str, OpCase]:
    element = torch.empty((), dtype=dtype).element_size()
    return {**_norm_cases(tokens, dtype, element), "rotary": _rotary_case(tokens, dtype, element),
            "silu_mul": _silu_case(tokens, dtype, element)}


def _errors(case: OpCase) -> tuple[float, float]:
    """(max abs difference, fraction of elements bit-equal) of the fused op against the eager sequence."""
    got, want = case.outputs()
    diff = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
    equal = sum(int((g == w).sum()) for g, w in zip(got, want)) / sum(w.numel() for w in want)
    return diff, equal


def _bench(op: str, tokens: int, case: OpCase, bandwidth: float) -> dict:
    row = {"op": op, "tokens": tokens}
    row["max_abs_err"], row["bit_equal"] = _errors(case)
    row["fused_us"] = _time(case.fused, graph=False)
    row["fused_graph_us"] = _time(case.fused, graph=True)
    row["eager_us"] = _time(case.eager, graph=False)
    row["eager_graph_us"] = _time(case.eager, graph=True)
    row["floor_us"] = 1e6 * case.floor_bytes / bandwidth
    for name in ("fused", "fused_graph"):
        row[f"{name}_over_floor"] = _ratio(row[f"{name}_us"], row["floor_us"])
    row["speedup"] = _ratio(row["eager_us"], row["fused_us"])
    row["speedup_graph"] = _ratio(row["eager_graph_us"], row["fused_graph_us"])
    return row


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _fmt(value, width: int = 8, digits: int = 2) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def _print_row(row: dict) -> None:
    print(f"{row['op']:>13} T{row['tokens']:<5} | fused {_fmt(row['fused_us'])} graph {_fmt(row['fused_graph_us'])} "
          f"| eager {_fmt(row['eager_us'])} graph {_fmt(row['eager_graph_us'])} | floor {_fmt(row['floor_us'])} "
          f"| speedup {_fmt(row['speedup'], 5, 2)} graph {_fmt(row['speedup_graph'], 5, 2)} "
          f"| fused/floor {_fmt(row['fused_over_floor'], 5, 2)} | err {row['max_abs_err']:.1e} "
          f"bit-equal {100 * row['bit_equal']:.2f}%", flush=True)


def _layer_summary(rows: list[dict], tokens: int) -> dict:
    """What one decoder layer's elementwise work costs, fused vs eager (CUDA-graph timings)."""
    by_op = {row["op"]: row for row in rows if row["tokens"] == tokens}
    total = lambda key: sum(by_op[op][key] or 0.0 for op in LAYER_OPS)  # noqa: E731
    summary = {"tokens": tokens, "fused_graph_us": total("fused_graph_us"), "eager_graph_us": total("eager_graph_us"),
               "floor_us": total("floor_us")}
    print(f"{'per layer':>13} T{tokens:<5} | fused graph {_fmt(summary['fused_graph_us'])} "
          f"| eager graph {_fmt(summary['eager_graph_us'])} | floor {_fmt(summary['floor_us'])}", flush=True)
    return summary


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/kernels/results/fused.json", help="JSON results path")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[32, 256, 2048, 8192])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.tokens):
        parser.error(f"--tokens must be positive, got {args.tokens}")
    return args


def main(argv=None) -> None:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused needs a CUDA device (the Triton ops are timed on the GPU); none is visible")
    dtype = getattr(torch, args.dtype)
    bandwidth = _copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s  dtype {args.dtype}")
    rows, layers = [], []
    for tokens in args.tokens:
        cases = _cases(tokens, dtype)
        for op in args.ops:
            rows.append(_bench(op, tokens, cases[op], bandwidth))
            _print_row(rows[-1])
        if set(LAYER_OPS) <= set(args.ops):
            layers.append(_layer_summary(rows, tokens))
        del cases
        torch.cuda.empty_cache()
    document = {"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bandwidth, "dtype": args.dtype,
                "shapes": {"hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                           "intermediate": INTERMEDIATE}, "rows": rows, "per_layer": layers}
    write_file(args.out, json.dumps(document, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

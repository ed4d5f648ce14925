"""composed_lora on Llama-3-8B shapes: ours vs vLLM's lora_shrink/lora_expand, a torch reference, the floor.

    python benchmarks/kernels/bench_composed_lora.py --out results/composed_lora.json

For every (target, rank, pool size, tokens, k) it times, eagerly (`triton.testing.do_bench`, L2 flushed)
and under CUDA-graph replay (`do_bench_cudagraph`, L2 warm):

    ours    tessera_kernels.composed_lora.triton (shrink + expand, top-k compositions in one pass)
    peer    vLLM's lora_shrink + lora_expand (`import vllm_lora_peer as peer`, see shared/tools/README.md).
            vLLM applies one LoRA per token, so k = 2 runs as a stacked rank-2r LoRA per distinct
            composition, gates and scale folded into A (the stacking is setup, not timed).
    torch   tessera_kernels.composed_lora.reference (eager only: it syncs to list the step's slots)
    floor   bytes that must move / copy bandwidth measured in this run: each active module's A and B
            once, x read once, y read and written once.

Compositions: up to 256 tokens is decode (every token its own request, k modules drawn uniformly from
the pool); 2048 and 8192 tokens are prefill (requests of 512 tokens, one composition each).
"""

import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tessera_kernels.composed_lora import LoraStack, ModuleBatchMeta  # noqa: E402
from tessera_kernels.composed_lora import reference  # noqa: E402
from router.atomic import write_file  # noqa: E402

TARGETS = {  # name: (in_features, output slice widths) of Llama-3-8B
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}
PREFILL_REQUEST_TOKENS = 512


@dataclass(frozen=True)
class Case:
    target: str
    rank: int
    pool: int
    tokens: int
    k: int


def _stack(target: str, rank: int, pool: int, dtype: torch.dtype, device: str = "cuda") -> LoraStack:
    hidden, widths = TARGETS[target]
    stack = LoraStack.allocate(hidden, widths, pool, rank, dtype, device)
    for a, b in zip(stack.lora_a, stack.lora_b):
        a.normal_(std=hidden**-0.5)
        b.normal_(std=0.02)
    stack.scale.fill_(2.0 / rank)
    stack.ranks.fill_(rank)
    return stack


def _compositions(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, k] slots and gates: per token in decode, per 512-token request in prefill."""
    per_request = 1 if case.tokens <= 256 else PREFILL_REQUEST_TOKENS
    requests = triton.cdiv(case.tokens, per_request)
    slots = torch.stack([torch.randperm(case.pool, generator=gen)[: case.k] for _ in range(requests)])
    gates = torch.rand(requests, case.k, generator=gen) + 0.1
    repeat = lambda t: t.repeat_interleave(per_request, 0)[: case.tokens].contiguous()  # noqa: E731
    return repeat(slots).int(), repeat(gates)


def _floor_bytes(case: Case, slots: torch.Tensor, element: int) -> int:
    hidden, widths = TARGETS[case.target]
    active = torch.unique(slots).numel()
    weights = active * case.rank * (hidden * len(widths) + sum(widths))  # A per slice + B
    activations = case.tokens * (hidden + 2 * sum(widths))  # x in, y in and out
    return (weights + activations) * element


def _copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device copy (read + write counted)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _peer_call(peer, stack: LoraStack, slots, gates, x, y):
    """Stack each distinct (slots, gates) row into one rank-k*r LoRA; returns a closure over vLLM's ops."""
    device = x.device
    keys, mapping = torch.unique(torch.cat([slots.float(), gates], 1), dim=0, return_inverse=True)
    comp_slots, comp_gates = keys[:, : slots.shape[1]].long().to(device), keys[:, slots.shape[1] :].to(device)
    lora_a, lora_b = [], []
    for a, b in zip(stack.lora_a, stack.lora_b):
        weight = (comp_gates * stack.scale[comp_slots]).to(a.dtype)  # [C, k]
        stacked_a = a[comp_slots] * weight[:, :, None, None]  # [C, k, r, in]
        lora_a.append(stacked_a.flatten(1, 2).contiguous())  # [C, k*r, in]
        lora_b.append(b[comp_slots].permute(0, 2, 1, 3).flatten(2, 3).contiguous())  # [C, n, k*r]
    meta = peer.make_meta(mapping.int().to(device), keys.shape[0])
    buf = torch.empty(len(lora_a), x.shape[0], lora_a[0].shape[1], dtype=torch.float32, device=device)

    def run():
        peer.shrink(x, lora_a, buf, meta, 1.0)
        peer.expand(buf, lora_b, y, meta, add_inputs=True)

    return run


def _time(fn, graph: bool) -> float | None:
    """Median microseconds, or None when the callable cannot be timed that way."""
    try:
        if graph:
            return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=25, return_mode="median")
        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=25, return_mode="median")
    except Exception as exc:  # a peer that cannot be captured is reported, not fatal
        print(f"    timing failed ({'graph' if graph else 'eager'}): {type(exc).__name__}: {exc}")
        return None


def _prepare(case: Case, stacks: tuple[LoraStack, LoraStack], dtype, device: str = "cuda"):
    """The case's inputs on `device`: (slots, gates) on the host, meta, x, y, and y + the fp32 reference."""
    hidden, widths = TARGETS[case.target]
    gen = torch.Generator().manual_seed(case.tokens * 31 + case.k)
    slots, gates = _compositions(case, gen)
    meta = ModuleBatchMeta.allocate(case.tokens, case.k, case.pool, device)
    meta.fill(slots.to(device), gates.to(device))
    x = torch.randn(case.tokens, hidden, device=device, dtype=dtype)  # [tokens, hidden]
    y = torch.randn(case.tokens, sum(widths), device=device, dtype=dtype)  # [tokens, sum n_s]
    expected = y.to(torch.float32, copy=True)  # never y itself (an fp32 y would alias it)
    reference.composed_lora(expected, x.float(), stacks[1], meta)
    return slots, gates, meta, x, y, expected


def check_case(case: Case, stacks: tuple[LoraStack, LoraStack], peer, dtype, device: str = "cuda") -> dict:
    """Max abs error against the fp32 reference of ours and of the peer's stacked-LoRA call (None without
    a peer): the timings compare the same work only if both are small."""
    from tessera_kernels.composed_lora import triton as ours

    slots, gates, meta, x, y, expected = _prepare(case, stacks, dtype, device)
    out = y.clone()
    ours.composed_lora(out, x, stacks[0], meta)
    errors = {"max_abs_err": (out.float() - expected).abs().max().item(), "peer_max_abs_err": None}
    if peer is not None:
        out = y.clone()
        _peer_call(peer, stacks[0], slots, gates, x, out)()
        errors["peer_max_abs_err"] = (out.float() - expected).abs().max().item()
    return errors


def _bench_case(case: Case, stacks: tuple[LoraStack, LoraStack], peer, bandwidth: float, dtype) -> dict:
    from tessera_kernels.composed_lora import triton as ours

    stack = stacks[0]
    row = asdict(case) | check_case(case, stacks, peer, dtype)
    slots, gates, meta, x, y, _ = _prepare(case, stacks, dtype)
    row["ours_us"] = _time(lambda: ours.composed_lora(y, x, stack, meta), graph=False)
    row["ours_graph_us"] = _time(lambda: ours.composed_lora(y, x, stack, meta), graph=True)
    row["torch_us"] = _time(lambda: reference.composed_lora(y, x, stack, meta), graph=False)
    row["floor_us"] = 1e6 * _floor_bytes(case, slots, x.element_size()) / bandwidth
    row["peer_us"] = row["peer_graph_us"] = None
    if peer is not None:
        run_peer = _peer_call(peer, stack, slots, gates, x, y)
        row["peer_us"], row["peer_graph_us"] = _time(run_peer, graph=False), _time(run_peer, graph=True)
    return row


def _fp32(stack: LoraStack) -> LoraStack:
    return LoraStack(tuple(a.float() for a in stack.lora_a), tuple(b.float() for b in stack.lora_b),
                     stack.scale, stack.ranks)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _print_row(row: dict) -> None:
    fmt = lambda v: "   n/a" if v is None else f"{v:8.1f}"  # noqa: E731
    rfmt = lambda v: "  n/a" if v is None else f"{v:5.2f}"  # noqa: E731
    print(f"{row['target']:>8} r{row['rank']:<3} pool{row['pool']:<4} T{row['tokens']:<5} k{row['k']} "
          f"| ours {fmt(row['ours_us'])} graph {fmt(row['ours_graph_us'])} "
          f"| peer {fmt(row['peer_us'])} graph {fmt(row['peer_graph_us'])} | torch {fmt(row['torch_us'])} "
          f"| floor {fmt(row['floor_us'])} | ours/peer {rfmt(row['ours_over_peer_graph'])} "
          f"ours/floor {rfmt(row['ours_over_floor_graph'])} | err {row['max_abs_err']:.2e} "
          f"peer err {'n/a' if row['peer_max_abs_err'] is None else format(row['peer_max_abs_err'], '.2e')}",
          flush=True)


def _load_peer():
    try:
        import vllm_lora_peer as peer
    except Exception as exc:
        print(f"NOTE: vllm_lora_peer is not importable ({type(exc).__name__}: {exc}); timing ours vs the floor "
              "only. See shared/tools/README.md to put it on PYTHONPATH.")
        return None
    return peer


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/kernels/results/composed_lora.json", help="JSON results path")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--pools", nargs="+", type=int, default=[8, 64, 256])
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 64, 256, 2048, 8192])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_composed_lora needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    peer = _load_peer()
    bandwidth = _copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s  dtype {args.dtype}")
    payload = {"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bandwidth, "dtype": args.dtype,
               "peer": peer is not None, "rows": []}
    for target, rank, pool in itertools.product(args.targets, args.ranks, args.pools):
        stack = _stack(target, rank, pool, dtype)
        stacks = (stack, _fp32(stack))
        for tokens, k in itertools.product(args.tokens, args.k):
            row = _bench_case(Case(target, rank, pool, tokens, k), stacks, peer, bandwidth, dtype)
            row["ours_over_peer"] = _ratio(row["ours_us"], row["peer_us"])
            row["ours_over_peer_graph"] = _ratio(row["ours_graph_us"], row["peer_graph_us"])
            row["ours_over_floor"] = _ratio(row["ours_us"], row["floor_us"])
            row["ours_over_floor_graph"] = _ratio(row["ours_graph_us"], row["floor_us"])
            _print_row(row)
            payload["rows"].append(row)
            write_file(args.out, json.dumps(payload, indent=1))  # every row: a run cut short keeps them
        del stack, stacks
        torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

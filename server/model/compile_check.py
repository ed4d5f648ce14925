"""Compile every Triton kernel the backbone launches, for a CUDA architecture, on a machine with no GPU.

    tessera compile-check [--arch 90] [--model llama-3-8b ... | --config DIR] [--json FILE]

The interpreter tests (TRITON_INTERPRET=1) check what each kernel computes, not that it compiles for a
GPU: the interpreter accepts tile shapes `tl.dot` rejects and any amount of shared memory. This check
calls the kernels' own launch wrappers (`tessera_kernels.*.triton`) on CPU tensors with the shapes one decoder
layer of the backbone (`server/model/llama.py`) launches them with, for real model configs, dtypes,
step shapes and module-pool settings, with Triton's launch replaced by compile-only. Every
specialisation goes through Triton's whole NVIDIA pipeline (TTIR, TTGIR, LLVM IR, PTX, then a cubin by
the ptxas that ships with Triton), so no CUDA driver is needed. Nothing runs; the outputs are garbage.

Per compiled kernel it reports shared memory (an error above the architecture's per-block limit: the
launch would fail), registers per thread (an error if a block would need more than the SM's 64K) and
spilled bytes (a warning: slow, not wrong), read from the cubin with the cuobjdump bundled with Triton.

Triton reads TRITON_INTERPRET when kernels are decorated, so this must run in a process where it is
unset (the test runs it as a subprocess).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SHARED_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                120: 101376}
"""Largest shared memory one block may use (bytes, opt-in maximum) per compute capability (x10)."""
REGISTER_FILE = 65536
"""32-bit registers per SM (every architecture above): one block's warps must fit in it."""

PRESETS = {
    "tiny": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=384)),
    "llama-3-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                       num_key_value_heads=8, vocab_size=128256)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                                         num_key_value_heads=8, head_dim=64, vocab_size=128256)),
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                       num_key_value_heads=4, vocab_size=152064)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=128, vocab_size=151936)),
    "mistral-7b": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                         num_key_value_heads=8, vocab_size=32000, sliding_window=4096)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                             num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                             num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                             vocab_size=151936)),
    "qwen1.5-moe-a2.7b": ("Qwen2MoeConfig", dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                                                 shared_expert_intermediate_size=5632, num_experts=60,
                                                 num_experts_per_tok=4, num_attention_heads=16,
                                                 num_key_value_heads=16, vocab_size=151936)),
    "mixtral-8x7b": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                           num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8,
                                           vocab_size=32000)),
}
"""Backbone shapes from the published configs (one layer is enough: every layer launches the same)."""


@dataclass(frozen=True)
class Step:
    """One engine step: per sequence, (tokens this step, context length after it)."""

    name: str
    seqs: tuple[tuple[int, int], ...]


STEPS = (
    Step("decode-1", ((1, 1000),)),
    Step("decode-32", tuple((1, 200 + 37 * i) for i in range(32))),
    Step("decode-256", tuple((1, 300 + i) for i in range(256))),
    Step("mixed-512", ((449, 1473),) + tuple((1, 90 + i) for i in range(63))),
    Step("drafts-1", ((17, 3000),)),
    Step("drafts-24", tuple((17 - i % 17, 500 + 61 * i) for i in range(24))),
    Step("prefill-2048", ((2048, 2048),)),
    Step("prefill-8192", tuple((2048, 2048) for _ in range(4))),
)


@dataclass(frozen=True)
class Pool:
    """Module-pool settings that change a composed_lora specialisation (None: no modules)."""

    max_slots: int
    max_rank: int
    max_k: int


POOLS = (None, Pool(16, 16, 4), Pool(64, 64, 2), Pool(256, 128, 1))


@dataclass
class Compiled:
    kernel: str
    constants: str
    num_warps: int
    num_stages: int
    shared: int
    registers: int
    spilled: int
    seconds: float
    problems: list[str]


def _arch_spec(preset: str | None, config_dir: str | None):
    import transformers

    from server.model.llama import ArchSpec

    if config_dir is not None:
        return ArchSpec.from_hf_config(transformers.AutoConfig.from_pretrained(config_dir))
    cls_name, kwargs = PRESETS[preset]
    arch = cls_name.replace("Config", "ForCausalLM")
    return ArchSpec.from_hf_config(getattr(transformers, cls_name)(architectures=[arch], **kwargs))


def _stack(in_features: int, widths: tuple[int, ...], pool: Pool, dtype: torch.dtype):
    """A LoraStack of never-touched buffers (torch.empty): only shapes, strides and dtypes matter here."""
    from tessera_kernels.composed_lora import LoraStack

    return LoraStack(
        lora_a=tuple(torch.empty(pool.max_slots, pool.max_rank, in_features, dtype=dtype) for _ in widths),
        lora_b=tuple(torch.empty(pool.max_slots, w, pool.max_rank, dtype=dtype) for w in widths),
        scale=torch.rand(pool.max_slots),
        ranks=torch.full((pool.max_slots,), pool.max_rank, dtype=torch.int32),
    )


@functools.cache
def _experts(spec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13, w2) of one sparse layer, never touched (torch.empty: the pages are not even mapped)."""
    experts, width, hidden = spec.num_experts, spec.expert_intermediate_size, spec.hidden_size
    return (torch.empty(experts, 2 * width, hidden, dtype=dtype), torch.empty(experts, hidden, width, dtype=dtype))


def launch_layer(spec, step: Step, dtype: torch.dtype, pool: Pool | None, block_size: int = 16,
                 kv_dtype: torch.dtype | None = None) -> None:
    """Call every kernel wrapper as one decoder layer, the final norm and the sampler do for `step`, over a KV cache
    of `kv_dtype` (default: `dtype`)."""
    from tessera_kernels.composed_lora import ModuleBatchMeta
    from tessera_kernels.composed_lora import triton as lora
    from tessera_kernels.fused_moe import route
    from tessera_kernels.fused_moe.triton import fused_moe
    from tessera_kernels.paged_attention import AttentionMeta
    from tessera_kernels.paged_attention import triton as attention
    from tessera_kernels.rms_norm.triton import rms_norm
    from tessera_kernels.rotary.triton import rotary
    from tessera_kernels.sampling.triton import race_sample
    from tessera_kernels.silu_mul.triton import silu_mul

    tokens = sum(n for n, _ in step.seqs)
    hidden, heads, kv_heads, head_dim = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    widths = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    meta = None
    if pool is not None:
        meta = ModuleBatchMeta.allocate(tokens, pool.max_k, pool.max_slots, "cpu")
        slots = torch.randint(-1, pool.max_slots, (tokens, pool.max_k), dtype=torch.int32)
        meta.fill(slots, torch.rand(tokens, pool.max_k))

    def linear(x: torch.Tensor, out_widths: tuple[int, ...]) -> torch.Tensor:
        y = torch.empty(x.shape[0], sum(out_widths), dtype=dtype)  # the frozen GEMM's output
        if pool is not None:
            lora.composed_lora(y, x, _stack(x.shape[1], out_widths, pool, dtype), meta)
        return y

    x = torch.empty(tokens, hidden, dtype=dtype)
    norm_w = torch.ones(hidden, dtype=dtype)
    h = rms_norm(x, norm_w, 1e-5)  # first layer: no residual yet
    h, residual = rms_norm(x, norm_w, 1e-5, x)
    q, k, v = linear(h, widths).split(widths, dim=-1)
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    if spec.qk_norm:
        head_w = torch.ones(head_dim, dtype=dtype)
        q, k = rms_norm(q, head_w, 1e-6), rms_norm(k, head_w, 1e-6)
    positions = torch.cat([torch.arange(ctx - n, ctx) for n, ctx in step.seqs])
    max_ctx = max(ctx for _, ctx in step.seqs)
    cos = sin = torch.empty(max_ctx, head_dim)
    rotary(q, k, positions, cos, sin)

    blocks_per_seq = -(-max_ctx // block_size)
    num_seqs = len(step.seqs)
    k_cache = torch.empty(num_seqs * blocks_per_seq, block_size, kv_heads, head_dim, dtype=kv_dtype or dtype)
    v_cache = torch.empty_like(k_cache)
    slot_mapping = torch.randint(0, k_cache.shape[0] * block_size, (tokens,))
    attention.write_kv(k, v, k_cache, v_cache, slot_mapping)
    query_lens = torch.tensor([n for n, _ in step.seqs], dtype=torch.int32)
    att_meta = AttentionMeta(
        block_tables=torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, -1),
        seq_lens=torch.tensor([ctx for _, ctx in step.seqs], dtype=torch.int32),
        cu_query_lens=torch.cat([torch.zeros(1, dtype=torch.int32), query_lens.cumsum(0).to(torch.int32)]),
        num_seqs=num_seqs,
        max_query_len=int(query_lens.max()),
        max_seq_len=max_ctx,
    )
    out = torch.empty_like(q)
    attention.paged_attention(out, q, k_cache, v_cache, att_meta, head_dim**-0.5, spec.sliding_window)
    h = linear(out.view(tokens, -1), (hidden,))
    h, residual = rms_norm(h, norm_w, 1e-5, residual)
    if spec.num_experts:
        if spec.shared_expert_intermediate_size:  # Qwen2-MoE's shared expert: a frozen SwiGLU MLP, no module pool
            silu_mul(torch.empty(tokens, 2 * spec.shared_expert_intermediate_size, dtype=dtype))
        weights, ids = route(torch.randn(tokens, spec.num_experts), spec.experts_per_token, spec.renormalize_routing)
        h = fused_moe(h, *_experts(spec, dtype), weights, ids)
    else:
        h = linear(silu_mul(linear(h, (spec.intermediate_size,) * 2)), (hidden,))
    rms_norm(h, norm_w, 1e-5, residual)  # the final norm
    scores = torch.empty(num_seqs, spec.vocab_size)
    race_sample(scores, torch.arange(num_seqs), torch.zeros(num_seqs, dtype=torch.bool))


class _TargetOnly:
    """The slice of Triton's driver interface that compiling needs: a device, a stream and a target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack frame bytes per thread) of the cubin's one kernel, via cuobjdump.

    The kernels keep no arrays in local memory, so a stack frame is registers spilled by ptxas."""
    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK):(\d+)", text))
    return int(fields.get("REG", 0)), int(fields.get("STACK", 0))


def _describe(kernel) -> str:
    """The specialisation's constexpr values, short."""
    src = getattr(kernel, "src", None)
    constants = getattr(src, "constants", {}) if src is not None else {}
    names = getattr(getattr(src, "fn", None), "arg_names", [])
    parts = []
    for key, value in sorted(constants.items(), key=str):
        index = key[0] if isinstance(key, tuple) else key
        name = names[index] if isinstance(index, int) and index < len(names) else str(key)
        if name.isupper():
            parts.append(f"{name}={value}")
    return " ".join(parts)


@dataclass
class Failure:
    case: str
    error: str


def compile_all(arch: int, cases: Iterable[tuple[str, Callable[[], None]]]) -> tuple[list[Compiled], list[Failure]]:
    """Run each case's launches compile-only for `arch`: one record per distinct specialisation compiled,
    one failure per case that raised (a compile error stops the rest of that case's launches)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    records: dict[str, Compiled] = {}
    failures: list[Failure] = []
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        compiled = original(self, *args, grid=grid, warmup=True, **kwargs)
        md = compiled.metadata
        if md.hash not in records:
            registers, spilled = _resources(compiled.asm["cubin"])
            problems = []
            limit = SHARED_LIMIT.get(arch)
            if limit is not None and md.shared > limit:
                problems.append(f"shared memory {md.shared} B > {limit} B per block")
            if registers * md.num_warps * 32 > REGISTER_FILE:
                problems.append(f"{registers} registers x {md.num_warps * 32} threads > {REGISTER_FILE}")
            records[md.hash] = Compiled(self.fn.__name__, _describe(compiled), md.num_warps, md.num_stages,
                                        md.shared, registers, spilled, time.perf_counter() - start, problems)
        return compiled

    driver.set_active(_TargetOnly(arch))
    JITFunction.run = compile_only
    try:
        for name, launch in cases:
            try:
                launch()
            except Exception as exc:  # a kernel that does not compile: report it with its case, go on
                failures.append(Failure(name, f"{type(exc).__name__}: {exc}"))
    finally:
        JITFunction.run = original  # the driver stays the target-only one: run this in a process of its own
    return list(records.values()), failures


def layer_cases(specs, dtypes, steps=STEPS, pools=POOLS, fp8_kv: bool = False) -> Iterator[tuple[str, Callable[[], None]]]:
    """(description, launch) for every backbone shape x dtype x step x module pool; with `fp8_kv`, every shape x dtype
    x step also over a float8 e4m3 KV cache (without modules: the pool does not change the attention kernels)."""
    for label, spec in specs:
        for dtype in dtypes:
            for step in steps:
                for pool in pools:
                    name = f"{label} {str(dtype).removeprefix('torch.')} {step.name} {pool or 'no modules'}"
                    yield name, functools.partial(launch_layer, spec, step, dtype, pool)
                if fp8_kv:
                    name = f"{label} {str(dtype).removeprefix('torch.')} {step.name} fp8 KV cache"
                    yield name, functools.partial(launch_layer, spec, step, dtype, None, kv_dtype=torch.float8_e4m3fn)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `tessera compile-check`."""
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80, 86, 89, 90, ...)")
    parser.add_argument("--model", action="append", choices=sorted(PRESETS),
                        help="preset backbone shape (repeatable; default: all)")
    parser.add_argument("--config", help="a Hugging Face model directory with config.json, instead of presets")
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float16"],
                        help="activation dtype (repeatable; default: both)")
    parser.add_argument("--json", help="write the records and failures here")


def _specs(args: argparse.Namespace) -> list[tuple[str, object]]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise ValueError("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    if args.config is not None and args.model:
        raise ValueError("give --model or --config, not both")
    if args.config is None:
        return [(name, _arch_spec(name, None)) for name in (args.model or PRESETS)]
    try:
        return [(args.config, _arch_spec(None, args.config))]
    except (OSError, ValueError) as exc:
        raise ValueError(f"--config {args.config}: {exc}") from None


def report(arch: int, records: list[Compiled], failures: list[Failure], seconds: float) -> str:
    """The printed table: one line per specialisation, the failures, a summary line."""
    lines = [f"{'kernel':<24}{'warps':>6}{'stages':>7}{'shared B':>10}{'regs':>6}{'spill B':>8}  constexprs"]
    for r in sorted(records, key=lambda r: (r.kernel, -r.shared)):
        flag = "  !! " + "; ".join(r.problems) if r.problems else ("  (spills)" if r.spilled else "")
        lines.append(f"{r.kernel:<24}{r.num_warps:>6}{r.num_stages:>7}{r.shared:>10}{r.registers:>6}"
                     f"{r.spilled:>8}  {r.constants}{flag}")
    lines += [f"FAILED {f.case}: {f.error.splitlines()[0] if f.error else ''}" for f in failures]
    over = sum(1 for r in records if r.problems)
    lines.append(f"sm_{arch}: {len(records)} specialisations compiled in {seconds:.0f} s; {len(failures)} cases "
                 f"failed to compile, {over} over a resource limit, {sum(1 for r in records if r.spilled)} spill")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[str, int]:
    """(report, exit status: 1 if anything failed to compile or is over a limit); ValueError for bad flags.
    Run it in a process of its own: it replaces Triton's active driver."""
    from router.atomic import write_file

    specs = _specs(args)
    dtypes = [getattr(torch, name) for name in (args.dtype or ["bfloat16", "float16"])]
    start = time.perf_counter()
    fp8_kv = args.arch >= 89  # float8 e4m3 exists from Ada (8.9) on; kv_cache_dtype fp8 is refused below
    records, failures = compile_all(args.arch, layer_cases(specs, dtypes, fp8_kv=fp8_kv))
    seconds = time.perf_counter() - start
    if args.json:
        write_file(args.json, json.dumps({"arch": args.arch, "seconds": seconds, "records": [asdict(r) for r in records],
                                          "failures": [asdict(f) for f in failures]}, indent=1))
    return report(args.arch, records, failures, seconds), int(bool(failures or any(r.problems for r in records)))

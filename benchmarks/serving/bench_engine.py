"""Offline engine throughput: Tessera's engine vs transformers `generate` vs PEFT's mixed-adapter batch.

    python benchmarks/serving/bench_engine.py --out results/bench_engine.json           # GPU: Llama-3-8B shape
    python benchmarks/serving/bench_engine.py --config tiny --quick --out results/tiny.json  # CPU: every path
    python benchmarks/serving/bench_engine.py --config qwen3-30b-a3b-12l --out results/moe.json  # GPU: Qwen3-MoE

A Llama-3-8B-shaped backbone (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256) with
random weights is built in memory (bf16 on CUDA; no download, no checkpoint on disk); `--config
qwen3-30b-a3b-12l` builds 12 of Qwen3-30B-A3B's 48 layers instead (128 experts of 768, top 8; the modules adapt
the attention projections, all a mixture-of-experts backbone adapts). Each workload is
one batch of random-token prompts, submitted at once, every request forced to its full output length;
the metric is generated tokens per second over the wall time of the run, prefill included, after a
warm-up run (see benchmarks/serving/engine_systems.py). Systems, all on the same weights:

    tessera_a   the engine, no modules
    tessera_b   8 distinct rank-16 modules on all seven projections, request i uses m{i mod 8}
    tessera_c   k = 2 compositions over those 8 (the C(8, 2) pairs round robin, gates 0.6 / 0.4)
    tessera_d   64 distinct rank-16 modules, request i uses m{i mod 64}
    hf_generate transformers generate, batched, left padded, min_new_tokens = max_new_tokens
    peft_mixed  PEFT's mixed-adapter batch: the 8 modules of (b) as PEFT adapters, adapter_names=[...]

Cross-checks (always on): Tessera (a) against transformers and Tessera (b) against PEFT, greedy tokens of
every request. In fp32 they must be equal (the run fails otherwise); in bf16 the agreement is reported.
Output: a printed table and a JSON file (`--out`) with ratios, memory, versions, git commit and config.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.serving.engine_models import (  # noqa: E402
    PAD_ID, SHAPES, EngineSettings, peft_model, random_hf_model, random_modules, tessera_engine, word_tokenizer,
)
from benchmarks.serving.engine_systems import (  # noqa: E402
    PEFT_MODULES, VARIANTS, Run, StepCounter, Workload, agreement, run_generate, run_tessera, synchronize,
)
from router.library import ModuleLibrary, fingerprint_from_hf_config  # noqa: E402

VLLM_PUBLISHED_TOKENS_PER_S = {"b32_p256_n64": 3337.0, "b256_p256_n128": 9684.0}
"""vLLM's generated tokens/s on one H100 for the Llama-3-8B shape and these two workloads."""
VLLM_SOURCE = "issue 5, measured by the project owner"
FULL_WORKLOADS = (Workload(32, 256, 64), Workload(256, 256, 128))
QUICK_WORKLOADS = (Workload(4, 16, 8), Workload(8, 16, 8))
SYSTEMS = tuple(v.system for v in VARIANTS) + ("hf_generate", "peft_mixed")
MODULE_RANK = 16
GiB = 1 << 30
Prompts = dict[str, list[list[int]]]
"""Workload name -> its prompts (token ids), the same for every system."""


class CrossCheckError(RuntimeError):
    """Two systems that compute the same function generated different greedy tokens in fp32."""


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run; the CLI flags are these fields."""

    config: str
    """Model shape (engine_models.SHAPES): llama3-8b, small or tiny; qwen3-30b-a3b-12l or tiny-moe for a Qwen3-MoE
    backbone (modules on the attention)."""
    quick: bool
    """Small workloads (B=4 and B=8, prompt 16, 8 new tokens) instead of the two full ones."""
    workloads: tuple[str, ...]
    """Workload names to run (empty: all of the chosen set)."""
    systems: tuple[str, ...]
    """Systems to run."""
    out: str
    """JSON results path (rewritten atomically after every run)."""
    device: str
    """cuda or cpu."""
    dtype: str
    """bfloat16, float16 or float32."""
    warmup_tokens: int
    """New tokens per request in each warm-up run."""
    max_num_batched_tokens: int
    """Tessera's token budget per step."""
    block_size: int
    """Tessera's KV block size."""
    seed: int
    """Seed of the weights, the modules and the prompts."""
    threads: int | None
    """torch CPU threads (None: torch's default)."""
    cuda_graphs: str = "auto"
    """Tessera's decode steps: auto (CUDA graphs on CUDA), off (eager), padded (graph shapes, eager)."""
    async_scheduling: str = "auto"
    """Tessera's step loop: auto (step N+1 planned and launched while N runs, on CUDA), on, or off."""


def _parse(argv: list[str] | None) -> BenchSettings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--config", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--quick", action="store_true", help="small workloads (smoke runs, tests)")
    parser.add_argument("--workloads", nargs="+", default=[], metavar="NAME",
                        help=f"run only these: {[w.name for w in FULL_WORKLOADS + QUICK_WORKLOADS]}")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--out", default="benchmarks/serving/results/bench_engine.json")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--warmup-tokens", type=int, default=8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cuda-graphs", default="auto", choices=["auto", "off", "padded"],
                        help="Tessera's decode steps: CUDA graphs on CUDA (auto), eager (off), or padded")
    parser.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                        help="Tessera's step loop: plan and launch step N+1 while N runs (auto: on CUDA)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device is available")
    known = {w.name for w in (QUICK_WORKLOADS if args.quick else FULL_WORKLOADS)}
    unknown = sorted(set(args.workloads) - known)
    if unknown:
        parser.error(f"--workloads {unknown}: not in this run's set {sorted(known)} (--quick picks the small set)")
    if args.warmup_tokens < 1:
        parser.error("--warmup-tokens must be at least 1")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return BenchSettings(
        args.config, args.quick, tuple(args.workloads), tuple(dict.fromkeys(args.systems)), args.out, args.device,
        dtype, args.warmup_tokens, args.max_num_batched_tokens, args.block_size, args.seed, args.threads,
        args.cuda_graphs, args.async_scheduling,
    )


def _workloads(settings: BenchSettings) -> list[Workload]:
    chosen = QUICK_WORKLOADS if settings.quick else FULL_WORKLOADS
    return [w for w in chosen if not settings.workloads or w.name in settings.workloads]


def _num_modules(settings: BenchSettings) -> int:
    """Modules the selected systems use: m0 .. m{n-1}."""
    used = [v.num_modules for v in VARIANTS if v.system in settings.systems]
    return max(used + ([PEFT_MODULES] if "peft_mixed" in settings.systems else []), default=0)


def _engine_settings(settings: BenchSettings, workloads: list[Workload], num_modules: int) -> EngineSettings:
    blocks = max(w.batch_size * -(-(w.prompt_len + w.new_tokens) // settings.block_size) for w in workloads)
    return EngineSettings(
        block_size=settings.block_size,
        max_num_seqs=max(w.batch_size for w in workloads),
        max_num_batched_tokens=settings.max_num_batched_tokens,
        num_kv_blocks=blocks,
        max_slots=num_modules,
        max_rank=MODULE_RANK,
        max_k=max(v.k for v in VARIANTS),
        cuda_graphs=settings.cuda_graphs,
        async_scheduling=settings.async_scheduling,
    )


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _environment(settings: BenchSettings) -> dict:
    import transformers

    device = torch.cuda.get_device_name() if settings.device == "cuda" else (platform.processor() or "cpu")
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": _version("peft"), "triton": _version("triton"), "python": platform.python_version(),
            "git_commit": _git_commit()}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_json(path: str, document: dict) -> None:
    """Write `document` atomically: a sibling temp file, fsync, rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)


class Results:
    """Runs so far, and the JSON document they make (ratios recomputed and the file rewritten after every
    run, so a run stopped by a time limit leaves every finished system and its ratios)."""

    def __init__(self, settings: BenchSettings, document: dict, workloads: list[Workload]):
        self.settings = settings
        self.document = document
        self.workloads = workloads
        self.runs: dict[tuple[str, str], Run] = {}

    def add(self, run: Run) -> None:
        self.runs[(run.system, run.workload.name)] = run
        self.document["rows"].append(run.row())
        print(f"  {run.workload.name:<16} {run.system:<12} {run.tokens_per_s:10.1f} tok/s "
              f"({run.generated_tokens} tokens in {run.seconds:.2f} s, warm-up {run.warmup_seconds:.2f} s)",
              flush=True)
        self.save()

    def save(self) -> None:
        self.document["ratios"] = _ratios(self.settings, self.runs, self.workloads,
                                          self.document["environment"]["device"])
        _write_json(self.settings.out, self.document)


def _peak_of(results: Results, prefix: str) -> int | None:
    """The largest torch.cuda.max_memory_allocated of the timed runs of systems `prefix*` (None on the CPU)."""
    peaks = [r.peak_memory_bytes for (system, _), r in results.runs.items() if system.startswith(prefix)]
    return max(peaks) if peaks and None not in peaks else None


def _tessera(settings: BenchSettings, results: Results, hf_model, library: ModuleLibrary | None,
             workloads: list[Workload], prompts: Prompts) -> None:
    """Every selected Tessera variant on every workload, on one engine; then the engine is freed."""
    variants = [v for v in VARIANTS if v.system in settings.systems]
    if not variants:
        return
    engine_settings = _engine_settings(settings, workloads, len(library.modules) if library is not None else 0)
    counter = StepCounter()
    started = time.perf_counter()
    engine = tessera_engine(hf_model, word_tokenizer(hf_model.config.vocab_size), library, engine_settings,
                            settings.dtype, counter)
    hf_model.to("cpu")  # only Tessera's own memory is on the device while it runs
    synchronize(settings.device)
    memory = engine.model.memory_bytes()
    results.document["memory"]["tessera"] = {
        "weights_bytes": memory["weights"], "module_pool_bytes": memory["module_pool"],
        "kv_cache_bytes": engine.runner.kv_cache_bytes(), "kv_blocks": engine_settings.num_kv_blocks,
    }
    results.document["setup_seconds"]["tessera_engine"] = time.perf_counter() - started
    results.document["config"]["engine"] = asdict(engine_settings)
    for workload in workloads:
        for variant in variants:
            run = run_tessera(engine, counter, variant, workload, prompts[workload.name], settings.warmup_tokens,
                              settings.device)
            results.add(run)
    results.document["memory"]["tessera"]["max_memory_allocated_bytes"] = _peak_of(results, "tessera_")
    del engine
    gc.collect()
    if settings.device == "cuda":
        torch.cuda.empty_cache()
    if {"hf_generate", "peft_mixed"} & set(settings.systems):
        hf_model.to(settings.device)


def _baselines(settings: BenchSettings, results: Results, hf_model, library: ModuleLibrary | None,
               workloads: list[Workload], prompts: Prompts) -> None:
    """transformers generate, then PEFT's mixed batch (PEFT wraps the same model in place)."""
    if "hf_generate" in settings.systems:
        for workload in workloads:
            results.add(run_generate("hf_generate", hf_model, workload, prompts[workload.name],
                                     settings.warmup_tokens, settings.device, PAD_ID))
        results.document["memory"]["transformers"]["max_memory_allocated_bytes"] = _peak_of(results, "hf_")
    if "peft_mixed" not in settings.systems:
        return
    started = time.perf_counter()
    model = peft_model(hf_model, library, [f"m{i}" for i in range(PEFT_MODULES)])
    results.document["setup_seconds"]["peft_adapters"] = time.perf_counter() - started
    for workload in workloads:
        names = [f"m{i % PEFT_MODULES}" for i in range(workload.batch_size)]
        results.add(run_generate("peft_mixed", model, workload, prompts[workload.name], settings.warmup_tokens,
                                 settings.device, PAD_ID, adapter_names=names))
    results.document["memory"]["peft"] = {"max_memory_allocated_bytes": _peak_of(results, "peft_")}


def _cross_checks(settings: BenchSettings, results: Results, workloads: list[Workload]) -> None:
    """Tessera (a) vs transformers and (b) vs PEFT, greedy tokens of every request; fp32 must agree exactly."""
    pairs = [("tessera_a", "hf_generate"), ("tessera_b", "peft_mixed"), ("tessera_b", "tessera_a")]
    checks = results.document["agreement"]
    for workload in workloads:
        for left, right in pairs:
            runs = results.runs.get((left, workload.name)), results.runs.get((right, workload.name))
            if None in runs:
                continue
            found = agreement(runs[0].tokens, runs[1].tokens)
            checks.append({"workload": workload.name, "left": left, "right": right, **found})
            same_function = right != "tessera_a"
            results.save()
            if same_function and settings.dtype == "float32" and found["exact_requests"] != found["requests"]:
                bad = next(i for i, (a, b) in enumerate(zip(runs[0].tokens, runs[1].tokens)) if a != b)
                raise CrossCheckError(
                    f"{workload.name}: {left} and {right} compute the same function but request {bad} differs: "
                    f"{runs[0].tokens[bad]} vs {runs[1].tokens[bad]}"
                )


def _vllm_comparable(settings: BenchSettings) -> bool:
    """vLLM's numbers were taken on one H100 in bf16, with the Llama-3-8B shape and the full workloads."""
    same_setup = (settings.config, settings.device, settings.dtype) == ("llama3-8b", "cuda", "bfloat16")
    return same_setup and not settings.quick


def _throughput(settings: BenchSettings, runs: dict, system: str, workload: Workload) -> float | None:
    if system == "vllm_published":
        return VLLM_PUBLISHED_TOKENS_PER_S.get(workload.name) if _vllm_comparable(settings) else None
    run = runs.get((system, workload.name))
    return None if run is None else run.tokens_per_s


def _ratios(settings: BenchSettings, runs: dict[tuple[str, str], Run], workloads: list[Workload],
            device_name: str) -> list[dict]:
    """b/a, c/a, d/a, b/peft, a/hf and (Llama-3-8B shape on CUDA in bf16 only) a/vLLM's published number."""
    wanted = [("tessera_b", "tessera_a"), ("tessera_c", "tessera_a"), ("tessera_d", "tessera_a"),
              ("tessera_b", "peft_mixed"), ("tessera_a", "hf_generate"), ("tessera_a", "vllm_published")]
    ratios = []
    for workload in workloads:
        for numerator, denominator in wanted:
            top = _throughput(settings, runs, numerator, workload)
            bottom = _throughput(settings, runs, denominator, workload)
            if top is not None and bottom is not None:
                ratios.append({
                    "workload": workload.name, "numerator": numerator, "denominator": denominator,
                    "numerator_tokens_per_s": top, "denominator_tokens_per_s": bottom, "value": top / bottom,
                })
                if denominator == "vllm_published":  # a number from elsewhere: like for like on an H100 only
                    ratios[-1]["like_for_like"] = "H100" in device_name
    return ratios


def _print_summary(document: dict) -> None:
    print(f"\n{document['environment']['device']}  torch {document['environment']['torch']}  "
          f"transformers {document['environment']['transformers']}  {document['config']['dtype']}")
    print(f"{'workload':<16} {'system':<12} {'tok/s':>10} {'seconds':>8} {'tokens':>7} {'peak GiB':>9}")
    for row in document["rows"]:
        peak = "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / GiB:.1f}"
        print(f"{row['workload']:<16} {row['system']:<12} {row['tokens_per_s']:10.1f} {row['seconds']:8.2f} "
              f"{row['generated_tokens']:7d} {peak:>9}")
    print("\nratios (tokens/s)")
    for ratio in document["ratios"]:
        caveat = "" if ratio.get("like_for_like", True) else "  (vLLM's H100 number, on another GPU: not like for like)"
        print(f"  {ratio['workload']:<16} {ratio['numerator']:>10} / {ratio['denominator']:<15} {ratio['value']:6.3f}"
              + caveat)
    print("\nagreement of greedy tokens (exact requests, mean shared-prefix share)")
    for check in document["agreement"]:
        print(f"  {check['workload']:<16} {check['left']:>10} vs {check['right']:<12} "
              f"{check['exact_requests']}/{check['requests']}  {check['mean_prefix_share']:.3f}")
    for system, memory in document["memory"].items():
        facts = [f"{k.removesuffix('_bytes')} {v / GiB:.2f} GiB" for k, v in memory.items()
                 if k.endswith("_bytes") and v is not None]
        facts += [f"{k} {v}" for k, v in memory.items() if not k.endswith("_bytes")]
        if facts:
            print(f"memory {system}: {'  '.join(facts)}")
    print("setup: " + "  ".join(f"{k} {v:.1f} s" for k, v in document["setup_seconds"].items()))


def _document(settings: BenchSettings, workloads: list[Workload]) -> dict:
    shape = SHAPES[settings.config]
    return {
        "benchmark": "bench_engine",
        "environment": _environment(settings),
        "config": {
            **asdict(settings), "shape": asdict(shape), "workloads": [asdict(w) | {"name": w.name} for w in workloads],
            "variants": [asdict(v) for v in VARIANTS], "module_rank": MODULE_RANK, "peft_modules": PEFT_MODULES,
            "vllm_published_tokens_per_s": VLLM_PUBLISHED_TOKENS_PER_S, "vllm_source": VLLM_SOURCE,
        },
        "rows": [], "ratios": [], "agreement": [], "memory": {}, "setup_seconds": {},
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the JSON document it wrote to `--out`."""
    settings = _parse(argv)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    workloads = _workloads(settings)
    shape = SHAPES[settings.config]
    results = Results(settings, _document(settings, workloads), workloads)
    dtype = getattr(torch, settings.dtype)
    started = time.perf_counter()
    hf_model = random_hf_model(shape, dtype, settings.device, settings.seed)
    num_modules = _num_modules(settings)
    library = random_modules(fingerprint_from_hf_config(hf_model.config), num_modules, MODULE_RANK,
                             shape.initializer_range, settings.seed + 1, settings.device) if num_modules else None
    weights = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    results.document["memory"]["transformers"] = {"weights_bytes": weights}
    results.document["setup_seconds"]["models_and_modules"] = time.perf_counter() - started
    print(f"built {shape.name} ({weights / GiB:.1f} GiB) and {num_modules} modules "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    prompts = {w.name: w.prompts(shape.vocab_size, settings.seed + 2) for w in workloads}
    _tessera(settings, results, hf_model, library, workloads, prompts)
    _baselines(settings, results, hf_model, library, workloads, prompts)
    _cross_checks(settings, results, workloads)
    results.document["total_seconds"] = time.perf_counter() - started
    results.save()
    _print_summary(results.document)
    print(f"wrote {settings.out}")
    return results.document


if __name__ == "__main__":
    main()

"""Online latency with and without modules: issue 5's "p99 TPOT with 8 mixed modules within 1.15x of none".

    python benchmarks/serving/bench_online.py --out results/online.json                 # GPU: Llama-3-8B shape
    python benchmarks/serving/bench_online.py --config tiny --quick --out results/o.json  # CPU: every path

One process holds everything: a backbone with random weights built in memory (as bench_engine does; no
download), 8 random rank-16 modules on all seven projections, Tessera's engine behind its real HTTP app
on uvicorn at 127.0.0.1 (`server.api.background`); `tessera bench`'s load generator
(`benchmarks.serving.runner`) streams completions at it from a process of its own (a client in the server's
process would share its interpreter lock, and its per-token work would slow the server it measures), every
request forced to its full length:

    capacity    a fixed-concurrency run without modules: completed requests per second
    none        Poisson arrivals at --load x capacity, no modules
    modules     the same arrivals, prompts and lengths (same seed), each request an explicit composition of
                one of the 8 modules (uniform, a random gate): every batch mixes modules

It prints a table and writes JSON (`--out`): each run's summary (TTFT, TPOT, ITL, end-to-end latency,
throughput), the ratio of the two runs' p99 TPOT, and the server's CPU time per generated token on its HTTP
thread (the event loop: requests, SSE chunks) and on its engine thread (Linux only). The two share one
interpreter lock, so when their sum per step nears the device's step time the host, not the device, bounds
throughput. `--engine-process` builds the engine in a process of its own (`server.engine.process`) instead: the
engine column is then that whole process's CPU, and `pipe` the API-side thread that reads its pipe.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import gc
import multiprocessing
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.quality.report import git_state, write_json  # noqa: E402
from benchmarks.serving.config import BenchConfig  # noqa: E402
from benchmarks.serving.engine_models import (  # noqa: E402
    SHAPES, EngineSettings, random_hf_model, random_modules, tessera_engine, word_tokenizer,
)
from benchmarks.serving.runner import benchmark  # noqa: E402
from router.library import fingerprint_from_hf_config  # noqa: E402
from server.api.background import serve_in_background  # noqa: E402

TPOT_TARGET = 1.15
"""Issue 5: p99 TPOT with 8 mixed modules at most this many times that without modules."""
NUM_MODULES, MODULE_RANK = 8, 16


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--config", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--quick", action="store_true", help="a few short requests (smoke runs, tests)")
    parser.add_argument("--out", default="benchmarks/serving/results/online.json")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="requests in flight in the capacity run (default 256; quick: 4)")
    parser.add_argument("--num-requests", type=int, default=None, help="per run (default 600; quick: 12)")
    parser.add_argument("--input-len", type=int, default=None, help="prompt words (default 256; quick: 8)")
    parser.add_argument("--output-len", type=int, default=None, help="new tokens (default 128; quick: 6)")
    parser.add_argument("--load", type=float, default=0.8, help="Poisson rate as a share of the capacity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-process", action="store_true",
                        help="run the engine in a process of its own (EngineConfig.engine_process)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="tokens a streamed chunk gathers after the first (EngineConfig.stream_interval)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device is available")
    defaults = (4, 12, 8, 6) if args.quick else (256, 600, 256, 128)
    for name, default in zip(("concurrency", "num_requests", "input_len", "output_len"), defaults):
        value = getattr(args, name)
        if value is None:
            setattr(args, name, default)
        elif value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.stream_interval < 1:
        parser.error(f"--stream-interval must be at least 1, got {args.stream_interval}")
    if not 0 < args.load <= 1:
        parser.error(f"--load must be in (0, 1], got {args.load}")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def _engine(args: argparse.Namespace):
    """The engine (all 8 modules resident) on random weights; the transformers model is dropped after."""
    shape = SHAPES[args.config]
    hf_model = random_hf_model(shape, getattr(torch, args.dtype), args.device, args.seed)
    library = random_modules(fingerprint_from_hf_config(hf_model.config), NUM_MODULES, MODULE_RANK,
                             shape.initializer_range, args.seed + 1, args.device)
    per_request = -(-(args.input_len + args.output_len + 8) // 16)  # 16-token blocks; margin for the template
    settings = EngineSettings(block_size=16, max_num_seqs=args.concurrency, max_num_batched_tokens=8192,
                              num_kv_blocks=args.concurrency * per_request, max_slots=NUM_MODULES,
                              max_rank=MODULE_RANK, max_k=1, stream_interval=args.stream_interval)
    engine = tessera_engine(hf_model, word_tokenizer(shape.vocab_size), library, settings, args.dtype,
                            observer=lambda stats: None)
    del hf_model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return engine


def _config(args: argparse.Namespace, url: str, model: str, **load) -> BenchConfig:
    return BenchConfig(base_url=url, model=model, endpoint="completions", num_requests=args.num_requests,
                       warmup=min(args.concurrency, 8), seed=args.seed, input_len=str(args.input_len),
                       output_len=str(args.output_len), ignore_eos=True, progress=False, **load)


def _cpu_seconds(stat_path: str) -> float | None:
    """User + system CPU seconds of a /proc stat file (a process's or a thread's); None where there is none."""
    try:
        with open(stat_path) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def server_cpu_seconds(engine) -> dict[str, float]:
    """CPU seconds so far of each live Python thread of this process, by thread name, and of the engine's own
    process as `tessera-engine` when it has one (Linux's /proc; empty elsewhere)."""
    seconds = {}
    for thread in threading.enumerate():
        used = _cpu_seconds(f"/proc/self/task/{thread.native_id}/stat")
        if used is not None:
            seconds[thread.name] = seconds.get(thread.name, 0.0) + used
    pid = getattr(engine, "pid", None)
    used = _cpu_seconds(f"/proc/{pid}/stat") if pid is not None else None
    if used is not None:
        seconds["tessera-engine"] = used
    return seconds


def _server_cpu(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float | None]:
    """Microseconds of CPU per generated token between two readings: the server's HTTP thread, its engine (the
    step loop's thread, or the engine's whole process), and the API-side thread that reads an engine process's
    pipe (None without one)."""
    per_token = lambda name: (1e6 * (after[name] - before.get(name, 0.0)) / tokens  # noqa: E731
                              if name in after and tokens else None)
    return {"http_us_per_token": per_token("tessera-http"), "engine_us_per_token": per_token("tessera-engine"),
            "pipe_us_per_token": per_token("tessera-engine-reader")}


def _summary(document: dict) -> dict:
    run = document["runs"][0]
    return {"rate": run["rate"], "concurrency": run["concurrency"], **run["summary"],
            "labels": sorted(run["per_task"]), "failures": run["failures"][:5]}


def _row(name: str, s: dict) -> str:
    ms = lambda v: "   n/a" if v is None else f"{1e3 * v:6.1f}"  # noqa: E731
    us = lambda v: "   n/a" if v is None else f"{v:6.1f}"  # noqa: E731
    rate = "   -" if s["rate"] is None else f"{s['rate']:4.1f}"
    per_chunk = "   n/a" if s["tokens_per_chunk"] is None else f"{s['tokens_per_chunk']:6.2f}"
    return (f"{name:<9} {rate} {s['request_throughput']:6.2f} {s['output_throughput']:8.0f} "
            f"{ms(s['ttft']['p50'])} {ms(s['ttft']['p99'])} {ms(s['tpot']['p50'])} {ms(s['tpot']['p99'])} "
            f"{s['num_failed']:5d} {us(s['http_us_per_token'])} {us(s['engine_us_per_token'])} "
            f"{us(s['pipe_us_per_token'])} {per_chunk}")


def main(argv: list[str] | None = None) -> dict:
    """Run the three load runs; returns the JSON document it wrote to `--out`."""
    args = _parse(argv)
    started = time.perf_counter()
    if args.engine_process:
        from server.engine.process import EngineProcess

        engine = EngineProcess(build=functools.partial(_engine, args))
    else:
        engine = _engine(args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu")
    document = {"benchmark": "online", "config": vars(args), "device": device, "torch": torch.__version__,
                "git": git_state(REPO), "num_modules": NUM_MODULES, "module_rank": MODULE_RANK,
                "setup_seconds": time.perf_counter() - started}
    client = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with client, serve_in_background(engine) as url:

        def measure(**load) -> dict:
            before = server_cpu_seconds(engine)
            summary = _summary(client.submit(benchmark, _config(args, url, engine.model_name, **load)).result())
            tokens = summary["output_tokens"]
            return summary | _server_cpu(before, server_cpu_seconds(engine), tokens) | {
                "tokens_per_chunk": tokens / summary["output_chunks"] if summary["output_chunks"] else None}

        capacity = measure(concurrency=args.concurrency)
        rate = args.load * capacity["request_throughput"]
        if not rate > 0:
            raise SystemExit(f"the capacity run completed no request: {capacity['failures']}")
        none = measure(rate=(rate,))
        mixed = measure(rate=(rate,), modules_k=1)
    p99 = (none["tpot"]["p99"], mixed["tpot"]["p99"])
    document["runs"] = {"capacity": capacity, "none": none, "modules": mixed}
    document["p99_tpot_ratio"] = p99[1] / p99[0] if None not in p99 and p99[0] > 0 else None
    document["target"] = TPOT_TARGET
    document["total_seconds"] = time.perf_counter() - started
    write_json(Path(args.out), document)
    print(f"{args.config} on {device}, {args.dtype}: prompts {args.input_len} words, {args.output_len} new tokens")
    print(f"{'run':<9} {'rate':>4} {'req/s':>6} {'tok/s':>8} {'TTFT50':>6} {'TTFT99':>6} {'TPOT50':>6} {'TPOT99':>6}"
          f" {'fails':>5} {'http':>6} {'engine':>6} {'pipe':>6} {'tok/ch':>6}"
          "   (latencies in ms; server CPU in us per token; tokens per SSE chunk)")
    for name in ("capacity", "none", "modules"):
        print(_row(name, document["runs"][name]))
    ratio = document["p99_tpot_ratio"]
    print(f"p99 TPOT, 8 mixed modules / none: {'n/a' if ratio is None else f'{ratio:.3f}'} "
          f"(target <= {TPOT_TARGET}); wrote {args.out}")
    return document


if __name__ == "__main__":
    main()

"""Host (CPU) milliseconds per engine decode step, phase by phase.

    python benchmarks/serving/step_overhead.py --out results/step_overhead.json          # B = 64 and 256
    python benchmarks/serving/step_overhead.py --quick --out /tmp/step_overhead.json     # CPU smoke run

The tiny random Llama of `engine_models` (built in memory, a word-level tokenizer) serves B requests of
random 32-token prompts, 64 new tokens each (greedy, `ignore_eos`), over k = 2 compositions of 8 random
modules (variant c of bench_engine), through `Engine.generate_batch`. Timers wrap the engine's real
methods on the instance (no logic is copied), and each engine step records:

    schedule   Scheduler.schedule
    fill       ModelRunner._fill (the step's metadata into the runner's static buffers)
    segments   of which ModuleBatchMeta.fill: the kernels' module segments, built by device ops (on
               the CPU they compute here; on CUDA they are only launched)
    launch     ModelRunner.launch minus fill: deltas, forward and sampling queued (on the CPU: run)
    read       PendingStep.result (the step's host sync; on CUDA it includes waiting for the device)
    update     Scheduler.update
    emit       Engine._emit, summed over the step's changed requests (detokenization, increments)
    host       schedule + fill + read + update + emit: the host work outside the forward pass
    step       Engine.step, the whole step

The table reports the median of each over the decode steps (every running request adds one token) of
the timed run, which follows a warm-up run of the same requests with fewer new tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.serving.bench_engine import MODULE_RANK, _environment, _write_json  # noqa: E402
from benchmarks.serving.engine_models import (  # noqa: E402
    SHAPES, EngineSettings, random_model_and_modules, tessera_engine, word_tokenizer,
)
from benchmarks.serving.engine_systems import VARIANTS, StepCounter, Workload  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import Request, SamplingParams  # noqa: E402

PHASES = ("schedule", "fill", "segments", "launch", "read", "update", "emit")
HOST_PHASES = ("schedule", "fill", "read", "update", "emit")
COLUMNS = PHASES + ("host", "step")


@dataclass(frozen=True)
class OverheadSettings:
    """One run of the benchmark; the CLI flags are these fields."""

    batch_sizes: tuple[int, ...]
    """Requests per run, all submitted at once (one run per batch size)."""
    prompt_len: int
    """Prompt tokens per request."""
    new_tokens: int
    """Generated tokens per request (forced with ignore_eos)."""
    warmup_tokens: int
    """New tokens per request in the warm-up run."""
    variant: str
    """bench_engine's module variant: a (none), b (k=1 of 8), c (k=2 of 8), d (k=1 of 64)."""
    device: str
    """cpu or cuda."""
    dtype: str
    """float32, bfloat16 or float16."""
    threads: int
    """torch CPU threads."""
    async_scheduling: str
    """EngineConfig.async_scheduling: auto, on or off."""
    block_size: int
    """Tokens per KV block."""
    seed: int
    """Seed of the weights, the modules and the prompts."""
    out: str
    """JSON results path (written atomically)."""


class PhaseTimer:
    """Wraps one engine's real methods on the instance; `steps` holds each engine step's seconds per phase."""

    def __init__(self, engine: Engine):
        self.steps: list[dict] = []
        self._current: dict | None = None
        scheduler, runner = engine.scheduler, engine.runner
        self._wrapped = [(scheduler, "schedule"), (runner, "_fill"), (runner, "launch"), (scheduler, "update"),
                         (engine, "_emit"), (engine, "step")]
        scheduler.schedule = self._timed(scheduler.schedule, "schedule", self._note_plan)
        runner._fill = self._timed(runner._fill, "fill")
        if runner.meta.modules is not None:
            self._wrapped.append((runner.meta.modules, "fill"))
            runner.meta.modules.fill = self._timed(runner.meta.modules.fill, "segments")
        runner.launch = self._timed(runner.launch, "launch", self._wrap_result)
        scheduler.update = self._timed(scheduler.update, "update")
        engine._emit = self._timed(engine._emit, "emit")
        engine.step = self._timed_step(engine.step)

    def remove(self) -> None:
        """Put the engine's own methods back."""
        for obj, name in self._wrapped:
            vars(obj).pop(name)

    def _timed(self, method: Callable, phase: str, after: Callable | None = None) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            out = method(*args, **kwargs)
            if self._current is not None:
                self._current[phase] += time.perf_counter() - started
                if after is not None:
                    after(out)
            return out

        return timed

    def _timed_step(self, step: Callable[[], None]) -> Callable[[], None]:
        def timed() -> None:
            self._current = dict.fromkeys(PHASES + ("step",), 0.0) | {"num_seqs": 0, "num_tokens": 0}
            started = time.perf_counter()
            step()
            self._current["step"] = time.perf_counter() - started
            self.steps.append(self._current)
            self._current = None

        return timed

    def _note_plan(self, plan) -> None:
        self._current["num_seqs"] = len(plan.num_scheduled_tokens)
        self._current["num_tokens"] = plan.num_tokens

    def _wrap_result(self, pending) -> None:
        pending.result = self._timed(pending.result, "read")

    def decode_medians(self, batch_size: int) -> dict:
        """Median milliseconds per phase over the decode steps of the full batch (launch without fill)."""
        decode = [s for s in self.steps if s["num_seqs"] == s["num_tokens"] == batch_size]
        if not decode:
            raise RuntimeError(f"no decode step of batch {batch_size} was recorded")
        rows = [{**s, "launch": s["launch"] - s["fill"], "host": sum(s[p] for p in HOST_PHASES)} for s in decode]
        medians = {c: 1000.0 * statistics.median(r[c] for r in rows) for c in COLUMNS}
        return medians | {"decode_steps": len(rows)}


def _engine(settings: OverheadSettings) -> tuple[Engine, int]:
    """The engine over the tiny random Llama and the variant's modules; also the vocabulary size."""
    variant = next(v for v in VARIANTS if v.key == settings.variant)
    shape = SHAPES["tiny"]
    hf_model, library = random_model_and_modules(shape, settings.dtype, settings.device, settings.seed,
                                                 variant.num_modules, MODULE_RANK)
    largest = max(settings.batch_sizes)
    per_request = -(-(settings.prompt_len + settings.new_tokens) // settings.block_size)
    engine_settings = EngineSettings(
        block_size=settings.block_size, max_num_seqs=largest,
        max_num_batched_tokens=max(largest * settings.prompt_len, 256), num_kv_blocks=largest * per_request,
        max_slots=variant.num_modules, max_rank=MODULE_RANK, max_k=max(variant.k, 1),
        cuda_graphs="off", async_scheduling=settings.async_scheduling,
    )
    engine = tessera_engine(hf_model, word_tokenizer(shape.vocab_size), library, engine_settings, settings.dtype,
                            StepCounter())
    return engine, shape.vocab_size


def measure(engine: Engine, vocab_size: int, settings: OverheadSettings, batch_size: int) -> dict:
    """Warm-up run, then the timed run of `batch_size` requests; the decode steps' median phases (ms)."""
    variant = next(v for v in VARIANTS if v.key == settings.variant)
    workload = Workload(batch_size, settings.prompt_len, settings.new_tokens)
    prompts = workload.prompts(vocab_size, settings.seed)
    compositions = variant.compositions(batch_size)

    def generate(tag: str, num_tokens: int) -> None:
        sampling = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
        requests = [Request(f"{tag}-{batch_size}-{i}", prompt, sampling, composition)
                    for i, (prompt, composition) in enumerate(zip(prompts, compositions))]
        outputs = engine.generate_batch(requests)
        generated = sum(len(o.token_ids) for r in requests for o in outputs[r.request_id])
        if generated != batch_size * num_tokens:
            raise RuntimeError(f"{tag} run generated {generated} tokens, expected {batch_size * num_tokens}")

    generate("warmup", settings.warmup_tokens)
    timer = PhaseTimer(engine)
    try:
        generate("timed", settings.new_tokens)
    finally:
        timer.remove()
    return {"batch_size": batch_size, **timer.decode_medians(batch_size), "steps": len(timer.steps)}


def _parse(argv: list[str] | None) -> OverheadSettings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B = 4 and 8, prompt 8, 8 new tokens (CPU tests)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 64 256")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 32")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 64")
    parser.add_argument("--variant", default="c", choices=[v.key for v in VARIANTS])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/serving/results/step_overhead.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    defaults = ((4, 8), 8, 8) if args.quick else ((64, 256), 32, 64)
    batch_sizes = tuple(args.batch_sizes or defaults[0])
    prompt_len, new_tokens = args.prompt_len or defaults[1], args.new_tokens or defaults[2]
    if min(batch_sizes) < 1 or prompt_len < 1 or new_tokens < 2 or args.threads < 1:
        parser.error("batch sizes, --prompt-len and --threads must be >= 1, --new-tokens >= 2")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return OverheadSettings(batch_sizes, prompt_len, new_tokens, min(8, new_tokens), args.variant, args.device,
                            dtype, args.threads, args.async_scheduling, args.block_size, args.seed, args.out)


def _print_table(rows: list[dict]) -> None:
    print("median host ms per decode step")
    print(f"{'batch':>6} " + " ".join(f"{c:>9}" for c in COLUMNS) + f" {'steps':>6}")
    for row in rows:
        print(f"{row['batch_size']:>6} " + " ".join(f"{row[c]:9.3f}" for c in COLUMNS) + f" {row['decode_steps']:>6}")


def main(argv: list[str] | None = None) -> dict:
    settings = _parse(argv)
    torch.set_num_threads(settings.threads)
    engine, vocab_size = _engine(settings)
    rows = [measure(engine, vocab_size, settings, b) for b in settings.batch_sizes]
    document = {"settings": asdict(settings) | {"batch_sizes": list(settings.batch_sizes)},
                "environment": _environment(settings), "rows": rows, "units": "milliseconds, median over decode steps"}
    _write_json(settings.out, document)
    _print_table(rows)
    return document


if __name__ == "__main__":
    main()

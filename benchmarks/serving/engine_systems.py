"""Workloads, Tessera's module variants, and one timed run of each system over a whole batch.

Every run submits the whole batch at once, greedy, every request forced to its full output length
(Tessera: `ignore_eos`; transformers and PEFT: `min_new_tokens = max_new_tokens`; the random models have
no EOS token anyway). Throughput is generated tokens over the wall time of the run, prefill included,
measured after a warm-up run of the same requests with fewer new tokens (kernels compiled, modules
loaded into the pool, allocator caches filled).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from router.composition import NO_COMPOSITION, Composition
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams, StepStats

GATES_K2 = (0.6, 0.4)
"""Gates of the two modules of every k = 2 composition."""


@dataclass(frozen=True)
class Workload:
    """One batch: `batch_size` prompts of `prompt_len` random token ids, `new_tokens` generated each."""

    batch_size: int
    """Requests, all submitted at once."""
    prompt_len: int
    """Prompt tokens per request."""
    new_tokens: int
    """Generated tokens per request (forced)."""

    @property
    def name(self) -> str:
        return f"b{self.batch_size}_p{self.prompt_len}_n{self.new_tokens}"

    def prompts(self, vocab_size: int, seed: int) -> list[list[int]]:
        """Random prompts without the pad id 0, the same for every system."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(1, vocab_size, (self.batch_size, self.prompt_len), generator=gen).tolist()


@dataclass(frozen=True)
class Variant:
    """Which modules Tessera's requests apply: request i gets composition i of a round robin."""

    key: str
    """Short name: a, b, c, d."""
    description: str
    """What it measures, for the table."""
    num_modules: int
    """Modules m0 .. m{n-1} the requests draw from; 0: the backbone alone."""
    k: int
    """Modules per request."""

    @property
    def system(self) -> str:
        return f"tessera_{self.key}"

    def compositions(self, batch_size: int) -> list[Composition]:
        """Request i: k = 1 takes module i mod n; k = 2 takes the (i mod C(n, 2))-th pair of modules."""
        if self.k == 0:
            return [NO_COMPOSITION] * batch_size
        if self.k == 1:
            return [Composition((f"m{i % self.num_modules}",), (1.0,), "explicit") for i in range(batch_size)]
        if self.k == 2:
            pairs = list(itertools.combinations(range(self.num_modules), 2))
            chosen = (pairs[i % len(pairs)] for i in range(batch_size))
            return [Composition((f"m{first}", f"m{second}"), GATES_K2, "explicit") for first, second in chosen]
        raise ValueError(f"variant {self.key}: k must be 0, 1 or 2, got {self.k}")


VARIANTS = (
    Variant("a", "no modules", 0, 0),
    Variant("b", "8 modules, k=1", 8, 1),
    Variant("c", "8 modules, k=2 pairs", 8, 2),
    Variant("d", "64 modules, k=1", 64, 1),
)
PEFT_MODULES = 8
"""The PEFT mixed batch serves the modules of variant (b): request i uses adapter m{i mod 8}."""


@dataclass
class Run:
    """One system on one workload."""

    system: str
    workload: Workload
    seconds: float
    """Wall time of the timed run."""
    warmup_seconds: float
    """Wall time of its warm-up run."""
    tokens: list[list[int]]
    """Generated token ids per request, in request order."""
    peak_memory_bytes: int | None = None
    """torch.cuda.max_memory_allocated during the timed run (None on the CPU)."""
    details: dict = field(default_factory=dict)
    """System-specific facts (steps, preemptions, distinct modules)."""

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds

    def row(self) -> dict:
        """The JSON row (token ids left out)."""
        w = self.workload
        return {
            "system": self.system, "workload": w.name, "batch_size": w.batch_size, "prompt_len": w.prompt_len,
            "new_tokens": w.new_tokens, "generated_tokens": self.generated_tokens, "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s, "warmup_seconds": self.warmup_seconds,
            "peak_memory_bytes": self.peak_memory_bytes, **self.details,
        }


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], list[list[int]]], device: str) -> tuple[list[list[int]], float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def _reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


@dataclass
class StepCounter:
    """The engine's step observer: steps and preemptions since the last reset."""

    steps: int = 0
    preempted: int = 0

    def __call__(self, stats: StepStats) -> None:
        self.steps += 1
        self.preempted += stats.num_preempted

    def reset(self) -> None:
        self.steps = self.preempted = 0


def run_tessera(
    engine: Engine, counter: StepCounter, variant: Variant, workload: Workload, prompts: list[list[int]],
    warmup_tokens: int, device: str,
) -> Run:
    """Variant `variant` of Tessera's engine on `workload` (inline steps, detokenization included)."""
    compositions = variant.compositions(workload.batch_size)

    def generate(tag: str, num_tokens: int) -> list[list[int]]:
        sampling = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
        requests = [
            Request(f"{variant.key}-{workload.name}-{tag}-{i}", prompt, sampling, composition)
            for i, (prompt, composition) in enumerate(zip(prompts, compositions))
        ]
        outputs = engine.generate_batch(requests)
        return [[t for output in outputs[r.request_id] for t in output.token_ids] for r in requests]

    _, warmup_seconds = _timed(lambda: generate("warmup", warmup_tokens), device)
    counter.reset()
    _reset_peak(device)
    tokens, seconds = _timed(lambda: generate("timed", workload.new_tokens), device)
    distinct = len({m for c in compositions for m in c.module_ids})
    details = {"steps": counter.steps, "preempted": counter.preempted, "distinct_modules": distinct}
    return Run(variant.system, workload, seconds, warmup_seconds, tokens, _peak(device), details)


def left_padded(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [batch, longest prompt], prompts aligned to the right."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)  # [batch, longest]
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)  # [batch, longest]
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def run_generate(
    system: str, model, workload: Workload, prompts: list[list[int]], warmup_tokens: int, device: str,
    pad_id: int, adapter_names: list[str] | None = None,
) -> Run:
    """transformers `generate` (a PeftModel's, with `adapter_names` for PEFT's mixed batch), batched, greedy."""
    input_ids, attention_mask = left_padded(prompts, pad_id, device)
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}

    def generate(num_tokens: int) -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=num_tokens,
                min_new_tokens=num_tokens, do_sample=False, pad_token_id=pad_id, **extra,
            )
        return out[:, input_ids.shape[1] :].tolist()  # [batch, new tokens]

    _, warmup_seconds = _timed(lambda: generate(warmup_tokens), device)
    _reset_peak(device)
    tokens, seconds = _timed(lambda: generate(workload.new_tokens), device)
    details = {"distinct_modules": len(set(adapter_names)) if adapter_names is not None else 0}
    return Run(system, workload, seconds, warmup_seconds, tokens, _peak(device), details)


def agreement(left: list[list[int]], right: list[list[int]]) -> dict:
    """How far two systems' greedy outputs agree: whole requests, and the mean shared prefix share."""
    if len(left) != len(right):
        raise ValueError(f"cannot compare {len(left)} requests with {len(right)}")
    exact = sum(a == b for a, b in zip(left, right))
    prefixes = []
    for a, b in zip(left, right):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(same / max(len(a), len(b), 1))
    return {
        "requests": len(left),
        "exact_requests": exact,
        "exact_share": exact / len(left),
        "mean_prefix_share": sum(prefixes) / len(left),
    }

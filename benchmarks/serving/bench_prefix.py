"""Prefix caching on a shared system prompt: Tessera's engine with and without it, side by side in one run.

    python benchmarks/serving/bench_prefix.py --out results/bench_prefix.json                 # GPU, Llama-3-8B shape
    python benchmarks/serving/bench_prefix.py --device cpu --config small --requests 16 \\
        --prefix-len 512 --out /tmp/bench_prefix.json                                          # CPU
    python benchmarks/serving/bench_prefix.py --cold ...                     # no warm-up: a burst on an empty cache

Every request is one shared prefix (a system prompt of --prefix-len random token ids) plus --unique-len
token ids of its own, and generates --new-tokens tokens (greedy, `ignore_eos`). Requests are spread over
--modules random rank-16 modules, one per request (k = 1), so the cache holds one copy of the prefix per
module: KV computed under one module is never valid under another. A warm-up request per module runs
first, as the earlier traffic of a server that has seen the prompt (`--cold` skips it: the burst meets an
empty cache, and each module's first request shares its prefix with the others admitted in the same step);
then all requests are submitted at once and timed. Both engines get the same weights and requests and must
generate the same tokens.

The table reports, per engine: prompt tokens computed (prefill work), prompt tokens taken from the cache,
wall seconds of the timed batch and generated tokens per second over it, and the ratio of the two
engines' times.
"""

from __future__ import annotations

import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.serving import side_by_side  # noqa: E402
from benchmarks.serving.bench_engine import MODULE_RANK, _environment  # noqa: E402
from benchmarks.serving.engine_models import (  # noqa: E402
    PAD_ID, SHAPES, EngineSettings, random_model_and_modules, tessera_engine, word_tokenizer,
)
from benchmarks.serving.side_by_side import (  # noqa: E402
    differing, model_dtype, parser_with_model_flags, same_tokens_note, timed_batch,
)
from router.composition import Composition  # noqa: E402
from server.engine.request import Request, SamplingParams, StepStats  # noqa: E402


@dataclass(frozen=True)
class PrefixSettings:
    """One run; the CLI flags are these fields."""

    config: str
    """Model shape preset (benchmarks.serving.engine_models.SHAPES)."""
    device: str
    dtype: str
    requests: int
    """Requests of the timed batch, all submitted at once."""
    prefix_len: int
    """Tokens of the prefix every request starts with."""
    unique_len: int
    """Tokens of each request after the prefix."""
    new_tokens: int
    """Tokens each request generates."""
    modules: int
    """Modules the requests are spread over (one each, round robin); 0 serves the backbone alone."""
    block_size: int
    seed: int
    out: str
    cold: bool = False
    """Skip the warm-up: the timed requests arrive at an empty cache."""


class _Work:
    """A step observer that adds up what the steps computed."""

    def __init__(self) -> None:
        self.tokens = self.seqs = self.cached = self.queried = 0

    def __call__(self, stats: StepStats) -> None:
        self.tokens += stats.num_tokens
        self.seqs += stats.num_seqs
        self.cached += stats.prefix_cache_hits
        self.queried += stats.prefix_cache_queries


def _requests(settings: PrefixSettings, vocab_size: int) -> tuple[list[Request], list[Request]]:
    """(warm-up requests, one per module; the timed batch)."""
    rng = random.Random(settings.seed)
    draw = lambda count: [rng.randrange(PAD_ID + 1, vocab_size) for _ in range(count)]  # noqa: E731
    prefix = draw(settings.prefix_len)
    sampling = SamplingParams(max_tokens=settings.new_tokens, temperature=0.0, ignore_eos=True)
    compositions = [Composition((f"m{i}",), (1.0,), "explicit") for i in range(settings.modules)] or [Composition()]
    warm = [Request(f"warm-{i}", prefix + draw(settings.unique_len), sampling, c) for i, c in enumerate(compositions)]
    timed = [Request(f"r{i}", prefix + draw(settings.unique_len), sampling, compositions[i % len(compositions)])
             for i in range(settings.requests)]
    return warm, timed


def run(settings: PrefixSettings) -> dict:
    shape = SHAPES[settings.config]
    hf_model, library = random_model_and_modules(shape, settings.dtype, settings.device, settings.seed,
                                                 settings.modules, MODULE_RANK)
    warm, timed = _requests(settings, shape.vocab_size)
    per_request = -(-(settings.prefix_len + settings.unique_len + settings.new_tokens) // settings.block_size)
    rows, tokens = [], {}
    for caching in (False, True):
        work = _Work()
        engine_settings = EngineSettings(
            block_size=settings.block_size, max_num_seqs=max(settings.requests, len(warm)),
            max_num_batched_tokens=max(2048, settings.block_size), num_kv_blocks=(len(warm) + settings.requests)
            * per_request, max_slots=max(settings.modules, 1), max_rank=MODULE_RANK, max_k=1,
            enable_prefix_caching=caching,
        )
        engine = tessera_engine(hf_model, word_tokenizer(shape.vocab_size), library, engine_settings,
                                settings.dtype, work)
        if not settings.cold:
            engine.generate_batch(warm)
        work.__init__()
        outputs, seconds, tokens[caching] = timed_batch(engine, timed, settings.device)
        generated = sum(len(t) for t in tokens[caching].values())
        prompt_tokens = sum(len(r.prompt_token_ids) for r in timed)
        rows.append({"prefix_caching": caching, "prompt_tokens": prompt_tokens,
                     "prompt_tokens_cached": sum(outs[-1].num_cached_tokens for outs in outputs.values()),
                     "tokens_computed": work.tokens, "seconds": seconds, "generated_tokens": generated,
                     "generated_per_s": generated / seconds})
        del engine
    different = differing(tokens[False], tokens[True], settings.dtype, "prefix caching")
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    return {"settings": asdict(settings), "environment": _environment(settings), "rows": rows,
            "speedup": speedup, "requests_with_other_tokens": len(different)}


def table(document: dict) -> str:
    s = document["settings"]
    lines = [f"{s['config']} on {s['device']} ({s['dtype']}): {s['requests']} requests of {s['prefix_len']} shared "
             f"+ {s['unique_len']} own prompt tokens, {s['new_tokens']} new tokens, {s['modules']} modules"
             + (", cold cache" if s.get("cold") else ""),
             f"{'prefix caching':>14} {'prompt tok':>10} {'cached':>8} {'computed':>9} {'seconds':>8} {'gen tok/s':>10}"]
    for row in document["rows"]:
        lines.append(f"{'on' if row['prefix_caching'] else 'off':>14} {row['prompt_tokens']:>10} "
                     f"{row['prompt_tokens_cached']:>8} {row['tokens_computed']:>9} {row['seconds']:>8.3f} "
                     f"{row['generated_per_s']:>10.1f}")
    lines.append(f"time without / with prefix caching: {document['speedup']:.2f}x ({same_tokens_note(document)})")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> PrefixSettings:
    parser = parser_with_model_flags(__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--unique-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--modules", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/serving/results/bench_prefix.json")
    parser.add_argument("--cold", action="store_true", help="no warm-up: the timed burst meets an empty cache")
    args = parser.parse_args(argv)
    dtype = model_dtype(parser, args, ("requests", "prefix_len", "unique_len", "new_tokens"))
    if args.modules < 0:
        parser.error("--modules must be >= 0")
    return PrefixSettings(args.config, args.device, dtype, args.requests, args.prefix_len, args.unique_len,
                          args.new_tokens, args.modules, args.block_size, args.seed, args.out, args.cold)


def main(argv: list[str] | None = None) -> dict:
    return side_by_side.main(_parse, run, table, argv)


if __name__ == "__main__":
    main()

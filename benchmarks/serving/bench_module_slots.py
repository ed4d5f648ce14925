"""More modules in use than module pool slots: requests that wait for slots held up the queue, or let
others pass. Both schedulers side by side in one run, on the same model, modules and requests.

    python benchmarks/serving/bench_module_slots.py --out results/bench_module_slots.json        # GPU, Llama-3-8B shape
    python benchmarks/serving/bench_module_slots.py --device cpu --config tiny --out /tmp/slots.json    # CPU

The first `--slots` requests are long (`--long-tokens` new tokens), one per module, and pin every slot of
the pool. The other requests arrive behind them, each on a module drawn at random from `--modules`, and
generate `--new-tokens` tokens (greedy, `ignore_eos`). With `module_wait_steps` 0 a request whose module
has no slot holds up every request behind it; with the default, requests whose modules are resident go
past it for that many steps. The table reports engine steps, the mean batch (sequences per step), wall
seconds and generated tokens per second, and the ratio of the two schedulers' steps and times. On a GPU,
decode steps are memory-bound, so time follows the number of steps; on a CPU it follows the work, which
is the same in both.
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
class SlotSettings:
    """One run; the CLI flags are these fields."""

    config: str
    device: str
    dtype: str
    requests: int
    """Requests in all, the long ones included."""
    modules: int
    slots: int
    """Module pool slots (fewer than `modules`)."""
    prompt_len: int
    long_tokens: int
    new_tokens: int
    max_num_seqs: int
    seed: int
    out: str


def _requests(settings: SlotSettings, vocab_size: int) -> list[Request]:
    rng = random.Random(settings.seed)
    requests = []
    for i in range(settings.requests):
        module = i if i < settings.slots else rng.randrange(settings.modules)
        tokens = settings.long_tokens if i < settings.slots else settings.new_tokens
        prompt = [rng.randrange(PAD_ID + 1, vocab_size) for _ in range(settings.prompt_len)]
        requests.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
                                Composition((f"m{module}",), (1.0,), "explicit")))
    return requests


def run(settings: SlotSettings) -> dict:
    shape = SHAPES[settings.config]
    hf_model, library = random_model_and_modules(shape, settings.dtype, settings.device, settings.seed,
                                                 settings.modules, MODULE_RANK)
    requests = _requests(settings, shape.vocab_size)
    per_request = -(-(settings.prompt_len + settings.long_tokens) // 16)
    rows, tokens = [], {}
    for wait in (0, EngineSettings.module_wait_steps):
        steps: list[StepStats] = []
        engine_settings = EngineSettings(
            block_size=16, max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=2048,
            num_kv_blocks=settings.requests * per_request, max_slots=settings.slots, max_rank=MODULE_RANK, max_k=1,
            module_wait_steps=wait)
        engine = tessera_engine(hf_model, word_tokenizer(shape.vocab_size), library, engine_settings,
                                settings.dtype, steps.append)
        outputs, seconds, tokens[wait] = timed_batch(engine, requests, settings.device)
        generated = sum(len(t) for t in tokens[wait].values())
        ran = [s for s in steps if s.num_seqs]
        rows.append({"module_wait_steps": wait, "steps": len(ran),
                     "mean_batch": sum(s.num_seqs for s in ran) / len(ran), "seconds": seconds,
                     "generated_tokens": generated, "generated_per_s": generated / seconds,
                     "module_loads": sum(s.num_module_loads for s in ran)})
        del engine
    strict, passing = rows
    different = differing(tokens[0], tokens[EngineSettings.module_wait_steps], settings.dtype, "passing over")
    return {"settings": asdict(settings), "environment": _environment(settings), "rows": rows,
            "steps_ratio": strict["steps"] / passing["steps"], "speedup": strict["seconds"] / passing["seconds"],
            "requests_with_other_tokens": len(different)}


def table(document: dict) -> str:
    s = document["settings"]
    lines = [f"{s['config']} on {s['device']} ({s['dtype']}): {s['requests']} requests over {s['modules']} modules, "
             f"{s['slots']} slots, {s['slots']} long requests first",
             f"{'wait steps':>10} {'steps':>6} {'mean batch':>10} {'loads':>6} {'seconds':>8} {'gen tok/s':>10}"]
    for row in document["rows"]:
        lines.append(f"{row['module_wait_steps']:>10} {row['steps']:>6} {row['mean_batch']:>10.1f} "
                     f"{row['module_loads']:>6} {row['seconds']:>8.3f} {row['generated_per_s']:>10.1f}")
    lines.append(f"steps strict / passing: {document['steps_ratio']:.2f}x, time: {document['speedup']:.2f}x "
                 f"({same_tokens_note(document)})")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> SlotSettings:
    parser = parser_with_model_flags(__doc__)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--modules", type=int, default=16)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/serving/results/bench_module_slots.json")
    args = parser.parse_args(argv)
    dtype = model_dtype(parser, args, ("prompt_len", "long_tokens", "new_tokens", "max_num_seqs"))
    if not 1 <= args.slots < args.modules:
        parser.error("--slots must be at least 1 and fewer than --modules")
    if args.requests <= args.slots:
        parser.error("--requests must be more than --slots")
    return SlotSettings(args.config, args.device, dtype, args.requests, args.modules, args.slots, args.prompt_len,
                        args.long_tokens, args.new_tokens, args.max_num_seqs, args.seed, args.out)


def main(argv: list[str] | None = None) -> dict:
    return side_by_side.main(_parse, run, table, argv)


if __name__ == "__main__":
    main()

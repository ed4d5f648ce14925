"""Speculative decoding: Tessera's engine without it, with OpenAI-style predictions and with n-gram lookup, side by
side in one run on the same weights and requests.

    python benchmarks/serving/bench_spec.py --out results/bench_spec.json                    # GPU, Llama-3-8B shape
    python benchmarks/serving/bench_spec.py --device cpu --config small --batch-sizes 1 4 \\
        --new-tokens 64 --out /tmp/bench_spec.json                                          # CPU
    python benchmarks/serving/bench_spec.py --workload copy --device cpu --batch-sizes 1 8 \\
        --out /tmp/bench_spec_copy.json                                                     # a trained model

Each batch of --batch-sizes requests runs under the settings below. `--workload random` (default): random prompts
of --prompt-len token ids, greedy, `ignore_eos`, --new-tokens each, spread over --modules random rank-16 modules,
one per request, on the random model of --config. `--workload copy`: a trained model whose replies quote their
prompts, the suite's character-level backbone (pretrained on first use and cached, about a minute on 2 CPU
cores) asked to repeat random strings, greedy, each reply ending at its own EOS. `--workload form`: the same
backbone under a structured output, a regex template whose labels and punctuation the grammar forces (settings
plain, forced, prediction and ngram only). The settings:

- `plain`: no speculation, the reference every other setting must reproduce token for token;
- `forced`: a structured output's forced tokens drafted, nothing else (form workload; every setting but `plain`
  drafts them too);
- `prediction`: each request carries its own plain output as its prediction, drafted --prediction-tokens a step
  (OpenAI's Predicted Outputs when the reply is known, as for a file sent back unchanged): the most any
  prediction can save;
- `edited`: the same with an edit every --edit-every tokens (two tokens replaced, one inserted), the shape of a
  code edit;
- `wrong`: a prediction none of whose tokens is right (each plain token shifted by one id): what a useless
  prediction costs;
- `ngram`: vLLM's n-gram lookup in the request's own prompt and output (`--speculative-config` method ngram, k
  = --drafts). A random model's text repeats only by chance, so on the random workload this row measures the
  cost of looking and of rejected drafts; the copy workload shows what it finds in a reply that quotes;
- `ngram+prediction`: both.

The table reports per setting: engine steps, wall seconds, generated tokens per second, draft tokens run and
kept, tokens per step of a request (outputs over the steps each request ran in: the prompt's step gives the
first), the steps replayed from CUDA graphs (decode and, of those, verify graphs: steps that run drafts), the
steps whose sampling waited for the step before (`deferred`: grammar masks under asynchronous scheduling, the form
workload's `plain`), the steps planned only after the one in flight was read back for speculation (`waits`), and
the time relative to `plain`. Under `plain`, decode steps replay CUDA graphs and overlap the next step's planning
(structured ones too, with only their sampling deferred); a setting that drafts replays verify graphs up to their
largest batch and gives up the overlap for its `waits` (the engine's documented cost), which is what the ratio
weighs against the steps saved.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.quality.evaluate import prompt_ids  # noqa: E402
from benchmarks.serving import side_by_side  # noqa: E402
from benchmarks.serving.bench_engine import MODULE_RANK, _environment  # noqa: E402
from benchmarks.serving.engine_models import (  # noqa: E402
    PAD_ID, SHAPES, EngineSettings, random_model_and_modules, tessera_engine, word_tokenizer,
)
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from benchmarks.serving.side_by_side import differing, model_dtype, parser_with_model_flags, timed_batch  # noqa: E402
from router.composition import Composition  # noqa: E402
from server.engine.request import Request, SamplingParams, StepStats  # noqa: E402
from server.engine.speculative import SpeculativeConfig  # noqa: E402

SYSTEMS = ("plain", "prediction", "edited", "wrong", "ngram", "ngram+prediction")


@dataclass(frozen=True)
class SpecSettings:
    """One run; the CLI flags are these fields."""

    config: str
    """Model shape preset (benchmarks.serving.engine_models.SHAPES)."""
    device: str
    dtype: str
    batch_sizes: tuple[int, ...]
    """Requests per batch, all submitted at once; a row per batch size and setting."""
    prompt_len: int
    new_tokens: int
    """Tokens each request generates."""
    modules: int
    """Modules the requests are spread over (one each, round robin); 0 serves the backbone alone."""
    drafts: int
    """n-gram draft tokens per step (`num_speculative_tokens`)."""
    prediction_tokens: int
    """Prediction tokens drafted per step (`prediction_tokens`)."""
    edit_every: int
    """The `edited` prediction changes its tokens once every this many."""
    block_size: int
    seed: int
    out: str
    workload: str = "random"
    """random: the random model of `config` on random prompts; copy: the suite backbone repeating strings."""
    suite_backbone: str = "small"
    """With workload copy: the suite backbone setting (training.suite.backbone.SETTINGS)."""
    cuda_graphs: str = "auto"
    """EngineConfig.cuda_graphs of every engine (padded: the graphs' shapes run eagerly, to check them on a CPU)."""
    async_scheduling: str = "auto"
    """EngineConfig.async_scheduling of every engine (auto: on CUDA)."""


class _Steps:
    """A step observer that counts steps and drafts."""

    def __init__(self) -> None:
        self.steps = self.seq_steps = self.drafted = self.accepted = 0

    def __call__(self, stats: StepStats) -> None:
        self.steps += stats.num_seqs > 0
        self.seq_steps += stats.num_seqs
        self.drafted += stats.num_draft_tokens
        self.accepted += stats.num_accepted_tokens


def _edited(tokens: list[int], every: int, vocab_size: int) -> list[int]:
    """`tokens` with two replaced and one inserted once every `every` tokens (ids shifted within the vocabulary)."""
    out = []
    for start in range(0, len(tokens), every):
        chunk = tokens[start : start + every]
        if len(chunk) >= every // 2 + 2:
            middle = every // 2
            changed = [(t % (vocab_size - 1)) + 1 for t in chunk[middle : middle + 2]]
            chunk = chunk[:middle] + changed + [changed[0]] + chunk[middle + 2 :]
        out += chunk
    return out


def _speculation(settings: SpecSettings, system: str) -> str:
    """EngineConfig.speculative_config of a setting (`plain`: no drafts at all)."""
    if system == "plain":
        return json.dumps({"prediction_tokens": 0, "grammar_tokens": 0})
    speculation = {"prediction_tokens": settings.prediction_tokens}
    if system.startswith("ngram"):
        speculation |= {"method": "ngram", "num_speculative_tokens": settings.drafts, "prompt_lookup_max": 3,
                        "prompt_lookup_min": 1}
    return json.dumps(speculation)


class _RandomWorkload:
    """The random Llama of `settings.config` with random modules, random prompts, every request forced to
    `new_tokens`."""

    systems = SYSTEMS

    def __init__(self, settings: SpecSettings):
        self.settings, shape = settings, SHAPES[settings.config]
        self.vocab_size = shape.vocab_size
        self.hf_model, self.library = random_model_and_modules(shape, settings.dtype, settings.device, settings.seed,
                                                               settings.modules, MODULE_RANK)

    def engine(self, batch: int, system: str, observer) -> Engine:
        s = self.settings
        per_request = -(-(s.prompt_len + s.new_tokens + 16) // s.block_size)
        engine_settings = EngineSettings(
            block_size=s.block_size, max_num_seqs=batch, max_num_batched_tokens=max(2048, s.block_size),
            num_kv_blocks=batch * per_request, max_slots=max(s.modules, 1), max_rank=MODULE_RANK, max_k=1,
            cuda_graphs=s.cuda_graphs, async_scheduling=s.async_scheduling, speculative_config=_speculation(s, system))
        return tessera_engine(self.hf_model, word_tokenizer(self.vocab_size), self.library, engine_settings, s.dtype,
                              observer)

    def requests(self, batch: int, predictions: dict | None) -> list[Request]:
        s = self.settings
        rng = random.Random(s.seed * 1000 + batch)
        sampling = SamplingParams(max_tokens=s.new_tokens, temperature=0.0, ignore_eos=True)
        compositions = [Composition((f"m{i}",), (1.0,), "explicit") for i in range(s.modules)] or [Composition()]
        return [Request(f"r{i}", [rng.randrange(PAD_ID + 1, self.vocab_size) for _ in range(s.prompt_len)],
                        sampling, compositions[i % len(compositions)], prediction=_prediction(predictions, f"r{i}"))
                for i in range(batch)]


class _CopyWorkload:
    """A trained model whose replies quote their prompts: the suite backbone (`training.suite.backbone`, a
    character-level Llama pretrained, and cached, to echo strings) asked to repeat random strings, each reply
    ending at its own EOS. No modules: the backbone alone."""

    systems = SYSTEMS

    def __init__(self, settings: SpecSettings):
        from transformers import AutoConfig, AutoTokenizer

        from training.suite.backbone import SETTINGS, ensure_backbone

        self.settings, self.backbone = settings, SETTINGS[settings.suite_backbone]
        self.model_dir = str(ensure_backbone(settings.suite_backbone, progress=True))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.vocab_size = AutoConfig.from_pretrained(self.model_dir).vocab_size

    def engine(self, batch: int, system: str, observer) -> Engine:
        s = self.settings
        config = EngineConfig(model=self.model_dir, dtype=s.dtype, device=s.device, block_size=s.block_size,
                              max_num_seqs=batch, max_num_batched_tokens=2048, num_kv_blocks=batch * 8,
                              cuda_graphs=s.cuda_graphs, async_scheduling=s.async_scheduling,
                              speculative_config=_speculation(s, system))
        return Engine(config, step_observer=observer)

    def requests(self, batch: int, predictions: dict | None) -> list[Request]:
        from training.suite.backbone import random_string

        rng = random.Random(f"bench-spec-copy:{self.settings.seed}:{batch}")
        sampling = SamplingParams(max_tokens=self.backbone.max_string_len + 2, temperature=0.0)
        lengths = (self.backbone.max_string_len // 2, self.backbone.max_string_len)
        texts = [f"repeat the string: {random_string(rng, rng.randint(*lengths))}" for _ in range(batch)]
        return self._requests(texts, sampling, predictions)

    def _requests(self, texts: list[str], sampling: SamplingParams, predictions: dict | None,
                  grammar=None) -> list[Request]:
        """A request per user message of `texts`, rendered with the backbone's chat template."""
        return [Request(f"r{i}", prompt_ids(self.tokenizer, [{"role": "user", "content": text}]), sampling,
                        grammar=grammar, prediction=_prediction(predictions, f"r{i}"))
                for i, text in enumerate(texts)]


FORM = r"name: [a-z]{2,8}, age: [0-9]{1,2}, city: [a-z]{2,8}, country: [a-z]{2,8}\."
"""The structured output of the form workload: a template whose literal parts a grammar forces."""


class _FormWorkload(_CopyWorkload):
    """A structured output with a template: the suite backbone answers "fill in the form" under the regex FORM,
    whose labels and punctuation (39 of its characters, one token each) the grammar forces and the drafts of
    `forced` propose, as a JSON schema forces its keys."""

    systems = ("plain", "forced", "prediction", "ngram")

    def __init__(self, settings: SpecSettings):
        super().__init__(settings)
        from server.engine.structured import GrammarCompiler, GrammarSpec

        eos = {self.tokenizer.eos_token_id}
        self.grammar = GrammarCompiler(self.tokenizer, self.vocab_size, eos).compile(GrammarSpec("regex", FORM))

    def requests(self, batch: int, predictions: dict | None) -> list[Request]:
        texts = [f"fill in the form: r{i}" for i in range(batch)]
        return self._requests(texts, SamplingParams(max_tokens=80, temperature=0.0), predictions, self.grammar)


WORKLOADS = {"random": _RandomWorkload, "copy": _CopyWorkload, "form": _FormWorkload}


def _prediction(predictions: dict | None, request_id: str) -> tuple[int, ...]:
    return tuple((predictions or {}).get(request_id, ()))


def _predictions(system: str, plain: dict | None, settings: SpecSettings, vocab_size: int) -> dict | None:
    """Each request's prediction under `system`, from the plain run's tokens."""
    if system.endswith("prediction"):
        return plain
    if system == "edited":
        return {r: _edited(t, settings.edit_every, vocab_size) for r, t in plain.items()}
    if system == "wrong":
        return {r: [t % (vocab_size - 1) + 1 for t in tokens] for r, tokens in plain.items()}
    return None


def _run_batch(settings: SpecSettings, workload, batch: int) -> list[dict]:
    rows, plain = [], None
    for system in workload.systems:
        predictions = _predictions(system, plain, settings, workload.vocab_size)
        steps = _Steps()
        engine = workload.engine(batch, system, steps)
        engine.generate_batch(workload.requests(batch, None)[:1])  # warm-up (graphs, kernels)
        steps.__init__()
        graphs = engine.runner.graphs
        replays = (graphs.num_replays, graphs.num_verify_replays) if graphs is not None else (0, 0)
        deferred, waits = engine.runner.num_deferred_samples, engine.num_token_waits
        _, seconds, tokens = timed_batch(engine, workload.requests(batch, predictions), settings.device)
        if graphs is not None:
            replays = (graphs.num_replays - replays[0], graphs.num_verify_replays - replays[1])
        deferred, waits = engine.runner.num_deferred_samples - deferred, engine.num_token_waits - waits
        del engine
        if system == "plain":
            plain = tokens
        generated = sum(len(t) for t in tokens.values())
        rows.append({"batch": batch, "system": system, "steps": steps.steps, "seconds": seconds,
                     "generated_tokens": generated, "generated_per_s": generated / seconds,
                     "draft_tokens": steps.drafted, "accepted_tokens": steps.accepted,
                     "tokens_per_step": generated / steps.seq_steps, "graph_steps": replays[0],
                     "verify_graph_steps": replays[1], "deferred_samples": deferred,
                     "token_waits": waits,
                     "time_vs_plain": seconds / rows[0]["seconds"] if rows else 1.0,
                     "requests_with_other_tokens": len(differing(plain, tokens, settings.dtype, system))})
    return rows


def run(settings: SpecSettings) -> dict:
    workload = WORKLOADS[settings.workload](settings)
    rows = [row for batch in settings.batch_sizes for row in _run_batch(settings, workload, batch)]
    return {"settings": asdict(settings) | {"batch_sizes": list(settings.batch_sizes)},
            "environment": _environment(settings), "rows": rows}


def table(document: dict) -> str:
    s = document["settings"]
    if s["workload"] == "copy":
        head = f"suite backbone {s['suite_backbone']} repeating strings (greedy, to EOS)"
    elif s["workload"] == "form":
        head = f"suite backbone {s['suite_backbone']} filling in a form under a regex (greedy, to EOS)"
    else:
        head = (f"{s['config']}: prompts of {s['prompt_len']} tokens, {s['new_tokens']} new tokens each (greedy), "
                f"{s['modules']} modules")
    lines = [f"{head} on {document['environment']['device']} ({s['dtype']}); n-gram k={s['drafts']}, "
             f"{s['prediction_tokens']} prediction tokens a step",
             f"{'batch':>5} {'setting':>17} {'steps':>6} {'seconds':>8} {'gen tok/s':>10} {'drafted':>8} "
             f"{'kept':>6} {'tok/step':>8} {'graphs':>6} {'verify':>6} {'deferred':>8} {'waits':>5} {'time/plain':>10} "
             f"{'same tokens':>11}"]
    for row in document["rows"]:
        lines.append(f"{row['batch']:>5} {row['system']:>17} {row['steps']:>6} {row['seconds']:>8.3f} "
                     f"{row['generated_per_s']:>10.1f} {row['draft_tokens']:>8} {row['accepted_tokens']:>6} "
                     f"{row['tokens_per_step']:>8.2f} {row['graph_steps']:>6} {row['verify_graph_steps']:>6} "
                     f"{row['deferred_samples']:>8} {row['token_waits']:>5} "
                     f"{row['time_vs_plain']:>10.2f} "
                     f"{'yes' if row['requests_with_other_tokens'] == 0 else 'NO':>11}")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> SpecSettings:
    parser = parser_with_model_flags(__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--modules", type=int, default=8)
    parser.add_argument("--drafts", type=int, default=4)
    parser.add_argument("--prediction-tokens", type=int, default=SpeculativeConfig.prediction_tokens)
    parser.add_argument("--edit-every", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/serving/results/bench_spec.json")
    parser.add_argument("--workload", default="random", choices=sorted(WORKLOADS),
                        help="random: --config's random model on random prompts; copy: the suite backbone, a "
                             "trained model, repeating strings; form: the suite backbone filling in a templated "
                             "structured output (with copy and form, --config, --prompt-len, --new-tokens and "
                             "--modules do not apply)")
    parser.add_argument("--suite-backbone", default="small", help="with --workload copy: tiny, small or full")
    parser.add_argument("--cuda-graphs", default="auto", choices=["auto", "off", "padded"],
                        help="EngineConfig.cuda_graphs (padded: the graphs' padded shapes, run eagerly)")
    parser.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                        help="EngineConfig.async_scheduling (auto: on CUDA)")
    args = parser.parse_args(argv)
    dtype = model_dtype(parser, args, ("prompt_len", "new_tokens", "drafts", "prediction_tokens", "edit_every"))
    if args.modules < 0 or min(args.batch_sizes) < 1:
        parser.error("--modules must be >= 0 and every --batch-sizes value >= 1")
    from training.suite.backbone import SETTINGS

    if args.suite_backbone not in SETTINGS:
        parser.error(f"--suite-backbone must be one of {sorted(SETTINGS)}")
    return SpecSettings(args.config, args.device, dtype, tuple(args.batch_sizes), args.prompt_len, args.new_tokens,
                        args.modules, args.drafts, args.prediction_tokens, args.edit_every, args.block_size, args.seed,
                        args.out, args.workload, args.suite_backbone, args.cuda_graphs, args.async_scheduling)


def main(argv: list[str] | None = None) -> dict:
    return side_by_side.main(_parse, run, table, argv)


if __name__ == "__main__":
    main()

"""The benchmark's one frozen config, and the small specs its string fields spell.

`tessera bench` builds every flag from `BenchConfig`'s fields and docstrings, in one place
(`benchmarks/serving/cli.py`). Specs stay strings in the config (what the user typed) and are parsed
once, in `__post_init__`, so a bad value fails before any request is sent.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SLO_METRICS = ("ttft", "tpot", "e2e")
"""Per-request latencies an SLO can bound (seconds)."""
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}
TAG_ROUTES = ("model", "header", "body")


@dataclass(frozen=True)
class LengthDist:
    """A distribution of lengths: `N` (fixed), `uniform:LO,HI` (inclusive) or `normal:MEAN,STD`."""

    kind: str
    """fixed, uniform or normal."""
    a: float
    """The length (fixed), the lowest length (uniform) or the mean (normal)."""
    b: float = 0.0
    """The highest length (uniform) or the standard deviation (normal)."""

    @classmethod
    def parse(cls, spec: str, what: str) -> "LengthDist":
        kind, _, rest = spec.partition(":") if ":" in spec else ("fixed", "", spec)
        try:
            numbers = [float(x) for x in rest.split(",")]
        except ValueError:
            numbers = []
        wanted = {"fixed": 1, "uniform": 2, "normal": 2}.get(kind)
        if wanted is None or len(numbers) != wanted or not all(map(math.isfinite, numbers)):
            raise ValueError(f"{what} {spec!r}: expected N, uniform:LO,HI or normal:MEAN,STD")
        dist = cls(kind, *numbers)
        low = dist.a if kind != "normal" else 1
        if low < 1 or (kind == "uniform" and dist.b < dist.a) or (kind == "normal" and (dist.a < 1 or dist.b < 0)):
            raise ValueError(f"{what} {spec!r}: lengths must be >= 1 (and LO <= HI, STD >= 0)")
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))


def popularity(spec: str, count: int) -> list[float]:
    """Weights of `count` names under `uniform` or `zipf:S` (the i-th name weighs 1 / i**S)."""
    if spec == "uniform":
        return [1.0 / count] * count
    kind, _, exponent = spec.partition(":")
    try:
        s = float(exponent)
    except ValueError:
        s = -1.0
    if kind != "zipf" or not s > 0 or not math.isfinite(s):
        raise ValueError(f"--task-dist {spec!r}: expected uniform or zipf:S with S > 0")
    raw = [1.0 / (i + 1) ** s for i in range(count)]
    return [w / sum(raw) for w in raw]


def parse_slos(specs: tuple[str, ...]) -> dict[str, float]:
    """`("ttft=0.5", "tpot=0.05")` -> `{"ttft": 0.5, "tpot": 0.05}` (seconds)."""
    slos = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            limit = float(value)
        except ValueError:
            limit = -1.0
        if not sep or name not in SLO_METRICS or not limit > 0 or not math.isfinite(limit):
            raise ValueError(f"--slo {spec!r}: expected METRIC=SECONDS with METRIC one of {', '.join(SLO_METRICS)}")
        if name in slos:
            raise ValueError(f"--slo {name} given twice")
        slos[name] = limit
    return slos


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: where to send requests, how they arrive, what they ask for, what counts as good."""

    base_url: str
    """Server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)."""
    model: str
    """The `model` field of requests without a task tag (the backbone's name or any served model id)."""
    endpoint: str = "chat"
    """chat (/v1/chat/completions), completions (/v1/completions) or responses (/v1/responses, OpenAI's
    Responses API); all are streamed."""
    rate: tuple[float, ...] = ()
    """Request rates (requests/s; inf sends all at once); several run one after another."""
    burstiness: float = 1.0
    """Shape of the gamma inter-arrival times: 1 is Poisson, below 1 burstier, above 1 more regular."""
    concurrency: int | None = None
    """Keep this many requests in flight instead of a rate (give --rate or --concurrency, not both)."""
    num_requests: int | None = None
    """Requests per run; 100 when neither this nor --duration is given."""
    duration: float | None = None
    """Seconds per run in which requests are started, instead of a request count."""
    warmup: int = 0
    """Requests sent (all at once) before each run and left out of its metrics."""
    reset_prefix_cache: bool = False
    """POST /reset_prefix_cache before each run (after its warm-up), so every run starts with a cold prefix
    cache: Tessera serves it, vLLM in its dev mode (VLLM_SERVER_DEV_MODE=1)."""
    seed: int = 0
    """Seed of the arrival times, prompts, lengths and tags."""
    dataset: str | None = None
    """JSONL of prompts: ShareGPT `conversations`, or OpenAI `messages` (with an optional `task`, as
    training/ writes); default: random prompts of --input-len words."""
    input_len: str = "128"
    """Random prompts' length in words: N, uniform:LO,HI or normal:MEAN,STD."""
    prefix_len: int = 0
    """Words of a system prompt shared by every request (drawn once per run from --seed), sent before each
    prompt: the workload prefix caching serves (as vLLM's --random-prefix-len); 0 sends none."""
    output_len: str = "128"
    """max_tokens of every request: N, uniform:LO,HI or normal:MEAN,STD."""
    ignore_eos: bool = False
    """Send `ignore_eos: true` so outputs run to max_tokens (Tessera and vLLM accept it; OpenAI does not)."""
    tasks: tuple[str, ...] = ()
    """Task tags drawn per request (comma-separated); default: the dataset's `task` fields, else none."""
    task_dist: str = "uniform"
    """Popularity of --tasks (and --modules): uniform, or zipf:S where the i-th name weighs 1/i**S."""
    modules: tuple[str, ...] = ()
    """Modules for --modules-k compositions (comma-separated); default: the modules GET /v1/models lists."""
    modules_k: int | None = None
    """Tag each request with an explicit composition of this many modules (`modules` body field,
    random weights) instead of a task."""
    tag_via: str = "model"
    """How a task tag is sent: model (the `model` field, as vLLM names LoRA adapters), header
    (X-Tessera-Task) or body (`task` field)."""
    slo: tuple[str, ...] = ()
    """Service-level objectives for goodput, METRIC=SECONDS with METRIC in ttft, tpot, e2e."""
    out: str | None = None
    """Directory for results.json and the PNG plots; default: only print the summary."""
    api_key: str | None = None
    """Sent as `Authorization: Bearer KEY`."""
    timeout: float = 600.0
    """Seconds a request may wait for the connection or for its next bytes before it counts as failed."""
    progress: bool = True
    """Show a progress bar while a run goes."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url {self.base_url!r}: expected http://HOST:PORT or https://...")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint {self.endpoint!r}: expected one of {', '.join(ENDPOINTS)}")
        self._check_load()
        self._check_workload()
        parse_slos(self.slo)

    def _check_load(self) -> None:
        if bool(self.rate) == (self.concurrency is not None):
            raise ValueError("give either --rate R [R ...] or --concurrency C")
        if any(not r > 0 for r in self.rate):
            raise ValueError(f"--rate {' '.join(map(str, self.rate))}: rates must be > 0 (inf sends all at once)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency {self.concurrency}: must be >= 1")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"--burstiness {self.burstiness}: must be a finite number > 0")
        if self.num_requests is not None and self.duration is not None:
            raise ValueError("give either --num-requests or --duration, not both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"--num-requests {self.num_requests}: must be >= 1")
        if self.duration is not None and not (self.duration > 0 and math.isfinite(self.duration)):
            raise ValueError(f"--duration {self.duration}: must be a finite number of seconds > 0")
        if self.duration is not None and any(math.isinf(r) for r in self.rate):
            raise ValueError("--rate inf sends a fixed number of requests at once; use --num-requests with it")
        if self.warmup < 0 or not self.timeout > 0:
            raise ValueError("--warmup must be >= 0 and --timeout > 0")
        if self.tag_via not in TAG_ROUTES:
            raise ValueError(f"--tag-via {self.tag_via!r}: expected one of {', '.join(TAG_ROUTES)}")

    def _check_workload(self) -> None:
        LengthDist.parse(self.input_len, "--input-len")
        LengthDist.parse(self.output_len, "--output-len")
        if self.prefix_len < 0:
            raise ValueError(f"--prefix-len {self.prefix_len}: must be >= 0")
        if self.modules_k is not None:
            if self.modules_k < 1:
                raise ValueError(f"--modules-k {self.modules_k}: must be >= 1")
            if self.tasks:
                raise ValueError("give either --tasks or --modules-k, not both")
            if self.modules and self.modules_k > len(self.modules):
                raise ValueError(f"--modules-k {self.modules_k} but only {len(self.modules)} --modules")
        elif self.modules:
            raise ValueError("--modules needs --modules-k")
        popularity(self.task_dist, max(1, len(self.tasks)))
        if len(set(self.tasks)) != len(self.tasks) or any(not t for t in self.tasks):
            raise ValueError(f"--tasks {','.join(self.tasks)}: names must be distinct and non-empty")

    @property
    def input_dist(self) -> LengthDist:
        return LengthDist.parse(self.input_len, "--input-len")

    @property
    def output_dist(self) -> LengthDist:
        return LengthDist.parse(self.output_len, "--output-len")

    @property
    def slos(self) -> dict[str, float]:
        return parse_slos(self.slo)

    @property
    def api_root(self) -> str:
        """The base URL without a trailing slash or /v1."""
        root = self.base_url.rstrip("/")
        return root[: -len("/v1")] if root.endswith("/v1") else root

    @property
    def count(self) -> int | None:
        """Requests per run, or None when the run lasts --duration seconds."""
        if self.duration is not None:
            return None
        return self.num_requests if self.num_requests is not None else 100

"""Prometheus metrics of one server, in a registry of its own.

Request metrics are labelled by task: the task name, `backbone` for untagged requests, `explicit` for
explicit module weights (never the weights themselves, which would explode label cardinality).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.composition import Composition
from server.engine.request import StepStats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def task_label(composition: Composition) -> str:
    """The `task` label of a request: its task, `explicit` for explicit weights, else `backbone`."""
    if composition.task is not None:
        return composition.task
    return "explicit" if composition.source == "explicit" else "backbone"


class Metrics:
    """Every metric of one app; `observe_step` is the engine's step observer."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        task, latency = ["task"], {"buckets": _LATENCY, "registry": r}
        self.requests = Counter("tessera_requests", "Finished engine requests by task and finish reason "
                                "(stop, length, abort, error)", ["task", "status"], registry=r)
        self.rejected = Counter("tessera_requests_rejected", "Calls answered with an error, by HTTP status "
                                "and error code", ["status", "code"], registry=r)
        self.prompt_tokens = Counter("tessera_prompt_tokens", "Prompt tokens processed", task, registry=r)
        self.generation_tokens = Counter("tessera_generation_tokens", "Tokens generated", task, registry=r)
        self.ttft = Histogram("tessera_time_to_first_token_seconds", "Time to first token", task, **latency)
        self.tpot = Histogram("tessera_time_per_output_token_seconds", "Time per output token after the first",
                              task, buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("tessera_e2e_request_latency_seconds", "End-to-end request latency", task, **latency)
        self.running = Gauge("tessera_requests_running", "Requests holding KV blocks", registry=r)
        self.waiting = Gauge("tessera_requests_waiting", "Requests waiting for admission", registry=r)
        self.kv_used = Gauge("tessera_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_total = Gauge("tessera_kv_blocks_total", "KV-cache blocks in the pool", registry=r)
        self.batch_size = Histogram("tessera_batch_size", "Sequences per engine step", buckets=_BATCH, registry=r)
        self.batch_tokens = Histogram("tessera_batch_tokens", "Tokens per engine step", buckets=_BATCH, registry=r)
        self.preemptions = Counter("tessera_preemptions", "Requests preempted for KV blocks", registry=r)
        self.module_loads = Counter("tessera_module_loads", "Module weights copied into device pool slots (pool "
                                    "misses: a module not resident when a request needed it)", registry=r)
        self.modules_resident = Gauge("tessera_modules_resident", "Modules in device pool slots", registry=r)
        self.module_slots = Gauge("tessera_module_slots_total", "Slots of the device module pool", registry=r)
        self.prefix_queries = Counter("tessera_prefix_cache_queries", "Tokens of admitted requests looked up in "
                                      "the prefix cache", registry=r)
        self.prefix_hits = Counter("tessera_prefix_cache_hits", "Tokens found in the prefix cache (their KV was "
                                   "reused, not computed)", registry=r)
        self.kv_cached = Gauge("tessera_kv_blocks_cached", "KV-cache blocks registered in the prefix cache (held "
                               "or free)", registry=r)

    def observe_step(self, stats: StepStats) -> None:
        """The engine's step observer."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_total.set(stats.kv_blocks_total)
        if stats.num_seqs:
            self.batch_size.observe(stats.num_seqs)
            self.batch_tokens.observe(stats.num_tokens)
        if stats.num_preempted:
            self.preemptions.inc(stats.num_preempted)
        if stats.num_module_loads:
            self.module_loads.inc(stats.num_module_loads)
        self.modules_resident.set(stats.modules_resident)
        self.module_slots.set(stats.module_slots_total)
        if stats.prefix_cache_queries:
            self.prefix_queries.inc(stats.prefix_cache_queries)
            self.prefix_hits.inc(stats.prefix_cache_hits)
        self.kv_cached.set(stats.kv_blocks_cached)

    def observe_error(self, error) -> None:
        """Count one call the API answered with an `APIError` (its status and code)."""
        self.rejected.labels(str(error.status), error.code or "").inc()

    def observe_request(self, task: str, status: str, timing: "RequestTiming") -> None:
        self.requests.labels(task, status).inc()
        self.prompt_tokens.labels(task).inc(timing.num_prompt_tokens)
        self.generation_tokens.labels(task).inc(timing.num_output_tokens)
        if timing.first_token is not None:
            self.ttft.labels(task).observe(timing.first_token - timing.start)
            if timing.num_output_tokens > 1:
                per_token = (timing.end - timing.first_token) / (timing.num_output_tokens - 1)
                self.tpot.labels(task).observe(per_token)
        self.e2e.labels(task).observe(timing.end - timing.start)


class RequestTiming:
    """Timestamps of one request (time.monotonic seconds)."""

    def __init__(self, start: float):
        self.start = start
        self.first_token: float | None = None
        self.end = start
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0

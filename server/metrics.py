"""Prometheus metrics of one server, in a registry of its own.

Request metrics are labelled by task: the task name, `backbone` for untagged requests, `explicit` for
explicit module weights (never the weights themselves, which would explode label cardinality).

The same observations are also exported under vLLM's names (`vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`, ...; `VllmMetrics`), labelled by `model_name`, so
dashboards, autoscalers and LoRA-aware routers built for vLLM (the Gateway API Inference Extension reads
the queue, the KV usage and which adapters run and wait) work on Tessera unchanged.
"""

from __future__ import annotations

import time

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

    def __init__(self, model_name: str = "tessera", max_modules: int = 0) -> None:
        self.registry = r = CollectorRegistry()
        self.vllm = VllmMetrics(r, model_name, max_modules)
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
        self.vllm.observe_step(stats)

    def observe_error(self, error) -> None:
        """Count one call the API answered with an `APIError` (its status and code)."""
        self.rejected.labels(str(error.status), error.code or "").inc()

    def observe_request(self, task: str, status: str, timing: "RequestTiming") -> None:
        self.requests.labels(task, status).inc()
        self.prompt_tokens.labels(task).inc(timing.num_prompt_tokens)
        self.generation_tokens.labels(task).inc(timing.num_output_tokens)
        timing.observe(self.ttft.labels(task), self.tpot.labels(task), self.e2e.labels(task))
        self.vllm.observe_request(status, timing)


class VllmMetrics:
    """vLLM's metric names over the same observations (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_modules: int):
        r, label = registry, ["model_name"]
        self.model_name, self.max_modules = model_name, max_modules
        self.running = Gauge("vllm:num_requests_running", "Requests in the model's batch", label, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be admitted", label, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Share of the KV cache in use, from 0 to 1", label,
                              registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Preemptions", label, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", label, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason",
                               ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", label, buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds", "Mean time per output token after "
                              "the first, per request", label, buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", label,
                             buckets=_LATENCY, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Tokens looked up in the prefix cache", label,
                                      registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Tokens found in the prefix cache", label, registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "Modules (LoRA adapters) of running and waiting requests "
                               "in the labels, as vLLM reports them; the value is when they were last updated",
                               ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)
        self._lora_labels: tuple[str, str, str] | None = None

    def observe_step(self, stats: StepStats) -> None:
        name = self.model_name
        self.running.labels(name).set(stats.num_running)
        self.waiting.labels(name).set(stats.num_waiting)
        self.kv_usage.labels(name).set(stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0)
        if stats.num_preempted:
            self.preemptions.labels(name).inc(stats.num_preempted)
        if stats.prefix_cache_queries:
            self.prefix_queries.labels(name).inc(stats.prefix_cache_queries)
            self.prefix_hits.labels(name).inc(stats.prefix_cache_hits)
        labels = (str(self.max_modules), ",".join(sorted(stats.waiting_modules)),
                  ",".join(sorted(stats.running_modules)))
        if labels != self._lora_labels:  # one series, the current one (vLLM keeps every past one)
            self._lora_labels = labels
            self.lora_info.clear()
            self.lora_info.labels(*labels).set(time.time())

    def observe_request(self, status: str, timing: "RequestTiming") -> None:
        name = self.model_name
        self.prompt_tokens.labels(name).inc(timing.num_prompt_tokens)
        self.generation_tokens.labels(name).inc(timing.num_output_tokens)
        if status in ("stop", "length", "abort"):
            self.success.labels(name, status).inc()
        timing.observe(self.ttft.labels(name), self.tpot.labels(name), self.e2e.labels(name))


class RequestTiming:
    """Timestamps of one request (time.monotonic seconds)."""

    def __init__(self, start: float):
        self.start = start
        self.first_token: float | None = None
        self.end = start
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0

    def observe(self, ttft, tpot, e2e) -> None:
        """Observe its time to first token, mean time per output token after the first, and end-to-end
        latency into these histograms (the first two only where they exist)."""
        if self.first_token is not None:
            ttft.observe(self.first_token - self.start)
            if self.num_output_tokens > 1:
                tpot.observe((self.end - self.first_token) / (self.num_output_tokens - 1))
        e2e.observe(self.end - self.start)

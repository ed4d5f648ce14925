"""Per-request timings and the numbers a run reports: latency percentiles, throughput, goodput.

Definitions (all times in seconds, measured by the client):
  TTFT   from sending the request to the first chunk with output text
  ITL    every gap between consecutive chunks with output text (a chunk may carry several tokens: a
         server may merge increments when the client falls behind or hold back a partial character)
  TPOT   per request, (e2e - ttft) / (output_tokens - 1); requests with fewer than 2 tokens have none
  e2e    from sending the request to `data: [DONE]`
Output tokens are the usage chunk's `completion_tokens` when the server sends one (the benchmark asks
for it with `stream_options.include_usage`), else the number of chunks with output text; each record
says which (`tokens_from`). Throughput divides by the run's duration: from the first request sent to
the last one finished. Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request did, as seen by the client."""

    index: int
    """Position in the run's send order."""
    label: str
    """Task name, `explicit` or `none` (see `BenchRequest.label`)."""
    start: float
    """Send time, seconds after the run started."""
    status: int = 0
    """HTTP status; 0 when no response came (connection error, timeout)."""
    ttft: float | None = None
    """Seconds to the first chunk with output text; None if none came."""
    e2e: float = 0.0
    """Seconds to the end of the stream (or to the failure)."""
    itl: list[float] = field(default_factory=list)
    """Gaps between consecutive chunks with output text."""
    num_chunks: int = 0
    """Chunks with output text."""
    output_tokens: int = 0
    """Output tokens (usage when sent, else `num_chunks`)."""
    prompt_tokens: int | None = None
    """Prompt tokens from the usage chunk; None without one."""
    cached_tokens: int | None = None
    """Prompt tokens the server took from its prefix cache (usage `prompt_tokens_details.cached_tokens`);
    None when it does not say."""
    prediction_tokens: tuple[int, int] | None = None
    """(accepted, rejected) prediction tokens from the usage's `completion_tokens_details` (Predicted Outputs);
    None when it does not say."""
    tokens_from: str = "chunks"
    """`usage` or `chunks`: where `output_tokens` came from."""
    error: str | None = None
    """The error body (or the client-side reason) of a failed request; None on success."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of a non-empty list, interpolating linearly."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_stats(values: list[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 and max of some latencies (None for an empty list)."""
    stats: dict[str, float | int | None] = {"count": len(values)}
    if not values:
        return stats | {"mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None}
    stats["mean"] = sum(values) / len(values)
    stats.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    stats["max"] = max(values)
    return stats


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a successful request stayed within every SLO (a request without a TPOT meets a TPOT SLO)."""
    if not record.ok:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}
    for name, limit in slos.items():
        value = values[name]
        if name == "ttft" and value is None:
            return False
        if value is not None and value > limit:
            return False
    return True


def _prediction_tokens(done: list[RequestRecord]) -> dict | None:
    """Accepted and rejected prediction tokens over the requests whose usage reported them; None when none did."""
    counted = [r.prediction_tokens for r in done if r.prediction_tokens is not None]
    if not counted:
        return None
    return {"accepted": sum(a for a, _ in counted), "rejected": sum(r for _, r in counted)}


def summarize(records: list[RequestRecord], duration: float, slos: dict[str, float]) -> dict:
    """The summary of some requests of a run that lasted `duration` seconds."""
    done = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    sources = sorted({r.tokens_from for r in done})
    good = sum(meets_slos(r, slos) for r in done)
    per_second = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return {
        "num_requests": len(records),
        "num_succeeded": len(done),
        "num_failed": len(records) - len(done),
        "duration_s": duration,
        "output_tokens": output_tokens,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in done),
        "cached_prompt_tokens": (sum(r.cached_tokens for r in done if r.cached_tokens is not None)
                                 if any(r.cached_tokens is not None for r in done) else None),
        "prediction_tokens": _prediction_tokens(done),
        "tokens_from": sources[0] if len(sources) == 1 else ("mixed" if sources else None),
        "request_throughput": per_second(len(done)),
        "output_throughput": per_second(output_tokens),
        "output_chunks": sum(r.num_chunks for r in done),
        "ttft": latency_stats([r.ttft for r in done if r.ttft is not None]),
        "tpot": latency_stats([r.tpot for r in done if r.tpot is not None]),
        "itl": latency_stats([gap for r in done for gap in r.itl]),
        "e2e": latency_stats([r.e2e for r in done]),
        "goodput": {"slos": slos, "num_good": good, "requests_per_s": per_second(good)} if slos else None,
    }


def summarize_run(records: list[RequestRecord], duration: float, slos: dict[str, float]) -> dict:
    """The whole run's summary, one per task label, and every failure with its body."""
    labels = sorted({r.label for r in records})
    return {
        "summary": summarize(records, duration, slos),
        "per_task": {label: summarize([r for r in records if r.label == label], duration, slos) for label in labels},
        "failures": [{"index": r.index, "task": r.label, "status": r.status, "body": r.error}
                     for r in records if not r.ok],
    }

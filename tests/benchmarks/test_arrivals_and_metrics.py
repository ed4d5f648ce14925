"""The arrival process, the metrics math on hand-made timings, and SSE framing."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from benchmarks.serving.arrivals import arrival_times, gaps
from benchmarks.serving.client import sse_events
from benchmarks.serving.metrics import RequestRecord, latency_stats, meets_slos, percentile, summarize, summarize_run


def squared_cv(values: list[float]) -> float:
    return statistics.pvariance(values) / statistics.fmean(values) ** 2


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gaps_keep_the_mean_rate_and_burstiness_sets_the_variance(burstiness):
    import random

    sample = gaps(8.0, burstiness, random.Random(0), 20_000)
    assert statistics.fmean(sample) == pytest.approx(1 / 8.0, rel=0.05)
    # Gamma(shape=b): squared coefficient of variation 1/b (1 for Poisson, larger when burstier).
    assert squared_cv(sample) == pytest.approx(1 / burstiness, rel=0.1)


def test_arrival_times_are_seeded_ordered_and_bounded():
    times = arrival_times(10.0, 1.0, seed=5, count=200)
    assert times == arrival_times(10.0, 1.0, seed=5, count=200)
    assert times != arrival_times(10.0, 1.0, seed=6, count=200)
    assert times[0] == 0.0 and all(a <= b for a, b in zip(times, times[1:]))
    assert len(times) / times[-1] == pytest.approx(10.0, rel=0.2)
    within = arrival_times(10.0, 0.5, seed=1, duration=20.0)
    assert all(t < 20.0 for t in within) and 150 < len(within) < 250
    assert arrival_times(float("inf"), 1.0, seed=0, count=4) == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"count": 3, "duration": 1.0}, "exactly one of count and duration"),
    ({"duration": 1.0, "rate": float("inf")}, "needs a request count"),
    ({"count": 3, "rate": 0.0}, "must be > 0"),
])
def test_arrival_times_reject_impossible_schedules(kwargs, message):
    kwargs = {"rate": 1.0, "burstiness": 1.0, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        arrival_times(**kwargs)


def record(index: int, ttft: float | None, e2e: float, tokens: int, itl=(), label="a", error=None) -> RequestRecord:
    return RequestRecord(index, label, start=0.1 * index, status=200 if error is None else 404, ttft=ttft, e2e=e2e,
                         itl=list(itl), num_chunks=len(itl) + 1, output_tokens=tokens, tokens_from="usage",
                         prompt_tokens=10, error=error)


def test_percentiles_interpolate_between_order_statistics():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    stats = latency_stats([0.1, 0.2, 0.3, 0.4, 1.0])
    assert stats["count"] == 5 and stats["mean"] == pytest.approx(0.4) and stats["max"] == 1.0
    assert stats["p50"] == 0.3 and stats["p99"] == pytest.approx(0.4 + 0.6 * 0.96)
    assert latency_stats([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}


def test_tpot_is_time_after_the_first_token_per_further_token():
    assert record(0, ttft=0.5, e2e=1.5, tokens=11).tpot == pytest.approx(0.1)
    assert record(0, ttft=0.5, e2e=0.5, tokens=1).tpot is None
    assert record(0, ttft=None, e2e=0.5, tokens=0, error="x").tpot is None


def test_summary_of_hand_made_timings():
    records = [
        record(0, ttft=0.2, e2e=1.2, tokens=11, itl=[0.1, 0.3], label="a"),
        record(1, ttft=0.4, e2e=0.9, tokens=6, itl=[0.2], label="b"),
        record(2, ttft=None, e2e=0.05, tokens=0, label="b", error='{"error": {"code": "model_not_found"}}'),
    ]
    summary = summarize(records, duration=2.0, slos={"ttft": 0.3, "tpot": 0.2})
    assert (summary["num_requests"], summary["num_succeeded"], summary["num_failed"]) == (3, 2, 1)
    assert summary["output_tokens"] == 17 and summary["prompt_tokens"] == 20 and summary["output_chunks"] == 5
    assert summary["output_throughput"] == 8.5 and summary["request_throughput"] == 1.0
    assert summary["ttft"]["mean"] == pytest.approx(0.3) and summary["e2e"]["max"] == 1.2
    assert summary["tpot"]["p50"] == pytest.approx(0.1)  # 0.1 and 0.1
    assert summary["itl"]["count"] == 3 and summary["itl"]["p50"] == pytest.approx(0.2)
    assert summary["goodput"] == {"slos": {"ttft": 0.3, "tpot": 0.2}, "num_good": 1, "requests_per_s": 0.5}
    run = summarize_run(records, 2.0, {})
    assert run["summary"]["goodput"] is None
    assert run["per_task"]["b"]["num_failed"] == 1 and run["per_task"]["a"]["output_tokens"] == 11
    assert run["failures"] == [{"index": 2, "task": "b", "status": 404, "body": records[2].error}]


def test_slos_bound_each_metric_and_failures_never_count():
    fast = record(0, ttft=0.1, e2e=0.5, tokens=5)
    assert meets_slos(fast, {"ttft": 0.1, "tpot": 0.1, "e2e": 0.5})
    assert not meets_slos(fast, {"e2e": 0.4})
    assert not meets_slos(fast, {"tpot": 0.09})
    assert meets_slos(record(0, ttft=0.1, e2e=0.1, tokens=1), {"tpot": 0.001})
    assert not meets_slos(record(0, ttft=0.1, e2e=0.5, tokens=5, error="boom"), {})


def events(lines: list[str]) -> list[str]:
    async def feed():
        for line in lines:
            yield line

    async def collect():
        return [event async for event in sse_events(feed())]

    return asyncio.run(collect())


def test_sse_framing_joins_data_lines_and_skips_comments_and_other_fields():
    lines = [": keep-alive", "", "event: message", "id: 7", 'data: {"a": 1}', "", "data:{\"b\": 2}", "",
             "data: line one", "data:  line two", "", "retry: 10", "", "data: [DONE]", ""]
    assert events(lines) == ['{"a": 1}', '{"b": 2}', "line one\n line two", "[DONE]"]
    assert events(["data: tail without a blank line"]) == ["tail without a blank line"]

"""PNG plots of a benchmark: latency CDFs per run, and throughput and p99 latency against request rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_LATENCIES = (("ttft", "time to first token"), ("tpot", "time per output token"),
              ("itl", "inter-token latency"), ("e2e", "end-to-end latency"))


def _values(run, metric: str) -> list[float]:
    done = [r for r in run.records if r.ok]
    if metric == "itl":
        return [gap for r in done for gap in r.itl]
    return [v for v in (getattr(r, metric) for r in done) if v is not None]


def plot_cdfs(runs: list, path: Path) -> None:
    """One panel per latency, one empirical CDF per run (`benchmarks.serving.runner.Run`)."""
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for axis, (metric, title) in zip(axes.flat, _LATENCIES):
        for run in runs:
            values = sorted(_values(run, metric))
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                axis.step(values, fractions, where="post", label=run.name)
        axis.set_title(title)
        axis.set_xlabel("seconds")
        axis.set_ylabel("fraction of requests" if metric != "itl" else "fraction of gaps")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_rate_sweep(document: dict, path: Path) -> None:
    """Throughput and p99 latencies against the offered request rate (finite rates only)."""
    runs = sorted((r for r in document["runs"] if isinstance(r["rate"], (int, float))), key=lambda r: r["rate"])
    rates = [r["rate"] for r in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot(rates, [r["summary"]["request_throughput"] for r in runs], marker="o", label="requests/s")
    left.plot(rates, rates, linestyle=":", color="grey", label="offered")
    left.set_xlabel("request rate (requests/s)")
    left.set_ylabel("requests/s")
    tokens = left.twinx()
    tokens.plot(rates, [r["summary"]["output_throughput"] for r in runs], marker="s", color="tab:orange",
                label="output tokens/s")
    tokens.set_ylabel("output tokens/s")
    left.legend(loc="upper left", fontsize="small")
    tokens.legend(loc="lower right", fontsize="small")
    left.set_title("throughput")
    for metric, title in _LATENCIES:
        p99 = [r["summary"][metric]["p99"] for r in runs]
        right.plot(rates, [float("nan") if v is None else v for v in p99], marker="o", label=f"p99 {metric}")
    right.set_xlabel("request rate (requests/s)")
    right.set_ylabel("seconds")
    right.set_yscale("log")
    right.set_title("p99 latency")
    right.legend(fontsize="small")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

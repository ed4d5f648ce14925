"""Running the benchmark: a preflight, then for each rate (or the one concurrency) a warm-up and a run.

Every run replays the same seeded request sequence, so runs at different rates are comparable; the
arrival times of the run at the i-th rate come from seed + i.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks.serving.arrivals import arrival_times
from benchmarks.serving.client import send
from benchmarks.serving.config import ENDPOINTS, BenchConfig
from benchmarks.serving.metrics import RequestRecord, summarize_run
from benchmarks.serving.workload import Workload

logger = logging.getLogger(__name__)
WARMUP_SEED_OFFSET = 1_000_003
"""Warm-up requests come from a workload seeded apart from the measured one."""


class BenchError(Exception):
    """The benchmark cannot run (server unreachable, refused the preflight, bad workload)."""


@dataclass
class Run:
    """One measured run: at a rate or at a concurrency."""

    rate: float | None
    """Requests per second (None for a concurrency run)."""
    concurrency: int | None
    """Requests in flight (None for a rate run)."""
    records: list[RequestRecord]
    """Every measured request, in send order."""
    duration: float
    """Seconds from the first send to the last finish."""

    @property
    def name(self) -> str:
        return f"rate {self.rate:g}/s" if self.rate is not None else f"concurrency {self.concurrency}"


def _headers(config: BenchConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def preflight(config: BenchConfig) -> tuple[str, ...]:
    """Check the server answers GET /v1/models; return the module ids a Tessera server lists there."""
    url = config.api_root + "/v1/models"
    try:
        response = httpx.get(url, headers=_headers(config), timeout=30)
    except httpx.HTTPError as error:
        raise BenchError(f"cannot reach {url}: {type(error).__name__}: {error}") from None
    if response.status_code != 200:
        raise BenchError(f"GET {url} answered {response.status_code}: {response.text[:500]}")
    cards = response.json().get("data") or []
    return tuple(c["id"] for c in cards if isinstance(c.get("tessera"), dict) and c["tessera"].get("kind") == "module")


async def _at_times(send_one: Callable[[int], Awaitable[RequestRecord]], times: list[float]) -> list[RequestRecord]:
    """Start request i at times[i] seconds from now (late starts go at once), then wait for all."""
    start, pending = time.perf_counter(), []
    for index, offset in enumerate(times):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(send_one(index)))
    return list(await asyncio.gather(*pending))


async def _in_flight(send_one: Callable[[int], Awaitable[RequestRecord]], concurrency: int, count: int | None,
                     duration: float | None) -> list[RequestRecord]:
    """Keep `concurrency` requests in flight until `count` were sent or `duration` seconds passed."""
    records: list[RequestRecord] = []
    deadline = None if duration is None else time.perf_counter() + duration
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while (count is None or sent < count) and (deadline is None or time.perf_counter() < deadline):
            index, sent = sent, sent + 1
            records.append(await send_one(index))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(records, key=lambda r: r.index)


async def _warm_up(config: BenchConfig, client: httpx.AsyncClient, modules: tuple[str, ...]) -> None:
    workload = Workload(dataclasses.replace(config, seed=config.seed + WARMUP_SEED_OFFSET), modules)
    url, start = config.api_root + ENDPOINTS[config.endpoint], time.perf_counter()
    records = await asyncio.gather(*(send(client, url, workload.sample(), i, start) for i in range(config.warmup)))
    failed = [r for r in records if not r.ok]
    if failed:
        logger.warning("%d of %d warm-up requests failed; the first: %s %s", len(failed), len(records),
                       failed[0].status, failed[0].error)


async def _reset_prefix_cache(config: BenchConfig, client: httpx.AsyncClient) -> None:
    response = await client.post(config.api_root + "/reset_prefix_cache")
    if response.status_code != 200:
        raise ValueError(f"--reset-prefix-cache: {config.api_root}/reset_prefix_cache answered "
                         f"{response.status_code} {response.text[:200]} (vLLM serves it only with VLLM_SERVER_DEV_MODE=1)")


async def _measure(config: BenchConfig, client: httpx.AsyncClient, modules: tuple[str, ...],
                   rate: float | None, seed: int) -> Run:
    workload, url = Workload(config, modules), config.api_root + ENDPOINTS[config.endpoint]
    times = None if rate is None else arrival_times(rate, config.burstiness, seed, config.count, config.duration)
    total = len(times) if times is not None else config.count
    bar = tqdm(total=total, desc=f"rate {rate:g}/s" if rate else f"concurrency {config.concurrency}",
               unit="req", disable=not config.progress)
    start = time.perf_counter()

    async def send_one(index: int) -> RequestRecord:
        record = await send(client, url, workload.sample(), index, start)
        bar.update(1)
        return record

    try:
        if times is not None:
            records = await _at_times(send_one, times)
        else:
            records = await _in_flight(send_one, config.concurrency, config.count, config.duration)
    finally:
        bar.close()
    duration = max((r.start + r.e2e for r in records), default=0.0)
    return Run(rate, config.concurrency, records, duration)


async def run_all(config: BenchConfig, modules: tuple[str, ...]) -> list[Run]:
    """Every run of the config, one after another."""
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    timeout = httpx.Timeout(config.timeout, connect=min(config.timeout, 30.0))
    runs = []
    async with httpx.AsyncClient(headers=_headers(config), limits=limits, timeout=timeout) as client:
        for i, rate in enumerate(config.rate or (None,)):
            if config.warmup:
                await _warm_up(config, client, modules)
            if config.reset_prefix_cache:
                await _reset_prefix_cache(config, client)
            runs.append(await _measure(config, client, modules, rate, config.seed + i))
    return runs


def _record_json(record: RequestRecord) -> dict:
    return dataclasses.asdict(record) | {"tpot": record.tpot}


def _rate_json(rate: float | None) -> float | str | None:
    """A rate as strict JSON allows it: inf becomes the string "inf"."""
    return "inf" if rate == float("inf") else rate


def results(config: BenchConfig, runs: list[Run]) -> dict:
    """The JSON document of a benchmark: its config and, per run, summaries, failures and every request."""
    slos = config.slos
    return {
        "config": dataclasses.asdict(config) | {"rate": [_rate_json(r) for r in config.rate],
                                                "api_key": "<redacted>" if config.api_key else None},
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runs": [{"name": run.name, "rate": _rate_json(run.rate), "burstiness": config.burstiness if run.rate else None,
                  "concurrency": run.concurrency, **summarize_run(run.records, run.duration, slos),
                  "requests": [_record_json(r) for r in run.records]} for run in runs],
    }


def benchmark(config: BenchConfig) -> dict:
    """Run the benchmark; with `config.out`, write results.json and the PNG plots there. Returns the results."""
    modules = preflight(config)
    try:
        Workload(config, modules)
    except (OSError, ValueError) as error:
        raise BenchError(str(error)) from None
    runs = asyncio.run(run_all(config, modules))
    document = results(config, runs)
    if config.out:
        from benchmarks.serving.plots import plot_cdfs, plot_rate_sweep

        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(document, indent=1, allow_nan=False))
        plot_cdfs(runs, out / "latency_cdf.png")
        if sum(run.rate is not None and run.rate != float("inf") for run in runs) > 1:
            plot_rate_sweep(document, out / "rate_sweep.png")
    return document

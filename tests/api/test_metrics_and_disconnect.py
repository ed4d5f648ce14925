"""/metrics after real traffic, and clients that leave early: the engine must abort their requests."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

MESSAGES = [{"role": "user", "content": "count the letters"}]
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}


def scrape(server) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from GET /metrics."""
    response = httpx.get(server.url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def chat(server, **fields) -> httpx.Response:
    body = {"model": "reverse", "messages": MESSAGES, "max_tokens": 5, "temperature": 0} | fields
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def test_metrics_count_requests_tokens_latency_and_steps(server):
    before = scrape(server)
    responses = [chat(server), chat(server), chat(server, model="no-such-task")]
    usage = [r.json()["usage"] for r in responses[:2]]
    after = scrape(server)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("tessera_requests_total", task="reverse", status="length") == 2
    for module in server.engine.library.controller.gates_for_task("reverse").module_ids:
        assert delta("tessera_module_requests_total", module=module) == 2
        assert delta("tessera_module_generation_tokens_total", module=module) == sum(u["completion_tokens"]
                                                                                     for u in usage)
    assert delta("tessera_prompt_tokens_total", task="reverse") == sum(u["prompt_tokens"] for u in usage)
    assert delta("tessera_generation_tokens_total", task="reverse") == sum(u["completion_tokens"] for u in usage)
    assert delta("tessera_requests_rejected_total", status="404", code="model_not_found") == 1
    assert delta("tessera_time_to_first_token_seconds_count", task="reverse") == 2
    assert delta("tessera_time_per_output_token_seconds_count", task="reverse") == 2
    assert delta("tessera_e2e_request_latency_seconds_count", task="reverse") == 2
    assert delta("tessera_batch_size_count") >= 5, "one observation per engine step"
    assert delta("tessera_prefix_cache_queries_total") == sum(u["prompt_tokens"] for u in usage)
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usage]
    assert cached[1] > 0 and delta("tessera_prefix_cache_hits_total") == sum(cached)
    assert after[("tessera_kv_blocks_cached", ())] > 0
    assert after[("tessera_kv_blocks_total", ())] == server.engine.stats().kv_blocks_total > 0
    for gauge in ("tessera_requests_running", "tessera_requests_waiting", "tessera_kv_blocks_used"):
        assert after[(gauge, ())] == 0


def test_vllm_metric_names_report_the_same_traffic(server):
    name = {"model_name": server.backbone}
    before = scrape(server)
    responses = [chat(server), chat(server)]
    usage = [r.json()["usage"] for r in responses]
    after = scrape(server)

    def delta(sample: str, **labels) -> float:
        key = (sample, tuple(sorted((name | labels).items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("vllm:request_success_total", finished_reason="length") == 2
    assert delta("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta("vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert delta("vllm:time_to_first_token_seconds_count") == delta("vllm:e2e_request_latency_seconds_count") == 2
    assert delta("vllm:prefix_cache_hits_total") == sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert after[(gauge, tuple(name.items()))] == 0


def test_vllm_lora_requests_info_names_the_modules_of_running_and_waiting_requests(server):
    from prometheus_client import generate_latest

    from server.engine.request import StepStats
    from server.metrics import Metrics

    def series(metrics: Metrics) -> list[dict]:
        text = generate_latest(metrics.registry).decode()
        return [s.labels for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "vllm:lora_requests_info"]

    metrics = Metrics("llama", max_modules=4)
    step = dict(num_seqs=2, num_tokens=2, num_running=2, num_waiting=1, kv_blocks_used=3, kv_blocks_total=10,
                num_preempted=0, step_seconds=0.01)
    metrics.observe_step(StepStats(**step, running_modules=("m1", "m0"), waiting_modules=("m2",)))
    assert series(metrics) == [{"max_lora": "4", "waiting_lora_adapters": "m2", "running_lora_adapters": "m0,m1"}]
    metrics.observe_step(StepStats(**step, running_modules=("m2",)))
    assert series(metrics) == [{"max_lora": "4", "waiting_lora_adapters": "", "running_lora_adapters": "m2"}]

    response = chat(server, model=server.backbone, modules={"m1": 1.0})  # the real server, once idle again
    assert response.status_code == 200
    (labels,) = [dict(labels) for (name, labels), _ in scrape(server).items() if name == "vllm:lora_requests_info"]
    assert labels == {"max_lora": str(server.engine.num_module_slots), "waiting_lora_adapters": "",
                      "running_lora_adapters": ""}


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def assert_engine_idle_after_abort(server, aborted_before: float) -> None:
    """The API saw the abort, and the engine freed the request's blocks at once, with no later step."""
    key = ("tessera_requests_total", (("status", "abort"), ("task", "reverse")))
    wait_for(lambda: scrape(server).get(key, 0.0) == aborted_before + 1)

    def idle() -> bool:
        stats = server.engine.stats()
        return (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)

    wait_for(idle)
    assert scrape(server)[("tessera_requests_running", ())] == 0
    assert chat(server, max_tokens=2).status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(server, stream):
    aborted_before = scrape(server).get(("tessera_requests_total", (("status", "abort"), ("task", "reverse"))), 0.0)
    body = {"model": "reverse", "messages": MESSAGES, "stream": stream} | LONG
    if stream:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if '"content"' in line and '"role"' not in line)
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.15))
    assert_engine_idle_after_abort(server, aborted_before)


@pytest.mark.parametrize("stream", [True, False])
def test_a_responses_client_that_leaves_aborts_the_request(server, stream):
    aborted_before = scrape(server).get(("tessera_requests_total", (("status", "abort"), ("task", "reverse"))), 0.0)
    body = {"model": "reverse", "input": MESSAGES, "stream": stream, "max_output_tokens": 200, "temperature": 0,
            "ignore_eos": True}
    if stream:
        with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=60) as response:
            assert next(line for line in response.iter_lines() if "response.output_text.delta" in line)
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/responses", json=body, timeout=httpx.Timeout(60, read=0.15))
    assert_engine_idle_after_abort(server, aborted_before)

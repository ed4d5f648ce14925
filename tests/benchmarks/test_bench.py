"""`tessera bench` against a real Tessera server (uvicorn, tiny Llama, random library): the numbers add up."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from benchmarks.serving.config import BenchConfig
from benchmarks.serving.runner import benchmark
from server.cli import main
from tests.api.conftest import TASKS, make_engine, serve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LATENCIES = ("ttft", "tpot", "itl", "e2e")


def generation_tokens(url: str) -> dict[str, float]:
    """The server's own `tessera_generation_tokens` counter per task label, from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    pattern = re.compile(r'^tessera_generation_tokens_total\{task="([^"]+)"\} (\S+)$', re.M)
    return {task: float(value) for task, value in pattern.findall(text)}


def check_run_adds_up(run: dict) -> None:
    summary, requests = run["summary"], run["requests"]
    done = [r for r in requests if r["error"] is None]
    assert summary["num_requests"] == len(requests) == summary["num_succeeded"] + summary["num_failed"]
    assert summary["num_failed"] == len(run["failures"])
    assert summary["output_tokens"] == sum(r["output_tokens"] for r in done)
    assert summary["output_chunks"] == sum(r["num_chunks"] for r in done) <= summary["output_tokens"]
    assert summary["cached_prompt_tokens"] == sum(r["cached_tokens"] for r in done) <= summary["prompt_tokens"]
    assert summary["output_tokens"] == sum(t["output_tokens"] for t in run["per_task"].values())
    assert summary["output_throughput"] == pytest.approx(summary["output_tokens"] / summary["duration_s"])
    assert summary["request_throughput"] == pytest.approx(len(done) / summary["duration_s"])
    assert summary["duration_s"] >= max(r["start"] + r["e2e"] for r in requests) - 1e-9
    for record in done:
        assert 0 < record["ttft"] <= record["e2e"]
        assert record["tokens_from"] == "usage" and record["prompt_tokens"] > 0
        assert 1 <= record["num_chunks"] <= record["output_tokens"]
        assert len(record["itl"]) == record["num_chunks"] - 1
        if record["output_tokens"] > 1:
            expected = (record["e2e"] - record["ttft"]) / (record["output_tokens"] - 1)
            assert record["tpot"] == pytest.approx(expected)
    for metric in LATENCIES:
        stats = summary[metric]
        assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert summary["itl"]["count"] == sum(len(r["itl"]) for r in done)


def test_chat_at_two_rates_adds_up_and_matches_the_server(server, tmp_path):
    config = BenchConfig(base_url=server.url + "/v1", model=server.backbone, rate=(40.0, 80.0), num_requests=6,
                         input_len="uniform:3,10", output_len="uniform:2,6", ignore_eos=True, tasks=TASKS,
                         task_dist="zipf:1.1", slo=("ttft=30", "tpot=0.000001"), out=str(tmp_path), progress=False)
    before = generation_tokens(server.url)
    document = benchmark(config)
    after = generation_tokens(server.url)

    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(document))
    for name in ("latency_cdf.png", "rate_sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert [run["rate"] for run in document["runs"]] == [40.0, 80.0]
    served = {task: after[task] - before.get(task, 0.0) for task in after}
    by_task = {task: 0 for task in TASKS}
    for run in document["runs"]:
        check_run_adds_up(run)
        assert run["summary"]["num_requests"] == 6 and run["failures"] == []
        assert set(run["per_task"]) <= set(TASKS)
        for task, summary in run["per_task"].items():
            by_task[task] += summary["output_tokens"]
        goodput = run["summary"]["goodput"]
        assert goodput["num_good"] == sum(r["tpot"] is None for r in run["requests"])
    assert {t: n for t, n in by_task.items() if n} == {t: n for t, n in served.items() if n}


def test_completions_by_concurrency_record_unknown_tasks_as_404(server):
    config = BenchConfig(base_url=server.url, model=server.backbone, endpoint="completions", concurrency=2,
                         num_requests=8, warmup=2, input_len="4", output_len="3", ignore_eos=True,
                         tasks=("reverse", "no-such-task"), tag_via="header", seed=3, progress=False)
    run = benchmark(config)["runs"][0]
    check_run_adds_up(run)
    requests = run["requests"]
    unknown = [r for r in requests if r["label"] == "no-such-task"]
    assert len(requests) == 8 and 0 < len(unknown) < 8
    assert [f["index"] for f in run["failures"]] == [r["index"] for r in unknown]
    for failure in run["failures"]:
        assert failure["status"] == 404
        error = json.loads(failure["body"])["error"]
        assert error["code"] == "model_not_found" and "no-such-task" in error["message"]
    assert run["per_task"]["reverse"]["num_failed"] == 0
    assert run["per_task"]["no-such-task"]["num_succeeded"] == 0
    assert all(r["output_tokens"] == 3 for r in requests if r["label"] == "reverse")


def test_the_responses_api_is_benchmarked_from_its_typed_events(server):
    config = BenchConfig(base_url=server.url, model=server.backbone, endpoint="responses", concurrency=2,
                         num_requests=6, input_len="4", output_len="3", ignore_eos=True, tasks=("reverse", "uppercase"),
                         seed=5, progress=False)
    before = generation_tokens(server.url)
    run = benchmark(config)["runs"][0]
    after = generation_tokens(server.url)
    check_run_adds_up(run)
    assert run["failures"] == [] and all(r["output_tokens"] == 3 for r in run["requests"])
    served = sum(after.get(t, 0.0) - before.get(t, 0.0) for t in ("reverse", "uppercase"))
    assert served == run["summary"]["output_tokens"] == 18


def test_cli_runs_module_compositions_sent_in_the_body(server, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--base-url", server.url, "--model", server.backbone, "--concurrency", "3",
              "--num-requests", "4", "--modules-k", "2", "--input-len", "5", "--output-len", "2",
              "--no-progress", "--out", str(tmp_path)])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "== concurrency 3: 4/4 succeeded" in printed
    document = json.loads((tmp_path / "results.json").read_text())
    run = document["runs"][0]
    summary = run["summary"]
    assert f"; {summary['output_tokens'] / summary['output_chunks']:.2f} per chunk)" in printed
    check_run_adds_up(run)
    assert set(run["per_task"]) == {"explicit"}
    assert document["config"]["modules_k"] == 2
    assert (tmp_path / "latency_cdf.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "rate_sweep.png").exists()


def test_a_shared_prefix_is_reported_as_the_servers_cache_hits(server, capsys):
    def hits() -> float:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        return float(re.search(r"^tessera_prefix_cache_hits_total (\S+)$", text, re.M).group(1))

    before = hits()
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--base-url", server.url, "--model", server.backbone, "--concurrency", "1",
              "--num-requests", "4", "--prefix-len", "40", "--input-len", "4", "--output-len", "2",
              "--seed", "3", "--no-progress"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    cached = int(re.search(r"prompt tokens: \d+, (\d+) \(", out).group(1))
    assert cached >= 3 * 32 and cached == hits() - before  # requests 2-4 reuse the prefix's full blocks


def test_dataset_predictions_are_sent_and_their_usage_reported(server, tmp_path, capsys):
    def spec(name: str) -> float:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        return float(re.search(rf"^tessera_spec_{name}_tokens_total (\S+)$", text, re.M).group(1))

    dataset = tmp_path / "edits.jsonl"
    dataset.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"fix: {text}"}],
                                           "prediction": text}) + "\n"
                               for text in ("the quick brown fox", "print(x)", "a b c d e f")))
    before = spec("draft"), spec("accepted")
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--base-url", server.url, "--model", server.backbone, "--concurrency", "1",
              "--num-requests", "3", "--dataset", str(dataset), "--output-len", "8", "--ignore-eos", "--no-progress"])
    assert exit_.value.code == 0
    drafted, accepted = spec("draft") - before[0], spec("accepted") - before[1]
    reported = re.search(r"prediction tokens: (\d+) accepted, (\d+) rejected", capsys.readouterr().out)
    assert drafted > 0 and (int(reported.group(1)), int(reported.group(2))) == (accepted, drafted - accepted)


def test_reset_prefix_cache_starts_every_run_cold(server, capsys):
    def cached(*extra: str) -> int:
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "--base-url", server.url, "--model", server.backbone, "--concurrency", "1",
                  "--num-requests", "3", "--prefix-len", "40", "--input-len", "4", "--output-len", "2",
                  "--seed", "5", "--no-progress", *extra])
        assert exit_.value.code == 0
        return int(re.search(r"prompt tokens: \d+, (\d+) \(", capsys.readouterr().out).group(1))

    cold = cached("--reset-prefix-cache")
    assert cached("--reset-prefix-cache") == cold  # the first request computes the prefix again
    assert cached() > cold  # without the reset the first request finds it too


@pytest.mark.parametrize(("flags", "message"), [
    (["--rate", "1", "--concurrency", "2"], "give either --rate R [R ...] or --concurrency C"),
    (["--rate", "1", "--slo", "ttft=fast"], "--slo 'ttft=fast'"),
    (["--rate", "1", "--task-dist", "zipf:0"], "--task-dist 'zipf:0'"),
    (["--rate", "1", "--output-len", "uniform:5,2"], "--output-len 'uniform:5,2'"),
    (["--rate", "inf", "--duration", "5"], "use --num-requests with it"),
])
def test_cli_rejects_bad_flags_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--base-url", "http://127.0.0.1:9", "--model", "m", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera bench: error: ") and message in err and "Traceback" not in err


def test_cli_names_an_unreachable_server(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--base-url", "http://127.0.0.1:9", "--model", "m", "--rate", "1"])
    assert exit_.value.code == 2
    assert "cannot reach http://127.0.0.1:9/v1/models" in capsys.readouterr().err


def test_cli_names_a_bad_dataset_line(server, tmp_path, capsys):
    dataset = tmp_path / "data.jsonl"
    dataset.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "no"}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--base-url", server.url, "--model", server.backbone, "--rate", "1",
              "--dataset", str(dataset)])
    assert exit_.value.code == 2
    assert f"{dataset}:2: expected a `conversations` (ShareGPT) or `messages` (OpenAI) list" in capsys.readouterr().err


def test_api_key_is_sent_and_kept_out_of_the_results(tiny_llama, library_dir, tmp_path, capsys):
    with serve(make_engine(tiny_llama, library_dir), api_key="sekret") as served:
        flags = ["bench", "--base-url", served.url, "--model", served.backbone, "--rate", "inf",
                 "--num-requests", "2", "--input-len", "5", "--output-len", "2", "--no-progress"]
        with pytest.raises(SystemExit) as exit_:
            main([*flags, "--api-key", "wrong"])
        assert exit_.value.code == 2
        assert f"GET {served.url}/v1/models answered 401" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_:
            main([*flags, "--api-key", "sekret", "--out", str(tmp_path)])
        assert exit_.value.code == 0
    text = (tmp_path / "results.json").read_text()
    document = json.loads(text)
    assert "sekret" not in text and document["config"]["api_key"] == "<redacted>"
    assert document["config"]["rate"] == ["inf"] and document["runs"][0]["summary"]["num_succeeded"] == 2

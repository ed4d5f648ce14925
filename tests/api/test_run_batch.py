"""`tessera run-batch`: OpenAI batch files served offline through the real API, line for line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.batch import read_lines, run_batch
from tests.api.conftest import make_engine, serve
from tests.api.test_cli import run_cli

USER = [{"role": "user", "content": "reverse: abc"}]
CHAT = {"messages": USER, "max_tokens": 5, "temperature": 0, "ignore_eos": True}


def _write(path: Path, items: list) -> Path:
    path.write_text("\n".join(item if isinstance(item, str) else json.dumps(item) for item in items) + "\n")
    return path


def test_a_batch_is_served_line_for_line_as_the_api_serves_it(tiny_llama, library_dir, tmp_path):
    good = [
        {"custom_id": "tagged", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "reverse", **CHAT}},
        {"custom_id": "mixed", "url": "/v1/chat/completions",
         "body": {"model": Path(tiny_llama).name, "modules": {"m0": 0.5, "m1": -0.5}, **CHAT}},
        {"custom_id": "text", "method": "POST", "url": "/v1/completions",
         "body": {"model": "uppercase", "prompt": "the quick", "max_tokens": 4, "temperature": 0}},
        {"custom_id": "resp", "method": "POST", "url": "/v1/responses",
         "body": {"model": "reverse", "input": "abc", "max_output_tokens": 3, "temperature": 0}},
    ]
    bad = [
        "{not json",
        {"custom_id": "tagged", "url": "/v1/completions", "body": {}},  # reused id
        {"custom_id": "s", "url": "/v1/chat/completions", "body": {"model": "reverse", "stream": True, **CHAT}},
        {"custom_id": "e", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "unknown", "url": "/v1/chat/completions", "body": {"model": "no-such-task", **CHAT}},
    ]
    source = _write(tmp_path / "in.jsonl", [*good[:2], bad[0], *good[2:], *bad[1:]])
    counts = run_batch(make_engine(tiny_llama, library_dir), source, tmp_path / "out" / "out.jsonl",
                       max_concurrency=3)
    assert counts == {"lines": 9, "served": 4, "api_errors": 1, "invalid_lines": 4}
    records = [json.loads(line) for line in (tmp_path / "out" / "out.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in records] == ["tagged", "mixed", None, "text", "resp", "tagged", "s", "e",
                                                  "unknown"]  # the input's order
    by_id = {r["custom_id"]: r for r in records[:5] if r["custom_id"]}
    with serve(make_engine(tiny_llama, library_dir)) as served:  # the same requests sent online
        import httpx

        for item in good:
            online = httpx.post(served.url + item["url"], json=item["body"], timeout=60).json()
            response = by_id[item["custom_id"]]["response"]
            assert response["status_code"] == 200 and by_id[item["custom_id"]]["error"] is None
            if item["url"] == "/v1/responses":
                assert response["body"]["output"][0]["content"][0]["text"] == online["output"][0]["content"][0]["text"]
            elif item["url"] == "/v1/completions":
                assert response["body"]["choices"][0]["text"] == online["choices"][0]["text"]
            else:
                assert response["body"]["choices"][0]["message"] == online["choices"][0]["message"]
                assert response["body"]["tessera"] == online["tessera"]
            assert response["request_id"] and response["body"]["id"].endswith(response["request_id"])
    assert records[2]["response"] is None and "line 3 is not JSON" in records[2]["error"]["message"]
    assert "used by an earlier line" in records[5]["error"]["message"]
    assert "does not stream" in records[6]["error"]["message"] and "url must be one of" in records[7]["error"]["message"]
    unknown = records[8]["response"]
    assert unknown["status_code"] == 404 and unknown["body"]["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("where", [(), ("--engine-process",)], ids=["thread", "process"])
def test_the_cli_runs_a_batch_and_refuses_a_missing_input(tiny_llama, tmp_path, where):
    source = _write(tmp_path / "in.jsonl", [{"custom_id": "a", "url": "/v1/completions",
                                             "body": {"model": Path(tiny_llama).name, "prompt": "x", "max_tokens": 2}}])
    result = run_cli("run-batch", "--model", tiny_llama, "-i", str(source), "-o", str(tmp_path / "out.jsonl"),
                     "--num-kv-blocks", "16", *where)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"lines": 1, "served": 1, "api_errors": 0,
                                                                 "invalid_lines": 0}
    (record,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert record["response"]["status_code"] == 200 and record["response"]["body"]["usage"]["completion_tokens"] == 2
    missing = run_cli("run-batch", "--model", tiny_llama, "-i", str(tmp_path / "none.jsonl"), "-o", "x.jsonl")
    assert missing.returncode == 2 and "--input-file" in missing.stderr and "Traceback" not in missing.stderr


def test_blank_lines_are_skipped_and_numbers_are_the_files(tmp_path):
    lines = read_lines(_write(tmp_path / "in.jsonl", ["", "[1]", "", '{"custom_id": "x", "url": "/v1/completions"}']))
    assert [(line.number, line.error) for line in lines] == [
        (2, "line 2 is not a JSON object"), (4, "line 4: body must be a JSON object")]

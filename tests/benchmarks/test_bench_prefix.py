"""bench_prefix on the CPU: the two engines do exactly the work prefix caching says, and the JSON is written."""

from __future__ import annotations

import json

from benchmarks.serving.bench_prefix import main


def test_cached_prefix_blocks_are_not_computed_again(tmp_path, capsys):
    out = tmp_path / "prefix.json"
    document = main(["--device", "cpu", "--config", "tiny", "--requests", "6", "--prefix-len", "40",
                     "--unique-len", "5", "--new-tokens", "3", "--modules", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == document and "time without / with prefix caching" in capsys.readouterr().out
    off, on = document["rows"]
    assert (off["prefix_caching"], on["prefix_caching"]) == (False, True)
    prompt, decodes = 6 * 45, 6 * (3 - 1)  # the first token of each request comes from its prefill step
    assert off["prompt_tokens"] == on["prompt_tokens"] == prompt
    assert off["prompt_tokens_cached"] == 0 and off["tokens_computed"] == prompt + decodes
    assert on["prompt_tokens_cached"] == 6 * 32  # the prefix's two full 16-token blocks, under either module
    assert on["tokens_computed"] == prompt - 6 * 32 + decodes
    assert document["requests_with_other_tokens"] == 0 and document["speedup"] > 0


def test_a_cold_burst_computes_each_modules_prefix_once(tmp_path):
    document = main(["--device", "cpu", "--config", "tiny", "--requests", "6", "--prefix-len", "40",
                     "--unique-len", "5", "--new-tokens", "3", "--modules", "2", "--cold", "--out",
                     str(tmp_path / "cold.json")])
    off, on = document["rows"]
    prompt, decodes = 6 * 45, 6 * 2
    assert off["tokens_computed"] == prompt + decodes
    # all six are admitted in the first step: the first request of each module computes the prefix, and the
    # other two of its module take its two full blocks in that same step
    assert on["prompt_tokens_cached"] == 4 * 32 and on["tokens_computed"] == prompt - 4 * 32 + decodes
    assert document["requests_with_other_tokens"] == 0 and document["settings"]["cold"] is True

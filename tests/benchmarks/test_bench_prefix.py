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

"""bench_module_slots on the CPU: letting requests pass one that waits for module slots takes fewer steps,
generates the same greedy tokens, and the JSON is written."""

from __future__ import annotations

import json

from benchmarks.serving.bench_module_slots import main


def test_passing_a_request_that_waits_for_slots_takes_fewer_steps(tmp_path, capsys):
    out = tmp_path / "slots.json"
    document = main(["--device", "cpu", "--config", "tiny", "--requests", "20", "--modules", "6", "--slots", "2",
                     "--prompt-len", "8", "--long-tokens", "24", "--new-tokens", "4", "--max-num-seqs", "8",
                     "--out", str(out)])
    assert json.loads(out.read_text()) == document and "steps strict / passing" in capsys.readouterr().out
    strict, passing = document["rows"]
    assert (strict["module_wait_steps"], passing["module_wait_steps"]) == (0, 32)
    assert strict["generated_tokens"] == passing["generated_tokens"] == 2 * 24 + 18 * 4
    assert passing["steps"] < strict["steps"] and passing["mean_batch"] > strict["mean_batch"]
    assert document["requests_with_other_tokens"] == 0

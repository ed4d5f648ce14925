"""step_overhead on the CPU: one decode-step row per batch size, phases that nest as they must, the JSON
written, and the engine's own methods back in place after the timed run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.serving.step_overhead import COLUMNS, PhaseTimer, _engine, _parse, main, measure
from server.engine.request import Request, SamplingParams


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("step-overhead") / "overhead.json"
    threads = torch.get_num_threads()
    try:
        document = main(["--quick", "--out", str(out), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return document, out


def test_quick_run_reports_every_phase_of_every_decode_step(quick):
    document, out = quick
    assert json.loads(out.read_text()) == document
    settings = document["settings"]
    assert [row["batch_size"] for row in document["rows"]] == list(settings["batch_sizes"]) == [4, 8]
    for row in document["rows"]:
        assert row["decode_steps"] == settings["new_tokens"] - 1  # the first token comes from the prefill step
        assert all(math.isfinite(row[c]) and row[c] >= 0 for c in COLUMNS)
        assert row["segments"] <= row["fill"] and row["host"] <= row["step"] and row["launch"] < row["step"]
        assert row["segments"] > 0 and row["emit"] > 0 and row["schedule"] > 0


def test_timers_count_every_call_and_leave_the_engine_as_it_was():
    settings = _parse(["--quick", "--variant", "a", "--batch-sizes", "3", "--new-tokens", "4", "--out", "unused"])
    engine, vocab_size = _engine(settings)
    row = measure(engine, vocab_size, settings, 3)
    assert row["segments"] == 0.0 and row["decode_steps"] == 3
    assert not {"step", "_emit"} & set(vars(engine))
    assert not {"schedule", "update"} & set(vars(engine.scheduler))
    assert not {"_fill", "launch"} & set(vars(engine.runner))
    assert row["steps"] >= row["decode_steps"] + 1
    timer = PhaseTimer(engine)
    engine.generate_batch([Request("one", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))])
    timer.remove()
    assert [s["num_tokens"] for s in timer.steps] == [3, 1, 1]
    assert all(s["emit"] > 0 and s["fill"] > 0 and s["schedule"] > 0 and s["read"] > 0 for s in timer.steps)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        _parse(["--new-tokens", "1"])
    with pytest.raises(SystemExit):
        _parse(["--batch-sizes", "0"])

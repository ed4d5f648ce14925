"""benchmarks/training/step_memory.py on the CPU: every option runs a real training step in its own process and
the table's ratios are read against plain's row."""

from __future__ import annotations

import json

from benchmarks.training.step_memory import OPTIONS, main


def test_every_option_trains_and_reports_its_peak_and_time(tmp_path, capsys):
    out = tmp_path / "step_memory.json"
    assert main(["--hidden", "64", "--layers", "2", "--tokens", "16", "--batch", "4", "--steps", "1",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["option"] for row in rows] == list(OPTIONS)
    plain = rows[0]
    assert plain["peak_ratio"] == 1.0 and plain["time_ratio"] == 1.0 and plain["batch_tokens"] > 4 * 16
    for row in rows:
        assert row["peak_mib"] > 0 and row["step_s"] > 0
        assert row["peak_ratio"] == row["peak_mib"] / plain["peak_mib"]
        assert row["batch_tokens"] == plain["batch_tokens"]  # the same batch for every option
    printed = capsys.readouterr().out
    assert "option" in printed and all(option in printed for option in OPTIONS)

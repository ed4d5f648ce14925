"""benchmarks/serving/emit_scaling.py runs on the CPU and times every length it is given (speed is the benchmark's
to report, not the test's)."""

from benchmarks.serving import emit_scaling


def test_it_times_each_length(capsys):
    result = emit_scaling.main(["--lengths", "60", "1500", "--timed", "40"])
    assert list(result) == [60, 1500] and all(value > 0 for value in result.values())
    assert "output of   1500 tokens" in capsys.readouterr().out

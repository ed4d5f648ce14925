"""benchmarks/serving/bench_online.py end to end on the CPU: a tiny random model behind the real HTTP app,
three load runs through `tessera bench`'s generator (in a process of its own), and numbers that add up."""

import json

import pytest

from benchmarks.serving import bench_online


@pytest.mark.slow
@pytest.mark.parametrize("where", [(), ("--engine-process",)], ids=["thread", "process"])
def test_three_runs_through_the_http_stack_and_the_ratio(tmp_path, where):
    out = tmp_path / "online.json"
    document = bench_online.main(["--config", "tiny", "--quick", "--device", "cpu", "--out", str(out), *where])
    assert json.loads(out.read_text()) == json.loads(json.dumps(document))
    runs = document["runs"]
    for name in ("capacity", "none", "modules"):
        assert runs[name]["num_succeeded"] == 12 and runs[name]["num_failed"] == 0
        assert runs[name]["output_tokens"] == 12 * 6  # ignore_eos: every request runs to its length
        # the server's threads did the serving (the client ran in a process of its own, so it is not counted)
        assert runs[name]["engine_us_per_token"] > 0 and runs[name]["http_us_per_token"] >= 0
        assert (runs[name]["pipe_us_per_token"] is not None) == bool(where)  # the reader of the engine's pipe
    assert runs["capacity"]["concurrency"] == 4 and runs["capacity"]["rate"] is None
    rate = runs["none"]["rate"]
    assert rate == pytest.approx(0.8 * runs["capacity"]["request_throughput"]) and runs["modules"]["rate"] == rate
    assert runs["none"]["labels"] == ["none"] and runs["modules"]["labels"] == ["explicit"]
    assert document["p99_tpot_ratio"] == pytest.approx(runs["modules"]["tpot"]["p99"] / runs["none"]["tpot"]["p99"])
    assert document["target"] == 1.15 and document["git"]["commit"]


@pytest.mark.parametrize("argv,message", [
    (["--load", "0"], "--load"), (["--num-requests", "0"], "--num-requests"), (["--output-len", "-3"], "--output-len"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_online._parse(["--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

"""bench_spec on the CPU: every setting reproduces the plain tokens, and the steps add up to what was drafted and
kept."""

from __future__ import annotations

import json

from benchmarks.serving.bench_spec import SYSTEMS, _edited, main


def test_every_setting_gives_the_plain_tokens_and_the_steps_add_up(tmp_path, capsys):
    out = tmp_path / "spec.json"
    document = main(["--device", "cpu", "--config", "tiny", "--batch-sizes", "1", "3", "--prompt-len", "12",
                     "--new-tokens", "20", "--modules", "2", "--edit-every", "8", "--prediction-tokens", "8",
                     "--cuda-graphs", "padded", "--out", str(out)])
    assert json.loads(out.read_text()) == document and "time/plain" in capsys.readouterr().out
    rows = {(row["batch"], row["system"]): row for row in document["rows"]}
    assert sorted(rows) == sorted((batch, system) for batch in (1, 3) for system in SYSTEMS)
    assert all(row["requests_with_other_tokens"] == 0 for row in rows.values())
    for batch in (1, 3):
        plain, exact, edited = rows[batch, "plain"], rows[batch, "prediction"], rows[batch, "edited"]
        assert plain["steps"] == 20 and plain["draft_tokens"] == 0
        assert exact["generated_tokens"] == edited["generated_tokens"] == plain["generated_tokens"] == 20 * batch
        assert exact["accepted_tokens"] == exact["draft_tokens"] > 0  # a prediction that holds is kept whole
        assert exact["steps"] == 3  # 8 drafts and the token after them a step: 9 + 9 + 2
        assert 0 < edited["accepted_tokens"] < edited["draft_tokens"] and exact["steps"] < edited["steps"] < 20
        wrong = rows[batch, "wrong"]  # its start, then wherever a token of the output recurs in it: never right
        assert wrong["accepted_tokens"] == 0 and wrong["draft_tokens"] >= 8 * batch and wrong["steps"] == 20
        # every step after the prompts' replays a (padded) graph: a decode graph, or a verify graph when it drafts
        assert plain["graph_steps"] == 19 and plain["verify_graph_steps"] == 0
        assert exact["graph_steps"] == exact["verify_graph_steps"] == 2


def test_an_edited_prediction_replaces_two_tokens_and_inserts_one_every_so_often():
    tokens = list(range(1, 17))
    edited = _edited(tokens, 8, 100)
    assert edited[:4] == [1, 2, 3, 4] and edited[4:7] == [6, 7, 6] and edited[7:9] == [7, 8]
    assert len(edited) == 18


def test_the_copy_workload_runs_a_suite_backbone_from_the_cache(tmp_path, monkeypatch):
    """The tiny suite backbone (pretrained in seconds into a fresh cache) stands in for "small": it has not learned
    to copy, so only the plumbing is checked: the same tokens everywhere, and a prediction of the reply kept whole."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    document = main(["--workload", "copy", "--suite-backbone", "tiny", "--device", "cpu", "--batch-sizes", "2",
                     "--out", str(tmp_path / "copy.json")])
    assert list((tmp_path / "cache" / "tessera").glob("suite-backbone-*"))
    rows = {row["system"]: row for row in document["rows"]}
    assert all(row["requests_with_other_tokens"] == 0 for row in rows.values())
    assert rows["prediction"]["accepted_tokens"] == rows["prediction"]["draft_tokens"] > 0
    assert rows["prediction"]["steps"] < rows["plain"]["steps"]


def test_the_form_workload_drafts_what_its_grammar_forces(tmp_path, monkeypatch):
    """With asynchronous scheduling, as on a GPU: the plain setting's grammar masks wait for the step before (its
    sampling is deferred, every decode step); with forced-token drafts, steps overlap while the grammar forces
    nothing, and are read back first otherwise."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    document = main(["--workload", "form", "--suite-backbone", "tiny", "--device", "cpu", "--batch-sizes", "2",
                     "--async-scheduling", "on", "--out", str(tmp_path / "form.json")])
    rows = {row["system"]: row for row in document["rows"]}
    assert sorted(rows) == ["forced", "ngram", "plain", "prediction"]
    assert all(row["requests_with_other_tokens"] == 0 for row in rows.values())
    assert rows["plain"]["draft_tokens"] == 0
    assert rows["forced"]["accepted_tokens"] >= 2 * 20 and rows["forced"]["steps"] < rows["plain"]["steps"]
    assert rows["plain"]["deferred_samples"] >= rows["plain"]["steps"] - 2  # (all but the prompts' steps)
    assert 0 < rows["forced"]["deferred_samples"] < rows["forced"]["steps"] - 2
    assert rows["plain"]["token_waits"] == 0 < rows["forced"]["token_waits"] < rows["forced"]["steps"]

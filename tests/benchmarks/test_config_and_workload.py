"""BenchConfig's checks and specs, and the workload: datasets, lengths, tags."""

from __future__ import annotations

import collections
import json
import random

import pytest

from benchmarks.serving.config import BenchConfig, LengthDist, parse_slos, popularity
from benchmarks.serving.workload import TASK_HEADER, Workload, load_dataset

URL = "http://127.0.0.1:8000"


def config(**overrides) -> BenchConfig:
    return BenchConfig(**({"base_url": URL, "model": "backbone", "rate": (1.0,)} | overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"base_url": "localhost:8000"}, "--base-url 'localhost:8000'"),
    ({"endpoint": "embeddings"}, "--endpoint 'embeddings'"),
    ({"rate": ()}, "give either --rate"),
    ({"rate": (1.0, -2.0)}, "rates must be > 0"),
    ({"num_requests": 3, "duration": 2.0}, "either --num-requests or --duration"),
    ({"burstiness": 0.0}, "--burstiness 0.0"),
    ({"input_len": "normal:10"}, "--input-len 'normal:10'"),
    ({"output_len": "0"}, "--output-len '0'"),
    ({"prefix_len": -1}, "--prefix-len -1"),
    ({"tasks": ("a", "a")}, "must be distinct"),
    ({"tasks": ("a",), "modules_k": 1}, "either --tasks or --modules-k"),
    ({"modules": ("m0",)}, "--modules needs --modules-k"),
    ({"modules": ("m0",), "modules_k": 2}, "only 1 --modules"),
    ({"tag_via": "query"}, "--tag-via 'query'"),
    ({"slo": ("ttft=1", "ttft=2")}, "--slo ttft given twice"),
    ({"slo": ("itl=1",)}, "--slo 'itl=1'"),
])
def test_config_names_the_bad_flag(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        config(**overrides)


def test_config_defaults_and_derived_values():
    plain = config(base_url=URL + "/v1/")
    assert plain.api_root == URL and plain.count == 100
    assert config(duration=5.0).count is None and config(num_requests=7).count == 7
    assert parse_slos(("ttft=0.5", "tpot=0.05")) == {"ttft": 0.5, "tpot": 0.05}


def test_length_distributions_sample_within_their_spec():
    rng = random.Random(0)
    assert {LengthDist.parse("12", "x").sample(rng) for _ in range(20)} == {12}
    uniform = [LengthDist.parse("uniform:3,6", "x").sample(rng) for _ in range(400)]
    assert set(uniform) == {3, 4, 5, 6}
    normal = [LengthDist.parse("normal:50,5", "x").sample(rng) for _ in range(2000)]
    assert sum(normal) / len(normal) == pytest.approx(50, rel=0.03) and min(normal) >= 1


def test_zipf_popularity_falls_as_a_power_of_rank():
    weights = popularity("zipf:1.0", 4)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(2.0) and weights[0] / weights[3] == pytest.approx(4.0)
    assert popularity("uniform", 4) == [0.25] * 4


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_datasets_in_both_formats_keep_the_prompt_before_the_first_answer(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}, {"from": "human", "value": "more"}]},
        {"task": "reverse", "messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "cba"}]},
    ])
    first, second = load_dataset(path)
    assert first.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    assert first.task is None
    assert second.messages == ({"role": "user", "content": "abc"},) and second.task == "reverse"


@pytest.mark.parametrize(("line", "message"), [
    ("not json", ":1: not JSON"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', ":1: the conversation must open with a user turn"),
    ('{"conversations": [{"from": "robot", "value": "x"}]}', ":1: a ShareGPT turn needs"),
    ('{"messages": [{"role": "user", "content": "x"}], "task": 3}', ":1: `task` must be a non-empty string"),
])
def test_dataset_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


def test_tags_go_by_the_chosen_route_and_follow_the_popularity():
    by_model = Workload(config(tasks=("a", "b", "c"), task_dist="zipf:2", seed=1))
    requests = [by_model.sample() for _ in range(600)]
    counts = collections.Counter(r.label for r in requests)
    assert counts["a"] > 2 * counts["b"] > 0 and counts["b"] > counts["c"] > 0
    assert all(r.body["model"] == r.label and not r.headers for r in requests)
    header = Workload(config(tasks=("a",), tag_via="header", endpoint="completions", ignore_eos=True)).sample()
    assert header.headers == {TASK_HEADER: "a"} and header.body["model"] == "backbone"
    assert isinstance(header.body["prompt"], str) and header.body["ignore_eos"] is True
    body = Workload(config(tasks=("a",), tag_via="body")).sample()
    assert body.body["task"] == "a" and "ignore_eos" not in body.body
    assert body.body["stream"] is True and body.body["stream_options"] == {"include_usage": True}


def test_compositions_dataset_tasks_and_untagged_requests(tmp_path):
    composed = Workload(config(modules_k=2, output_len="uniform:4,9"), modules=("m0", "m1", "m2")).sample()
    assert composed.label == "explicit" and len(composed.body["modules"]) == 2
    assert set(composed.body["modules"]) <= {"m0", "m1", "m2"} and 4 <= composed.body["max_tokens"] <= 9
    with pytest.raises(ValueError, match="the server lists 1 modules"):
        Workload(config(modules_k=2), modules=("m0",))
    path = write_jsonl(tmp_path / "d.jsonl", [{"task": "t", "messages": [{"role": "user", "content": "x"}]}])
    from_dataset = Workload(config(dataset=path, tag_via="body")).sample()
    assert from_dataset.label == "t" and from_dataset.body["task"] == "t"
    untagged = Workload(config(input_len="7")).sample()
    assert untagged.label == "none" and untagged.body["model"] == "backbone"
    assert len(untagged.body["messages"][0]["content"].split()) == 7


def test_a_shared_prefix_goes_before_every_prompt_and_changes_nothing_else(tmp_path):
    plain = Workload(config(input_len="uniform:3,9", output_len="uniform:2,8", tasks=("a", "b")))
    shared = Workload(config(input_len="uniform:3,9", output_len="uniform:2,8", tasks=("a", "b"), prefix_len=12))
    for _ in range(20):
        one, other = plain.sample(), shared.sample()
        system, *rest = other.body["messages"]
        assert system["role"] == "system" and len(system["content"].split()) == 12
        assert rest == one.body["messages"] and other.label == one.label
        assert other.body["max_tokens"] == one.body["max_tokens"]
    systems = {Workload(config(prefix_len=12, seed=s)).sample().body["messages"][0]["content"] for s in (0, 0, 1)}
    assert len(systems) == 2, "one prefix per seed"
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    text = Workload(config(dataset=path, prefix_len=3, endpoint="completions")).sample().body["prompt"]
    assert len(text.split("\n\n")) == 2 and text.endswith("\n\nx") and len(text.split("\n\n")[0].split()) == 3

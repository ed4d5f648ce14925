"""bench_engine on the tiny config (CPU, fp32): every system on every workload at full length, ratios that
are quotients of the reported rows, exact cross-checks against transformers and PEFT, the JSON written."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from benchmarks.serving.bench_engine import (
    FULL_WORKLOADS, QUICK_WORKLOADS, SYSTEMS, CrossCheckError, Results, _cross_checks, _document, _parse, main,
)
from benchmarks.serving.engine_systems import VARIANTS, Run, agreement, left_padded


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick CPU run, with Tessera's asynchronous step loop forced on (it is on by default on CUDA only),
    so the greedy cross-check against transformers and PEFT also covers the pipelined steps."""
    out = tmp_path_factory.mktemp("bench-engine") / "results" / "engine.json"
    threads = torch.get_num_threads()
    try:
        document = main(["--config", "tiny", "--quick", "--out", str(out), "--threads", "1",
                         "--async-scheduling", "on"])
    finally:
        torch.set_num_threads(threads)
    return document, out


def _rows(document: dict) -> dict[tuple[str, str], dict]:
    return {(row["system"], row["workload"]): row for row in document["rows"]}


@pytest.mark.slow
def test_every_system_runs_every_workload_to_full_length(quick_run):
    document, _ = quick_run
    rows = _rows(document)
    assert set(rows) == {(s, w.name) for s in SYSTEMS for w in QUICK_WORKLOADS}
    assert len(document["rows"]) == len(rows)
    for workload in QUICK_WORKLOADS:
        for system in SYSTEMS:
            row = rows[(system, workload.name)]
            assert row["generated_tokens"] == workload.batch_size * workload.new_tokens, (system, workload)
            assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
            assert row["tokens_per_s"] == pytest.approx(row["generated_tokens"] / row["seconds"], rel=1e-12)
        assert rows[("tessera_d", workload.name)]["distinct_modules"] == min(64, workload.batch_size)
        assert rows[("tessera_b", workload.name)]["distinct_modules"] == min(8, workload.batch_size)
        assert rows[("peft_mixed", workload.name)]["distinct_modules"] == min(8, workload.batch_size)
        for variant in VARIANTS:
            row = rows[(variant.system, workload.name)]
            assert row["preempted"] == 0 and row["steps"] >= workload.new_tokens


@pytest.mark.slow
def test_ratios_are_the_quotients_of_the_reported_throughputs(quick_run):
    document, _ = quick_run
    rows = _rows(document)
    pairs = {(r["workload"], r["numerator"], r["denominator"]) for r in document["ratios"]}
    expected = {("tessera_b", "tessera_a"), ("tessera_c", "tessera_a"), ("tessera_d", "tessera_a"),
                ("tessera_b", "peft_mixed"), ("tessera_a", "hf_generate")}
    assert pairs == {(w.name, n, d) for w in QUICK_WORKLOADS for n, d in expected}  # no vLLM ratio for tiny
    for ratio in document["ratios"]:
        top = rows[(ratio["numerator"], ratio["workload"])]["tokens_per_s"]
        bottom = rows[(ratio["denominator"], ratio["workload"])]["tokens_per_s"]
        assert ratio["value"] == pytest.approx(top / bottom, rel=1e-12)


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_and_peft_and_modules_change_them(quick_run):
    document, _ = quick_run
    checks = {(c["workload"], c["left"], c["right"]): c for c in document["agreement"]}
    for workload in QUICK_WORKLOADS:
        for left, right in (("tessera_a", "hf_generate"), ("tessera_b", "peft_mixed")):
            check = checks[(workload.name, left, right)]
            assert check["exact_requests"] == check["requests"] == workload.batch_size
            assert check["mean_prefix_share"] == 1.0
        assert checks[(workload.name, "tessera_b", "tessera_a")]["exact_requests"] == 0


@pytest.mark.slow
def test_json_holds_the_document_with_environment_and_memory(quick_run):
    document, out = quick_run
    assert json.loads(out.read_text()) == json.loads(json.dumps(document))
    assert not list(out.parent.glob(".*tmp*"))
    environment = document["environment"]
    assert environment["torch"] == torch.__version__ and environment["device"]
    assert "git_commit" in environment and environment["transformers"]
    engine = document["config"]["engine"]
    assert engine["max_num_seqs"] == 8 and engine["num_kv_blocks"] == 8 * 2  # 24 tokens: 2 blocks of 16
    memory = document["memory"]["tessera"]
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads, head_dim 16, fp32
    assert memory["kv_cache_bytes"] == engine["num_kv_blocks"] * per_block
    assert memory["weights_bytes"] > document["memory"]["transformers"]["weights_bytes"] > 0  # + RoPE tables
    assert memory["module_pool_bytes"] > 0
    assert document["config"]["vllm_source"] == "issue 5, measured by the project owner"


def _run(system: str, tokens: list[list[int]]) -> Run:
    return Run(system, QUICK_WORKLOADS[0], 1.0, 1.0, tokens)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cross_check_mismatch_fails_in_fp32_and_is_reported_in_bf16(tmp_path, dtype):
    settings = _parse(["--config", "tiny", "--quick", "--dtype", dtype, "--out", str(tmp_path / "e.json")])
    results = Results(settings, _document(settings, list(QUICK_WORKLOADS[:1])), list(QUICK_WORKLOADS[:1]))
    results.add(_run("tessera_a", [[1, 2], [3, 4]]))
    results.add(_run("hf_generate", [[1, 2], [3, 5]]))
    if dtype == "float32":
        with pytest.raises(CrossCheckError, match=r"request 1 differs: \[3, 4\] vs \[3, 5\]"):
            _cross_checks(settings, results, list(QUICK_WORKLOADS[:1]))
    else:
        _cross_checks(settings, results, list(QUICK_WORKLOADS[:1]))
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["agreement"] == [{"workload": "b4_p16_n8", "left": "tessera_a", "right": "hf_generate",
                                   "requests": 2, "exact_requests": 1, "exact_share": 0.5, "mean_prefix_share": 0.75}]


def test_cli_rejects_workloads_outside_the_chosen_set(capsys):
    with pytest.raises(SystemExit):
        _parse(["--workloads", "b4_p16_n8"])
    assert "not in this run's set ['b256_p256_n128', 'b32_p256_n64'] (--quick picks the small set)" in capsys.readouterr().err
    settings = _parse(["--quick", "--workloads", "b8_p16_n8", "--systems", "tessera_a", "tessera_a"])
    assert settings.workloads == ("b8_p16_n8",) and settings.systems == ("tessera_a",)


def test_variants_round_robin_over_modules_and_pairs():
    by_key = {v.key: v for v in VARIANTS}
    assert all(c.k == 0 for c in by_key["a"].compositions(3))
    assert [c.module_ids for c in by_key["b"].compositions(10)][7:] == [("m7",), ("m0",), ("m1",)]
    pairs = [c.module_ids for c in by_key["c"].compositions(30)]
    assert len(set(pairs[:28])) == 28 and pairs[28] == pairs[0] == ("m0", "m1")
    assert all(c.gates == (0.6, 0.4) for c in by_key["c"].compositions(30))
    assert {c.module_ids[0] for c in by_key["d"].compositions(256)} == {f"m{i}" for i in range(64)}


def test_left_padding_and_agreement_math():
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    found = agreement([[1, 2, 3, 4], [1, 2, 3, 4]], [[1, 2, 3, 4], [1, 9, 3, 4]])
    assert found == {"requests": 2, "exact_requests": 1, "exact_share": 0.5, "mean_prefix_share": 0.625}


def test_the_vllm_ratio_needs_the_published_setup(tmp_path):
    run = Run("tessera_a", FULL_WORKLOADS[1], 4.0, 1.0, [[7] * 128] * 256)  # 8192 tokens/s
    for argv, expected in ((["--dtype", "bfloat16"], 8192.0 / 9684.0), (["--dtype", "float32"], None),
                           (["--config", "tiny", "--dtype", "bfloat16"], None)):
        on_cpu = _parse(argv + ["--out", str(tmp_path / "e.json")])
        settings = dataclasses.replace(on_cpu, device="cuda")  # as the GPU run parses it
        results = Results(settings, _document(on_cpu, list(FULL_WORKLOADS)), list(FULL_WORKLOADS))
        results.add(run)
        found = [r for r in results.document["ratios"] if r["denominator"] == "vllm_published"]
        assert [r["value"] for r in found] == ([] if expected is None else [pytest.approx(expected)]), argv
        assert all(r["like_for_like"] is False for r in found)  # vLLM's numbers are an H100's; this is no H100
    on_cpu = _parse(["--dtype", "bfloat16", "--out", str(tmp_path / "e.json")])
    results = Results(dataclasses.replace(on_cpu, device="cuda"), _document(on_cpu, list(FULL_WORKLOADS)),
                      list(FULL_WORKLOADS))
    results.document["environment"]["device"] = "NVIDIA H100 80GB HBM3"
    results.add(run)
    assert [r["like_for_like"] for r in results.document["ratios"] if r["denominator"] == "vllm_published"] == [True]


@pytest.mark.slow
def test_a_mixture_of_experts_backbone_cross_checks_with_transformers_and_peft(tmp_path):
    """The Qwen3-MoE shape (tiny-moe): Tessera's engine with modules on the attention generates, greedy, exactly
    what transformers' generate and PEFT's mixed-adapter batch generate (fp32 on the CPU: a mismatch raises)."""
    threads = torch.get_num_threads()
    try:
        document = main(["--config", "tiny-moe", "--quick", "--out", str(tmp_path / "moe.json"), "--threads", "1",
                         "--workloads", "b4_p16_n8", "--systems", "tessera_a", "tessera_b", "hf_generate",
                         "peft_mixed"])
    finally:
        torch.set_num_threads(threads)
    checks = {(a["left"], a["right"]): a for a in document["agreement"]}
    assert checks[("tessera_a", "hf_generate")]["exact_share"] == 1.0
    assert checks[("tessera_b", "peft_mixed")]["exact_share"] == 1.0
    assert checks[("tessera_b", "tessera_a")]["exact_share"] < 1.0  # the modules change the tokens
    assert document["config"]["shape"]["num_experts"] == 8

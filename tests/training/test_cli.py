"""`tessera train` through `python -m server.cli`: a run that writes a library, and errors without tracebacks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from router.library import ModuleLibrary, random_library
from tests.training.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--num-modules", "2", "--rank", "2", "--steps", "2", "--batch-size", "2", "--max-seq-len", "64",
        "--device", "cpu", "--no-progress", "--learning-rate", "0.01"]


def _train(*args) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "server.cli", "--log-level", "warning", "train", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tessera: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_train_writes_a_library_then_refuses_to_overwrite_it(tiny_llama, examples, fingerprint, tmp_path):
    data, out = tmp_path / "data.jsonl", tmp_path / "lib"
    write_jsonl(data, examples[:6])
    result = _train("--model", tiny_llama, "--data", data, "--out", out, "--targets", "q_proj,v_proj",
                    "--eval-split", "0.34", "--lr-schedule", "cosine", "--warmup-steps", "1", "--max-grad-norm", "1",
                    "--micro-batch-size", "1", "--gradient-checkpointing", *FAST)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}: 2 steps" in result.stdout
    assert "held-out task loss at step 2: {'reverse': " in result.stdout and "'mean': " in result.stdout
    library = ModuleLibrary.load(out, expect=fingerprint)
    assert list(library.modules) == ["m0", "m1"] and library.modules["m0"].targets == ("q_proj", "v_proj")
    again = _error(_train("--model", tiny_llama, "--data", data, "--out", out, *FAST))
    assert f"{out} already exists" in again and "pass --overwrite to replace it" in again


def test_bad_data_names_the_line(tiny_llama, examples, tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, examples[:2])
    data.write_text(data.read_text() + json.dumps({"messages": examples[0].messages}) + "\n")
    line = _error(_train("--model", tiny_llama, "--data", data, "--out", tmp_path / "lib", *FAST))
    assert f"{data}:3: missing 'task'" in line
    write_jsonl(data, examples[:2])
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"task": "sort", "messages": examples[0].messages}) + "\n")
    line = _error(_train("--model", tiny_llama, "--data", data, "--out", tmp_path / "lib", "--eval-data", held_out,
                         *FAST))
    assert "evaluation example 1: task 'sort' is not trained in this run" in line
    line = _error(_train("--model", tiny_llama, "--data", data, "--out", tmp_path / "lib", "--eval-data",
                         tmp_path / "missing.jsonl", *FAST))
    assert f"{tmp_path / 'missing.jsonl'}: cannot read the examples" in line
    line = _error(_train("--model", tiny_llama, "--data", data, "--out", tmp_path / "lib", "--eval-data", held_out,
                         "--eval-split", "0.2", *FAST))
    assert "give --eval-data or --eval-split, not both" in line
    line = _error(_train("--model", tiny_llama, "--data", data, "--out", tmp_path / "lib", "--eval-split", "1", *FAST))
    assert "--eval-split must be a share in (0, 1), got 1.0" in line


def test_init_library_for_another_backbone_and_bad_flags(tiny_llama, examples, fingerprint, tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, examples[:2])
    other = random_library(dataclasses.replace(fingerprint, num_layers=3), num_modules=2).write(tmp_path / "other")
    line = _error(_train("--model", tiny_llama, "--data", data, "--out", tmp_path / "lib", "--init-library", other,
                         *FAST))
    assert "library was made for num_layers=3, the backbone has num_layers=2" in line
    line = _error(_train("--model", tiny_llama, "--data", data, "--out", tmp_path / "lib", "--targets", "q_proj,x"))
    assert "TrainConfig.targets must be distinct names" in line


def test_relation_and_task_descriptions_files(tiny_llama, examples, tmp_path):
    data, out = tmp_path / "data.jsonl", tmp_path / "lib"
    write_jsonl(data, examples[:6])
    relation, descriptions = tmp_path / "relation.json", tmp_path / "descriptions.json"
    relation.write_text(json.dumps({"reverse": {"upper": 1.0}}))
    descriptions.write_text(json.dumps({"reverse": "reverse the letters", "upper": "uppercase the letters"}))
    result = _train("--model", tiny_llama, "--data", data, "--out", out, "--relation", relation,
                    "--task-descriptions", descriptions, *FAST)
    assert result.returncode == 0, result.stderr
    library = ModuleLibrary.load(out)
    assert {t.name: t.description for t in library.tasks.values()} == json.loads(descriptions.read_text())
    relation.write_text(json.dumps({"reverse": {"translate": 1.0}}))
    line = _error(_train("--model", tiny_llama, "--data", data, "--out", tmp_path / "two", "--relation", relation,
                         *FAST))
    assert "relation names unknown task 'translate'" in line
    relation.write_text("[1, 2")
    assert f"--relation {relation}: not valid JSON" in _error(
        _train("--model", tiny_llama, "--data", data, "--out", tmp_path / "two", "--relation", relation, *FAST))

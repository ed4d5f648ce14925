"""`--model` as a Hugging Face Hub id resolves through huggingface_hub's cache (offline here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.model.loader import resolve_model_dir

REPO = Path(__file__).resolve().parents[2]
REVISION = "0123456789abcdef0123456789abcdef01234567"
SCRIPT = """
import sys
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
engine = Engine(EngineConfig(model=sys.argv[1], device="cpu", num_kv_blocks=16, block_size=4))
out = engine.generate_batch([Request("r", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))])
print(engine.model_name, sum(len(o.token_ids) for o in out["r"]))
"""


def _hub_cache(tmp_path: Path, model_dir: str) -> Path:
    """A huggingface_hub cache holding `model_dir` as revision `main` of tessera-test/tiny."""
    repo = tmp_path / "hub" / "models--tessera-test--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return tmp_path / "hub"


def _run(cache: Path, model: str) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT, model], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_hub_id_serves_from_the_cache(tiny_llama, tmp_path):
    cache = _hub_cache(tmp_path, tiny_llama)
    result = _run(cache, "tessera-test/tiny")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["tessera-test/tiny", "3"]
    missing = _run(cache, "tessera-test/absent")
    assert missing.returncode != 0 and "tessera-test/absent" in missing.stderr and "Hub" in missing.stderr


@pytest.mark.parametrize("model", ["./no/such/dir", "/no/such/dir", "not-an-id"])
def test_neither_a_directory_nor_a_hub_id(model):
    with pytest.raises(FileNotFoundError, match="neither a model directory nor a Hugging Face Hub id"):
        resolve_model_dir(model)


def test_directory_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_train_takes_a_hub_id_too(tiny_llama, tmp_path):
    from tests.training.conftest import two_task_examples, write_jsonl

    cache = _hub_cache(tmp_path, tiny_llama)
    data = tmp_path / "data.jsonl"
    write_jsonl(data, two_task_examples(count=2))
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def train(model: str, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", "--log-level", "warning", "train", "--model", model,
                               "--data", str(data), "--out", str(out), "--num-modules", "2", "--rank", "2", "--steps",
                               "1", "--batch-size", "2", "--device", "cpu", "--no-progress", "--no-text-router"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    result = train("tessera-test/tiny", tmp_path / "lib")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'lib'}: 1 steps" in result.stdout
    missing = train("tessera-test/absent", tmp_path / "other")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().startswith("tessera: error: --model tessera-test/absent: ") and "Hub" in missing.stderr

"""`tessera library` as a user runs it: import real PEFT adapters, inspect, export, and fail cleanly."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.cli import main
from tests.router.helpers import random_peft_adapter

REPO = Path(__file__).resolve().parents[2]
PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 40, 41, 42]])  # [batch, seq]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "library", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _adapter(model_dir, out: Path, seed: int, targets) -> None:
    random_peft_adapter(model_dir, out, seed, targets)


def _peft_logits(model_dir, adapter: Path) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(_base(model_dir), str(adapter)).eval()(PROMPT).logits


def test_import_info_export_round_trip(tiny_llama, tmp_path):
    library = tmp_path / "lib"
    _adapter(tiny_llama, tmp_path / "a", 0, ["q_proj", "v_proj", "down_proj"])
    _adapter(tiny_llama, tmp_path / "b", 1, ["o_proj", "up_proj"])
    first = _cli("import-peft", "--model", tiny_llama, "--library", library, "--adapter", tmp_path / "a",
                 "--name", "alpha", "--task", "spell")
    assert first.returncode == 0, first.stderr
    second = _cli("import-peft", "--model", tiny_llama, "--library", library, "--adapter", tmp_path / "b", "--name", "beta")
    assert second.returncode == 0, second.stderr

    info = _cli("info", library, "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert list(summary["modules"]) == ["alpha", "beta"] and summary["tasks"] == {"spell": {"alpha": 1.0}}
    assert summary["modules"]["alpha"]["targets"] == ["q_proj", "v_proj", "down_proj"]
    assert "spell" in _cli("info", library).stdout

    exported = _cli("export-peft", "--library", library, "--task", "spell", "--out", tmp_path / "spell")
    assert exported.returncode == 0, exported.stderr
    assert torch.allclose(_peft_logits(tiny_llama, tmp_path / "spell"), _peft_logits(tiny_llama, tmp_path / "a"),
                          atol=1e-5)
    mixed = _cli("export-peft", "--library", library, "--modules", "alpha=0.5,beta=0.5", "--out", tmp_path / "mix")
    assert mixed.returncode == 0, mixed.stderr
    assert json.loads((tmp_path / "mix" / "adapter_config.json").read_text())["r"] == 8

    vllm = _cli("export-vllm", "--library", library, "--out", tmp_path / "vllm", "--base-model", tiny_llama)
    assert vllm.returncode == 0, vllm.stderr
    manifest = json.loads((tmp_path / "vllm" / "vllm.json").read_text())
    assert [a["name"] for a in manifest["lora_modules"]] == ["spell"] and manifest["max_lora_rank"] == 8
    exported_logits = _peft_logits(tiny_llama, tmp_path / "vllm" / "spell")
    assert torch.allclose(exported_logits, _peft_logits(tiny_llama, tmp_path / "a"), atol=1e-5)
    command = shlex.split(vllm.stdout.strip().splitlines()[-1])
    assert command == ["vllm", "serve", tiny_llama, "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1",
                       "--lora-modules", f"spell={tmp_path / 'vllm' / 'spell'}"]
    again = _cli("export-vllm", "--library", library, "--out", tmp_path / "vllm")
    assert again.returncode == 2 and "already exists" in again.stderr and "pass --overwrite" in again.stderr
    replaced = _cli("export-peft", "--library", library, "--task", "spell", "--out", tmp_path / "mix", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((tmp_path / "mix" / "adapter_config.json").read_text())["r"] == 4


def _in_process(capsys, *args) -> tuple[int, str]:
    """Exit status and stderr of `tessera library ...` run in this process (same code path, no start-up)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["library", *map(str, args)])
    return exit_info.value.code, capsys.readouterr().err


def test_errors_are_one_line_and_leave_the_library_as_it_was(tiny_llama, tmp_path, capsys):
    library = tmp_path / "lib"
    _adapter(tiny_llama, tmp_path / "a", 0, ["q_proj"])
    assert _cli("import-peft", "--model", tiny_llama, "--library", library, "--adapter", tmp_path / "a",
                "--name", "alpha").returncode == 0
    before = {p.name: p.read_bytes() for p in library.iterdir()}
    cases = [
        (("import-peft", "--model", tiny_llama, "--library", library, "--adapter", tmp_path / "a", "--name", "alpha"),
         "already exists"),
        (("import-peft", "--model", tiny_llama, "--library", library, "--adapter", tmp_path / "nope", "--name", "x"),
         "not a directory"),
        (("export-peft", "--library", library, "--task", "nope", "--out", tmp_path / "o"), "nope"),
        (("export-peft", "--library", library, "--modules", "alpha", "--out", tmp_path / "o"), "name=weight"),
        (("export-peft", "--library", library, "--modules", "ghost=1", "--out", tmp_path / "o"), "ghost"),
        (("info", tmp_path / "missing"), "not a directory"),
        (("export-vllm", "--library", library, "--tasks", "alpha,,x", "--out", tmp_path / "o"), "empty name"),
        (("export-vllm", "--library", library, "--tasks", "ghost", "--out", tmp_path / "o"), "ghost"),
        (("export-peft", "--library", library, "--modules", "alpha=1", "--out", library), "pass --overwrite"),
    ]
    for args, message in cases:
        code, err = _in_process(capsys, *args)
        assert code == 2 and err.startswith("tessera: error: ") and message in err, (args, err)
    assert _cli(*cases[0][0]).stderr.startswith("tessera: error: module 'alpha' already exists")
    assert {p.name: p.read_bytes() for p in library.iterdir()} == before
    assert not (tmp_path / "o").exists()

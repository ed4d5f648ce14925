"""A library exports for vLLM as one exact PEFT LoRA per task, plus the `vllm serve` arguments."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from router.compose import compose
from router.controller import ControllerSettings
from router.errors import CompositionError, LibraryError, UnknownTaskError
from router.library import ModuleLibrary, TaskInfo, random_library
from router.vllm_export import MANIFEST_FILE, VLLM_MAX_LORA_RANKS, export_vllm, vllm_max_lora_rank
from tests.router.helpers import merged_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 40, 41, 42]])  # [batch, seq]


def _base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _composed_logits(model_dir, library, composition):
    with torch.no_grad():
        return merged_model(model_dir, library, composition)(PROMPT).logits


def _peft_logits(model_dir, adapter):
    with torch.no_grad():
        return PeftModel.from_pretrained(_base(model_dir), str(adapter)).eval()(PROMPT).logits


def test_every_task_exports_as_the_composition_tessera_serves(library, tiny_llama, tmp_path):
    done = export_vllm(library, tmp_path / "vllm", base_model=tiny_llama)
    manifest = json.loads((done.path / MANIFEST_FILE).read_text())
    assert [a["name"] for a in manifest["lora_modules"]] == list(library.tasks) == [a.name for a in done.adapters]
    assert manifest["base_model_tasks"] == [] and manifest["max_loras"] == done.max_loras == 3
    plain = _base(tiny_llama)(PROMPT).logits.detach()
    logits = {}
    for entry in manifest["lora_modules"]:
        composition = compose(library, task=entry["name"])
        assert entry["gates"] == pytest.approx(dict(zip(composition.module_ids, composition.gates)))
        assert entry["rank"] == sum(library.modules[m].rank for m in composition.module_ids)
        config = json.loads((done.path / entry["path"] / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == entry["rank"] and config["base_model_name_or_path"] == tiny_llama
        logits[entry["name"]] = _peft_logits(tiny_llama, done.path / entry["path"])
        torch.testing.assert_close(logits[entry["name"]], _composed_logits(tiny_llama, library, composition),
                                   atol=1e-4, rtol=1e-4)
        assert (logits[entry["name"]] - plain).abs().max() > 1e-2, "each adapter must change the logits"
    first, second = list(logits)[:2]
    assert (logits[first] - logits[second]).abs().max() > 1e-3, "tasks must export different adapters"
    ranks = [a.rank for a in done.adapters]
    assert done.max_lora_rank in VLLM_MAX_LORA_RANKS and done.max_lora_rank >= max(ranks)
    assert done.max_lora_rank == min(r for r in VLLM_MAX_LORA_RANKS if r >= max(ranks))

    command = shlex.split(done.serve_command(tiny_llama))
    assert command[:3] == ["vllm", "serve", tiny_llama] and "--enable-lora" in command
    assert command[command.index("--max-lora-rank") + 1] == str(done.max_lora_rank)
    served = command[command.index("--lora-modules") + 1:]
    assert served == [f"{a.name}={done.path / a.name}" for a in done.adapters]
    assert shlex.split(done.serve_command(None))[2] == "<MODEL>"


def test_chosen_tasks_composites_and_tasks_without_modules(fingerprint, tiny_llama, tmp_path):
    library = random_library(fingerprint, num_modules=4, rank=(4, 8, 8, 2), std=0.2, tasks=("reverse", "uppercase"))
    logits = torch.cat([library.controller.logits, torch.full((1, 4), -30.0)])  # "copy" gates every module off
    library = ModuleLibrary.build(
        fingerprint, {name: (info, library.module_weights(name)) for name, info in library.modules.items()},
        [*library.tasks.values(), TaskInfo("copy")], logits, ControllerSettings(top_k=2, threshold=0.05),
    )
    assert compose(library, task="copy").k == 0
    done = export_vllm(library, tmp_path / "vllm", tasks=["reverse+uppercase", "copy"], max_loras=4)
    assert [a.name for a in done.adapters] == ["reverse+uppercase"] and done.base_model_tasks == ("copy",)
    composite = compose(library, task="reverse+uppercase")
    parts = [compose(library, task=t) for t in ("reverse", "uppercase")]
    assert set(composite.module_ids) == set(parts[0].module_ids) | set(parts[1].module_ids)
    assert set(composite.module_ids) != set(parts[0].module_ids), "the composite must differ from one task"
    assert done.adapters[0].rank == sum(library.modules[m].rank for m in composite.module_ids)
    torch.testing.assert_close(_peft_logits(tiny_llama, done.path / "reverse+uppercase"),
                               _composed_logits(tiny_llama, library, composite), atol=1e-4, rtol=1e-4)
    manifest = json.loads((done.path / MANIFEST_FILE).read_text())
    assert manifest["base_model_tasks"] == ["copy"] and manifest["max_loras"] == 4
    assert sorted(p.name for p in done.path.iterdir()) == sorted([MANIFEST_FILE, "reverse+uppercase"])


def test_vllm_rank_is_the_smallest_it_accepts():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 33, 256, 257, 320, 321, 512)] == \
        [1, 8, 8, 16, 16, 64, 256, 320, 320, 512, 512]
    with pytest.raises(CompositionError, match="rank 513 exceeds vLLM's largest --max-lora-rank \\(512\\)"):
        vllm_max_lora_rank(513)


def test_errors_write_nothing(library, tmp_path):
    out = tmp_path / "vllm"
    cases = [
        (dict(tasks=["reverse", "nope"]), UnknownTaskError, "nope"),
        (dict(tasks=["reverse", "reverse"]), CompositionError, "tasks repeated: \\['reverse'\\]"),
        (dict(tasks=[]), CompositionError, "no tasks to export"),
        (dict(max_loras=0), CompositionError, "max_loras must be >= 1"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            export_vllm(library, out, **kwargs)
        assert not out.exists() and list(tmp_path.iterdir()) == []
    export_vllm(library, out, tasks=["reverse"])
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(LibraryError, match="already exists and is not empty"):
        export_vllm(library, out, tasks=["uppercase"])
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    again = export_vllm(library, out, tasks=["uppercase"], overwrite=True)
    assert [a.name for a in again.adapters] == ["uppercase"] and not (out / "reverse").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["vllm"], "no staging directories are left behind"

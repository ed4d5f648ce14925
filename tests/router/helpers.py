"""Edits of a written library's files, to build invalid libraries from valid ones; the merged-weights oracle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def edit_json(root: Path, change) -> None:
    """Apply `change(meta)` to library.json in place."""
    meta = json.loads((root / "library.json").read_text())
    change(meta)
    (root / "library.json").write_text(json.dumps(meta))


def edit_tensors(root: Path, file: str, change) -> None:
    """Apply `change(tensors)` to one safetensors file of the library in place."""
    tensors = load_file(str(root / file))
    change(tensors)
    save_file(tensors, str(root / file))


def merged_model(model_dir, library, composition):
    """The Hugging Face model of `model_dir` (fp32, eval) with `composition` merged into its weights:
    W += gate * scale * B @ A for every module point, the math Tessera serves, computed the plain way."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = model.state_dict()
    for name, gate in zip(composition.module_ids, composition.gates):
        scale = library.modules[name].scale
        for (layer, target), (a, b) in library.module_weights(name).items():
            part = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            state[f"model.layers.{layer}.{part}.{target}.weight"] += gate * scale * (b @ a)
    model.load_state_dict(state)
    return model


def random_peft_adapter(model_dir, out, seed: int, targets, rank: int = 4, std: float = 0.2) -> str:
    """Save a real PEFT LoRA (alpha 2 * rank) on `model_dir` with random non-zero A and B to `out`."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    model.save_pretrained(str(out))
    return str(out)

"""Reference math for training tests: backbones with updates merged into their weights."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from router.composition import Composition
from router.library import ModuleLibrary
from training.modules import target_linear

PROMPTS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 40], [41, 42, 43, 12, 13, 14, 15, 16]])  # [batch, seq]


def backbone(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def merged(model_dir: str, deltas: dict[tuple[int, str], torch.Tensor]):
    """The backbone with W += delta [out, in] at every (layer, target) of `deltas`."""
    model = backbone(model_dir)
    with torch.no_grad():
        for point, delta in deltas.items():
            target_linear(model, point).weight += delta
    return model


def composition_deltas(library: ModuleLibrary, composition: Composition) -> dict[tuple[int, str], torch.Tensor]:
    """sum_j g_j (alpha_j / r_j) B_j A_j per (layer, target): what serving a composition adds to W."""
    deltas: dict[tuple[int, str], torch.Tensor] = {}
    for name, gate in zip(composition.module_ids, composition.gates):
        scale = library.modules[name].scale
        for point, (a, b) in library.module_weights(name).items():
            deltas[point] = deltas.get(point, 0) + gate * scale * (b @ a)
    return deltas

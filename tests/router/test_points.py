"""Modules on a sparse set of (layer, target) points: format, validation, PEFT import, nothing padded."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from router.errors import LibraryError
from router.info import ModuleInfo
from router.library import ModuleLibrary
from router.peft_io import import_peft
from tests.router.helpers import edit_json

POINTS = ((0, "q_proj"), (1, "v_proj"), (1, "down_proj"))


def _sparse(fingerprint, name="s0", points=POINTS, rank=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers = tuple(sorted({layer for layer, _ in points}))
    targets = tuple(t for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                    if any(t == target for _, target in points))
    info = ModuleInfo(name, rank, 8.0, "sparse", targets, layers, points)
    weights = {}
    for layer, target in points:
        in_features, out_features = fingerprint.shape(target)
        weights[(layer, target)] = (torch.randn(rank, in_features, generator=gen),  # [rank, in]
                                    torch.randn(out_features, rank, generator=gen))  # [out, rank]
    return info, weights


def test_sparse_module_round_trips_with_only_its_points(library, fingerprint, tmp_path):
    info, weights = _sparse(fingerprint)
    written = library.with_module(info, weights).write(tmp_path / "lib")
    meta = json.loads((written / "library.json").read_text())
    entry = next(m for m in meta["modules"] if m["name"] == "s0")
    assert entry["points"] == [[0, "q_proj"], [1, "v_proj"], [1, "down_proj"]]
    assert "points" not in meta["modules"][0]  # full-grid modules keep the short form
    loaded = ModuleLibrary.load(written, expect=fingerprint)
    assert sorted(loaded.module_weights("s0")) == sorted(POINTS)
    for point in POINTS:
        assert torch.equal(loaded.module_weights("s0")[point][1], weights[point][1])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda e: e.update(points=[[0, "q_proj"], [0, "q_proj"], [1, "v_proj"], [1, "down_proj"]]), "repeat"),
        (lambda e: e.update(points=[[0, "q_proj"], [1, "v_proj"], [1, "down_proj"], [1, "k_proj"]]), "outside"),
        (lambda e: e.update(points=[[0, "q_proj"], [1, "down_proj"]]), "used by no point"),
        (lambda e: e.update(points=[]), "non-empty list"),
        (lambda e: e.update(points=[[0, 1]]), "non-empty list"),
        (lambda e: e.update(points=[[0, "q_proj"], [0, "v_proj"], [1, "down_proj"]]), "tensor"),
    ],
)
def test_bad_points_are_rejected(library, fingerprint, tmp_path, change, message):
    info, weights = _sparse(fingerprint)
    written = library.with_module(info, weights).write(tmp_path / "lib")

    def edit(meta):
        change(next(m for m in meta["modules"] if m["name"] == "s0"))

    edit_json(written, edit)
    with pytest.raises(LibraryError, match=message):
        ModuleLibrary.load(written, expect=fingerprint)


def test_weights_off_the_points_are_rejected(fingerprint):
    info, weights = _sparse(fingerprint)
    weights[(0, "v_proj")] = weights[(1, "v_proj")]
    with pytest.raises(LibraryError, match=r"\(0, 'v_proj'\) it does not declare"):
        ModuleLibrary.build(fingerprint, {"s0": (info, weights)}, [], torch.zeros(0, 1))


def test_peft_adapter_on_some_layers_imports_without_padding(tiny_llama, fingerprint, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.save_pretrained(str(tmp_path / "peft"))
    info, weights = import_peft(tmp_path / "peft", fingerprint, "late")
    assert info.layers == (1,) and info.points is None and sorted(weights) == [(1, "q_proj"), (1, "up_proj")]

    sparse = LoraConfig(r=4, lora_alpha=8, target_modules=["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), sparse).save_pretrained(
        str(tmp_path / "sparse"))
    info, weights = import_peft(tmp_path / "sparse", fingerprint, "sparse")
    assert info.points == ((0, "q_proj"), (1, "up_proj")) and sorted(weights) == [(0, "q_proj"), (1, "up_proj")]
    library = ModuleLibrary.build(fingerprint, {"sparse": (info, weights)}, [], torch.zeros(0, 1))
    assert sorted(library.module_weights("sparse")) == [(0, "q_proj"), (1, "up_proj")]

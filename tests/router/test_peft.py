"""PEFT LoRA directories import as one module; compositions export as one exact PEFT LoRA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from router.composition import Composition
from router.errors import CompositionError, LibraryError, UnknownModuleError
from router.library import ModuleInfo, ModuleLibrary, TaskInfo
from router.peft_io import export_peft, import_peft
from tests.router.helpers import merged_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning", "ignore:Setting `save_embedding_layers`:UserWarning"
)
PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 40, 41, 42]])  # [batch, seq]


def _base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _save_peft(model_dir, out, seed=0, **config):
    """A real PEFT LoRA on the tiny model, with random non-zero A and B; returns {module key: (A, B, scale)}."""
    model = get_peft_model(_base(model_dir), LoraConfig(**({"r": 4, "lora_alpha": 8} | config)))
    gen = torch.Generator().manual_seed(seed)
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            with torch.no_grad():
                a.copy_(torch.randn(a.shape, generator=gen) * 0.2)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
            found[name.removeprefix("base_model.model.")] = (a.detach().clone(), b.detach().clone(), module.scaling["default"])
    model.save_pretrained(str(out))
    return found


def _layer_target(key):
    parts = key.split(".")  # model.layers.{i}.{self_attn|mlp}.{target}
    return int(parts[2]), parts[4]


def test_import_matches_the_peft_weights(tiny_llama, fingerprint, tmp_path):
    saved = _save_peft(tiny_llama, tmp_path / "peft", target_modules=["q_proj", "v_proj", "down_proj"])
    info, weights = import_peft(tmp_path / "peft", fingerprint, "imported", "from peft")
    assert (info.name, info.rank, info.alpha, info.description) == ("imported", 4, 8, "from peft")
    assert info.targets == ("q_proj", "v_proj", "down_proj") and info.layers == (0, 1)
    assert len(saved) == len(weights) == 6
    for key, (a, b, scale) in saved.items():
        got_a, got_b = weights[_layer_target(key)]
        assert torch.equal(got_a, a) and torch.equal(got_b, b) and info.scale == scale
        assert b.abs().sum() > 0


def test_rslora_becomes_an_equivalent_alpha(tiny_llama, fingerprint, tmp_path):
    saved = _save_peft(tiny_llama, tmp_path / "peft", target_modules=["o_proj"], use_rslora=True)
    info, _ = import_peft(tmp_path / "peft", fingerprint, "rs")
    assert info.scale == pytest.approx(8 / math.sqrt(4)) == pytest.approx(next(iter(saved.values()))[2])


def test_rank_and_alpha_patterns_are_represented_exactly(tiny_llama, fingerprint, tmp_path):
    saved = _save_peft(
        tiny_llama, tmp_path / "peft", target_modules=["q_proj", "up_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"up_proj": 3},
    )
    assert saved["model.layers.1.self_attn.q_proj"][0].shape == (2, 64)
    info, weights = import_peft(tmp_path / "peft", fingerprint, "patterned")
    assert info.rank == 4 and info.scale == 1.0
    for key, (a, b, scale) in saved.items():
        got_a, got_b = weights[_layer_target(key)]
        torch.testing.assert_close(info.scale * got_b @ got_a, scale * b @ a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, r"DoRA adapters \(use_dora\)"),
        ({"target_modules": ["q_proj", "lm_head"]}, r"target_modules \['lm_head'\] are outside the adaptable targets"),
        ({"bias": "lora_only"}, "adapters that train biases are not supported"),
        ({"modules_to_save": ["lm_head"]}, r"fully trained modules \(modules_to_save\)"),
    ],
)
def test_unsupported_adapters_are_refused(tiny_llama, fingerprint, tmp_path, config, message):
    _save_peft(tiny_llama, tmp_path / "peft", **({"target_modules": ["q_proj"]} | config))
    with pytest.raises(LibraryError, match=message):
        import_peft(tmp_path / "peft", fingerprint, "bad")


def test_dora_tensors_are_refused_even_without_the_flag(tiny_llama, fingerprint, tmp_path):
    _save_peft(tiny_llama, tmp_path / "peft", target_modules=["q_proj"], use_dora=True)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": False}))
    with pytest.raises(LibraryError, match="is a DoRA magnitude vector"):
        import_peft(tmp_path / "peft", fingerprint, "bad")


def test_wrong_shape_adapter_names_layer_target_and_shape(tiny_llama, fingerprint, tmp_path):
    _save_peft(tiny_llama, tmp_path / "peft", target_modules=["down_proj"])
    narrower = type(fingerprint)(
        fingerprint.architecture, 64, 2,
        tuple((n, 96 if n == "down_proj" else i, o) for n, i, o in fingerprint.targets),
    )
    with pytest.raises(LibraryError, match=r"layer 0, target down_proj, lora_A: shape \[4, 128\], expected \[4, 96\]"):
        import_peft(tmp_path / "peft", narrower, "bad")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    with pytest.raises(LibraryError, match=r"lora_A: shape \[4, 128\], expected \[8, 128\] \[r, in_features\]"):
        import_peft(tmp_path / "peft", fingerprint, "bad")


def _two_module_library(fingerprint, tiny_llama, tmp_path):
    """An imported PEFT module (q, v, down on both layers) and one on k and o of layer 1 only, rank 2."""
    gen = torch.Generator().manual_seed(1)
    info = ModuleInfo("late", 2, 5.0, "", ("k_proj", "o_proj"), (1,))
    weights = {
        (1, t): (torch.randn(2, fingerprint.shape(t)[0], generator=gen) * 0.3,  # [rank, in]
                 torch.randn(fingerprint.shape(t)[1], 2, generator=gen) * 0.3)  # [out, rank]
        for t in info.targets
    }
    library = ModuleLibrary.build(fingerprint, {"late": (info, weights)}, [TaskInfo("t")], torch.zeros(1, 1))
    _save_peft(tiny_llama, tmp_path / "peft", target_modules=["q_proj", "v_proj", "down_proj"])
    return library.with_module(*import_peft(tmp_path / "peft", fingerprint, "imported"))


def _merged_logits(model_dir, library, composition):
    with torch.no_grad():
        return merged_model(model_dir, library, composition)(PROMPT).logits


def test_export_is_exactly_the_composition(tiny_llama, fingerprint, tmp_path):
    library = _two_module_library(fingerprint, tiny_llama, tmp_path)
    composition = Composition(("imported", "late"), (0.7, 1.3), "explicit")
    out = export_peft(library, composition, tmp_path / "export", base_model=tiny_llama)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 6
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    peft_model = PeftModel.from_pretrained(_base(tiny_llama), str(out)).eval()
    with torch.no_grad():
        got = peft_model(PROMPT).logits
        base = _base(tiny_llama)(PROMPT).logits
    expected = _merged_logits(tiny_llama, library, composition)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (expected - base).abs().max() > 1e-2, "the composition must change the logits"
    swapped = _merged_logits(tiny_llama, library, Composition(("imported", "late"), (1.3, 0.7), "explicit"))
    assert (swapped - got).abs().max() > 1e-3, "gates must not be interchangeable"


def test_export_then_import_round_trips_one_module(tiny_llama, fingerprint, tmp_path):
    library = _two_module_library(fingerprint, tiny_llama, tmp_path)
    out = export_peft(library, Composition(("late",), (1.0,), "explicit"), tmp_path / "export")
    info, weights = import_peft(out, fingerprint, "back")
    assert info.rank == 2 and info.scale == 1.0 and info.targets == ("k_proj", "o_proj") and info.layers == (0, 1)
    for (layer, target), (a, b) in library.module_weights("late").items():
        torch.testing.assert_close(weights[(layer, target)][1] @ weights[(layer, target)][0], 2.5 * b @ a)
    assert weights[(0, "k_proj")][1].abs().sum() == 0


def test_export_errors(library, tmp_path):
    with pytest.raises(CompositionError, match="nothing to export"):
        export_peft(library, Composition(), tmp_path / "x")
    with pytest.raises(UnknownModuleError, match="unknown module 'zz'"):
        export_peft(library, Composition(("zz",), (1.0,), "explicit"), tmp_path / "x")
    export_peft(library, Composition(("m0",), (1.0,), "explicit"), tmp_path / "x")
    with pytest.raises(LibraryError, match="already exists"):
        export_peft(library, Composition(("m1",), (1.0,), "explicit"), tmp_path / "x")
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["r"] == library.modules["m0"].rank == 4

"""Round trips, the fingerprint, in-memory construction and random libraries."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from router.errors import LibraryError, UnknownModuleError
from router.library import (
    TARGETS, ControllerSettings, ModuleInfo, ModuleLibrary, TaskInfo, fingerprint_from_hf_config, random_library,
)


def assert_same_library(a: ModuleLibrary, b: ModuleLibrary) -> None:
    assert a.backbone == b.backbone
    assert a.modules == b.modules and list(a.modules) == list(b.modules)
    assert a.tasks == b.tasks and list(a.tasks) == list(b.tasks)
    assert a.controller.settings == b.controller.settings
    assert torch.equal(a.controller.logits, b.controller.logits)
    for name in a.modules:
        wa, wb = a.module_weights(name), b.module_weights(name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key][0], wb[key][0]) and torch.equal(wa[key][1], wb[key][1])


def test_fingerprint_of_tiny_llama(fingerprint):
    assert fingerprint.architecture == "LlamaForCausalLM"
    assert (fingerprint.hidden_size, fingerprint.num_layers) == (64, 2)
    assert fingerprint.target_shapes == {
        "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64),
    }


def test_fingerprint_uses_explicit_head_dim(tiny_llama):
    config = AutoConfig.from_pretrained(tiny_llama)
    config.head_dim = 32  # 4 heads of 32 on a width of 64, as Qwen3 and Gemma allow
    shapes = fingerprint_from_hf_config(config).target_shapes
    assert shapes["q_proj"] == (64, 128) and shapes["k_proj"] == (64, 64) and shapes["o_proj"] == (128, 64)


def test_check_compatible_names_the_difference(fingerprint, tiny_llama):
    config = AutoConfig.from_pretrained(tiny_llama)
    config.intermediate_size = 96
    with pytest.raises(LibraryError, match=r"gate_proj is \[64 -> 128\].*\[64, 96\]"):
        fingerprint.check_compatible(fingerprint_from_hf_config(config))
    config.num_hidden_layers = 3
    with pytest.raises(LibraryError, match="num_layers=2.*num_layers=3"):
        fingerprint.check_compatible(fingerprint_from_hf_config(config))
    fingerprint.check_compatible(fingerprint_from_hf_config(AutoConfig.from_pretrained(tiny_llama)))


def test_write_load_round_trip(library, written, fingerprint):
    assert sorted(p.name for p in written.iterdir()) == ["controller.safetensors", "library.json", "modules.safetensors"]
    meta = json.loads((written / "library.json").read_text())
    assert meta["format"] == "tessera-library" and meta["version"] == 1
    assert meta["controller"] == {"type": "task-gates", "top_k": 2, "threshold": 0.0, "temperature": 1.0, "renormalize": True}
    loaded = ModuleLibrary.load(written, expect=fingerprint)
    assert_same_library(library, loaded)
    assert loaded.controller.gates_for_task("reverse") == library.controller.gates_for_task("reverse")


def test_module_weights_are_fp32_cpu_in_peft_layout(library, fingerprint):
    weights = library.module_weights("m1")
    assert set(weights) == {(layer, t) for layer in range(2) for t in TARGETS}
    a, b = weights[(1, "down_proj")]
    assert a.shape == (8, 128) and b.shape == (64, 8)
    assert a.dtype == b.dtype == torch.float32 and a.device.type == "cpu"
    assert b.abs().sum() > 0, "random modules must change outputs"
    assert library.modules["m1"].scale == 16.0 / 8


def test_module_weights_of_unknown_module(library):
    with pytest.raises(UnknownModuleError, match="unknown module 'nope'; known: m0, m1, m2, m3"):
        library.module_weights("nope")


def test_random_library_options(fingerprint):
    lib = random_library(fingerprint, num_modules=2, tasks=("a", "b"), rank=(2, 6), alpha=4, seed=3,
                         targets=("q_proj", "down_proj"), settings=ControllerSettings(top_k=1))
    assert [m.rank for m in lib.modules.values()] == [2, 6]
    assert lib.modules["m1"].targets == ("q_proj", "down_proj") and lib.modules["m1"].scale == 4 / 6
    assert lib.controller.logits.shape == (2, 2) and lib.controller.gates_for_task("b").k == 1
    again = random_library(fingerprint, num_modules=2, tasks=("a", "b"), rank=(2, 6), alpha=4, seed=3,
                           targets=("q_proj", "down_proj"))
    assert torch.equal(lib.module_weights("m1")[(0, "q_proj")][0], again.module_weights("m1")[(0, "q_proj")][0])
    with pytest.raises(ValueError, match="3 ranks given for 2 modules"):
        random_library(fingerprint, num_modules=2, rank=(2, 4, 8))


def _one_module(fingerprint, rank=2, b_shape=None):
    info = ModuleInfo("solo", rank, 4.0, "one layer", ("v_proj",), (1,))
    a = torch.randn(rank, 64)  # [rank, in]
    b = torch.randn(*(b_shape or (32, rank)))  # [out, rank]
    return info, {(1, "v_proj"): (a, b)}


def test_build_checks_tensors(fingerprint):
    info, weights = _one_module(fingerprint)
    lib = ModuleLibrary.build(fingerprint, {"solo": (info, weights)}, [TaskInfo("t")], torch.zeros(1, 1))
    assert lib.module_weights("solo")[(1, "v_proj")][1].shape == (32, 2)
    weights[(1, "v_proj")][1].fill_(7.0)
    assert not torch.equal(lib.module_weights("solo")[(1, "v_proj")][1], weights[(1, "v_proj")][1]), "library aliased"
    info, weights = _one_module(fingerprint, b_shape=(64, 2))
    with pytest.raises(LibraryError, match=r"module solo, layer 1, target v_proj, lora_B: shape \[64, 2\], expected \[32, 2\]"):
        ModuleLibrary.build(fingerprint, {"solo": (info, weights)}, [TaskInfo("t")], torch.zeros(1, 1))
    with pytest.raises(LibraryError, match=r"controller task_gate_logits has shape \[2, 1\], expected .* \[1, 1\]"):
        ModuleLibrary.build(fingerprint, {"solo": _one_module(fingerprint)}, [TaskInfo("t")], torch.zeros(2, 1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a/b"}, "module name 'a/b' is invalid"),
        ({"name": "gpt:task"}, "module name 'gpt:task' is invalid"),
        ({"name": "x" * 65}, "is invalid"),
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"targets": ("q_proj", "lm_head")}, "unknown target 'lm_head'"),
        ({"targets": ("q_proj", "q_proj")}, "targets must be non-empty and distinct"),
        ({"layers": ()}, "layers must be non-empty"),
        ({"layers": (-1,)}, "layer indices must be integers >= 0"),
    ],
)
def test_module_info_rejects(kwargs, message):
    fields = {"name": "ok", "rank": 2, "alpha": 4.0, "targets": ("q_proj",), "layers": (0,)} | kwargs
    with pytest.raises(LibraryError, match=message):
        ModuleInfo(**fields)


def test_with_module_adds_a_column_and_round_trips(library, fingerprint, tmp_path):
    info, weights = _one_module(fingerprint)
    bigger = library.with_module(info, weights)
    assert list(bigger.modules) == ["m0", "m1", "m2", "m3", "solo"] and "solo" not in library.modules
    assert bigger.controller.logits.shape == (3, 5)
    assert torch.all(bigger.controller.logits[:, 4] == -10.0)
    assert bigger.controller.gates_for_task("reverse") == library.controller.gates_for_task("reverse")
    assert_same_library(bigger, ModuleLibrary.load(bigger.write(tmp_path / "big"), expect=fingerprint))
    with pytest.raises(LibraryError, match="module 'solo' already exists"):
        bigger.with_module(info, weights)
    back = bigger.without_module("solo")
    assert list(back.modules) == list(library.modules) and "solo" not in back.weights
    assert torch.equal(back.controller.logits, library.controller.logits)
    used = library.controller.gates_for_task("reverse").module_ids[0]
    with pytest.raises(LibraryError, match=f"module '{used}' is in the compositions of tasks \\['reverse'"):
        library.without_module(used)

"""Every way a library on disk can be invalid is a LibraryError that says where and what."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

from router.errors import LibraryError
from router.library import ModuleLibrary
from tests.router.helpers import edit_json, edit_tensors


def _module(meta, name):
    return next(m for m in meta["modules"] if m["name"] == name)


JSON_CASES = {
    "format": (lambda m: m.update(format="other"), "expected format 'tessera-library'"),
    "version": (lambda m: m.update(version=2), "unsupported version 2"),
    "rank mismatch": (
        lambda m: _module(m, "m1").update(rank=5),
        r"module m1, layer 0, target q_proj, lora_A: shape \[8, 64\], expected \[5, 64\] \[rank, in_features\]",
    ),
    "unknown target": (
        lambda m: _module(m, "m0")["targets"].append("lm_head"), "module m0: unknown target 'lm_head'"
    ),
    "target missing from the fingerprint": (
        lambda m: m["backbone"]["targets"].pop("up_proj"), "module m0: unknown target 'up_proj'; the backbone adapts"
    ),
    "fingerprint target outside TARGETS": (
        lambda m: m["backbone"]["targets"].update(lm_head=[64, 384]), "unknown target 'lm_head'"
    ),
    "layer out of range": (
        lambda m: _module(m, "m2")["layers"].append(2), "module m2: layer 2 out of range; the backbone has 2 layers"
    ),
    "undeclared target": (lambda m: m["targets"].remove("o_proj"), "target o_proj is not in library.json's targets"),
    "bad module name": (lambda m: _module(m, "m3").update(name="../m3"), r"module name '\.\./m3' is invalid"),
    "bad task name": (lambda m: m["tasks"][0].update(name="a:b"), "task name 'a:b' is invalid"),
    "duplicate module": (lambda m: m["modules"].append(dict(m["modules"][0])), "module 'm0' is declared more than once"),
    "malformed module": (lambda m: m["modules"][0].pop("rank"), "malformed module entry"),
    "malformed task": (lambda m: m["tasks"].append("loose"), "malformed task entry"),
    "malformed backbone": (lambda m: m["backbone"].pop("hidden_size"), "malformed backbone fingerprint"),
    "controller type": (lambda m: m["controller"].update(type="text-router"), "controller type 'text-router' is not supported"),
    "controller top_k": (lambda m: m["controller"].update(top_k=0), "controller settings out of range"),
    "controller temperature": (lambda m: m["controller"].update(temperature=-1.0), "controller settings out of range"),
    "controller unknown setting": (lambda m: m["controller"].update(top_p=0.5), r"unknown controller settings \['top_p'\]"),
    "task added without a controller row": (
        lambda m: m["tasks"].append({"name": "extra"}), r"has shape \[3, 4\], expected \[num_tasks, num_modules\] = \[4, 4\]"
    ),
}


@pytest.mark.parametrize("case", JSON_CASES)
def test_invalid_library_json(written, case):
    change, message = JSON_CASES[case]
    edit_json(written, change)
    with pytest.raises(LibraryError, match=message):
        ModuleLibrary.load(written)


def test_malformed_json_file(written):
    (written / "library.json").write_text("{not json")
    with pytest.raises(LibraryError, match="library.json is not valid JSON"):
        ModuleLibrary.load(written)


def _set(key, make):
    return lambda tensors: tensors.__setitem__(key, make(tensors[key]))


TENSOR_CASES = {
    "B shape": (
        _set("m0.layers.1.v_proj.lora_B", lambda t: torch.zeros(33, 4)),
        r"module m0, layer 1, target v_proj, lora_B: shape \[33, 4\], expected \[32, 4\] \[out_features, rank\]",
    ),
    "A in_features": (
        _set("m3.layers.0.down_proj.lora_A", lambda t: torch.zeros(2, 64)),
        r"module m3, layer 0, target down_proj, lora_A: shape \[2, 64\], expected \[2, 128\]",
    ),
    "NaN": (
        _set("m2.layers.1.gate_proj.lora_A", lambda t: t.index_fill(1, torch.tensor([3]), float("nan"))),
        "module m2, layer 1, target gate_proj, lora_A: contains NaN or Inf",
    ),
    "Inf": (
        _set("m1.layers.0.k_proj.lora_B", lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))),
        "module m1, layer 0, target k_proj, lora_B: contains NaN or Inf",
    ),
    "integer dtype": (
        _set("m0.layers.0.q_proj.lora_A", lambda t: t.to(torch.int32)),
        "module m0, layer 0, target q_proj, lora_A: expected a floating-point tensor",
    ),
    "missing": (
        lambda tensors: tensors.pop("m2.layers.1.up_proj.lora_B"),
        "module m2, layer 1, target up_proj: tensor m2.layers.1.up_proj.lora_B is missing",
    ),
    "extra": (
        lambda tensors: tensors.__setitem__("m9.layers.0.q_proj.lora_A", torch.zeros(2, 64)),
        r"tensors no module declares: \['m9.layers.0.q_proj.lora_A'\]",
    ),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_invalid_module_tensors(written, case):
    change, message = TENSOR_CASES[case]
    edit_tensors(written, "modules.safetensors", change)
    with pytest.raises(LibraryError, match=message):
        ModuleLibrary.load(written)


CONTROLLER_CASES = {
    "shape": (_set("task_gate_logits", lambda t: torch.zeros(3, 5)), r"shape \[3, 5\], expected \[num_tasks, num_modules\] = \[3, 4\]"),
    "NaN": (_set("task_gate_logits", lambda t: t.index_fill(1, torch.tensor([2]), float("nan"))), "contains NaN or Inf"),
    "extra tensor": (lambda t: t.__setitem__("embedding", torch.zeros(2)), "must hold exactly task_gate_logits"),
}


@pytest.mark.parametrize("case", CONTROLLER_CASES)
def test_invalid_controller(written, case):
    change, message = CONTROLLER_CASES[case]
    edit_tensors(written, "controller.safetensors", change)
    with pytest.raises(LibraryError, match=message):
        ModuleLibrary.load(written)


def test_not_safetensors(written):
    (written / "modules.safetensors").write_bytes(b"\x80\x04pickle, not safetensors")
    with pytest.raises(LibraryError, match="modules.safetensors: not a readable safetensors file"):
        ModuleLibrary.load(written)


def test_missing_file(written):
    (written / "controller.safetensors").unlink()
    with pytest.raises(LibraryError, match="controller.safetensors is missing"):
        ModuleLibrary.load(written)


def test_symlink_escaping_the_root(written, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(written / "modules.safetensors", outside)
    os.symlink(outside, written / "modules.safetensors")
    with pytest.raises(LibraryError, match="outside the library root"):
        ModuleLibrary.load(written)


def test_symlink_inside_the_root_is_followed(written, fingerprint):
    (written / "data").mkdir()
    shutil.move(written / "modules.safetensors", written / "data" / "modules.safetensors")
    os.symlink("data/modules.safetensors", written / "modules.safetensors")
    assert list(ModuleLibrary.load(written, expect=fingerprint).modules) == ["m0", "m1", "m2", "m3"]


def test_library_root_through_a_symlink(written, tmp_path, fingerprint):
    os.symlink(written, tmp_path / "alias")
    assert list(ModuleLibrary.load(tmp_path / "alias", expect=fingerprint).tasks) == ["reverse", "uppercase", "summarize"]


def test_expected_backbone_must_match(written, fingerprint):
    other = dataclasses.replace(fingerprint, architecture="Qwen3ForCausalLM")
    with pytest.raises(LibraryError, match="architecture='LlamaForCausalLM'.*architecture='Qwen3ForCausalLM'"):
        ModuleLibrary.load(written, expect=other)
    smaller = dataclasses.replace(fingerprint, targets=tuple((n, i, o // 2) for n, i, o in fingerprint.targets))
    with pytest.raises(LibraryError, match=r"library target q_proj is \[64 -> 64\], the backbone's is \[64, 32\]"):
        ModuleLibrary.load(written, expect=smaller)


def test_not_a_directory(tmp_path):
    with pytest.raises(LibraryError, match="is not a directory"):
        ModuleLibrary.load(tmp_path / "absent")

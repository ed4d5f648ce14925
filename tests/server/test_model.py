"""The backbone against transformers' own implementation, through the paged KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.model.forward_context import forward_context
from server.model.loader import BackboneConfig, load_backbone
from server.model.tiny import TinyConfig, write_checkpoint
from tests.server.helpers import PagedSequences, assert_edited_checkpoints_fail


def _hf_logits(model_dir: str, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # [len(ids), vocab]


def _step(backbone, paged, chunks, modules=None) -> torch.Tensor:
    meta = paged.metadata(chunks, modules)
    with forward_context(meta):
        hidden = backbone(meta.input_ids[: meta.num_tokens], meta.positions[: meta.num_tokens])
        return backbone.compute_logits(hidden)  # [num_tokens, vocab]


@pytest.mark.parametrize(
    "architecture,overrides",
    [("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"tie_word_embeddings": True}),
     ("mixtral", {}), ("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}),
     ("qwen2_moe", {"norm_topk_prob": False})],
)
def test_prefill_then_decode_matches_transformers(tiny_checkpoints, architecture, overrides):
    model_dir = tiny_checkpoints(architecture, **overrides)
    ids = [5, 17, 42, 99, 7, 256, 300, 12, 64, 3, 88]
    expected = _hf_logits(model_dir, ids)
    backbone = load_backbone(model_dir, BackboneConfig(dtype="float32"))
    paged = PagedSequences(backbone)
    prefill = _step(backbone, paged, [(0, ids[:7])])
    torch.testing.assert_close(prefill, expected[:7], atol=1e-4, rtol=1e-4)
    for t in range(7, len(ids)):
        decoded = _step(backbone, paged, [(0, [ids[t]])])
        torch.testing.assert_close(decoded[0], expected[t], atol=1e-4, rtol=1e-4)


def test_mixed_batch_chunked_prefill_and_decode(tiny_checkpoints):
    model_dir = tiny_checkpoints("qwen3")
    a = [9, 8, 7, 6, 5, 4, 3, 2, 100, 101]
    b = [50, 60, 70, 80, 90, 110, 120, 130, 140]
    expected_a, expected_b = _hf_logits(model_dir, a), _hf_logits(model_dir, b)
    backbone = load_backbone(model_dir, BackboneConfig(dtype="float32"))
    paged = PagedSequences(backbone)
    _step(backbone, paged, [(0, a[:6])])
    out = _step(backbone, paged, [(0, [a[6]]), (1, b[:5])])
    torch.testing.assert_close(out[0], expected_a[6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1:6], expected_b[:5], atol=1e-4, rtol=1e-4)
    out = _step(backbone, paged, [(1, b[5:]), (0, a[7:])])
    torch.testing.assert_close(out[:4], expected_b[5:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[4:], expected_a[7:], atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_loads(tmp_path):
    model_dir = write_checkpoint(tmp_path, TinyConfig(architecture="qwen2"), max_shard_size="100KB")
    assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    ids = [1, 2, 3, 40, 50, 60]
    backbone = load_backbone(str(model_dir), BackboneConfig(dtype="float32"))
    out = _step(backbone, PagedSequences(backbone), [(0, ids)])
    torch.testing.assert_close(out, _hf_logits(str(model_dir), ids), atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_named(tmp_path, tiny_llama):
    import json
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
        load_backbone(str(tmp_path / "m"))


@pytest.mark.parametrize("method", ["awq", "fp8", "bitsandbytes"])
def test_a_quantized_checkpoint_is_refused_with_what_to_do(tmp_path, tiny_llama, method):
    import json
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"the checkpoint is quantized \(quantization_config: {method}\), and Tessera "
                                         r"serves unquantized weights only; serve the model's bfloat16 or float16 "
                                         r"checkpoint, or deploy the library on vLLM"):
        load_backbone(str(tmp_path / "m"))


def test_missing_and_misshaped_tensors_are_named(tmp_path, tiny_llama):
    assert_edited_checkpoints_fail(tiny_llama, tmp_path, [
        ("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing.*layers\.1\.mlp\.gate_up_proj"),
        ("shape", lambda t: t.update({"model.norm.weight": torch.ones(3)}), r"model\.norm\.weight has shape \[3\]"),
        ("extra", lambda t: t.update({"model.layers.0.foo.weight": torch.ones(3)}), "does not use"),
    ])


@pytest.mark.parametrize(
    "device,dtype",
    [("cpu", "bfloat16"), ("cpu", "float16"),
     pytest.param("cuda", "bfloat16", marks=pytest.mark.gpu), pytest.param("cuda", "float16", marks=pytest.mark.gpu)],
)
def test_half_precision_tracks_fp32_transformers(tiny_checkpoints, device, dtype):
    """bf16/fp16 weights and activations (fp32 accumulation where the kernels do it) stay near fp32 logits;
    on CUDA this runs the Triton attention path, prefill then decode."""
    model_dir = tiny_checkpoints("qwen3")
    ids = [5, 17, 42, 99, 7, 256, 300, 12, 64, 3, 88]
    expected = _hf_logits(model_dir, ids)
    backbone = load_backbone(model_dir, BackboneConfig(dtype=dtype, device=device))
    paged = PagedSequences(backbone)
    out = [_step(backbone, paged, [(0, ids[:7])])]
    out += [_step(backbone, paged, [(0, [ids[t]])]) for t in range(7, len(ids))]
    logits = torch.cat(out).float().cpu()  # [len(ids), vocab]
    assert {p.dtype for p in backbone.parameters()} == {getattr(torch, dtype)}
    scale = expected.abs().max()
    assert (logits - expected).abs().max() < 0.03 * scale, f"{dtype}: {(logits - expected).abs().max()} vs {scale}"

"""What `bench_engine` runs on: a random Llama backbone built in memory, a word-level tokenizer that covers
its vocabulary, random rank-r modules, and the three systems over them (Tessera's engine, transformers,
PEFT), all without a download or a checkpoint on disk.

Tessera and transformers get the same weights (the engine's backbone is copied from the transformers
model's state dict), and PEFT gets the same modules (each exported with `router.peft_io.export_peft`, the
exact stacked-LoRA export), so every system computes the same function.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from router.composition import Composition
from router.fingerprint import BackboneFingerprint
from router.info import ModuleInfo, TaskInfo
from router.library import ModuleLibrary
from router.peft_io import export_peft
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import StepStats
from server.engine.setup import assemble_parts
from server.model.loader import BackboneConfig, backbone_from_state_dict

logger = logging.getLogger(__name__)

PAD_ID = 0
"""Token id 0 is the pad token; prompts never contain it. The models have no EOS token at all."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama backbone's shape (a Qwen3-MoE one with `num_experts`); its weights are random (transformers' own
    initialisation)."""

    name: str
    """Preset name, also the served model name."""
    hidden_size: int
    """Model width."""
    intermediate_size: int
    """MLP width."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA)."""
    vocab_size: int
    """Vocabulary size (the tokenizer covers every id)."""
    max_position_embeddings: int
    """Context length."""
    rope_theta: float
    """RoPE base."""
    initializer_range: float
    """Std of the random weights; also the std of the random modules' B."""
    num_experts: int = 0
    """Experts of a Qwen3-MoE sparse MLP in every layer (intermediate_size is then one expert's width); 0: a dense
    Llama MLP. Modules adapt the attention projections only there."""
    experts_per_token: int = 0
    """Experts each token is routed to."""
    head_dim: int | None = None
    """Per-head width when it is not hidden_size / num_heads (Qwen3-MoE's 128)."""


SHAPES = {
    "llama3-8b": ModelShape("llama3-8b", 4096, 14336, 32, 32, 8, 128256, 8192, 500000.0, 0.02),
    "small": ModelShape("small", 512, 1408, 8, 8, 4, 2048, 4096, 10000.0, 0.05),  # for CPU runs
    "tiny": ModelShape("tiny", 64, 128, 2, 4, 2, 512, 512, 10000.0, 0.2),
    # Qwen3-30B-A3B's layer (128 experts of 768, top 8, 32 heads of 128, 4 KV heads) in 12 of its 48 layers: 7.6 B
    # parameters, so transformers' copy and Tessera's fit one 80 GB GPU together
    "qwen3-30b-a3b-12l": ModelShape("qwen3-30b-a3b-12l", 2048, 768, 12, 32, 4, 151936, 8192, 1000000.0, 0.02,
                                    num_experts=128, experts_per_token=8, head_dim=128),
    "tiny-moe": ModelShape("tiny-moe", 64, 32, 2, 4, 2, 512, 512, 10000.0, 0.2, num_experts=8, experts_per_token=2),
}


def hf_config(shape: ModelShape):
    """A transformers LlamaConfig of `shape` (Qwen3MoeConfig with experts), with a pad token and no BOS/EOS."""
    from transformers import LlamaConfig, Qwen3MoeConfig

    if shape.num_experts:
        return Qwen3MoeConfig(
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=4 * shape.hidden_size,
            moe_intermediate_size=shape.intermediate_size, num_experts=shape.num_experts,
            num_experts_per_tok=shape.experts_per_token, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim or shape.hidden_size // shape.num_heads,
            max_position_embeddings=shape.max_position_embeddings, rope_theta=shape.rope_theta, rms_norm_eps=1e-6,
            initializer_range=shape.initializer_range, tie_word_embeddings=False, bos_token_id=None,
            eos_token_id=None, pad_token_id=PAD_ID, architectures=["Qwen3MoeForCausalLM"],
        )
    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        initializer_range=shape.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=PAD_ID,
        architectures=["LlamaForCausalLM"],
    )


def random_hf_model(shape: ModelShape, dtype: torch.dtype, device: str, seed: int):
    """A transformers LlamaForCausalLM with random weights, initialised directly on `device`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model.requires_grad_(False).eval()


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with one word per id: "<pad>" for 0, then "w1", "w2", ...

    The engine only detokenizes outputs, so a tokenizer that covers every id is all it needs.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>")


def _random_module(info: ModuleInfo, backbone: BackboneFingerprint, gen: torch.Generator, b_std: float) -> dict:
    """(layer, target) -> (A, B) of one module, drawn on the generator's device in one tensor, then moved
    to the CPU at once (the library keeps fp32 CPU copies). A has std 1/sqrt(in_features), B std `b_std`."""
    sizes = []
    for target in info.targets:
        in_features, out_features = backbone.shape(target)
        sizes += [info.rank * in_features, out_features * info.rank]
    flat = torch.randn(len(info.layers) * sum(sizes), generator=gen, device=gen.device).cpu()  # [all values]
    weights, offset = {}, 0
    for layer in info.layers:
        for target in info.targets:
            in_features, out_features = backbone.shape(target)
            a = flat[offset : offset + info.rank * in_features].view(info.rank, in_features)  # [rank, in]
            offset += a.numel()
            b = flat[offset : offset + out_features * info.rank].view(out_features, info.rank)  # [out, rank]
            offset += b.numel()
            weights[(layer, target)] = (a.mul_(in_features**-0.5), b.mul_(b_std))
    return weights


def random_modules(
    backbone: BackboneFingerprint, num_modules: int, rank: int, b_std: float, seed: int, device: str
) -> ModuleLibrary:
    """Modules m0, m1, ... of rank `rank` (alpha = rank, so scale 1) on every target of every layer (all seven; the
    four attention projections of a mixture of experts).

    `router.library.random_library` draws on the CPU one tensor at a time; 64 modules of Llama-3-8B
    (2.7 G values) take minutes that way, so this draws on `device`.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = tuple(range(backbone.num_layers))
    modules = {}
    for index in range(num_modules):
        info = ModuleInfo(f"m{index}", rank, float(rank), "random, untrained (bench_engine)", backbone.target_names,
                          layers)
        modules[info.name] = (info, _random_module(info, backbone, gen, b_std))
    task = TaskInfo("bench", "unused: every benchmark request names its modules")
    return ModuleLibrary.build(backbone, modules, [task], torch.zeros(1, num_modules))


def random_model_and_modules(shape: ModelShape, dtype: str, device: str, seed: int, num_modules: int,
                             rank: int) -> tuple:
    """(`random_hf_model`, a library of `num_modules` `random_modules` of `rank` over it, or None for 0)."""
    hf_model = random_hf_model(shape, getattr(torch, dtype), device, seed)
    if not num_modules:
        return hf_model, None
    from router.library import fingerprint_from_hf_config

    fingerprint = fingerprint_from_hf_config(hf_model.config)
    return hf_model, random_modules(fingerprint, num_modules, rank, shape.initializer_range, seed, device)


@dataclass(frozen=True)
class EngineSettings:
    """How the benchmark configures Tessera's engine."""

    block_size: int
    """Tokens per KV-cache block."""
    max_num_seqs: int
    """Requests running at once at most (the largest batch, so a whole batch runs together)."""
    max_num_batched_tokens: int
    """Tokens per step at most; prompts beyond it are prefilled in chunks."""
    num_kv_blocks: int
    """KV blocks: exactly what the largest workload needs, so nothing is preempted."""
    max_slots: int
    """Module pool slots (every module of the library stays resident)."""
    max_rank: int
    """Largest module rank the pool holds."""
    max_k: int
    """Modules per request at most."""
    cuda_graphs: str = "auto"
    """EngineConfig.cuda_graphs: decode steps from CUDA graphs (auto, on CUDA), eager (off) or padded."""
    async_scheduling: str = "auto"
    """EngineConfig.async_scheduling: plan and launch step N+1 while N runs (auto: on CUDA), on, or off."""
    enable_prefix_caching: bool = True
    """EngineConfig.enable_prefix_caching."""
    module_wait_steps: int = 32
    """EngineConfig.module_wait_steps (0: requests waiting for module slots hold up the queue)."""
    speculative_config: str | None = None
    """EngineConfig.speculative_config (n-gram drafts; predictions are drafted without it)."""
    stream_interval: int = 1
    """EngineConfig.stream_interval: tokens a request gathers before its reader is woken."""


def tessera_engine(
    hf_model, tokenizer, library: ModuleLibrary | None, settings: EngineSettings, dtype: str,
    observer: Callable[[StepStats], None],
) -> Engine:
    """Tessera's engine on a copy of `hf_model`'s weights (built in memory, no checkpoint on disk)."""
    device = str(hf_model.device)
    build = BackboneConfig(dtype, device, settings.max_slots, settings.max_rank)
    backbone = backbone_from_state_dict(hf_model.config, hf_model.state_dict(), build)
    config = EngineConfig(
        model=f"random-{hf_model.config.num_hidden_layers}-layer-{hf_model.config.model_type}",
        dtype=dtype,
        device=device,
        block_size=settings.block_size,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        num_kv_blocks=settings.num_kv_blocks,
        max_loaded_modules=settings.max_slots,
        max_rank=settings.max_rank,
        max_k=settings.max_k,
        cuda_graphs=settings.cuda_graphs,
        async_scheduling=settings.async_scheduling,
        enable_prefix_caching=settings.enable_prefix_caching,
        module_wait_steps=settings.module_wait_steps,
        speculative_config=settings.speculative_config,
        stream_interval=settings.stream_interval,
    )
    parts = assemble_parts(config, backbone, tokenizer, library, eos_ids=set())
    return Engine(config, step_observer=observer, parts=parts)


def peft_model(hf_model, library: ModuleLibrary, module_ids: Sequence[str]):
    """`hf_model` wrapped in a PeftModel with one adapter per module id, named after it.

    Each module is exported as a PEFT LoRA directory (scale folded into B, lora_alpha = r) and loaded
    back; adapters keep the backbone's dtype (autocast_adapter_dtype=False), as Tessera's pool does.
    Note: PEFT injects its LoRA layers into `hf_model` itself.
    """
    from peft import PeftModel

    model = None
    with tempfile.TemporaryDirectory(prefix="bench-engine-peft-") as tmp:
        for name in module_ids:
            path = str(export_peft(library, Composition((name,), (1.0,), "explicit"), Path(tmp) / name))
            if model is None:
                model = PeftModel.from_pretrained(hf_model, path, adapter_name=name, autocast_adapter_dtype=False)
            else:
                model.load_adapter(path, adapter_name=name, autocast_adapter_dtype=False)
    if model is None:
        raise ValueError("peft_model needs at least one module id")
    return model.eval()

"""Tiny real checkpoints: a byte-level BPE tokenizer with a chat template and small random backbones.

Tests and the offline demo use these instead of a hub download. They are written the way Hugging Face
writes real models (`config.json`, safetensors, `tokenizer.json`, `tokenizer_config.json`), so they load
through exactly the code path of a real model directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
THINKING_CHAT_TEMPLATE = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and message.reasoning_content is defined and message.reasoning_content %}"
    "{% set content = '<think>\n' + message.reasoning_content + '\n</think>\n\n' + content %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}{% endif %}"
)
"""A reasoning model's template (as Qwen3-2507's thinking models and DeepSeek-R1 write theirs): the assistant
turn opens a `<think>` block, or writes an empty one when `enable_thinking` is false; an earlier assistant turn's
`reasoning_content` is rendered in its own block."""
MISTRAL_TOOL_TOKENS = ("[TOOL_CALLS]", "[ARGS]")
"""Special tokens of Mistral's tokenizers that its tool calls are written with (`mistral_chat_template`)."""


def mistral_chat_template(version: str) -> str:
    """A ChatML template whose assistant turns write their tool calls as Mistral's templates do: v3
    `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`, v11 `[TOOL_CALLS]NAME[ARGS]{...}` per call."""
    if version == "v11":
        calls = ("{% for call in message.tool_calls %}{{ '[TOOL_CALLS]' + call.function.name + '[ARGS]' }}"
                 "{{ call.function.arguments | tojson }}{% endfor %}")
    elif version == "v3":
        calls = ("{{ '[TOOL_CALLS]' }}{{ message.tool_calls | map(attribute='function') | list | tojson }}")
    else:
        raise ValueError(f"mistral tool-call format must be v3 or v11, got {version!r}")
    return ("{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
            "{% if message.tool_calls is defined and message.tool_calls %}" + calls + "{% endif %}"
            "{{ '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


THINK_TOKENS = ("<think>", "</think>")
TOOL_TOKENS = ("<tool_call>", "</tool_call>")
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' \" # @ $ % & _ < > | ~ `",
    "reverse uppercase sort count caesar shift add the letters of this string",
    "user assistant system task input output answer",
]


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of a tiny backbone; defaults give about 0.3M parameters."""

    architecture: str = "llama"
    """One of llama, mistral, qwen2, qwen3, and the mixtures of experts mixtral, qwen2_moe and qwen3_moe."""
    hidden_size: int = 64
    """Model width."""
    intermediate_size: int = 128
    """MLP width."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """KV heads (GQA when fewer than query heads)."""
    max_position_embeddings: int = 512
    """Context length."""
    initializer_range: float = 0.2
    """Std of the random weights; large enough that greedy decoding has no near-ties."""
    tie_word_embeddings: bool = False
    """Share the embedding and LM head (Qwen's small models do)."""
    thinking: bool = False
    """A reasoning model's tokenizer: `<think>` and `</think>` are tokens (not special ones, as in Qwen3) and the
    chat template is `THINKING_CHAT_TEMPLATE`."""
    tool_tokens: bool = False
    """`<tool_call>` and `</tool_call>` are tokens (not special ones), as in Qwen's tokenizers."""
    mistral_tools: str | None = None
    """v3 or v11: `[TOOL_CALLS]` and `[ARGS]` are special tokens, as in Mistral's tokenizers, and the chat template
    writes calls in that version's format (`mistral_chat_template`)."""
    num_experts: int = 4
    """Experts per layer of the mixtures of experts (each of intermediate_size // 2; qwen2_moe's shared expert is
    intermediate_size wide)."""
    num_experts_per_tok: int = 2
    """Experts each token is routed to (mixtral, qwen2_moe, qwen3_moe)."""
    norm_topk_prob: bool = True
    """qwen2_moe, qwen3_moe: renormalise the top-k routing weights (Qwen3-30B-A3B does, Qwen2-MoE does not; Mixtral
    always does)."""
    seed: int = 0
    """Seed of the random weights."""


def write_tokenizer(path: str | Path, vocab_size: int = 384, thinking: bool = False, tool_tokens: bool = False,
                    mistral_tools: str | None = None) -> None:
    """Train a byte-level BPE tokenizer on a fixed corpus and save it with a ChatML chat template (with
    `thinking`, the think tokens after the trained vocabulary and `THINKING_CHAT_TEMPLATE`; with `tool_tokens`, the
    tool-call tokens after those; with `mistral_tools`, Mistral's as special tokens and its template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    added = (THINK_TOKENS if thinking else ()) + (TOOL_TOKENS if tool_tokens else ())
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|eos|>", *(MISTRAL_TOOL_TOKENS if mistral_tools else ())],
    )
    fast.chat_template = (mistral_chat_template(mistral_tools) if mistral_tools else
                          THINKING_CHAT_TEMPLATE if thinking else CHAT_TEMPLATE)
    fast.save_pretrained(str(path))


def _hf_config(cfg: TinyConfig, vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import (LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                              Qwen3MoeConfig)

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig}
    if cfg.architecture not in classes:
        raise ValueError(f"unknown tiny architecture {cfg.architecture!r}; choose from {sorted(classes)}")
    extra = {"head_dim": cfg.hidden_size // cfg.num_attention_heads}
    intermediate = cfg.intermediate_size
    if cfg.architecture in ("mistral", "mixtral"):
        extra["sliding_window"] = None
    if cfg.architecture == "mixtral":
        intermediate = cfg.intermediate_size // 2
        extra |= {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok}
    if cfg.architecture == "qwen2_moe":
        extra |= {"shared_expert_intermediate_size": cfg.intermediate_size}
    if cfg.architecture in ("qwen2_moe", "qwen3_moe"):
        extra |= {"num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
                  "moe_intermediate_size": cfg.intermediate_size // 2, "norm_topk_prob": cfg.norm_topk_prob,
                  "decoder_sparse_step": 1, "mlp_only_layers": []}
    return classes[cfg.architecture](
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        **extra,
    )


def write_checkpoint(path: str | Path, cfg: TinyConfig = TinyConfig(), max_shard_size: str | None = None) -> Path:
    """Write tokenizer, `config.json` and random safetensors weights of a tiny backbone to `path`.

    `max_shard_size` (for example "200KB") writes a sharded checkpoint with an index file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path, thinking=cfg.thinking, tool_tokens=cfg.tool_tokens, mistral_tools=cfg.mistral_tools)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = _hf_config(
        cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return path

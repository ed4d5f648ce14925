"""The Llama architecture family (Llama 2/3, Mistral, Mixtral, Qwen2/2.5, Qwen2-MoE, Qwen3, Qwen3-MoE) over a paged
KV cache.

One implementation covers the family; the differences are switches read from the Hugging Face config:
bias on q/k/v (Qwen2, Qwen2-MoE), per-head RMSNorm on q and k before rotary (Qwen3, Qwen3-MoE), a sliding
attention window (Mistral, Mixtral), a sparse mixture of experts in place of the MLP (Mixtral, Qwen2-MoE,
Qwen3-MoE: modules adapt the attention projections there, the experts stay frozen), tied embeddings, and the
RoPE variant. q/k/v and gate/up are fused into one adapted linear each, so a step runs one GEMM (and one
composed_lora launch) per fused projection. The elementwise work between them is one launch each: the residual
add fused into the next RMSNorm (layers carry the residual stream, as vLLM's do), q and k rotated together in
place, and silu(gate) * up from the fused gate_up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tessera_kernels.fused_moe import fused_moe, route
from tessera_kernels.paged_attention import paged_attention, write_kv
from tessera_kernels.silu_mul import silu_mul
from server.model.forward_context import get_forward_context
from server.model.layers import AdaptedLinear, RMSNorm, RotaryEmbedding

ARCHITECTURES = {
    "LlamaForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "MixtralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen2MoeForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": False, "qk_norm": True},
    "Qwen3MoeForCausalLM": {"qkv_bias": False, "qk_norm": True},
}
SLIDING_WINDOW_ARCHITECTURES = ("MistralForCausalLM", "MixtralForCausalLM")
"""Those whose config's sliding_window always applies; the others (Qwen) only with use_sliding_window."""


@dataclass(frozen=True)
class MoeShape:
    """A sparse mixture-of-experts MLP, as its config gives it."""

    experts: int
    top_k: int
    width: int
    """Intermediate width of one routed expert."""
    renormalize: bool
    """Divide a token's top-k routing weights by their sum."""
    shared_width: int = 0
    """Intermediate width of Qwen2-MoE's shared expert (every token, scaled by a sigmoid gate); 0 for none."""


def moe_shape(hf_config) -> MoeShape | None:
    """The sparse MLP of a mixture-of-experts config (Mixtral, Qwen2-MoE, Qwen3-MoE), or None for a dense one.
    Checked: every decoder layer must be sparse, as in every released model of these families."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "mixtral":
        shape = MoeShape(hf_config.num_local_experts, hf_config.num_experts_per_tok, hf_config.intermediate_size, True)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        dense = list(getattr(hf_config, "mlp_only_layers", None) or [])
        step = getattr(hf_config, "decoder_sparse_step", 1)
        if dense or step != 1:
            raise ValueError(f"{model_type} configs with dense layers (mlp_only_layers {dense}, decoder_sparse_step "
                             f"{step}) are not supported: Tessera serves the released layout, a sparse MLP in every "
                             f"layer (mlp_only_layers [], decoder_sparse_step 1)")
        shape = MoeShape(hf_config.num_experts, hf_config.num_experts_per_tok, hf_config.moe_intermediate_size,
                         bool(getattr(hf_config, "norm_topk_prob", False)),
                         getattr(hf_config, "shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0)
    else:
        return None
    if not 1 <= shape.top_k <= shape.experts or shape.width < 1:
        raise ValueError(f"mixture-of-experts config needs 1 <= num_experts_per_tok <= experts and an intermediate size "
                         f">= 1, got {shape.top_k} of {shape.experts} experts of width {shape.width}")
    return shape


@dataclass(frozen=True)
class ArchSpec:
    """The shape of one backbone, read from its Hugging Face config."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    num_experts: int = 0
    """Experts of every layer's sparse MLP; 0 for a dense MLP."""
    experts_per_token: int = 0
    """Experts each token is routed to (top_k)."""
    expert_intermediate_size: int = 0
    """Intermediate width of one expert's SwiGLU MLP."""
    renormalize_routing: bool = False
    """Divide a token's top-k routing weights by their sum (Mixtral always; Qwen's norm_topk_prob)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE's shared expert: a SwiGLU MLP of this width that every token runs, scaled by a sigmoid gate."""

    @classmethod
    def from_hf_config(cls, hf_config) -> "ArchSpec":
        names = list(getattr(hf_config, "architectures", None) or [])
        known = [n for n in names if n in ARCHITECTURES]
        if not known:
            raise ValueError(
                f"unsupported architecture {names or hf_config.model_type!r}; "
                f"supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        quantized = getattr(hf_config, "quantization_config", None)
        if quantized:
            method = (quantized.get("quant_method") if isinstance(quantized, dict)
                      else getattr(quantized, "quant_method", None)) or "unknown"
            raise ValueError(
                f"the checkpoint is quantized (quantization_config: {method}), and Tessera serves unquantized weights "
                f"only; serve the model's bfloat16 or float16 checkpoint, or deploy the library on vLLM, which serves "
                f"quantized models (`tessera library export-vllm`)"
            )
        switches = ARCHITECTURES[known[0]]
        heads = hf_config.num_attention_heads
        window = getattr(hf_config, "sliding_window", None)
        if known[0] not in SLIDING_WINDOW_ARCHITECTURES and not getattr(hf_config, "use_sliding_window", False):
            window = None
        moe = moe_shape(hf_config) or MoeShape(0, 0, 0, False)
        return cls(
            architecture=known[0],
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            vocab_size=hf_config.vocab_size,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            qkv_bias=switches["qkv_bias"] or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=switches["qk_norm"],
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            sliding_window=window,
            num_experts=moe.experts,
            experts_per_token=moe.top_k,
            expert_intermediate_size=moe.width,
            renormalize_routing=moe.renormalize,
            shared_expert_intermediate_size=moe.shared_width,
        )


@dataclass(frozen=True)
class LayerBuild:
    """What every layer is built with besides the architecture."""

    dtype: torch.dtype
    device: torch.device
    max_slots: int
    max_rank: int

    def linear(self, in_features: int, targets: tuple[str, ...], widths: tuple[int, ...], bias=False):
        return AdaptedLinear(
            in_features, targets, widths, bias, self.max_slots, self.max_rank, self.dtype, self.device
        )


class Attention(nn.Module):
    def __init__(self, spec: ArchSpec, build: LayerBuild, rotary: RotaryEmbedding):
        super().__init__()
        self.spec = spec
        self.rotary = rotary
        q_width, kv_width = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = build.linear(
            spec.hidden_size, ("q_proj", "k_proj", "v_proj"), (q_width, kv_width, kv_width), spec.qkv_bias
        )
        self.o_proj = build.linear(q_width, ("o_proj",), (spec.hidden_size,))
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, build.dtype, build.device)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, build.dtype, build.device)
        self.scale = spec.head_dim**-0.5
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.slice_widths, dim=-1)
        q = q.view(num_tokens, spec.num_heads, spec.head_dim)  # [num_tokens, heads, head_dim]
        k = k.view(num_tokens, spec.num_kv_heads, spec.head_dim)  # [num_tokens, kv_heads, head_dim]
        v = v.view(num_tokens, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        self.rotary(q, k, positions)  # in place
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound: call Backbone.bind_kv_cache before the forward pass")
        ctx = get_forward_context()
        k_cache, v_cache = self.kv_cache
        write_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        out = torch.empty_like(q)  # [num_tokens, heads, head_dim]
        paged_attention(out, q, k_cache, v_cache, ctx.attention(), self.scale, spec.sliding_window)
        return self.o_proj(out.view(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, spec: ArchSpec, build: LayerBuild, width: int | None = None):
        super().__init__()
        width = spec.intermediate_size if width is None else width
        self.gate_up_proj = build.linear(spec.hidden_size, ("gate_proj", "up_proj"), (width, width))
        self.down_proj = build.linear(width, ("down_proj",), (spec.hidden_size,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class SparseMoe(nn.Module):
    """A sparse mixture of SwiGLU experts (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks each token's top-k experts
    and weights, `tessera_kernels.fused_moe` runs them; Qwen2-MoE adds a shared expert every token runs, scaled by
    sigmoid(x . shared_expert_gate). Parameters are named as transformers names them in memory (`gate.weight`,
    `experts.gate_up_proj`, `experts.down_proj`, `shared_expert.*`, `shared_expert_gate.weight`); frozen, never
    adapted."""

    def __init__(self, spec: ArchSpec, build: LayerBuild):
        super().__init__()
        self.spec = spec
        experts, width, hidden = spec.num_experts, spec.expert_intermediate_size, spec.hidden_size
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(torch.empty(experts, hidden, dtype=build.dtype, device=build.device),
                                        requires_grad=False)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(
            torch.empty(experts, 2 * width, hidden, dtype=build.dtype, device=build.device), requires_grad=False)
        self.experts.down_proj = nn.Parameter(
            torch.empty(experts, hidden, width, dtype=build.dtype, device=build.device), requires_grad=False)
        self.shared_expert = None
        if spec.shared_expert_intermediate_size:
            frozen = LayerBuild(build.dtype, build.device, max_slots=0, max_rank=0)  # no module pool slots
            self.shared_expert = MLP(spec, frozen, spec.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Module()
            self.shared_expert_gate.weight = nn.Parameter(
                torch.empty(1, hidden, dtype=build.dtype, device=build.device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.gate.weight.T  # [num_tokens, experts], x's dtype (transformers' router linear)
        weights, ids = route(logits, self.spec.experts_per_token, self.spec.renormalize_routing)
        out = fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        if self.shared_expert is not None:  # transformers' order: routed + sigmoid(gate) * shared
            out = out + torch.sigmoid(x @ self.shared_expert_gate.weight.T) * self.shared_expert(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, spec: ArchSpec, build: LayerBuild, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, build.dtype, build.device)
        self.self_attn = Attention(spec, build, rotary)
        self.post_attention_layernorm = RMSNorm(
            spec.hidden_size, spec.rms_norm_eps, build.dtype, build.device
        )
        self.mlp = SparseMoe(spec, build) if spec.num_experts else MLP(spec, build)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); the next norm adds the two.

        HF's `h = r + attn(norm(r)); h + mlp(norm(h))` with each add fused into the norm after it: the
        first layer gets residual None (x is the embedding), every later one the previous layer's pair.
        """
        if residual is None:
            hidden, residual = self.input_layernorm(x), x
        else:
            hidden, residual = self.input_layernorm(x, residual)
        hidden = self.self_attn(hidden, positions)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

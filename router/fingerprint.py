"""What a library records of the backbone it was made for, and the check that a backbone fits."""

from __future__ import annotations

from dataclasses import dataclass

from router.errors import LibraryError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers a module may adapt, in every decoder layer."""
ATTENTION_TARGETS = TARGETS[:4]
"""The targets of a backbone whose MLP is a mixture of experts (`has_sparse_mlp`): its experts stay frozen."""


def has_sparse_mlp(hf_config) -> bool:
    """Whether the decoder layers' MLP is a sparse mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE), which has no
    single gate_proj, up_proj or down_proj to adapt."""
    return bool(getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None))


@dataclass(frozen=True)
class BackboneFingerprint:
    """Architecture and shapes of a backbone: enough to check every module tensor against it."""

    architecture: str
    """Hugging Face architecture name, for example LlamaForCausalLM."""
    hidden_size: int
    """Model width."""
    num_layers: int
    """Decoder layers."""
    targets: tuple[tuple[str, int, int], ...]
    """(target, in_features, out_features) of every adaptable linear."""

    def shape(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of `target`."""
        for name, in_features, out_features in self.targets:
            if name == target:
                return in_features, out_features
        raise LibraryError(f"target {target!r} is not adaptable on this backbone; adaptable: {self.target_names}")

    @property
    def target_names(self) -> tuple[str, ...]:
        """Adaptable targets, in fingerprint order."""
        return tuple(name for name, _, _ in self.targets)

    @property
    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """target -> (in_features, out_features)."""
        return {name: (i, o) for name, i, o in self.targets}

    def to_json(self) -> dict:
        """The `backbone` object of library.json."""
        return {
            "architecture": self.architecture,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "targets": {name: [i, o] for name, i, o in self.targets},
        }

    @classmethod
    def from_json(cls, data: dict) -> "BackboneFingerprint":
        """Parse and check the `backbone` object of library.json."""
        try:
            targets = tuple((str(name), int(io[0]), int(io[1])) for name, io in data["targets"].items())
            fingerprint = cls(str(data["architecture"]), int(data["hidden_size"]), int(data["num_layers"]), targets)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise LibraryError(f"library.json: malformed backbone fingerprint ({error!r})") from error
        fingerprint.check()
        return fingerprint

    def check(self) -> None:
        """Raise LibraryError unless every size is positive and every target is one of TARGETS."""
        if self.hidden_size < 1 or self.num_layers < 1:
            raise LibraryError(f"backbone fingerprint: hidden_size and num_layers must be >= 1, got {self}")
        for name, in_features, out_features in self.targets:
            if name not in TARGETS:
                raise LibraryError(f"backbone fingerprint: unknown target {name!r}; targets are {TARGETS}")
            if in_features < 1 or out_features < 1:
                raise LibraryError(f"backbone fingerprint: target {name} has shape [{in_features} -> {out_features}]")
        if len(set(self.target_names)) != len(self.targets):
            raise LibraryError(f"backbone fingerprint: repeated target in {self.target_names}")

    def check_compatible(self, backbone: "BackboneFingerprint") -> None:
        """Raise LibraryError naming the first difference between this library's backbone and `backbone`."""
        for field in ("architecture", "hidden_size", "num_layers"):
            ours, theirs = getattr(self, field), getattr(backbone, field)
            if ours != theirs:
                raise LibraryError(f"library was made for {field}={ours!r}, the backbone has {field}={theirs!r}")
        theirs = {name: (i, o) for name, i, o in backbone.targets}
        for name, in_features, out_features in self.targets:
            if theirs.get(name) != (in_features, out_features):
                raise LibraryError(
                    f"library target {name} is [{in_features} -> {out_features}], "
                    f"the backbone's is {list(theirs[name]) if name in theirs else 'absent'}"
                )


def fingerprint_from_hf_config(hf_config) -> BackboneFingerprint:
    """The fingerprint of a Hugging Face Llama-family config (attention targets only where the MLP is sparse)."""
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    sparse = has_sparse_mlp(hf_config)
    inter = hf_config.intermediate_size
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    architecture = (getattr(hf_config, "architectures", None) or [hf_config.model_type])[0]
    targets = ATTENTION_TARGETS if sparse else TARGETS
    return BackboneFingerprint(
        architecture, hidden, hf_config.num_hidden_layers, tuple((t, *shapes[t]) for t in targets)
    )

"""The trainable module bank, installed on a frozen Hugging Face backbone with forward hooks.

An insertion point is a (layer index, target) pair; target names are router.fingerprint.TARGETS, which
Llama, Mistral, Qwen2 and Qwen3 all use for `model.layers[i].self_attn.{q,k,v,o}_proj` and
`model.layers[i].mlp.{gate,up,down}_proj` (router.peft_io.PARENT). At point p with modules J_p present,
the hook adds to the linear's output, for every batch row b:

    delta[b] = ig_p * sum_{j in J_p} gate[b, j] * (alpha_j / r_j) * B_j (A_j x[b])
    ig_p = sigmoid(insertion_logit_p)                      (1 when insertion gates are off)

computed as one low-rank product over the concatenated ranks of J_p: u = x A_p^T [.., R_p], then
(u * w[b]) B_p^T with w[b, c] = gate[b, module(c)] * scale(c) * keep(c) per rank column c. So the
N module outputs are never materialised, and a gate's gradient is <dL/d(u w), u> on its columns.

New modules start with A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's kaiming-uniform bound) and B = 0, so
the installed bank equals the backbone until it is trained. Module, gate and controller parameters are
float32; the delta is cast to the backbone's dtype.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from router.fingerprint import BackboneFingerprint
from router.peft_io import PARENT

logger = logging.getLogger(__name__)

Point = tuple[int, str]
"""An insertion point: (decoder layer index, target name)."""


@dataclass(frozen=True)
class ModuleSpec:
    """One module of the bank."""

    name: str
    """Module id in the exported library."""
    rank: int
    """r: A is [r, in], B is [out, r]."""
    alpha: float
    """The update is (alpha / r) * B A."""
    points: tuple[Point, ...]
    """Insertion points it adapts."""


def target_linear(model: nn.Module, point: Point) -> nn.Linear:
    """The nn.Linear of a Llama-family HF causal LM at `point`."""
    layer, target = point
    layers = model.get_decoder().layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"insertion point {point}: layer out of range; the model has {len(layers)} layers")
    linear = getattr(getattr(layers[layer], PARENT[target], None), target, None)
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f"insertion point {point}: model.layers[{layer}].{PARENT[target]}.{target} is not an nn.Linear "
            f"(found {type(linear).__name__}); supported are Llama, Mistral, Qwen2 and Qwen3 layouts"
        )
    return linear


@dataclass(frozen=True)
class Dropout:
    """Dropout on the modules' input x (TrainConfig.module_dropout; PEFT's lora_dropout): each element of x is
    zeroed with probability p on the modules' branch and the rest scaled by 1 / (1 - p).

    The mask of a batch row at a point is a function of (the row's seed, the point) alone: drawn from a generator
    seeded with (row_seed * 1_000_003 + point) mod 2^63, over the row's real positions (right padding gets none; its outputs
    are never read). So a step's masks do not depend on how its rows are cut into micro-batch passes or padded,
    and an activation-checkpointed layer's rerun draws the masks its first run drew."""

    p: float
    row_seeds: tuple[int, ...]
    """One per batch row (TrainConfig.seed, step, the row's place in the step's batch and which forward)."""
    lengths: tuple[int, ...]
    """Real (unpadded) length of each row."""

    def apply(self, x: torch.Tensor, point: int) -> torch.Tensor:
        """x [batch, seq, in] with the rows' masks at `point`."""
        keep = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        for row, (seed, length) in enumerate(zip(self.row_seeds, self.lengths)):
            gen = torch.Generator(device=x.device).manual_seed((seed * 1_000_003 + point) % (1 << 63))
            keep[row, :length] = torch.rand((length, x.shape[-1]), generator=gen, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


class PointAdapter(nn.Module):
    """The stacked low-rank factors of every module present at one insertion point."""

    def __init__(self, point: Point, specs: list[ModuleSpec], in_features: int, out_features: int, gate_init: float):
        super().__init__()
        self.point = point
        present = [(j, s) for j, s in enumerate(specs) if point in s.points]
        total_rank = sum(s.rank for _, s in present)
        self.a = nn.Parameter(torch.zeros(total_rank, in_features))  # [R_p, in]
        self.b = nn.Parameter(torch.zeros(out_features, total_rank))  # [out, R_p]
        logit = torch.logit(torch.tensor(gate_init, dtype=torch.float64)).float()
        self.gate_logit = nn.Parameter(logit.reshape(()))  # []
        columns = [j for j, s in present for _ in range(s.rank)]
        scales = [s.alpha / s.rank for _, s in present for _ in range(s.rank)]
        self.register_buffer("col_module", torch.tensor(columns, dtype=torch.long))  # [R_p]
        self.register_buffer("col_scale", torch.tensor(scales, dtype=torch.float32))  # [R_p]
        self.register_buffer("col_keep", torch.ones(total_rank))  # [R_p], 0 on pruned columns
        self.offsets = {}
        start = 0
        for j, spec in present:
            self.offsets[j] = (start, start + spec.rank)
            start += spec.rank
        self.use_gate = True

    def insertion_gate(self) -> torch.Tensor:
        """ig_p, a scalar: sigmoid of the logit, or 1 when insertion gates are off."""
        return torch.sigmoid(self.gate_logit) if self.use_gate else torch.ones((), device=self.a.device)

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta [batch, seq, out] in x's dtype, u [batch, seq, R_p]) for x [batch, seq, in], gates [batch, N]."""
        u = x.to(self.a.dtype) @ self.a.t()  # [batch, seq, R_p]
        weights = gates[:, self.col_module] * (self.col_scale * self.col_keep) * self.insertion_gate()  # [batch, R_p]
        delta = (u * weights[:, None, :]) @ self.b.t()  # [batch, seq, out]
        return delta.to(x.dtype), u


class ModuleBank(nn.Module):
    """N modules over a set of insertion points; install() hooks them into a backbone."""

    def __init__(self, specs: list[ModuleSpec], backbone: BackboneFingerprint, gate_init: float):
        super().__init__()
        self.specs = list(specs)
        points = sorted({p for s in specs for p in s.points}, key=lambda p: (p[0], backbone.target_names.index(p[1])))
        self.adapters = nn.ModuleList(
            PointAdapter(p, self.specs, *backbone.shape(p[1]), gate_init) for p in points
        )
        self._handles: list = []
        self._gates: torch.Tensor | None = None
        self._token_mask: torch.Tensor | None = None
        self._on_point = None
        self._dropout: Dropout | None = None

    @property
    def num_modules(self) -> int:
        return len(self.specs)

    @property
    def points(self) -> list[Point]:
        return [adapter.point for adapter in self.adapters]

    def init_new(self, seed: int) -> None:
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) from a seeded generator, B = 0, for every adapter."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for adapter in self.adapters:
                bound = adapter.a.shape[1] ** -0.5
                adapter.a.copy_((torch.rand(adapter.a.shape, generator=gen) * 2 - 1) * bound)
                adapter.b.zero_()

    def module_parameters(self) -> list[nn.Parameter]:
        """A and B of every adapter."""
        return [p for adapter in self.adapters for p in (adapter.a, adapter.b)]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The insertion-gate logits, one per point."""
        return [adapter.gate_logit for adapter in self.adapters]

    def insertion_gates(self) -> torch.Tensor:
        """ig_p of every point, [num_points]."""
        return torch.stack([adapter.insertion_gate() for adapter in self.adapters])

    def set_insertion_gates(self, enabled: bool) -> None:
        """Turn insertion gates on (trainable, folded into B at export) or off (fixed at 1, frozen)."""
        for adapter in self.adapters:
            adapter.use_gate = enabled
            adapter.gate_logit.requires_grad_(enabled)

    def freeze_modules(self) -> None:
        """Stop gradients to every A and B (controller-only training)."""
        for parameter in self.module_parameters():
            parameter.requires_grad_(False)

    def pair(self, module: int, point: Point) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (A [r, in], B [out, r]) of one module at one point it adapts."""
        adapter = self.adapters[self.points.index(point)]
        start, end = adapter.offsets[module]
        return adapter.a[start:end], adapter.b[:, start:end]

    def load_pair(self, module: int, point: Point, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy one module's (A [r, in], B [out, r]) at `point` into the bank."""
        own_a, own_b = self.pair(module, point)
        if own_a.shape != a.shape or own_b.shape != b.shape:
            raise ValueError(f"module {self.specs[module].name} at {point}: got A {list(a.shape)}, "
                             f"B {list(b.shape)}, the bank holds {list(own_a.shape)}, {list(own_b.shape)}")
        with torch.no_grad():
            own_a.copy_(a)
            own_b.copy_(b)

    def install(self, model: nn.Module) -> None:
        """Hook every adapter into the matching nn.Linear of `model`."""
        if self._handles:
            raise RuntimeError("the module bank is already installed")
        for index, adapter in enumerate(self.adapters):
            linear = target_linear(model, adapter.point)
            expected = (adapter.a.shape[1], adapter.b.shape[0])
            if (linear.in_features, linear.out_features) != expected:
                raise ValueError(f"insertion point {adapter.point}: linear is "
                                 f"[{linear.in_features} -> {linear.out_features}], the bank expects {list(expected)}")
            self._handles.append(linear.register_forward_hook(self._hook(index)))

    def uninstall(self) -> None:
        """Remove every hook; the model is the plain backbone again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        adapter = self.adapters[index]

        def hook(_linear: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._gates is None:
                raise RuntimeError("module bank forward outside `with bank.gating(gates):`; no gates are set")
            x = inputs[0] if self._dropout is None else self._dropout.apply(inputs[0], index)
            delta, u = adapter(x, self._gates)
            if self._on_point is not None:
                tokens = u.reshape(-1, u.shape[-1]) if self._token_mask is None else u[self._token_mask]
                self._on_point(adapter, tokens)
            return output + delta

        return hook

    def checkpoint_layers(self, model: nn.Module) -> None:
        """Activation checkpointing for the decoder layers of `model` (TrainConfig.gradient_checkpointing).

        Each layer's forward keeps only its inputs (torch.utils.checkpoint, non-reentrant) and is run again
        when the backward pass needs its activations. The rerun happens after `gating` has exited, and maybe
        while another forward's gating is set (the alignment loss runs two forwards with different gates in
        one backward). So every layer call records the gating it ran with (gates, token mask, `on_point`), and
        its rerun runs under the same: the same ops, as the checkpoint requires. What `on_point` sees in a rerun
        goes to a pass whose loss was taken already, so it counts nothing twice.
        """
        from torch.utils.checkpoint import checkpoint

        def rerun_as_now():
            return contextlib.nullcontext(), self._restored(self._state())

        for layer in model.get_decoder().layers:
            forward = layer.forward

            def checkpointed(*args, _forward=forward, **kwargs):
                if not torch.is_grad_enabled():
                    return _forward(*args, **kwargs)
                return checkpoint(_forward, *args, use_reentrant=False, context_fn=rerun_as_now, **kwargs)

            layer.forward = checkpointed

    def _state(self) -> tuple:
        return self._gates, self._token_mask, self._on_point, self._dropout

    @contextlib.contextmanager
    def _restored(self, state: tuple):
        previous = self._state()
        self._gates, self._token_mask, self._on_point, self._dropout = state
        try:
            yield
        finally:
            self._gates, self._token_mask, self._on_point, self._dropout = previous

    @contextlib.contextmanager
    def gating(self, gates: torch.Tensor, token_mask: torch.Tensor | None = None, on_point=None,
               dropout: "Dropout | None" = None):
        """Run forwards with per-row module gates [batch, num_modules].

        `on_point(adapter, u)`, if given, sees every point's u [tokens, R_p] restricted to `token_mask`
        [batch, seq] (bool) - how the decoupling loss reads module outputs without a second pass. `dropout`, if
        given, drops elements of every module's input (the modules' branch only; the backbone sees x whole).
        """
        if gates.dim() != 2 or gates.shape[1] != self.num_modules:
            raise ValueError(f"gates must be [batch, {self.num_modules}], got {list(gates.shape)}")
        if dropout is not None and len(dropout.row_seeds) != gates.shape[0]:
            raise ValueError(f"dropout has {len(dropout.row_seeds)} row seeds for {gates.shape[0]} rows")
        with self._restored((gates, token_mask, on_point, dropout)):
            yield

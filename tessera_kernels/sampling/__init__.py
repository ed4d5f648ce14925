"""race_sample: one token per row of a batch, drawn by a seeded exponential race, or greedy.

Semantics:
    For every row s, with p = probs[s] (non-negative, need not sum to 1) and the row's seed seeds[s]:

        greedy[s]:      out[s] = argmax_v p[v]
        otherwise:      out[s] = argmax_v p[v] / E_v        E_v = -log(U_v),  U_v = uniform(seeds[s], v)

    Ties go to the lowest index, as torch.argmax. U_v is a counter-based draw: a pure function of
    (seeds[s], v) on one backend, in (0, 1) (23 bits: U = (2k + 1) * 2**-24, k < 2**23), so E_v is an
    Exp(1) variable and p[v] / E_v wins with probability p[v] / sum(p) (the exponential race: the winner
    of independent Exp(p_v) clocks E_v / p_v is v with probability p_v / sum p). Tokens with p[v] == 0
    (masked by top-k / top-p) score 0 and never win while any p is positive. A greedy row may hold any
    real scores (the engine passes its raw logits there); its seed is not read.

    The contract is distribution + determinism, not bits: the same (probs row, seed) gives the same token
    on the same backend whatever the other rows and the batch size; the backends draw different bits:
        reference (CPU path): U from splitmix64 of (seed, v): the v-th output of a splitmix64 stream
                              started at `seed` (`reference.splitmix64`), top 23 bits;
        triton (CUDA path):   U from Philox-4x32-10 (`tl.randint`) keyed by the seed, counter v, top 23
                              bits; one launch for the batch, no host sync.

Shape:
    probs:  [S, V] fp32, last dim contiguous (row stride free)
    seeds:  [S] int64 (any value; the engine passes `draw_seed(request seed, position)`, 63 bits)
    greedy: [S] bool
    out:    [S] int64, new tensor on probs' device (static shape, static grid: CUDA-graph safe)
"""

from __future__ import annotations

import torch

from tessera_kernels import use_triton

__all__ = ["race_sample"]


def _check(probs: torch.Tensor, seeds: torch.Tensor, greedy: torch.Tensor) -> None:
    """Shape, dtype and device checks on host metadata only (no device sync)."""
    if probs.dim() != 2 or probs.dtype != torch.float32:
        raise ValueError(f"race_sample takes probs [S, V] float32, got {list(probs.shape)} {probs.dtype}")
    if probs.shape[1] == 0:
        raise ValueError("race_sample needs a vocabulary of at least one token, got V = 0")
    rows = probs.shape[0]
    if seeds.shape != (rows,) or seeds.dtype != torch.int64:
        raise ValueError(
            f"seeds must be int64 [{rows}] (one per row of probs), got {list(seeds.shape)} {seeds.dtype}"
        )
    if greedy.shape != (rows,) or greedy.dtype != torch.bool:
        raise ValueError(
            f"greedy must be bool [{rows}] (one per row of probs), got {list(greedy.shape)} {greedy.dtype}"
        )
    if seeds.device != probs.device or greedy.device != probs.device:
        raise ValueError(
            f"probs, seeds and greedy must share a device, got {probs.device}, {seeds.device}, {greedy.device}"
        )


def race_sample(probs: torch.Tensor, seeds: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """One token id per row of `probs`: int64 [S] (see the module docstring)."""
    _check(probs, seeds, greedy)
    if use_triton(probs):
        from tessera_kernels.sampling import triton as backend
    else:
        from tessera_kernels.sampling import reference as backend
    return backend.race_sample(probs, seeds, greedy)

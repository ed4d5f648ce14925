"""Plain-torch race_sample: the oracle for the contract's distribution and the engine's CPU path.

The uniforms come from splitmix64 written on int64 tensors (two's-complement wrap-around, logical
shifts by masking): U_v is the top 23 bits of the v-th output of the splitmix64 stream that starts at
the row's seed, so a row's draw depends on nothing but (its probs, its seed).
"""

from __future__ import annotations

import torch

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
_CHUNK_TOKENS = 1 << 22


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Output number `counters + 1` of the splitmix64 stream started at each seed, as int64 bits.

    seeds [S] int64 and counters [V] int64 broadcast to [S, V]."""
    x = seeds[:, None] + (counters[None, :] + 1) * _signed(_GOLDEN)  # [S, V], wraps mod 2**64
    x = (x ^ _shr(x, 30)) * _signed(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed(_MIX2)
    return x ^ _shr(x, 31)


def splitmix64_int(seed: int, counter: int) -> int:
    """The same function on Python ints (unsigned result): the spec `splitmix64` is tested against."""
    x = (seed + _GOLDEN * (counter + 1)) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def uniforms(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """U [S, vocab] fp32 in (0, 1): (2k + 1) * 2**-24 with k the top 23 bits of splitmix64(seed, v)."""
    counters = torch.arange(vocab, dtype=torch.int64, device=seeds.device)  # [V]
    top = _shr(splitmix64(seeds, counters), 41)  # [S, V], k < 2**23
    return (2 * top + 1).to(torch.float32) * 2.0**-24  # exact in fp32: 2k + 1 < 2**24


def _race_rows(probs: torch.Tensor, seeds: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    race = -torch.log(uniforms(seeds, probs.shape[1]))  # [rows, V] fp32, Exp(1)
    scores = torch.where(greedy[:, None], probs, probs / race)  # [rows, V]
    return scores.argmax(dim=-1)


def race_sample(probs: torch.Tensor, seeds: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """argmax of p / E per row (E = -log U), or of p on greedy rows; int64 [S].

    Rows go in chunks of about 4M tokens, so the int64 temporaries of the hash stay near 32 MB each
    (a batch of 256 Llama-3 rows would otherwise hold several 260 MB ones)."""
    step = max(1, _CHUNK_TOKENS // probs.shape[1])
    chunks = [
        _race_rows(probs[i : i + step], seeds[i : i + step], greedy[i : i + step]) for i in range(0, len(probs), step)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64, device=probs.device)

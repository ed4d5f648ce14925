"""race_sample, both backends, against its distribution + determinism contract: chi-square of the draws
over many seeds against probs (with a check that the threshold rejects wrong races), same seeds -> same
tokens whatever the other rows, the batch size and the tile, greedy rows, masked tokens, vocabularies
that are not powers of two and span several blocks. On CPU the Triton kernel runs in Triton's
interpreter (tests/kernels/conftest.py); the `gpu` cases use the Llama-3 vocabulary and a CUDA graph."""

import os

import pytest
import torch

from tessera_kernels.sampling import race_sample, reference
from tessera_kernels.sampling import triton as backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = {"reference": reference.race_sample, "triton": backend.race_sample}

CHI2_CRITICAL_999 = {4: 18.467, 6: 22.458}
"""chi2.ppf(0.999, df) (scipy.stats): a correct sampler exceeds it on one seed set in a thousand."""
SKEWED = [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02, 0.0]
"""Seven kept tokens and one masked one (top-k = 7)."""


def _seeds(n: int, base: int) -> torch.Tensor:
    """n well-mixed non-negative int64 seeds, fixed by `base` (the shape of `draw_seed`'s values)."""
    return torch.tensor([reference.splitmix64_int(base, i) >> 1 for i in range(n)], dtype=torch.int64, device=DEVICE)


def _no_greedy(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.bool, device=DEVICE)


def _chi_square(tokens: torch.Tensor, probs_row: torch.Tensor) -> tuple[float, int]:
    """(Pearson's statistic over the kept tokens, degrees of freedom); asserts no masked token was drawn."""
    counts = torch.bincount(tokens.cpu(), minlength=probs_row.numel()).double()
    kept = probs_row.cpu() > 0
    assert counts[~kept].sum() == 0, f"drew masked tokens {torch.nonzero(counts * ~kept).flatten().tolist()}"
    expected = tokens.numel() * probs_row.cpu().double()[kept] / probs_row.cpu().double().sum()
    return float(((counts[kept] - expected) ** 2 / expected).sum()), int(kept.sum()) - 1


def _spread_row() -> torch.Tensor:
    """V = 300 (not a power of two, five 64-wide blocks), unnormalised weight on tokens in four blocks."""
    row = torch.zeros(300)
    row[[3, 70, 140, 200, 299]] = torch.tensor([0.9, 0.75, 0.6, 0.45, 0.3])  # sums to 3
    return row


CASES = {"skewed": (torch.tensor(SKEWED), None), "spread_blocks": (_spread_row(), (256, 64))}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(BACKENDS))
def test_draws_over_many_seeds_follow_probs(name, case):
    row, blocks = CASES[case]
    num_draws = 4000
    probs = row.to(DEVICE).expand(num_draws, -1).contiguous()  # [N, V]: one draw per seed
    extra = {"blocks": blocks} if name == "triton" and blocks else {}
    tokens = BACKENDS[name](probs, _seeds(num_draws, base=17), _no_greedy(num_draws), **extra)
    stat, df = _chi_square(tokens, row)
    assert stat < CHI2_CRITICAL_999[df], f"{name} {case}: chi-square {stat:.1f} over {df} dof"


def test_the_chi_square_threshold_rejects_wrong_races():
    """The statistic above, on races that are wrong in plausible ways, with the same uniforms."""
    num_draws, row = 4000, torch.tensor(SKEWED)
    probs = row.expand(num_draws, -1)  # [N, V]
    uniform = reference.uniforms(_seeds(num_draws, base=17).cpu(), row.numel())  # [N, V]
    wrong = {"p * U": probs * uniform, "p / U": probs / uniform, "uniform over kept": (probs > 0) * uniform,
             "p / E with p squared": probs**2 / -uniform.log()}
    for label, scores in wrong.items():
        stat, df = _chi_square(scores.argmax(dim=-1), row)
        assert stat > 2 * CHI2_CRITICAL_999[df], f"the test would pass the wrong race {label}: {stat:.1f}"
    right, df = _chi_square((probs / -uniform.log()).argmax(dim=-1), row)
    assert right < CHI2_CRITICAL_999[df]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_rows_token_depends_only_on_its_probs_and_seed(name):
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 1000, 37  # not a power of two; > one block when the tile is forced below
    probs = torch.softmax(torch.randn(rows, vocab, generator=gen) * 0.5, dim=-1).to(DEVICE)  # [37, 1000]
    seeds, greedy = _seeds(rows, base=3), _no_greedy(rows)
    sample = BACKENDS[name]
    tokens = sample(probs, seeds, greedy)
    assert torch.equal(sample(probs, seeds, greedy), tokens), "not deterministic"
    order = torch.randperm(rows, generator=gen).to(DEVICE)
    assert torch.equal(sample(probs[order], seeds[order], greedy[order]), tokens[order]), "depends on the row's place"
    assert torch.equal(sample(probs[5:9], seeds[5:9], greedy[5:9]), tokens[5:9]), "depends on the batch size"
    others = probs.clone()
    others[::2] = torch.softmax(torch.randn(others[::2].shape, generator=gen), dim=-1).to(DEVICE)
    assert torch.equal(sample(others, seeds, greedy)[1::2], tokens[1::2]), "depends on the other rows"
    if name == "triton":
        for blocks in ((1, 128), (8, 256), (64, 16)):
            assert torch.equal(backend.race_sample(probs, seeds, greedy, blocks=blocks), tokens), f"tile {blocks}"
    reseeded = sample(probs, _seeds(rows, base=4), greedy)
    assert (reseeded != tokens).sum() > rows * 0.8, "the seed barely matters"


@pytest.mark.parametrize("name", list(BACKENDS))
def test_greedy_rows_take_the_first_argmax_of_any_scores(name):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 700, generator=gen) * 4  # raw logits: negative values, not normalised
    logits[0, [130, 650]] = 50.0  # a tie across blocks: the lower index wins
    logits[1, :] = float("-inf")
    logits[1, 420] = -3.0
    logits[2, :] = 7.0  # all equal: index 0
    logits = logits.to(DEVICE)
    greedy = torch.tensor([True, True, True, True, False, True], device=DEVICE)
    expected = logits.argmax(dim=-1)
    assert expected[:3].tolist() == [130, 420, 0]
    extra = {"blocks": (2, 128)} if name == "triton" else {}
    for seeds in (_seeds(6, base=5), _seeds(6, base=6)):
        tokens = BACKENDS[name](logits, seeds, greedy, **extra)
        assert torch.equal(tokens[greedy], expected[greedy])


@pytest.mark.parametrize("name", list(BACKENDS))
def test_masked_tokens_are_never_drawn(name):
    """Top-k style rows (5 of 777 kept, one of them with a tiny weight) over many seeds."""
    gen = torch.Generator().manual_seed(2)
    rows, vocab = 512, 777
    probs = torch.zeros(rows, vocab)
    kept = torch.rand(rows, vocab, generator=gen).topk(5, dim=-1).indices  # [rows, 5] random supports
    weights = torch.tensor([0.5, 0.3, 0.2 - 1e-30, 1e-30, 1e-30])
    probs.scatter_(1, kept, weights.expand(rows, -1))
    probs = probs.to(DEVICE)
    extra = {"blocks": (64, 256)} if name == "triton" else {}
    tokens = BACKENDS[name](probs, _seeds(rows, base=8), _no_greedy(rows), **extra)
    assert bool((probs.gather(1, tokens[:, None]) > 0).all()), "drew a masked token"


def test_reference_chunks_rows_without_changing_tokens(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(9, 100, generator=gen), dim=-1)  # [9, 100]
    seeds, greedy = _seeds(9, base=11).cpu(), torch.zeros(9, dtype=torch.bool)
    whole = reference.race_sample(probs, seeds, greedy)
    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 250)  # chunks of 2 rows, the last one of 1
    assert torch.equal(reference.race_sample(probs, seeds, greedy), whole)


def test_reference_uniforms_are_splitmix64_bits():
    seeds = torch.tensor([0, 1, 123456789, (1 << 63) - 1, -(1 << 63)], dtype=torch.int64)
    bits = reference.splitmix64(seeds, torch.arange(50, dtype=torch.int64))  # [5, 50]
    for i, seed in enumerate(seeds.tolist()):
        expected = [reference.splitmix64_int(seed % (1 << 64), v) for v in range(50)]
        assert [b % (1 << 64) for b in bits[i].tolist()] == expected
    uniform = reference.uniforms(seeds, 50)
    assert bool(((uniform > 0) & (uniform < 1)).all())
    assert torch.equal(uniform, ((bits >> 41) % (1 << 23) * 2 + 1).float() * 2.0**-24)


def test_bad_inputs_are_named():
    probs, seeds, greedy = torch.rand(3, 10), torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"probs \[S, V\] float32, got \[3, 10\] torch.float16"):
        race_sample(probs.half(), seeds, greedy)
    with pytest.raises(ValueError, match="at least one token"):
        race_sample(probs[:, :0], seeds, greedy)
    with pytest.raises(ValueError, match=r"seeds must be int64 \[3\].*got \[2\] torch.int64"):
        race_sample(probs, seeds[:2], greedy)
    with pytest.raises(ValueError, match=r"seeds must be int64 \[3\].*torch.int32"):
        race_sample(probs, seeds.int(), greedy)
    with pytest.raises(ValueError, match=r"greedy must be bool \[3\]"):
        race_sample(probs, seeds, greedy.int())
    with pytest.raises(ValueError, match="powers of two"):
        backend.race_sample(probs, seeds, greedy, blocks=(3, 16))
    with pytest.raises(ValueError, match="rows contiguous"):
        backend.race_sample(probs.t().contiguous().t(), seeds, greedy)


def test_an_empty_batch_gives_an_empty_result():
    for sample in BACKENDS.values():
        out = sample(torch.rand(0, 10), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool))
        assert out.shape == (0,) and out.dtype == torch.int64


def test_interpreter_runs_on_cpu():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert type(backend._race_sample_kernel).__name__ == "InterpretedFunction"


def _llama_rows(rows: int, seed: int) -> torch.Tensor:
    """Softmax rows over the Llama-3 vocabulary (128256), each top-k masked to its 50 best tokens."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(rows, 128256, device="cuda", generator=gen) * 3  # [rows, 128256]
    kth = logits.topk(50, dim=-1).values[:, -1:]
    return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)


@pytest.mark.gpu
def test_llama_vocab_gpu_rows_are_independent_and_in_the_support():
    probs, seeds, greedy = _llama_rows(256, seed=0), _seeds(256, base=9), _no_greedy(256)
    greedy[::7] = True
    tokens = race_sample(probs, seeds, greedy)
    assert torch.equal(race_sample(probs, seeds, greedy), tokens)
    assert torch.equal(race_sample(probs[:32], seeds[:32], greedy[:32]), tokens[:32])
    assert torch.equal(race_sample(probs[200:], seeds[200:], greedy[200:]), tokens[200:])
    assert bool((probs.gather(1, tokens[:, None]) > 0).all())
    assert torch.equal(tokens[greedy], probs[greedy].argmax(dim=-1))


@pytest.mark.gpu
def test_race_sample_cuda_graph_replays_new_seeds_and_probs():
    probs, seeds, greedy = _llama_rows(32, seed=1), _seeds(32, base=10), _no_greedy(32)
    race_sample(probs, seeds, greedy)  # warm up: compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = race_sample(probs, seeds, greedy)
    for step in (2, 3):
        probs.copy_(_llama_rows(32, seed=step))
        seeds.copy_(_seeds(32, base=10 + step))
        graph.replay()
        assert torch.equal(out, backend.race_sample(probs, seeds, greedy))

"""The seeded draw of a decode step: the old per-row torch.Generator loop vs race_sample's one launch.

    python benchmarks/kernels/bench_sampling.py --out results/sampling.json

On the Llama-3 vocabulary (V = 128256), fp32 logits of S rows, every row sampled (temperature 0.8,
top-p 0.95, its own seed), for each S it times with bench_composed_lora's helpers
(`triton.testing.do_bench`: CUDA events, warm-up, median; `do_bench_cudagraph` where a graph can hold it):

    draw    given the filtered probs [S, V]:
              loop     per row: generator.manual_seed(draw_seed(...)), exponential_, p / E, argmax, store
                       (what server/engine/sampling.py ran before; a few launches a row; cannot be captured)
              race     tessera_kernels.sampling.race_sample, eager and CUDA-graph replay
    step    sample_on_device as a whole (filter: sort, softmax, cumsum; then the draw), loop vs race
    floor   S * V * 4 bytes (race_sample reads probs once) / copy bandwidth measured in this run

The events bracket the host work too, so the loop's launch overhead is in its numbers when the GPU waits.
It also checks that every race token lies in its row's top-p support and that a repeat gives the same tokens.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from benchmarks.kernels.bench_composed_lora import _copy_bandwidth, _time  # noqa: E402
from router.atomic import write_file  # noqa: E402
from server.engine.request import SamplingParams  # noqa: E402
from server.engine.sampling import _filter, draw_seed, sample_on_device  # noqa: E402

VOCAB = 128256
PARAMS = SamplingParams(temperature=0.8, top_p=0.95)


def _loop_draw(probs: torch.Tensor, generators: list[torch.Generator], seeds: list[int]) -> torch.Tensor:
    """The old draw: one generator per row, reseeded for this token, four launches a row."""
    chosen = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)  # [S]
    for row, generator in enumerate(generators):
        generator.manual_seed(seeds[row])
        race = torch.empty_like(probs[row]).exponential_(generator=generator)  # [V]
        chosen[row] = (probs[row] / race).argmax()
    return chosen


def _loop_step(logits: torch.Tensor, params: list[SamplingParams], generators, seeds: list[int]) -> torch.Tensor:
    """The old sample_on_device: the batched filter, then the per-row loop."""
    return _loop_draw(_filter(logits, params).softmax(dim=-1), generators, seeds)


def _bench(rows: int, bandwidth: float) -> dict:
    from tessera_kernels.sampling import triton as race

    gen = torch.Generator(device="cuda").manual_seed(rows)
    logits = torch.randn(rows, VOCAB, device="cuda", generator=gen) * 3  # [S, V] fp32
    params = [PARAMS] * rows
    seeds = [draw_seed(1000 + row, 17) for row in range(rows)]
    generators = [torch.Generator(device="cuda") for _ in range(rows)]
    probs = _filter(logits, params).softmax(dim=-1)  # [S, V]
    seeds_t = torch.tensor(seeds, dtype=torch.int64, device="cuda")  # [S]
    greedy = torch.zeros(rows, dtype=torch.bool, device="cuda")
    tokens = race.race_sample(probs, seeds_t, greedy)
    in_support = float((probs.gather(1, tokens[:, None]) > 0).float().mean())
    repeatable = bool(torch.equal(tokens, race.race_sample(probs, seeds_t, greedy)))
    return {
        "rows": rows, "vocab": VOCAB,
        "draw_loop_us": _time(lambda: _loop_draw(probs, generators, seeds), graph=False),
        "draw_race_us": _time(lambda: race.race_sample(probs, seeds_t, greedy), graph=False),
        "draw_race_graph_us": _time(lambda: race.race_sample(probs, seeds_t, greedy), graph=True),
        "step_loop_us": _time(lambda: _loop_step(logits, params, generators, seeds), graph=False),
        "step_race_us": _time(lambda: sample_on_device(logits, params, seeds), graph=False),
        "floor_us": 1e6 * rows * VOCAB * 4 / bandwidth,
        "race_tokens_in_support": in_support, "race_repeatable": repeatable,
    }


def _fmt(value: float | None) -> str:
    return f"{value:9.1f}" if value is not None else "      n/a"


def _print_row(row: dict) -> None:
    print(f"S {row['rows']:>4} | draw loop {_fmt(row['draw_loop_us'])} | race {_fmt(row['draw_race_us'])} "
          f"| race graph {_fmt(row['draw_race_graph_us'])} | floor {_fmt(row['floor_us'])} "
          f"| step loop {_fmt(row['step_loop_us'])} | step race {_fmt(row['step_race_us'])} (us) "
          f"| in support {row['race_tokens_in_support']:.3f} repeatable {row['race_repeatable']}", flush=True)


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/kernels/results/sampling.json", help="JSON results path")
    parser.add_argument("--rows", nargs="+", type=int, default=[32, 256], help="batch sizes S")
    args = parser.parse_args(argv)
    if any(r < 1 for r in args.rows):
        parser.error(f"--rows must be positive, got {args.rows}")
    return args


def main(argv=None) -> None:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampling needs a CUDA device (the draw is timed on the GPU); none is visible")
    bandwidth = _copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s  vocab {VOCAB}")
    rows = []
    for num_rows in args.rows:
        rows.append(_bench(num_rows, bandwidth))
        _print_row(rows[-1])
        torch.cuda.empty_cache()
    document = {"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bandwidth,
                "params": {"temperature": PARAMS.temperature, "top_p": PARAMS.top_p}, "rows": rows}
    write_file(args.out, json.dumps(document, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""What the CPU-or-GPU engine benchmarks that compare two engine settings in one run share: their model
flags, the timed batch, the check that both settings generated the same greedy tokens, and the way each
prints and writes its result (`bench_prefix`, `bench_module_slots`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from benchmarks.serving.bench_engine import _write_json
from benchmarks.serving.engine_models import SHAPES


def parser_with_model_flags(doc: str) -> argparse.ArgumentParser:
    """A parser with --config, --device and --dtype (see `model_dtype`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    return parser


def model_dtype(parser: argparse.ArgumentParser, args: argparse.Namespace, positive: tuple[str, ...]) -> str:
    """The run's dtype, after refusing a CUDA run without CUDA and any of the `positive` flags below 1."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu --config tiny or small)")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args.dtype or ("bfloat16" if args.device == "cuda" else "float32")


def timed_batch(engine, requests, device: str) -> tuple[dict, float, dict[str, list[int]]]:
    """(outputs by request, wall seconds, generated token ids by request) of one batch run to the end."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = engine.generate_batch(requests)
    seconds = time.perf_counter() - started
    return outputs, seconds, {r: [t for o in outs for t in o.token_ids] for r, outs in outputs.items()}


def differing(first: dict[str, list[int]], second: dict[str, list[int]], dtype: str, what: str) -> list[str]:
    """Requests whose greedy tokens differ between the two settings; in fp32 that is an error (in bf16 a
    near tie may flip with the batch's shape)."""
    different = [r for r in first if first[r] != second[r]]
    if different and dtype == "float32":
        raise RuntimeError(f"{what} changed the greedy tokens of {len(different)} requests: {different[:5]}")
    return different


def same_tokens_note(document: dict) -> str:
    count = document["requests_with_other_tokens"]
    return "same greedy tokens" if count == 0 else f"{count} requests differ"


def main(parse: Callable, run: Callable, table: Callable, argv: list[str] | None) -> dict:
    """Parse, run, write the JSON document to the settings' `out`, print the table; the document."""
    settings = parse(argv)
    document = run(settings)
    _write_json(settings.out, document)
    print(table(document))
    return document

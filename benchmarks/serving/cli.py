"""`tessera bench`: its flags, built from `BenchConfig`'s fields and docstrings, and its entry point.

A field `num_requests` is the flag `--num-requests`; a tuple field takes several values, space- or
comma-separated, and may be repeated (`--slo ttft=0.5 --slo tpot=0.05`, `--tasks a,b,c`, `--rate 1 2 4`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from benchmarks.serving.config import BenchConfig
from server.cli import field_docs


def _element_type(hint) -> tuple[type, bool]:
    """(the flag's value type, whether it takes a list) of a field's type hint."""
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    args = [t for t in typing.get_args(hint) if t is not type(None)]
    return (args[0] if args else hint), False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per BenchConfig field, its docstring as help."""
    docs = field_docs(BenchConfig)
    hints = typing.get_type_hints(BenchConfig)
    for field in dataclasses.fields(BenchConfig):
        kind, many = _element_type(hints[field.name])
        required = field.default is dataclasses.MISSING
        help_text = " ".join(docs.get(field.name, "").split()).replace("%", "%%")
        if not required and field.default not in (None, ()):
            help_text += " (default: %(default)s)"
        if kind is bool:
            options = {"action": argparse.BooleanOptionalAction}
        elif many:
            options = {"type": str if kind is str else kind, "nargs": "+", "action": "extend"}
        else:
            options = {"type": kind}
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, required=required,
                            default=None if required or many else field.default, help=help_text, **options)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The config the flags spell; a ValueError names the offending flag."""
    hints = typing.get_type_hints(BenchConfig)
    values = {}
    for field in dataclasses.fields(BenchConfig):
        value = getattr(args, field.name)
        kind, many = _element_type(hints[field.name])
        if many:
            parts = value or []
            if kind is str:
                parts = [name.strip() for part in parts for name in part.split(",") if name.strip()]
            value = tuple(parts)
        values[field.name] = value
    return BenchConfig(**values)


def _fmt(value) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def summary_table(document: dict) -> str:
    """A few lines per run: counts, throughput, latency percentiles in milliseconds."""
    lines = []
    for run in document["runs"]:
        s = run["summary"]
        lines.append(f"== {run['name']}: {s['num_succeeded']}/{s['num_requests']} succeeded in "
                     f"{s['duration_s']:.2f} s, {s['request_throughput']:.2f} req/s, "
                     f"{s['output_throughput']:.1f} output tok/s (tokens from {s['tokens_from']}"
                     + (f"; {s['output_tokens'] / s['output_chunks']:.2f} per chunk" if s.get("output_chunks") else "")
                     + ")")
        lines.append(f"   {'ms':6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}")
        for metric in ("ttft", "tpot", "itl", "e2e"):
            stats = s[metric]
            cells = " ".join(f"{_fmt(stats[key]):>9}" for key in ("mean", "p50", "p90", "p99", "max"))
            lines.append(f"   {metric:6} {cells}")
        if s["cached_prompt_tokens"] is not None and s["prompt_tokens"]:
            cached = s["cached_prompt_tokens"]
            lines.append(f"   prompt tokens: {s['prompt_tokens']}, {cached} ({100 * cached / s['prompt_tokens']:.1f}%) "
                         "from the server's prefix cache")
        if s.get("prediction_tokens"):
            predicted = s["prediction_tokens"]
            lines.append(f"   prediction tokens: {predicted['accepted']} accepted, {predicted['rejected']} rejected")
        if s["goodput"]:
            good = s["goodput"]
            lines.append(f"   goodput: {good['num_good']} requests within SLOs, {good['requests_per_s']:.2f} req/s")
        for failure in run["failures"][:3]:
            lines.append(f"   failed #{failure['index']} ({failure['task']}): {failure['status']} "
                         f"{(failure['body'] or '')[:200]}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of `tessera bench`; errors are one line on stderr and exit status 2."""
    try:
        from benchmarks.serving.runner import BenchError, benchmark
    except ModuleNotFoundError as error:
        print(f"tessera bench: error: {error.name} is missing; install the bench extra: "
              "pip install 'tessera-serve[bench]'", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
        document = benchmark(config)
    except (ValueError, BenchError) as error:
        print(f"tessera bench: error: {error}", file=sys.stderr)
        return 2
    print(summary_table(document))
    if config.out:
        print(f"results and plots in {config.out}")
    return 0

"""The `tessera` command: `serve` a model with a module library, run the offline `demo`, `train` a library,
manage a `library`, `bench` any OpenAI-compatible server, or `compile-check` the Triton kernels for a GPU.

Engine flags are generated from `EngineConfig`'s fields and their docstrings, in one place.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path

from server.engine.config import EngineConfig
from server.library_cli import add_library_parser, run_library
from training.cli import add_train_arguments, run_train


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[node.target.id] = following.value.value
    return docs


def _add_engine_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per EngineConfig field (`max_num_seqs` -> `--max-num-seqs`), its docstring as help."""
    docs = field_docs(EngineConfig)
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine", "fields of EngineConfig")
    for field in dataclasses.fields(EngineConfig):
        if field.name in skip:
            continue
        hint = hints[field.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kind = next(t for t in typing.get_args(hint) if t is not type(None)) if union else hint
        required = field.default is dataclasses.MISSING
        help_text = docs.get(field.name, "").replace("%", "%%")
        if not required and field.default is not None:
            help_text += " (default: %(default)s)"
        if kind is bool:
            options = {"action": argparse.BooleanOptionalAction}
        elif typing.get_origin(kind) is tuple:  # tuple[str, ...]: several values after one flag
            options = {"nargs": "+", "type": typing.get_args(kind)[0]}
        else:
            options = {"type": kind}
        group.add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, required=required,
            default=None if required else field.default, help=help_text, **options,
        )


def _engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}  # nargs flags
    return EngineConfig(**(values | overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="default: info when serving, warning otherwise")
    from server.demo import DEMO_SETTINGS

    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a Hugging Face model directory with a module library")
    demo = commands.add_parser("demo", help="build (once) and serve a small offline demo")
    for sub in (serve, demo):
        sub.add_argument("--host", default="127.0.0.1", help="address to listen on")
        sub.add_argument("--port", type=int, default=8000, help="port to listen on")
        sub.add_argument("--api-key", default=None,
                         help="require `Authorization: Bearer KEY` on every route but /health, /ping and /version "
                              "(default: $TESSERA_API_KEY, else $VLLM_API_KEY, as vLLM reads it; unset: no key)")
        sub.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
        sub.add_argument("--ssl-certfile", default=None, help="... and this certificate (PEM)")
        sub.add_argument("--root-path", default="", help="the path prefix a proxy serves the API under (ASGI root_path)")
        sub.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                         help="let browsers on these origins call the API (CORS; `*` for any); default: none")
        sub.add_argument("--max-concurrent-requests", type=int, default=None, metavar="N",
                         help="answer generation calls past N in flight with a 429 and Retry-After (TGI's and "
                              "LoRAX's); default: no bound, every call waits, as in vLLM")
        sub.add_argument("--enable-log-requests", action="store_true",
                         help="log one line per finished request: ids, status, composition, token counts, latencies")
    _add_engine_flags(serve)
    _add_engine_flags(demo, skip=("model", "library"))
    batch = commands.add_parser("run-batch", help="serve an OpenAI batch file offline (vLLM's run-batch)")
    batch.add_argument("-i", "--input-file", required=True, type=Path, help="OpenAI batch input JSONL")
    batch.add_argument("-o", "--output-file", required=True, type=Path,
                       help="where the batch output JSONL goes (written whole, atomically)")
    batch.add_argument("--max-concurrency", type=int, default=64, help="requests in flight at once")
    _add_engine_flags(batch)
    demo.add_argument("--cache-dir", type=Path, default=None, help="where the demo is built (default ~/.cache/tessera)")
    demo.add_argument("--setting", default="small", choices=sorted(DEMO_SETTINGS),
                      help="small: the demo (built once, about 2.5 minutes on 2 CPU cores); tiny: built in seconds, "
                           "its modules have learned next to nothing (for tests)")
    train = commands.add_parser("train", help="train a module library on a frozen Hugging Face model")
    add_train_arguments(train)
    add_library_parser(commands)
    from benchmarks.serving.cli import add_arguments as add_bench_arguments

    bench = commands.add_parser("bench", help="measure latency and throughput of any OpenAI-compatible server")
    add_bench_arguments(bench)
    from server.model.compile_check import add_arguments as add_compile_check_arguments

    compile_check = commands.add_parser("compile-check", help="compile every Triton kernel the backbone launches "
                                        "for a CUDA architecture, on a machine without a GPU")
    add_compile_check_arguments(compile_check)
    return parser


def _fail(message: str) -> typing.NoReturn:
    print(f"tessera: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _engine(config: EngineConfig):
    """The engine `config` describes, or a precise CLI error (exit 2) saying why there is none."""
    from router.errors import LibraryError
    from server.engine.engine import Engine
    from server.model.loader import resolve_model_dir

    try:
        resolve_model_dir(config.model)
    except FileNotFoundError as error:
        _fail(f"--model {config.model}: {error}")
    try:
        if config.engine_process:
            from server.engine.process import EngineProcess

            return EngineProcess(config)
        return Engine(config)
    except LibraryError as error:
        _fail(f"--library {config.library}: {error}")
    except (ValueError, OSError) as error:
        _fail(str(error))


def _run(config: EngineConfig, args: argparse.Namespace, banner: str | None = None) -> None:
    import uvicorn

    from server.api.app import create_app

    _check_tls(args)
    if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
        _fail(f"--max-concurrent-requests must be >= 1, got {args.max_concurrent_requests}")
    engine = _engine(config)
    if banner:
        print(banner, flush=True)
    app = create_app(engine, api_key=_api_key(args), allowed_origins=args.allowed_origins,
                     log_requests=args.enable_log_requests, max_concurrent_requests=args.max_concurrent_requests)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, ssl_keyfile=args.ssl_keyfile,
                ssl_certfile=args.ssl_certfile, root_path=args.root_path)


def _run_batch(args: argparse.Namespace) -> None:
    from server.batch import run_batch

    if not args.input_file.is_file():
        _fail(f"--input-file {args.input_file}: no such file")
    if args.max_concurrency < 1:
        _fail(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    engine = _engine(_engine_config(args))
    counts = run_batch(engine, args.input_file, args.output_file, args.max_concurrency)
    print(json.dumps(counts))


def _api_key(args: argparse.Namespace) -> str | None:
    """The key to require: --api-key, else $TESSERA_API_KEY, else $VLLM_API_KEY (so a key need not appear in the
    process list)."""
    return args.api_key or os.environ.get("TESSERA_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def _check_tls(args: argparse.Namespace) -> None:
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        _fail("--ssl-keyfile and --ssl-certfile go together")
    for flag, path in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile)):
        if path is not None and not Path(path).is_file():
            _fail(f"{flag} {path}: no such file")


def _demo_request(url: str, auth: str, model: str, task: str | None, prompt: str) -> str:
    body = {"model": model, **({"task": task} if task else {}), "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16, "temperature": 0}
    return (f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
            f"    -d '{json.dumps(body)}'")


def _demo_banner(args: argparse.Namespace, record: dict) -> str:
    """What the demo prints once it is ready: what was built, and a tagged and an untagged request on prompts
    the library answered correctly in the build's held-out check (the best-scoring tasks first)."""
    from server.demo import DEMO_MODEL
    from training.suite.tasks import prompt_for

    url = f"{'https' if args.ssl_certfile else 'http'}://{args.host}:{args.port}{args.root_path.rstrip('/')}"
    if args.api_key:
        auth = f" -H 'Authorization: Bearer {args.api_key}'"
    else:  # a key from the environment is not printed
        name = next((n for n in ("TESSERA_API_KEY", "VLLM_API_KEY") if os.environ.get(n)), None)
        auth = f' -H "Authorization: Bearer ${name}"' if name else ""
    scores, examples = record["exact_match"], record["examples"]
    ranked = sorted(scores, key=lambda task: (task not in examples, -scores[task]))
    tagged, untagged = ranked[0], ranked[1]

    def prompt(task: str) -> str:
        return examples[task]["prompt"] if task in examples else prompt_for([task], "hello")

    expect = f", expected answer {examples[tagged]['answer']!r}" if tagged in examples else ""
    return "\n".join([
        f"Tessera demo ({record['setting']}): a char-level Llama pretrained on generic strings, with a module library "
        "trained on six string tasks.",
        "Held-out exact match per task: " + ", ".join(f"{task} {score:.2f}" for task, score in scores.items()),
        f"A tagged request (task {tagged}{expect}):",
        _demo_request(url, auth, DEMO_MODEL, tagged, prompt(tagged)),
        "An untagged request, routed by the library's text router (model auto):",
        _demo_request(url, auth, "auto", None, prompt(untagged)),
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.log_level = args.log_level or ("info" if args.command in ("serve", "demo", "train", "run-batch") else "warning")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        from benchmarks.serving.cli import run as run_bench

        raise SystemExit(run_bench(args))
    if args.command == "compile-check":
        from server.model.compile_check import run as run_compile_check

        try:
            text, status = run_compile_check(args)
        except ValueError as error:
            _fail(str(error))
        print(text)
        raise SystemExit(status)
    if args.command == "train":
        from server.model.loader import resolve_model_dir

        try:  # a Hub id trains from its snapshot, as `serve` serves one
            args.model = resolve_model_dir(str(args.model))
        except FileNotFoundError as error:
            _fail(f"--model {args.model}: {error}")
        run_train(args)
    elif args.command == "serve":
        _run(_engine_config(args), args)
    elif args.command == "run-batch":
        _run_batch(args)
    elif args.command == "library":
        try:
            print(run_library(args))
        except (ValueError, LookupError, OSError) as error:
            _fail(str(error).strip("'\""))
    else:
        from server.demo import ensure_demo, load_record

        model_dir, library_dir = ensure_demo(args.cache_dir, args.setting)
        banner = _demo_banner(args, load_record(model_dir))
        _run(_engine_config(args, model=str(model_dir), library=str(library_dir)), args, banner)


if __name__ == "__main__":
    main()

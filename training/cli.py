"""`tessera train`: flags built from TrainConfig's fields and docstrings, and the run itself.

    tessera train --model DIR --data FILE.jsonl --out LIBRARY [--eval-data FILE.jsonl | --eval-split SHARE]
                  [--init-library DIR] [--overwrite]
                  [--relation R.json] [--task-descriptions D.json]
                  [--num-modules N --rank R ... one flag per TrainConfig field]

Every expected failure (bad data with its line number, a backbone that does not fit --init-library, an
existing --out, an invalid flag value) ends as `tessera: error: ...` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import sys
import typing
from pathlib import Path

from training.config import TrainConfig

logger = logging.getLogger(__name__)


def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring under it, read from the dataclass's source."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        node.target.id: " ".join(following.value.value.split())
        for node, following in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)
    }


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names, e.g. q_proj,v_proj."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`num_modules` -> `--num-modules`), its docstring as help."""
    docs, hints = field_docs(TrainConfig), typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training", "fields of TrainConfig")
    for field in dataclasses.fields(TrainConfig):
        hint = hints[field.name]
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if typing.get_origin(hint) is tuple:
            options, shown = {"type": _names, "metavar": "A,B,..."}, ",".join(field.default)
        elif kind is bool:
            options, shown = {"action": argparse.BooleanOptionalAction}, field.default
        else:
            options, shown = {"type": kind}, field.default
        help_text = docs.get(field.name, "").replace("%", "%%") + f" (default: {shown})"
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=field.default,
                           help=help_text, **options)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tessera train`."""
    parser.add_argument("--model", required=True, type=Path,
                        help="the frozen backbone: a Hugging Face model directory, or a Hub id fetched into the Hub's "
                             "cache as `tessera serve` fetches one")
    parser.add_argument("--data", required=True, type=Path,
                        help="JSONL training data: `task` plus OpenAI `messages` or ShareGPT `conversations`")
    parser.add_argument("--out", required=True, type=Path, help="module library directory to write")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="JSONL held-out examples of the trained tasks (the --data format): their task loss under "
                             "each task's served composition is logged at every checkpoint and printed at the end")
    parser.add_argument("--eval-split", type=float, default=None, metavar="SHARE",
                        help="hold out this share of each task's --data examples (drawn with --seed) as --eval-data "
                             "instead of training on them")
    parser.add_argument("--init-library", type=Path, default=None,
                        help="start from this library's modules and controller (e.g. imported PEFT adapters)")
    parser.add_argument("--relation", type=Path, default=None,
                        help="JSON {task: {other task: weight}} giving the task-relation prior's R (pairs not named "
                             "are 0, a pair named once counts both ways); default: estimated from gradients")
    parser.add_argument("--task-descriptions", type=Path, default=None,
                        help="JSON {task: description} recorded in the library (shown by GET /v1/models)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar (default: on)")
    _add_config_flags(parser)


def _fail(message: str) -> typing.NoReturn:
    print(f"tessera: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _config(args: argparse.Namespace) -> TrainConfig:
    try:
        return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    except ValueError as error:
        _fail(str(error))


def _init_library(args: argparse.Namespace):
    """The --init-library, loaded and checked against the --model's fingerprint; None without one."""
    from transformers import AutoConfig

    from router.errors import LibraryError
    from router.library import ModuleLibrary, fingerprint_from_hf_config

    if args.init_library is None:
        return None
    try:
        return ModuleLibrary.load(args.init_library,
                                  expect=fingerprint_from_hf_config(AutoConfig.from_pretrained(str(args.model))))
    except LibraryError as error:
        _fail(f"--init-library {args.init_library}: {error}")


def _json_file(path: Path | None, flag: str):
    """The JSON object in `path` (None without one); a one-line error for a missing file or bad JSON."""
    import json

    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        _fail(f"{flag} {path}: {error.strerror or error}")
    except json.JSONDecodeError as error:
        _fail(f"{flag} {path}: not valid JSON ({error})")
    if not isinstance(value, dict):
        _fail(f"{flag} {path}: expected a JSON object, got {type(value).__name__}")
    return value


def _descriptions(path: Path | None) -> dict[str, str] | None:
    descriptions = _json_file(path, "--task-descriptions")
    bad = [task for task, text in (descriptions or {}).items() if not isinstance(text, str)]
    if bad:
        _fail(f"--task-descriptions {path}: the description of task {bad[0]!r} is not a string")
    return descriptions


def run_train(args: argparse.Namespace) -> None:
    """Run `tessera train` with parsed arguments; expected failures exit with status 2 and one line."""
    config = _config(args)
    if not (args.model / "config.json").is_file():
        _fail(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    from router.atomic import CLI_OVERWRITE_HINT, check_target
    from router.errors import LibraryError
    from training.checkpoint import CheckpointError
    from training.data import DataError, hold_out, load_examples
    from training.trainer import train_library

    try:
        check_target(args.out, args.overwrite, CLI_OVERWRITE_HINT)
        examples = load_examples(args.data)
        eval_examples = load_examples(args.eval_data) if args.eval_data is not None else None
        if args.eval_split is not None:
            if eval_examples is not None:
                _fail("give --eval-data or --eval-split, not both")
            if not 0 < args.eval_split < 1:
                _fail(f"--eval-split must be a share in (0, 1), got {args.eval_split}")
            examples, eval_examples = hold_out(examples, args.eval_split, config.seed)
            logger.info("held out %d of %d examples for evaluation", len(eval_examples), len(examples) + len(eval_examples))
        init = _init_library(args)
        report = train_library(args.model, examples, args.out, config, init=init, progress=args.progress,
                               overwrite=args.overwrite, relation=_json_file(args.relation, "--relation"),
                               descriptions=_descriptions(args.task_descriptions), eval_examples=eval_examples)
    except (DataError, LibraryError, CheckpointError, ValueError, FloatingPointError) as error:
        _fail(str(error))
    if report.finished:
        kept = sum(len(points) for points in report.kept_points.values())
        print(f"wrote {report.path}: {report.steps} steps, final losses "
              f"{ {k: round(v, 4) for k, v in report.losses.items()} }, {report.tokens_per_second:.0f} tokens/s, "
              f"{kept} module insertion points kept")
        if report.eval_history:
            step, losses = report.eval_history[-1]
            print(f"held-out task loss at step {step}: { {task: round(loss, 4) for task, loss in losses.items()} }")
    else:
        print(f"stopped after {report.steps} steps; rerun the same command to resume")

"""`tessera library ...`: inspect a module library, import PEFT LoRA adapters into it, export compositions.

    tessera library info LIBRARY
    tessera library import-peft --model MODEL --library LIBRARY --adapter PEFT_DIR --name NAME [--task TASK]
    tessera library export-peft --library LIBRARY (--task TASK | --modules a=0.7,b=0.3) --out PEFT_DIR
    tessera library export-vllm --library LIBRARY --out DIR [--tasks a,b+c] [--base-model MODEL]

Every write is atomic (router.atomic): a failed import leaves the library as it was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from router.atomic import CLI_OVERWRITE_HINT, check_target
from router.composition import Composition
from router.controller import Controller, ControllerSettings
from router.info import TaskInfo, check_name
from router.library import ModuleLibrary

TAG_LOGIT = 30.0
"""Controller logit of an imported module for its own task (gate 1 - 1e-13) and minus that for the rest."""


def add_library_parser(commands) -> None:
    library = commands.add_parser("library", help="inspect a module library, import or export PEFT LoRA adapters")
    actions = library.add_subparsers(dest="action", required=True)
    info = actions.add_parser("info", help="print the library's backbone, modules and task compositions")
    info.add_argument("library", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")

    imp = actions.add_parser("import-peft", help="add a PEFT LoRA directory as a module (creating the library)")
    imp.add_argument("--model", required=True, help="the backbone the adapter was trained on (directory or Hub id)")
    imp.add_argument("--library", required=True, type=Path, help="library to add to; created when missing")
    imp.add_argument("--adapter", required=True, type=Path, help="PEFT directory (adapter_config.json + safetensors)")
    imp.add_argument("--name", required=True, help="module name")
    imp.add_argument("--description", default="", help="module description")
    imp.add_argument("--task", default=None, help="also add a task of this name that selects the module alone")

    exp = actions.add_parser("export-peft", help="write a task's or explicit composition as one PEFT LoRA")
    exp.add_argument("--library", required=True, type=Path)
    which = exp.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="export the controller's composition for this task")
    which.add_argument("--modules", help="explicit weights, e.g. m0=0.7,m1=0.3")
    exp.add_argument("--out", required=True, type=Path, help="PEFT directory to create (must not exist)")
    exp.add_argument("--base-model", default=None, help="recorded as base_model_name_or_path")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")

    vllm = actions.add_parser("export-vllm", help="write every task as a PEFT LoRA, with the `vllm serve` arguments")
    vllm.add_argument("--library", required=True, type=Path)
    vllm.add_argument("--out", required=True, type=Path, help="directory to create: one adapter per task + vllm.json")
    vllm.add_argument("--tasks", default=None,
                      help="comma-separated task tags (composites as a+b); default: every task of the library")
    vllm.add_argument("--base-model", default=None,
                      help="the model vLLM serves (directory or Hub id): recorded and put in the printed command")
    vllm.add_argument("--max-loras", type=int, default=None,
                      help="adapters vLLM may batch at once (it preallocates that many); default: all of them")
    vllm.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run_library(args: argparse.Namespace) -> str:
    """Run one `tessera library` action; the text to print. Errors raise (the CLI reports them)."""
    if args.action == "info":
        library = ModuleLibrary.load(args.library)
        return json.dumps(_summary(library), indent=2) if args.json else _table(library)
    if args.action == "import-peft":
        return _import(args)
    if args.action == "export-vllm":
        return _export_vllm(args)
    return _export(args)


def _summary(library: ModuleLibrary) -> dict:
    tasks = {}
    for name in library.tasks:
        composition = library.controller.gates_for_task(name)
        tasks[name] = dict(zip(composition.module_ids, (round(g, 4) for g in composition.gates)))
    modules = {
        name: info.to_json() | {"num_params": sum(a.numel() + b.numel() for a, b in library.module_weights(name).values())}
        for name, info in library.modules.items()
    }
    return {"backbone": library.backbone.to_json(), "modules": modules, "tasks": tasks,
            "controller": library.controller.settings_json()}


def _table(library: ModuleLibrary) -> str:
    summary = _summary(library)
    lines = [f"backbone: {library.backbone.architecture}, {library.backbone.num_layers} layers, "
             f"hidden {library.backbone.hidden_size}",
             f"{'module':<24}{'rank':>6}{'alpha':>8}{'layers':>8}  targets"]
    for name, info in summary["modules"].items():
        lines.append(f"{name:<24}{info['rank']:>6}{info['alpha']:>8g}{len(info['layers']):>8}  {','.join(info['targets'])}")
    lines.append(f"{'task':<24}composition (controller: {summary['controller']})")
    for name, gates in summary["tasks"].items():
        lines.append(f"{name:<24}" + (", ".join(f"{m}={g}" for m, g in gates.items()) or "(backbone only)"))
    return "\n".join(lines)


def _import(args: argparse.Namespace) -> str:
    from transformers import AutoConfig

    from router.fingerprint import fingerprint_from_hf_config
    from router.peft_io import import_peft
    from server.model.loader import resolve_model_dir

    backbone = fingerprint_from_hf_config(AutoConfig.from_pretrained(resolve_model_dir(args.model)))
    name = check_name("module", args.name)
    info, weights = import_peft(args.adapter, backbone, name, args.description)
    exists = args.library.exists() and any(args.library.iterdir())
    if exists:
        library = ModuleLibrary.load(args.library, expect=backbone).with_module(info, weights)
    else:
        # A fresh library: a small threshold keeps near-zero gates of other modules out of tag compositions.
        settings = ControllerSettings(top_k=1, threshold=0.01)
        library = ModuleLibrary.build(backbone, {name: (info, weights)}, [], torch.zeros(0, 1), settings)
    if args.task is not None:
        library = _with_task(library, TaskInfo(check_name("task", args.task), f"imported adapter {name}"), name)
    library.write(args.library, overwrite=exists)
    task = f" and task {args.task!r}" if args.task else ""
    return f"imported {args.adapter} as module {name!r} (rank {info.rank}){task} into {args.library}"


def _with_task(library: ModuleLibrary, task: TaskInfo, module: str) -> ModuleLibrary:
    """`library` with one more task whose controller row selects `module` alone."""
    if task.name in library.tasks:
        raise ValueError(f"task {task.name!r} already exists in {sorted(library.tasks)}")
    if library.controller.text_router is not None:
        raise ValueError("the library's text router predicts its current tasks; a new task needs a new router "
                         "(fit one with training.text_router and attach it), so --task is refused here")
    row = torch.full((1, len(library.modules)), -TAG_LOGIT)  # [1, num_modules]
    row[0, list(library.modules).index(module)] = TAG_LOGIT
    old = library.controller
    controller = Controller([*old.tasks, task.name], old.modules, torch.cat([old.logits, row]), old.settings)
    return ModuleLibrary(library.backbone, dict(library.modules), {**library.tasks, task.name: task}, controller,
                         dict(library.weights))


def _export(args: argparse.Namespace) -> str:
    from router.compose import compose
    from router.peft_io import export_peft

    check_target(args.out, args.overwrite, CLI_OVERWRITE_HINT)
    library = ModuleLibrary.load(args.library)
    if args.task is not None:
        composition = compose(library, task=args.task)
    else:
        composition = compose(library, modules=_parse_weights(args.modules), max_k=len(library.modules) or 1)
    path = export_peft(library, composition, args.out, base_model=args.base_model, overwrite=args.overwrite)
    gates = ", ".join(f"{m}={g:.4g}" for m, g in zip(composition.module_ids, composition.gates))
    return f"exported {gates} as a PEFT LoRA of rank {_rank(library, composition)} to {path}"


def _export_vllm(args: argparse.Namespace) -> str:
    from router.vllm_export import export_vllm

    check_target(args.out, args.overwrite, CLI_OVERWRITE_HINT)
    library = ModuleLibrary.load(args.library)
    tasks = None if args.tasks is None else [part.strip() for part in args.tasks.split(",")]
    if tasks is not None and not all(tasks):
        raise ValueError(f"--tasks {args.tasks!r} has an empty name; separate task tags with commas")
    done = export_vllm(library, args.out, tasks, base_model=args.base_model, max_loras=args.max_loras,
                       overwrite=args.overwrite)
    lines = [f"exported {len(done.adapters)} tasks to {done.path} as PEFT LoRAs (max rank {done.max_lora_rank}):"]
    lines += [f"  {a.name}: rank {a.rank}, " + ", ".join(f"{m}={g:.4g}" for m, g in a.gates.items())
              for a in done.adapters]
    if done.base_model_tasks:
        lines.append(f"  served by the base model alone (no modules): {', '.join(done.base_model_tasks)}")
    lines += ["serve them with:", "  " + done.serve_command(args.base_model)]
    return "\n".join(lines)


def _rank(library: ModuleLibrary, composition: Composition) -> int:
    return sum(library.modules[m].rank for m in composition.module_ids)


def _parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for part in text.split(","):
        name, sep, value = (piece.strip() for piece in part.partition("="))
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"--modules: {part!r} is not name=weight (e.g. m0=0.7,m1=0.3)")
    return weights

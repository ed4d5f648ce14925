"""`python -m benchmarks.quality.run --setting tiny|small|full --out DIR [--sweeps [NAMES]] [--seed N]`

Stages (one log line each): backbone (pretrained once, cached), data, training of every system, serving
and scoring every system through the engine; with --sweeps also the per-task LoRA trained for `steps` steps
per adapter (EQUAL_STEPS), the composites' reference (COMPOSITE_REFERENCE: a LoRA trained on each composite, the
ceiling the never-trained systems read against) and the sweeps (all of benchmarks.quality.sweeps.SWEEPS, or the
comma-separated NAMES); results.json, tables, plots.

    DIR/results.json     every number, the config, seed, git commit, wall times, per-item outcomes
    DIR/tables.md        the markdown tables (also printed)
    DIR/sweep_*.png      with --sweeps
    DIR/systems/...      the trained libraries and PEFT adapters
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer

from training.suite.backbone import ensure_backbone

from benchmarks.quality.config import ABLATIONS, SETTINGS, QualityConfig
from benchmarks.quality.evaluate import ServeConfig, max_new_tokens
from benchmarks.quality.plots import plot_sweeps
from benchmarks.quality.report import git_state, markdown, write_json, write_text
from benchmarks.quality.scores import evaluate_system
from benchmarks.quality.sweeps import SWEEPS, base_means, check_sweep_names, run_sweeps
from benchmarks.quality.systems import (
    COMPOSITE_REFERENCE, Data, System, eval_items, fingerprint, lora_ranks, lora_steps, make_data, train_composite_lora,
    train_per_task_lora, train_shared_lora, train_tessera,
)

logger = logging.getLogger("benchmarks.quality")

EQUAL_STEPS = "per_task_lora_equal_steps"
"""With --sweeps (and lora_steps `equal_data`): the per-task LoRA trained for `steps` steps per adapter, as a
check that the main table's per-task LoRA is not limited by its share of the steps."""


def resolved_device(config: QualityConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def train_systems(config: QualityConfig, model_dir: Path, data: Data, seed: int, out: Path) -> dict[str, System]:
    """Every system of the main table, trained on `data` (one log line each)."""
    train = config.train(seed)
    ranks = lora_ranks(fingerprint(model_dir), train, len(data.tasks))
    systems = {"backbone": System("backbone", "backbone")}
    systems["per_task_lora"] = train_per_task_lora(model_dir, data, out / "per_task_lora", train, ranks["per_task"],
                                                   lora_steps(config, len(data.tasks)))
    logger.info("stage train: per-task LoRA (rank %d) in %.1f s", ranks["per_task"], systems["per_task_lora"].train_seconds)
    systems["shared_lora"] = train_shared_lora(model_dir, data, out / "shared_lora", train, ranks["shared"])
    logger.info("stage train: shared LoRA (rank %d) in %.1f s", ranks["shared"], systems["shared_lora"].train_seconds)
    systems["tessera"] = train_tessera("tessera", model_dir, data, out / "tessera", train)
    logger.info("stage train: Tessera in %.1f s", systems["tessera"].train_seconds)
    for name, changes in ABLATIONS.items():
        ablated = dataclasses.replace(train, text_router=False, **changes)
        systems[name] = train_tessera(name, model_dir, data, out / name, ablated)
        systems[name].info["changes"] = changes
        logger.info("stage train: %s in %.1f s", name, systems[name].train_seconds)
    return systems


def system_entry(system: System, out: Path, evaluation: dict) -> dict:
    library = None if system.library is None else os.path.relpath(system.library, out)
    return {"kind": system.kind, "library": library, "train_seconds": system.train_seconds, "params": system.params,
            "info": system.info} | evaluation


def equal_steps_lora(config: QualityConfig, model_dir: Path, data: Data, seed: int, out: Path) -> System:
    """The stronger per-task LoRA baseline: each adapter trained for `steps` steps (num_tasks times the compute
    of the main per-task LoRA when that one is `equal_data`)."""
    train = config.train(seed)
    rank = lora_ranks(fingerprint(model_dir), train, len(data.tasks))["per_task"]
    system = train_per_task_lora(model_dir, data, out / EQUAL_STEPS, train, rank, config.steps, EQUAL_STEPS)
    logger.info("stage baseline: per-task LoRA with %d steps per adapter in %.1f s", config.steps,
                system.train_seconds)
    return system


def composite_reference(config: QualityConfig, model_dir: Path, data: Data, seed: int, out: Path) -> System:
    """The composites' ceiling: one LoRA trained on each composite (systems.train_composite_lora)."""
    train = config.train(seed)
    rank = lora_ranks(fingerprint(model_dir), train, len(data.tasks))["per_task"]
    system = train_composite_lora(config, model_dir, data, out / COMPOSITE_REFERENCE, train, rank, seed)
    logger.info("stage reference: a LoRA trained on each of %d composites in %.1f s", len(data.composites),
                system.train_seconds)
    return system


def _sweep_stage(config: QualityConfig, model_dir: Path, data: Data, systems: dict[str, System], seed: int,
                 out: Path, serve_config: ServeConfig, max_tokens: int, names: Sequence[str]) -> dict[str, list[dict]]:
    """The sweeps, with the main run's Tessera and per-task LoRA (scored on validation too) as their main point."""
    main_point = {"seconds": 0.0, "train_seconds": {}, "params": {"tessera": systems["tessera"].params}}
    for name in ("tessera", "per_task_lora"):
        main_point[name] = base_means(systems[name], model_dir, data, serve_config, max_tokens)
        main_point["train_seconds"][name] = systems[name].train_seconds
    return run_sweeps(config, model_dir, seed, out / "sweeps", serve_config, main_point, names)


def run(setting: str, out: Path, seed: int = 0, sweeps: bool | Sequence[str] = False, cache_dir: str | None = None,
        config: QualityConfig | None = None) -> dict:
    """The whole benchmark (module docstring); returns what results.json holds. `sweeps`: True for every
    sweep, or the names of the ones to run."""
    sweep_names = () if not sweeps else SWEEPS if sweeps is True else check_sweep_names(sweeps)
    config, out, walls = config or SETTINGS[setting], Path(out).absolute(), {}
    torch.set_num_threads(config.threads)
    clock = time.perf_counter()
    model_dir = ensure_backbone(config.backbone, cache_dir)
    walls["backbone"], clock = time.perf_counter() - clock, time.perf_counter()
    logger.info("stage backbone: %s (%.1f s)", model_dir, walls["backbone"])
    data = make_data(config, seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_tokens = max_new_tokens(tokenizer, eval_items(data.test + data.val), config.answer_margin)
    serve_config = ServeConfig(device=resolved_device(config), answer_margin=config.answer_margin)
    walls["data"], clock = time.perf_counter() - clock, time.perf_counter()
    logger.info("stage data: %d train, %d validation, %d test items; max_tokens %d", len(data.train), len(data.val),
                len(data.test), max_tokens)
    systems = train_systems(config, model_dir, data, seed, out / "systems")
    walls["train"], clock = time.perf_counter() - clock, time.perf_counter()
    entries = {name: system_entry(system, out, evaluate_system(system, model_dir, data, data.test, serve_config,
                                                               max_tokens)) for name, system in systems.items()}
    walls["evaluate"], clock = time.perf_counter() - clock, time.perf_counter()
    logger.info("stage evaluate: %d systems in %.1f s", len(entries), walls["evaluate"])
    results = {
        "setting": setting, "config": dataclasses.asdict(config), "seed": seed, "git": git_state(Path(__file__).parent),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(serve_config.device),
        "backbone": model_dir.name, "tasks": list(data.tasks), "composites": list(data.composites),
        "max_tokens": max_tokens, "exact_match": "generated text == answer and finish reason stop (metrics.py)",
        "systems": entries, "wall_seconds": walls,
    }
    if sweep_names and config.lora_steps == "equal_data":
        strong = equal_steps_lora(config, model_dir, data, seed, out / "systems")
        entries[EQUAL_STEPS] = system_entry(strong, out, evaluate_system(strong, model_dir, data, data.test,
                                                                          serve_config, max_tokens))
        walls["baseline_equal_steps"], clock = time.perf_counter() - clock, time.perf_counter()
    if sweep_names:
        reference = composite_reference(config, model_dir, data, seed, out / "systems")
        entries[COMPOSITE_REFERENCE] = system_entry(reference, out, evaluate_system(reference, model_dir, data, data.test,
                                                                                    serve_config, max_tokens))
        walls["composite_reference"], clock = time.perf_counter() - clock, time.perf_counter()
    if sweep_names:
        results["sweeps"] = _sweep_stage(config, model_dir, data, systems, seed, out, serve_config, max_tokens,
                                         sweep_names)
        results["plots"] = [p.name for p in plot_sweeps(results["sweeps"], out)]
        walls["sweeps"] = time.perf_counter() - clock
        logger.info("stage sweeps: %.1f s", walls["sweeps"])
    walls["total"] = sum(walls.values())
    write_json(out / "results.json", results)
    write_text(out / "tables.md", markdown(results))
    logger.info("stage results: %s (total %.1f s)", out / "results.json", walls["total"])
    return results


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device, "torch": torch.__version__}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), required=True,
                   help="tiny (test, under a minute), small (the CPU result), full (one GPU); see config.py")
    p.add_argument("--out", required=True, type=Path, help="output directory (results.json, tables.md, PNGs)")
    p.add_argument("--sweeps", nargs="?", const=",".join(SWEEPS), default=None, metavar="NAMES",
                   help="also run the sweeps and plot them: all of them, or the comma-separated NAMES "
                   f"(from {', '.join(SWEEPS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the training and the LoRA init (default 0)")
    p.add_argument("--backbone-cache", default=None, help="where the pretrained suite backbone is cached "
                   "(default: training.suite.backbone's default cache directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "router.atomic", "router.library", "router.peft_io", "server.model.loader",
                  "server.engine.setup", "training.checkpoint", "training.export", "training.relation",
                  "training.text_router", "training.trainer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        sweeps = () if args.sweeps is None else check_sweep_names([n.strip() for n in args.sweeps.split(",") if n.strip()])
    except ValueError as error:
        parser().error(str(error))
    results = run(args.setting, args.out, args.seed, sweeps, args.backbone_cache)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

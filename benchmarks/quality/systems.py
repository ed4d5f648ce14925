"""The data of one run and the systems trained on it: Tessera (and its ablations), per-task LoRA, shared LoRA.

Every system gets the same training items, batch size and learning rate; Tessera, its ablations and the
shared LoRA take `steps` steps, each per-task LoRA `lora_steps` (QualityConfig.lora_steps). The LoRA ranks
are chosen so the LoRA family's total trainable parameters are as close as one shared rank allows to what
Tessera trains (benchmarks.quality.params).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

from router.fingerprint import BackboneFingerprint
from router.info import TaskInfo
from router.library import ModuleLibrary, fingerprint_from_hf_config
from training.config import TrainConfig
from training.suite.data import Item, make_items, to_examples
from training.suite.tasks import COMPOSITE_SEPARATOR, COMPOSITES, TASKS
from training.trainer import train_library

from benchmarks.quality.baselines import lora_library, train_peft_lora
from benchmarks.quality.config import QualityConfig
from benchmarks.quality.evaluate import EvalItem
from benchmarks.quality.params import all_points, equal_param_rank, library_params, rank_cost, tessera_trained_params

logger = logging.getLogger(__name__)

COMPOSITE_REFERENCE = "composite_lora"
"""System name of the composites' reference (train_composite_lora)."""
SHARED_MODULE = "shared"
"""Module name of the shared LoRA."""
VAL_SEED_OFFSET = 7919
"""Validation items are drawn with suite seed `seed + VAL_SEED_OFFSET` (and kept only when unseen in training)."""


@dataclass(frozen=True)
class Data:
    """The items of one run."""

    tasks: tuple[str, ...]
    """Base task names (trained on)."""
    composites: tuple[str, ...]
    """Composite task names (evaluation only)."""
    train: list[Item]
    """Training items of the base tasks."""
    val: list[Item]
    """Validation items of the base tasks: training side of the split, another seed, no training input."""
    test: list[Item]
    """Test items of the base tasks, then of the composites."""


def make_data(config: QualityConfig, seed: int, train_counts: dict[str, int] | None = None, **suite_overrides) -> Data:
    """Train, validation and test items of every base task, and test items of every composite. `train_counts`
    keeps only the first N training items of the tasks it names (an imbalanced mixture)."""
    suite = config.suite(seed, **suite_overrides)
    tasks, composites = tuple(TASKS), tuple(COMPOSITES)
    train = make_items(tasks, suite.train_per_task, "train", suite)
    if train_counts:
        taken: dict[str, int] = {}
        kept = []
        for item in train:
            taken[item.task] = taken.get(item.task, 0) + 1
            if taken[item.task] <= train_counts.get(item.task, suite.train_per_task):
                kept.append(item)
        train = kept
    seen = {(item.task, item.clean_input or item.input) for item in train}
    pool = make_items(tasks, 4 * config.val_per_task, "train",
                      dataclasses.replace(suite, seed=seed + VAL_SEED_OFFSET, noise=0.0))
    val = []
    for task in tasks:
        fresh = [item for item in pool if item.task == task and (task, item.input) not in seen]
        if len(fresh) < config.val_per_task:
            raise ValueError(f"task {task}: only {len(fresh)} validation inputs unseen in training; "
                             f"lower val_per_task ({config.val_per_task}) or lengthen the inputs")
        val += fresh[: config.val_per_task]
    test = make_items(tasks + composites, suite.test_per_task, "test", suite)
    return Data(tasks, composites, train, val, test)


def eval_items(items: Sequence[Item]) -> list[EvalItem]:
    """Items as the evaluation serves them: the training conversation without its assistant answer."""
    return [EvalItem(item.task, item.tasks, item.input, example.messages[:-1], item.answer)
            for item, example in zip(items, to_examples(items))]


@dataclass
class System:
    """One trained (or untrained) system."""

    name: str
    """System name in results.json."""
    kind: str
    """`backbone`, `lora` (served with explicit weights) or `tessera` (served by its controller)."""
    library: Path | None = None
    """Its module library; None for the backbone alone."""
    task_modules: dict[str, str] = field(default_factory=dict)
    """For `lora`: base task -> the module that serves it."""
    train_seconds: float = 0.0
    """Wall time of training, saving and importing."""
    params: dict = field(default_factory=dict)
    """Trainable and on-disk parameter counts."""
    info: dict = field(default_factory=dict)
    """Anything else worth recording (ranks, steps, final losses, fitted routing accuracy)."""


def fingerprint(model_dir: Path) -> BackboneFingerprint:
    return fingerprint_from_hf_config(AutoConfig.from_pretrained(str(model_dir)))


def train_tessera(name: str, model_dir: Path, data: Data, out: Path, train: TrainConfig) -> System:
    """Tessera's library on every base task's training items."""
    started = time.perf_counter()
    descriptions = {task: TASKS[task].description for task in data.tasks}
    report = train_library(model_dir, to_examples(data.train), out, train, progress=False, overwrite=True,
                           descriptions=descriptions)
    seconds = time.perf_counter() - started
    library = ModuleLibrary.load(report.path)
    placements = set(report.trained_points.values())
    if len(placements) != 1:
        raise ValueError(f"{name}: the modules were trained on different points; the parameter count assumes one "
                         f"placement shared by every module, got {len(placements)}")
    points = list(placements.pop())
    trained = tessera_trained_params(library.backbone, points, train.num_modules, train.rank, len(data.tasks))
    router = library.controller.text_router
    params = {"trained": trained, "library": library_params(library),
              "text_router_head": sum(t.numel() for t in router.tensors().values()) if router else 0}
    info = {"steps": report.steps, "final_losses": report.losses, "fit_routing_accuracy": report.routing_accuracy,
            "kept_points": sum(len(p) for p in report.kept_points.values()),
            "points": len(points) * train.num_modules, "placement": train.placement}
    logger.info("%s: trained in %.1f s, task loss %.4f", name, seconds, report.losses.get("task", math.nan))
    return System(name, "tessera", report.path, {}, seconds, params, info)


def lora_ranks(backbone: BackboneFingerprint, train: TrainConfig, num_tasks: int) -> dict[str, int]:
    """Ranks of the per-task and the shared LoRA that match Tessera's trained total (params module)."""
    points = all_points(backbone, train.targets)
    target = tessera_trained_params(backbone, points, train.num_modules, train.rank, num_tasks)["total"]
    cost = rank_cost(backbone, points)
    return {"per_task": equal_param_rank(target, num_tasks, cost), "shared": equal_param_rank(target, 1, cost)}


def lora_steps(config: QualityConfig, num_tasks: int) -> int:
    """Steps of each per-task LoRA (QualityConfig.lora_steps)."""
    return config.steps if config.lora_steps == "equal_steps" else math.ceil(config.steps / num_tasks)


def train_per_task_lora(model_dir: Path, data: Data, out: Path, train: TrainConfig, rank: int,
                        steps: int, name: str = "per_task_lora") -> System:
    """One PEFT LoRA per base task on that task's items, imported into one library."""
    started = time.perf_counter()
    reports = {}
    for task in data.tasks:
        mine = [item for item in data.train if item.task == task]
        reports[task] = train_peft_lora(model_dir, to_examples(mine), out / "peft" / task, train, rank, steps)
    task_modules = {task: f"lora-{task}" for task in data.tasks}
    infos = [TaskInfo(task, TASKS[task].description) for task in data.tasks]
    library = lora_library(fingerprint(model_dir), {task_modules[t]: r.path for t, r in reports.items()}, infos,
                           task_modules)
    path = library.write(out / "library", overwrite=True)
    seconds = time.perf_counter() - started
    params = {"trained": sum(r.trainable_params for r in reports.values()), "library": library_params(library),
              "per_adapter": reports[data.tasks[0]].trainable_params}
    info = {"rank": rank, "alpha": reports[data.tasks[0]].alpha, "steps_per_adapter": steps,
            "final_loss": {t: r.task_loss_history[-1] for t, r in reports.items()}}
    return System(name, "lora", path, task_modules, seconds, params, info)


def train_shared_lora(model_dir: Path, data: Data, out: Path, train: TrainConfig, rank: int) -> System:
    """One PEFT LoRA on every base task's items, serving every task."""
    started = time.perf_counter()
    report = train_peft_lora(model_dir, to_examples(data.train), out / "peft", train, rank, train.steps)
    task_modules = {task: SHARED_MODULE for task in data.tasks}
    infos = [TaskInfo(task, TASKS[task].description) for task in data.tasks]
    library = lora_library(fingerprint(model_dir), {SHARED_MODULE: report.path}, infos, task_modules)
    path = library.write(out / "library", overwrite=True)
    seconds = time.perf_counter() - started
    params = {"trained": report.trainable_params, "library": library_params(library)}
    info = {"rank": rank, "alpha": report.alpha, "steps": report.steps, "final_loss": report.task_loss_history[-1]}
    return System("shared_lora", "lora", path, task_modules, seconds, params, info)


def composite_module(composite: str) -> str:
    """Module (and library task) name of a composite's reference LoRA: "reverse+uppercase" -> "composite-reverse-uppercase"."""
    return "composite-" + composite.replace(COMPOSITE_SEPARATOR, "-")


def train_composite_lora(config: QualityConfig, model_dir: Path, data: Data, out: Path, train: TrainConfig, rank: int,
                         seed: int) -> System:
    """The composites' reference, not a competitor: one PEFT LoRA per composite, trained on that composite's own
    training items (as many as a base task has, `train.steps` steps, the per-task LoRA's rank), served only on
    that composite. Every other system never sees a composite; this row is what the frozen backbone plus one
    adapter reaches on a composite when it is trained on it, the ceiling the composite columns read against."""
    started = time.perf_counter()
    items = make_items(data.composites, config.train_per_task, "train", config.suite(seed))
    reports = {}
    for composite in data.composites:
        mine = [item for item in items if item.task == composite]
        reports[composite] = train_peft_lora(model_dir, to_examples(mine), out / "peft" / composite_module(composite),
                                             train, rank, train.steps)
    names = {composite: composite_module(composite) for composite in data.composites}
    infos = [TaskInfo(names[c], f"reference LoRA trained on the composite {c}") for c in data.composites]
    library = lora_library(fingerprint(model_dir), {names[c]: r.path for c, r in reports.items()}, infos,
                           {name: name for name in names.values()})
    path = library.write(out / "library", overwrite=True)
    seconds = time.perf_counter() - started
    params = {"trained": sum(r.trainable_params for r in reports.values()), "library": library_params(library),
              "per_adapter": reports[data.composites[0]].trainable_params}
    info = {"rank": rank, "alpha": reports[data.composites[0]].alpha, "steps_per_adapter": train.steps,
            "train_items_per_composite": config.train_per_task,
            "final_loss": {c: r.task_loss_history[-1] for c, r in reports.items()}}
    return System(COMPOSITE_REFERENCE, "reference", path, names, seconds, params, info)

"""Sweeps: one knob at a time, Tessera retrained at every value and scored on held-out base-task items.

    modules        TrainConfig.num_modules       N in QualityConfig.sweep_modules
    learning_rate  TrainConfig.learning_rate     (the same rate for the per-task LoRA when it runs)
    noise          SuiteConfig.noise             training inputs only; per-task LoRA alongside
    max_len        SuiteConfig.max_len           train, validation and test inputs; per-task LoRA alongside
    top_k          TrainConfig.top_k               modules per task composition
    rank           TrainConfig.rank (alpha = 2r)   module rank
    temperature    TrainConfig.gate_temperature
    threshold      TrainConfig.gate_threshold
    placement      TrainConfig.placement_budget  shares in QualityConfig.sweep_placement_budgets: below 1 the
                                                 placement search chooses the points, 1 is every point (`all`)
    placement_random  the same budgets with seeded random points (TrainConfig.placement "random"): the control
                                                 that says whether the search's choice beats chance
    seed           TrainConfig.seed              the training seed (module init, controller init, batch order;
                                                 the per-task LoRA's too) over the same data; LoRA alongside
    compute        TrainConfig.steps             multiples of the main run's steps; the per-task LoRA's steps
                                                 are scaled alike (LoRA alongside), so both get equal compute
    schedule       TrainConfig.lr_schedule, warmup_steps and max_grad_norm: QualityConfig.sweep_schedules
                                                 (schedule_overrides)
    module_dropout TrainConfig.module_dropout    QualityConfig.sweep_module_dropouts
    task_sampling  TrainConfig.task_sampling_temperature, on an imbalanced mixture (QualityConfig.imbalanced_tasks
                                                 keep imbalanced_items training items each); no point reuses the
                                                 main run, whose mixture is balanced
    lambda_*       TrainConfig.lambda_decouple, lambda_align, lambda_sparse, lambda_prior: each regulariser's
                   weight at QualityConfig.sweep_regulariser_scales times its default, the others at theirs
                   (weight 0 is the main table's ablation of that regulariser)

Every point reports mean exact match over the base tasks on the test items (what the plots show) and
on the validation items (what a choice of value may use; the test items never choose anything). A point
whose value is the main run's reuses the main run's systems instead of training them again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.quality.config import QualityConfig
from benchmarks.quality.evaluate import ServeConfig, max_new_tokens
from benchmarks.quality.scores import evaluate_system
from benchmarks.quality.systems import (
    Data, System, eval_items, fingerprint, lora_ranks, lora_steps, make_data, train_per_task_lora, train_tessera,
)

logger = logging.getLogger(__name__)

REGULARISERS = ("lambda_decouple", "lambda_align", "lambda_sparse", "lambda_prior")
"""TrainConfig fields of the regularisers' weights, one sweep each."""
CONTROLLER = {"top_k": "top_k", "rank": "rank", "temperature": "gate_temperature", "threshold": "gate_threshold"}
"""Sweep name -> the TrainConfig field it varies (the controller's gate settings and the module rank)."""
SWEEPS = ("modules", "learning_rate", "noise", "max_len", *CONTROLLER, "placement", "placement_random", "seed", "compute",
          "schedule", "module_dropout", "task_sampling", *REGULARISERS)
SCHEDULES = ("constant", "linear", "cosine")
"""The first part of a schedule-sweep point: TrainConfig.lr_schedule."""
WARMUP_SHARE, CLIP_NORM = 0.05, 1.0
"""A schedule point's "+warmup": warmup over this share of the steps; its "+clip": max_grad_norm."""


def base_means(system: System, model_dir: Path, data: Data, serve_config: ServeConfig, max_tokens: int) -> dict:
    """{"test": mean exact match over base tasks on the test items, "val": the same on the validation items}."""
    base_test = [item for item in data.test if item.task in data.tasks]
    means = {}
    for split, items in (("test", base_test), ("val", data.val)):
        result = evaluate_system(system, model_dir, data, items, serve_config, max_tokens, untagged=False,
                                 keep_outcomes=False)
        means[split] = next(iter(result["evaluations"].values()))["mean_base"]
    return means


def regulariser_values(config: QualityConfig, name: str) -> tuple[float, ...]:
    """The weights a regulariser sweep tries: its default (TrainConfig's) times each sweep scale (rounded to 12
    decimals, so 0.1 * 0.1 is recorded as 0.01)."""
    default = getattr(config.train(0), name)
    return tuple(round(scale * default, 12) for scale in config.sweep_regulariser_scales)


def _regulariser_override(name: str) -> Callable[[object], tuple[dict, dict]]:
    return lambda value: ({name: value}, {})


def _grid(config: QualityConfig) -> dict[str, tuple[tuple, Callable[[object], tuple[dict, dict]], bool]]:
    """Sweep -> (values, value -> (TrainConfig overrides, SuiteConfig overrides), per-task LoRA alongside)."""
    regularisers = {name: (regulariser_values(config, name), _regulariser_override(name), False)
                    for name in REGULARISERS}
    return {
        "modules": (config.sweep_modules, lambda n: ({"num_modules": n}, {}), False),
        "learning_rate": (config.sweep_learning_rates, lambda lr: ({"learning_rate": lr}, {}), False),
        "noise": (config.sweep_noise, lambda noise: ({}, {"noise": noise}), config.sweep_baseline),
        "max_len": (config.sweep_max_len,
                    lambda n: ({}, {"max_len": n, "min_len": min(config.min_len, n)}), config.sweep_baseline),
    } | {
        "top_k": (config.sweep_top_k, lambda k: ({"top_k": k}, {}), False),
        "rank": (config.sweep_ranks, lambda r: ({"rank": r}, {}), False),
        "temperature": (config.sweep_gate_temperatures, lambda t: ({"gate_temperature": t}, {}), False),
        "threshold": (config.sweep_gate_thresholds, lambda t: ({"gate_threshold": t}, {}), False),
        "placement": (config.sweep_placement_budgets, lambda b: (placement_overrides(b), {}), False),
        "placement_random": (config.sweep_placement_budgets, lambda b: (placement_overrides(b, "random"), {}), False),
        "seed": (config.sweep_seeds, lambda s: ({"seed": s}, {}), True),
        "compute": (config.sweep_compute, lambda m: ({"steps": m * config.steps}, {}), True),
        "schedule": (config.sweep_schedules, lambda v: (schedule_overrides(v, config.steps), {}), False),
        "module_dropout": (config.sweep_module_dropouts, lambda p: ({"module_dropout": p}, {}), False),
        "task_sampling": (config.sweep_task_sampling, lambda t: ({"task_sampling_temperature": t}, {"train_counts": {
            task: config.imbalanced_items for task in config.imbalanced_tasks}}), False),
    } | regularisers


def schedule_overrides(value: str, steps: int) -> dict:
    """TrainConfig fields of a schedule-sweep point "SCHEDULE[+warmup][+clip]" (QualityConfig.sweep_schedules)."""
    schedule, *extras = value.split("+")
    if schedule not in SCHEDULES or len(set(extras)) != len(extras) or not set(extras) <= {"warmup", "clip"}:
        raise ValueError(f"schedule sweep point {value!r}: want one of {', '.join(SCHEDULES)}, then optionally "
                         "+warmup and +clip")
    fields: dict = {"lr_schedule": schedule}
    if "warmup" in extras:
        fields["warmup_steps"] = max(1, round(WARMUP_SHARE * steps))
    if "clip" in extras:
        fields["max_grad_norm"] = CLIP_NORM
    return fields


def placement_overrides(budget: float, chooser: str = "search") -> dict:
    """TrainConfig fields of a placement-sweep point: `chooser` (search or random) under `budget`, or every point
    at 1."""
    return {"placement": "all"} if budget >= 1 else {"placement": chooser, "placement_budget": budget}


def main_value(config: QualityConfig, sweep: str, seed: int):
    """The main run's value of a sweep's knob (`seed`: the run's)."""
    if sweep == "seed":
        return seed
    if sweep == "compute":
        return 1
    if sweep == "task_sampling":
        return None  # the main run's mixture is balanced: every point trains
    if sweep == "schedule":
        train = config.train(0)
        return "+".join([train.lr_schedule] + ["warmup"] * (train.warmup_steps > 0) + ["clip"] * (train.max_grad_norm > 0))
    if sweep in (*REGULARISERS, "module_dropout"):
        return getattr(config.train(0), sweep)
    if sweep in CONTROLLER:
        return getattr(config.train(0), CONTROLLER[sweep])
    if sweep in ("placement", "placement_random"):
        train = config.train(0)
        return 1.0 if train.placement == "all" else train.placement_budget
    return {"modules": config.num_modules, "learning_rate": config.learning_rate, "noise": config.noise,
            "max_len": config.max_len}[sweep]


def sweep_point(config: QualityConfig, model_dir: Path, seed: int, out: Path, serve_config: ServeConfig,
                overrides: tuple[dict, dict], with_lora: bool) -> dict:
    """Train Tessera (and per-task LoRA) with one knob changed and score both on validation and test items. The data
    always comes from the run's `seed`; a `seed` in the TrainConfig overrides changes only the training seed."""
    started = time.perf_counter()
    train_overrides, suite_overrides = overrides
    data = make_data(config, seed, **suite_overrides)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_tokens = max_new_tokens(tokenizer, eval_items(data.test + data.val), config.answer_margin)
    train_overrides = dict(train_overrides)
    train = config.train(train_overrides.pop("seed", seed), text_router=False, **train_overrides)
    tessera = train_tessera("tessera", model_dir, data, out / "tessera", train)
    point = {"tessera": base_means(tessera, model_dir, data, serve_config, max_tokens),
             "train_seconds": {"tessera": tessera.train_seconds}, "params": {"tessera": tessera.params},
             "steps": {"tessera": tessera.info["steps"]}}
    if with_lora:
        rank = lora_ranks(fingerprint(model_dir), train, len(data.tasks))["per_task"]
        lora = train_per_task_lora(model_dir, data, out / "per_task_lora", train, rank,
                                   lora_steps(config.replace(steps=train.steps), len(data.tasks)))
        point["per_task_lora"] = base_means(lora, model_dir, data, serve_config, max_tokens)
        point["train_seconds"]["per_task_lora"] = lora.train_seconds
        point["steps"]["per_task_lora"] = lora.info["steps_per_adapter"]
    point["seconds"] = time.perf_counter() - started
    return point


def _reused(main_point: dict, with_lora: bool) -> dict:
    """The main run's point, without its per-task LoRA numbers where the sweep does not run the baseline."""
    point = {key: value for key, value in main_point.items() if with_lora or key != "per_task_lora"}
    seconds = {key: value for key, value in main_point["train_seconds"].items() if with_lora or key != "per_task_lora"}
    return point | {"train_seconds": seconds, "reused_main": True}


def check_sweep_names(names: Sequence[str]) -> tuple[str, ...]:
    """`names` as a tuple, or ValueError naming the unknown ones and the choices."""
    unknown = [name for name in names if name not in SWEEPS]
    if unknown or not names:
        raise ValueError(f"unknown sweep {unknown[0] if unknown else '(none given)'!r}; choose from {', '.join(SWEEPS)}")
    return tuple(names)


def run_sweeps(config: QualityConfig, model_dir: Path, seed: int, out: Path, serve_config: ServeConfig,
               main_point: dict, names: Sequence[str] = SWEEPS) -> dict[str, list[dict]]:
    """The sweeps `names` of the module docstring (all by default), in that module's order; `main_point` (same
    form as a point) stands in for main-run values."""
    wanted = check_sweep_names(names)
    results: dict[str, list[dict]] = {}
    for sweep, (values, overrides, with_lora) in _grid(config).items():
        if sweep not in wanted:
            continue
        results[sweep] = []
        for value in values:
            if value == main_value(config, sweep, seed) and (not with_lora or "per_task_lora" in main_point):
                point = _reused(main_point, with_lora)
            else:
                logger.info("sweep %s = %s", sweep, value)
                point = sweep_point(config, model_dir, seed, out / sweep / str(value), serve_config, overrides(value),
                                    with_lora)
            results[sweep].append({"value": value} | point)
            logger.info("sweep %s = %s: Tessera test %.3f, val %.3f", sweep, value, point["tessera"]["test"],
                        point["tessera"]["val"])
    return results

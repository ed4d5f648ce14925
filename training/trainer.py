"""`train_library`: a frozen Hugging Face causal LM + task-tagged chat data -> a module library.

    examples --encode--> rows;  model (frozen) + ModuleBank (hooks) + TaskController
    per step: gates = controller(task ids) -> forward with the bank -> task loss + regularisers
              (training.losses) -> AdamW on module weights, insertion-gate logits and gate logits
              (in passes of micro_batch_size rows, optionally with activation checkpointing, gradient
              clipping, and a warmup and schedule on every learning rate: training.step)
    checkpoints in OUT.ckpt every `checkpoint_every` steps; a rerun with the same arguments resumes
    end: prune insertion points (training.export), fold insertion gates into B, write the library

With `init` (an existing library) the bank holds its modules instead of new ones and its controller
rows seed the task logits; library tasks come first, tasks new in the data after them. With
`train_modules=False` the module weights and insertion gates are frozen and only the controller trains,
so the written modules are bit-identical to `init`'s.
"""

from __future__ import annotations

import collections
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from router.atomic import check_target
from router.controller import ControllerSettings
from router.info import TaskInfo
from router.fingerprint import TARGETS, BackboneFingerprint
from router.library import ModuleLibrary, fingerprint_from_hf_config
from training import checkpoint
from training.config import TrainConfig
from training.controller import TaskController
from training.data import IGNORE, DataError, Example, collate, encode, routing_prompt
from training.export import build_library, prune, pruned_preview
from training.modules import ModuleBank, ModuleSpec, Point
from training.relation import check_relation, estimate_relation, relation_from_mapping
from training.step import StepRunner

logger = logging.getLogger(__name__)

IMBALANCE = 10
"""Trainer warns when the largest task has this many times the examples of the smallest (and sampling is uniform)."""


@dataclass(frozen=True)
class TrainReport:
    """What a training run did."""

    steps: int
    """Optimiser steps done in total (including those before a resume)."""
    finished: bool
    """False when the run stopped at `stop_after_steps` (a checkpoint holds it; nothing was exported)."""
    losses: dict[str, float]
    """Each loss term (unweighted) and the weighted total at the last step of this run."""
    task_loss_history: tuple[float, ...]
    """The task loss of every step this run took (not those before a resume)."""
    tokens_per_second: float
    """Non-padding tokens per second of training forward and backward (alignment passes included)."""
    kept_points: dict[str, tuple[Point, ...]]
    """Module name -> insertion points it keeps after pruning; empty when not finished."""
    resumed_from: int
    """The checkpoint step this run started from; 0 for a fresh run."""
    path: Path | None
    """The written library, or None when not finished."""
    routing_accuracy: float | None = None
    """Held-out task accuracy of the text router fitted on the prompts; None when none was fitted."""
    trained_points: dict[str, tuple[Point, ...]] = field(default_factory=dict)
    """Module name -> insertion points it was trained on (before pruning): every (layer, target) of
    `config.targets` with placement `all`, the search's choice with `search`, seeded random points under the
    budget with `random`, the given `points` otherwise."""
    eval_history: tuple[tuple[int, dict[str, float]], ...] = ()
    """(step, held-out task loss per task and their `mean`) at every checkpoint of this run, when evaluation
    examples were given (Trainer.evaluate)."""


def resolve_device(config: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """The torch device and backbone dtype that config.device and config.dtype ask for."""
    cuda = torch.cuda.is_available()
    if config.device.startswith("cuda") and not cuda:
        raise ValueError(f"device {config.device!r} was asked for, but CUDA is not available")
    device = torch.device("cuda" if config.device == "auto" and cuda else "cpu" if config.device == "auto"
                          else config.device)
    if config.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, config.dtype)


def _task_infos(examples: Sequence[Example], init: ModuleLibrary | None,
                descriptions: Mapping[str, str]) -> list[TaskInfo]:
    """Library tasks first (with their descriptions), then tasks new in the data, in order of appearance."""
    counts: dict[str, int] = {}
    for example in examples:
        counts[example.task] = counts.get(example.task, 0) + 1
    infos = list(init.tasks.values()) if init is not None else []
    known = {info.name for info in infos}
    infos += [TaskInfo(t, descriptions.get(t, f"trained on {n} examples")) for t, n in counts.items() if t not in known]
    return [TaskInfo(i.name, descriptions.get(i.name, i.description)) for i in infos]


def _grid_targets(config: TrainConfig, backbone: BackboneFingerprint) -> tuple[str, ...]:
    """config.targets on this backbone: the default (all of TARGETS) keeps those the backbone has (the attention
    projections under a mixture-of-experts MLP, whose experts stay frozen); a target named on purpose that the
    backbone lacks is an error."""
    absent = [t for t in config.targets if t not in backbone.target_names]
    if absent and tuple(config.targets) != TARGETS:
        raise ValueError(f"targets {absent} are not adaptable on this backbone ({backbone.architecture}); adaptable: "
                         f"{list(backbone.target_names)}")
    return tuple(t for t in config.targets if t in backbone.target_names)


def _bank_specs(config: TrainConfig, backbone: BackboneFingerprint, points: Sequence[Point] | None,
                init: ModuleLibrary | None) -> list[ModuleSpec]:
    if init is not None:
        if points is not None:
            raise ValueError("points cannot be given with an init library: its modules bring their own points")
        return [ModuleSpec(m.name, m.rank, m.alpha, tuple(m.all_points)) for m in init.modules.values()]
    chosen = [tuple(p) for p in points] if points is not None else [
        (layer, t) for layer in range(backbone.num_layers) for t in _grid_targets(config, backbone)]
    if not chosen:
        raise ValueError("points is empty: there is nowhere to insert modules")
    if len(set(chosen)) != len(chosen):
        raise ValueError("points repeat a (layer, target)")
    return [ModuleSpec(f"m{j}", config.rank, config.alpha, tuple(chosen)) for j in range(config.num_modules)]


class Trainer:
    """One training run: the frozen model, the installed bank, the controller, data and optimiser."""

    def __init__(self, model_dir: str | Path, examples: Sequence[Example], config: TrainConfig, *,
                 points: Sequence[Point] | None = None,
                 relation: torch.Tensor | Mapping[str, Mapping[str, float]] | None = None,
                 init: ModuleLibrary | None = None, descriptions: Mapping[str, str] | None = None,
                 eval_examples: Sequence[Example] | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if not examples:
            raise DataError("no training examples")
        if not config.train_modules and init is None:
            raise ValueError("train_modules=False trains the controller only, over the modules of an init library; "
                             "give one (--init-library)")
        self.config, self.examples, self.points_arg, self.init = config, list(examples), points, init
        self.device, self.dtype = resolve_device(config)
        self.backbone = fingerprint_from_hf_config(AutoConfig.from_pretrained(str(model_dir)))
        if init is not None:
            init.backbone.check_compatible(self.backbone)
        self.tasks = _task_infos(examples, init, descriptions or {})
        names = [t.name for t in self.tasks]
        if isinstance(relation, Mapping):
            relation = relation_from_mapping(relation, names)
        self.relation_arg = None if relation is None else check_relation(relation, names)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.rows, self.row_tasks = self._encode(self.examples)
        self._warn_if_imbalanced()
        self.eval_rows, self.eval_row_tasks = self._encode(eval_examples, "evaluation ") if eval_examples else ([], [])
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.model.config.use_cache = False  # no forward of training reads a KV cache (and a rerun must not append)
        if points is None and init is None and config.placement == "search":
            points = self._search_points()
        elif points is None and init is None and config.placement == "random":
            points = self._random_points()
        self.bank = self._build_bank(points)
        if config.gradient_checkpointing:
            self.bank.checkpoint_layers(self.model)
        self.controller = self._build_controller().to(self.device)
        self.optimizer = self._build_optimizer()
        self.step = 0

    def _warn_if_imbalanced(self) -> None:
        """A warning when uniform sampling would starve small tasks (10x fewer examples than the largest)."""
        counts = collections.Counter(self.tasks[task].name for task in self.row_tasks)
        if self.config.task_sampling_temperature != 1.0 or len(counts) < 2:
            return
        (large, most), *_, (small, fewest) = counts.most_common()
        if most >= IMBALANCE * fewest:
            logger.warning("the tasks are imbalanced (%s: %d examples, %s: %d); steps sample examples uniformly, so "
                           "small tasks are seen rarely: --task-sampling-temperature 3 samples them more often",
                           large, most, small, fewest)

    def _search_points(self) -> list[Point]:
        """Insertion points from the gradient-clustering placement search (training.placement)."""
        from training.placement import PlacementConfig, search_placement

        cfg, size = self.config, self.config.batch_size
        task_batches = {}
        for index, task in enumerate(self.tasks):
            mine = [i for i, t in enumerate(self.row_tasks) if t == index][: 2 * size]
            if mine:
                task_batches[task.name] = self._passes(mine)
        placement = search_placement(self.model, task_batches, PlacementConfig(
            rank=cfg.rank, num_modules=cfg.num_modules, budget_fraction=cfg.placement_budget, seed=cfg.seed))
        logger.info("placement search chose %d points (cost %d of budget %d): %s", len(placement.points),
                    placement.total_cost, placement.budget, placement.points)
        return list(placement.points)

    def _random_points(self) -> list[Point]:
        """Seeded random insertion points under the placement budget (the search's control)."""
        from training.placement import PlacementConfig, point_costs, random_select

        cfg = self.config
        costs = point_costs(self.model.config, cfg.rank, cfg.num_modules)
        points = list(costs)
        budget = PlacementConfig(budget_fraction=cfg.placement_budget).budget(sum(costs.values()))  # the search's rule
        selection = random_select([costs[p] for p in points], budget, cfg.seed)
        chosen = [points[i] for i in selection.chosen]
        if not chosen:
            raise ValueError(f"placement_budget {cfg.placement_budget} allows {budget} parameters, less than the "
                             f"cheapest point costs ({min(costs.values())}); raise it")
        logger.info("random placement chose %d points (cost %d of budget %d): %s", len(chosen), selection.cost,
                    budget, chosen)
        return chosen

    def _encode(self, examples: Sequence[Example], kind: str = "") -> tuple[list[tuple[list[int], list[int]]], list[int]]:
        """(token ids, labels) and task index of every example that keeps an assistant token; `kind` names the set
        in errors ("evaluation ")."""
        index = {t.name: i for i, t in enumerate(self.tasks)}
        rows, row_tasks, dropped = [], [], 0
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"{self.tokenizer.name_or_path}: the tokenizer has no chat template; training needs one")
        for number, example in enumerate(examples, 1):
            if example.task not in index:
                raise DataError(f"{kind}example {number}: task {example.task!r} is not trained in this run; the tasks "
                                f"are {list(index)}")
            try:
                ids, labels = encode(self.tokenizer, example, self.config.max_seq_len)
            except DataError as error:
                raise DataError(f"{kind}example {number} (task {example.task}): {error}") from error
            if all(label == IGNORE for label in labels[1:]):
                dropped += 1
                continue
            rows.append((ids, labels))
            row_tasks.append(index[example.task])
        if dropped:
            logger.warning("dropped %d %sexamples with no assistant token within max_seq_len=%d",
                           dropped, kind, self.config.max_seq_len)
        if not rows:
            raise DataError(f"no {kind}example keeps an assistant token within max_seq_len={self.config.max_seq_len}")
        return rows, row_tasks

    def _build_bank(self, points: Sequence[Point] | None) -> ModuleBank:
        cfg, init = self.config, self.init
        bank = ModuleBank(_bank_specs(cfg, self.backbone, points, init), self.backbone,
                          cfg.insertion_gate_init)
        bank.init_new(cfg.seed)
        bank.set_insertion_gates(cfg.train_modules)
        if init is not None:  # B / ig_init makes the gated start equal init's modules; frozen B stays bit-exact
            for index, spec in enumerate(bank.specs):
                for point, (a, b) in init.module_weights(spec.name).items():
                    bank.load_pair(index, point, a, b / cfg.insertion_gate_init if cfg.train_modules else b)
        if not cfg.train_modules:
            bank.freeze_modules()
        bank.to(self.device)
        bank.install(self.model)
        return bank

    def _build_controller(self) -> TaskController:
        cfg = self.config
        settings = ControllerSettings(cfg.top_k, cfg.gate_threshold, cfg.gate_temperature, True)
        controller = TaskController(len(self.tasks), self.bank.num_modules, settings, cfg.straight_through)
        controller.init_random(cfg.controller_init_std, cfg.seed + 1)
        if self.init is not None:  # the library's tasks are the first rows, in its order
            with torch.no_grad():
                controller.logits[: len(self.init.tasks)] = self.init.controller.logits
        return controller

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups = [{"params": [self.controller.logits, *[p for p in self.bank.gate_parameters() if p.requires_grad]],
                   "lr": cfg.gate_learning_rate, "initial_lr": cfg.gate_learning_rate, "weight_decay": 0.0}]
        if cfg.train_modules:  # (each step sets lr to initial_lr times the schedule's factor)
            groups.append({"params": self.bank.module_parameters(), "lr": cfg.learning_rate,
                           "initial_lr": cfg.learning_rate, "weight_decay": cfg.weight_decay})
        return torch.optim.AdamW(groups)

    def parameters_by_name(self) -> dict[str, torch.nn.Parameter]:
        """Every bank and controller parameter, by a stable name (what checkpoints hold)."""
        named = {f"bank.{n}": p for n, p in self.bank.named_parameters()}
        return named | {f"controller.{n}": p for n, p in self.controller.named_parameters()}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The collated batch of the encoded rows at `indices`."""
        return collate([self.rows[i] for i in indices], [self.row_tasks[i] for i in indices], self._pad_id)

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out task loss of every task with evaluation examples: the mean cross-entropy over their assistant
        positions (as the task loss), each row under its task's served composition (the controller's exported
        gates: top-k, threshold, renormalised) with the insertion points export would prune left out, so it scores
        what the library would serve if written now; and `mean`, the average over those tasks."""
        with pruned_preview(self.bank, self.config.prune_threshold if self.config.train_modules else 0.0):
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        gates = self.controller.export_gates()  # [num_tasks, N]
        size = self.config.pass_rows
        sums: dict[int, list[float]] = {}
        for start in range(0, len(self.eval_rows), size):
            rows, tasks = self.eval_rows[start: start + size], self.eval_row_tasks[start: start + size]
            batch = {k: v.to(self.device) for k, v in collate(rows, tasks, self._pad_id).items()}
            with self.bank.gating(gates[batch["task_ids"]]):
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets,
                                                       ignore_index=IGNORE, reduction="none").sum(dim=1)  # [rows]
            for task, loss, count in zip(tasks, losses.tolist(), (targets != IGNORE).sum(dim=1).tolist()):
                total = sums.setdefault(task, [0.0, 0])
                total[0], total[1] = total[0] + loss, total[1] + count
        result = {self.tasks[task].name: loss / count for task, (loss, count) in sorted(sums.items())}
        return result | {"mean": sum(result.values()) / len(result)}

    def _passes(self, rows: list[int]) -> list[dict[str, torch.Tensor]]:
        """`rows` collated in batches of what one forward pass may hold (TrainConfig.pass_rows)."""
        size = self.config.pass_rows
        return [self.batch(rows[i: i + size]) for i in range(0, len(rows), size)]

    def _relation(self) -> torch.Tensor:
        """R: the given one, zeros when the prior is off, else estimated from gradients (training.relation)."""
        num_tasks = len(self.tasks)
        if self.relation_arg is not None:
            return self.relation_arg
        if self.config.lambda_prior == 0 or num_tasks < 2:
            return torch.zeros(num_tasks, num_tasks)
        size, per_task = self.config.batch_size, []
        for task in range(num_tasks):
            mine = [i for i, t in enumerate(self.row_tasks) if t == task][: size * self.config.relation_batches]
            per_task.append(self._passes(mine))
        return estimate_relation(self.model, self.bank, per_task, self.device)

    def run(self, checkpoints: Path, progress: bool = True) -> TrainReport:
        """Train to config.steps (or stop_after_steps), resuming from `checkpoints` if it holds this run."""
        cfg = self.config
        signature = checkpoint.run_signature(cfg, self.examples, self.points_arg, self.relation_arg, self.init)
        resumed_from, relation = 0, None
        if checkpoints.exists():
            resumed_from, relation = checkpoint.load(checkpoints, signature, self.parameters_by_name(), self.optimizer)
        relation = (relation if relation is not None else self._relation()).to(self.device)
        runner = StepRunner(self, relation)
        end = min(cfg.steps, cfg.stop_after_steps or cfg.steps)
        self.step = resumed_from
        history, evaluations, terms, tokens, seconds = [], [], {}, 0, 0.0
        with tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc="train", unit="step") as bar:
            while self.step < end:
                start = time.perf_counter()
                terms, step_tokens = runner.step(self.step)
                seconds += time.perf_counter() - start
                tokens += step_tokens
                self.step += 1
                history.append(terms["task"])
                bar.update(1)
                shown = {"loss": f"{terms['total']:.4f}", "tok_s": f"{tokens / max(seconds, 1e-9):.0f}"}
                if cfg.lr_schedule != "constant" or cfg.warmup:
                    shown["lr"] = f"{self.optimizer.param_groups[-1]['lr']:.2e}"
                if runner.grad_norm is not None:
                    shown["grad_norm"] = f"{runner.grad_norm:.3f}"
                if self.step % cfg.checkpoint_every == 0 or self.step == end:
                    checkpoint.save(checkpoints, self.step, signature, self.parameters_by_name(), self.optimizer,
                                    relation)
                    if self.eval_rows:
                        evaluations.append((self.step, self.evaluate()))
                        logger.info("step %d: held-out task loss %s", self.step,
                                    {task: round(loss, 4) for task, loss in evaluations[-1][1].items()})
                if evaluations:
                    shown["eval_loss"] = f"{evaluations[-1][1]['mean']:.4f}"
                bar.set_postfix(**shown)
        trained = {spec.name: tuple(spec.points) for spec in self.bank.specs}
        return TrainReport(self.step, self.step >= cfg.steps, terms, tuple(history),
                           tokens / seconds if seconds else 0.0, {}, resumed_from, None, trained_points=trained,
                           eval_history=tuple(evaluations))

    def export(self) -> tuple[ModuleLibrary, dict[str, tuple[Point, ...]]]:
        """Prune the bank (it then computes what the library serves) and build the library."""
        threshold = self.config.prune_threshold if self.config.train_modules else 0.0
        kept = prune(self.bank, threshold)
        if self.init is not None:
            notes = [m.description for m in self.init.modules.values()]
        else:
            notes = [f"tessera train: {self.step} steps over tasks {[t.name for t in self.tasks]}"] * len(kept)
        library = build_library(self.bank, self.controller, self.backbone, self.tasks, kept, notes)
        return library, {self.bank.specs[j].name: tuple(points) for j, points in kept.items()}


def train_library(
    model_dir: str | Path, examples: Sequence[Example], out: str | Path, config: TrainConfig = TrainConfig(), *,
    points: Sequence[Point] | None = None, relation: torch.Tensor | Mapping[str, Mapping[str, float]] | None = None,
    init: ModuleLibrary | None = None,
    progress: bool = True, overwrite: bool = False, descriptions: Mapping[str, str] | None = None,
    eval_examples: Sequence[Example] | None = None,
) -> TrainReport:
    """Train a module library on `model_dir` from `examples` and write it atomically to `out`.

    Refuses an existing non-empty `out` unless `overwrite`. Checkpoints go to the sibling `OUT.ckpt`
    (removed once the library is written); rerunning with the same arguments resumes there.
    `descriptions` maps task names to the descriptions the library records. `relation` is the prior's R,
    as a [num_tasks, num_tasks] tensor in the library's task order or as {task: {other: weight}}
    (training.relation.relation_from_mapping); None estimates it from gradients. `eval_examples` (of the trained
    tasks) are scored at every checkpoint (Trainer.evaluate; TrainReport.eval_history); they do not change the
    training.
    """
    out = check_target(out, overwrite)
    trainer = Trainer(model_dir, examples, config, points=points, relation=relation, init=init,
                      descriptions=descriptions, eval_examples=eval_examples)
    checkpoints = checkpoint.checkpoint_dir(out)
    report = trainer.run(checkpoints, progress)
    if not report.finished:
        logger.info("stopped after %d steps; rerun with the same arguments to resume from %s", report.steps,
                    checkpoints)
        return report
    library, kept = trainer.export()
    library, accuracy = _attach_text_router(library, examples, config)
    path = library.write(out, overwrite=overwrite)
    shutil.rmtree(checkpoints, ignore_errors=True)
    logger.info("wrote module library %s (%d modules, %d tasks)", path, len(library.modules), len(library.tasks))
    return TrainReport(report.steps, True, report.losses, report.task_loss_history, report.tokens_per_second,
                       kept, report.resumed_from, path, accuracy, report.trained_points, report.eval_history)


def _attach_text_router(library: ModuleLibrary, examples: Sequence[Example],
                        config: TrainConfig) -> tuple[ModuleLibrary, float | None]:
    """`library` with a text router fitted on each example's first user message, when config asks and the data
    allows (two or more tasks, two or more prompts each); and its held-out accuracy."""
    from training.text_router import TextRouterConfig, fit_text_router

    if not config.text_router:
        return library, None
    prompts = [(routing_prompt(e), e.task) for e in examples]
    counts = {task: sum(1 for _, t in prompts if t == task) for task in library.tasks}
    if len(counts) < 2 or min(counts.values()) < 2:
        logger.warning("no text router: it needs two or more tasks with two or more examples each, got %s", counts)
        return library, None
    router_config = TextRouterConfig(seed=config.seed)
    head, accuracy = fit_text_router([p for p, _ in prompts], [t for _, t in prompts], list(library.tasks),
                                     router_config)
    logger.info("text router: held-out task accuracy %.3f", accuracy)
    return library.with_text_router(head, router_config.settings), accuracy

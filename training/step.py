"""One optimiser step of the trainer: batch, gates, forward with the bank, loss terms, AdamW.

Everything random in a step is a function of (seed, step): the batch is a slice of a stream of seeded
per-epoch permutations of the examples (or, with a task sampling temperature, drawn task by task from a
generator seeded by the step), the alignment's module is drawn from a generator seeded by the step, module
dropout masks are seeded by the step and each row's place in the batch (`modules.Dropout`), and
every learning rate is its configured value times `lr_factor(config, step)`. So a run resumed
from a checkpoint takes exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from training.data import IGNORE
from training.losses import alignment_loss, decoupling_loss, prior_loss, sparsity_loss, task_loss
from training.modules import Dropout

if TYPE_CHECKING:
    from training.trainer import Trainer


class StepRunner:
    """The loss and update of one step for a Trainer's model, bank, controller and optimiser."""

    def __init__(self, trainer: "Trainer", relation: torch.Tensor):
        self.trainer = trainer
        self.relation = relation  # [num_tasks, num_tasks]
        cfg = trainer.config
        self.weights = {
            "decouple": cfg.lambda_decouple if cfg.train_modules else 0.0,
            "align": cfg.lambda_align if cfg.train_modules else 0.0,
            "sparse": cfg.lambda_sparse if cfg.train_modules else 0.0,
            "prior": cfg.lambda_prior if len(trainer.tasks) > 1 else 0.0,
        }
        self._epoch, self._order = -1, []
        self._task_rows: list[list[int]] | None = None  # rows of each task (tempered task sampling)
        self._task_weights = torch.zeros(0)
        self._served = torch.zeros(0)
        self.grad_norm: float | None = None
        """The global gradient norm of the last step before clipping; None when clipping is off."""

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.trainer.config.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.trainer.rows), generator=gen).tolist()
        return self._order

    def batch_indices(self, step: int) -> list[int]:
        """Rows of step `step`: positions [step * B, (step + 1) * B) of the epoch-permutation stream, or, with a task
        sampling temperature other than 1, a task per row drawn by the tempered sizes, then a row of that task
        (TrainConfig.task_sampling_temperature; seeded by the step)."""
        cfg, size, count = self.trainer.config, self.trainer.config.batch_size, len(self.trainer.rows)
        if cfg.task_sampling_temperature == 1.0:
            return [self._permutation(pos // count)[pos % count] for pos in range(step * size, (step + 1) * size)]
        if self._task_rows is None:
            by_task: dict[int, list[int]] = {}
            for row, task in enumerate(self.trainer.row_tasks):
                by_task.setdefault(task, []).append(row)
            self._task_rows = list(by_task.values())
            sizes = torch.tensor([len(rows) for rows in self._task_rows], dtype=torch.float64)
            self._task_weights = sizes ** (1.0 / cfg.task_sampling_temperature)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7 * step + 3)
        tasks = torch.multinomial(self._task_weights, size, replacement=True, generator=gen).tolist()
        return [self._task_rows[t][int(torch.randint(len(self._task_rows[t]), (1,), generator=gen))] for t in tasks]

    def step(self, step: int) -> tuple[dict[str, float], int]:
        """Take optimiser step `step`; returns (unweighted terms and total as floats, tokens processed).

        The step's batch runs as passes of at most `micro_batch_size` rows whose gradients add up. Each pass's task
        and alignment losses are scaled by its share of the step's positions they average over, so their sum is
        the whole batch's loss; the decoupling loss is scaled by the pass's share of tokens (an average of
        per-pass cosines); the batch-free terms (sparsity, prior) count once. With one pass every share is 1.
        """
        t, cfg = self.trainer, self.trainer.config
        indices = self.batch_indices(step)
        passes = [indices[i: i + cfg.pass_rows] for i in range(0, len(indices), cfg.pass_rows)]
        module = self._alignment_module(indices, step) if self.weights["align"] > 0 else None
        targets = {i: _targets(t.rows[i][1]) for i in indices}
        lengths = {i: len(t.rows[i][0]) for i in indices}
        all_targets, all_lengths = sum(targets.values()), sum(lengths.values())
        aligned = sum(targets[i] for i in indices if module is not None and self._uses(i, module)) or 1
        t.optimizer.zero_grad(set_to_none=True)
        values: dict[str, float] = {}
        tokens = 0
        for number, rows in enumerate(passes):
            first = number * cfg.pass_rows  # the pass's first row's place in the step's batch
            places = list(range(first, first + len(rows)))
            shares = {"task": sum(targets[i] for i in rows) / all_targets,
                      "decouple": sum(lengths[i] for i in rows) / all_lengths,
                      "align": sum(targets[i] for i in rows if module is not None and self._uses(i, module)) / aligned}
            terms, pass_tokens = self._pass(rows, module, shares, batch_free=number == 0,
                                            dropout=self._dropout(step, rows, places))
            total = terms["task"] + sum(self.weights[name] * value for name, value in terms.items() if name != "task")
            floats = {name: float(value.detach()) for name, value in (terms | {"total": total}).items()}
            if not torch.isfinite(total):
                raise FloatingPointError(f"training diverged at step {step}: loss terms {floats}; lower the learning "
                                         "rates")
            total.backward()
            for name, value in floats.items():
                values[name] = values[name] + value if name in values else value
            tokens += pass_tokens
        self.grad_norm = self._clip() if cfg.max_grad_norm > 0 else None
        factor = lr_factor(cfg, step)
        for group in t.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        t.optimizer.step()
        return values, tokens

    def _dropout(self, step: int, rows: list[int], places: list[int]) -> list[Dropout] | None:
        """The module dropout of a pass's forwards (the composed one, then the alignment's), or None when off."""
        cfg = self.trainer.config
        if cfg.module_dropout == 0:
            return None
        lengths = tuple(len(self.trainer.rows[i][0]) for i in rows)
        return [Dropout(cfg.module_dropout, tuple(((cfg.seed * 1_000_003 + step) * 4_099 + place) * 2 + forward
                                                  for place in places), lengths) for forward in (0, 1)]

    def _pass(self, rows: list[int], module: int | None, shares: dict[str, float],
              batch_free: bool, dropout: list[Dropout] | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """The weighted loss terms of one forward pass over `rows` (step's docstring), and its tokens."""
        t = self.trainer
        batch = {k: v.to(t.device) for k, v in t.batch(rows).items()}
        gates = t.controller(batch["task_ids"])  # [rows, N]
        decouple: list[torch.Tensor] = []

        def on_point(adapter, u):  # u [tokens, R_p]
            decouple.append(decoupling_loss(u, adapter.b, adapter.col_module, t.bank.num_modules))

        hook = on_point if self.weights["decouple"] > 0 else None
        mask = batch["attention_mask"].bool()
        with t.bank.gating(gates, token_mask=mask, on_point=hook, dropout=dropout[0] if dropout else None):
            logits = t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits
        terms = {"task": task_loss(logits, batch["labels"]) * shares["task"]}
        tokens = int(mask.sum())
        if hook is not None:
            terms["decouple"] = torch.stack(decouple).mean() * shares["decouple"]
        if module is not None:
            align, extra = self._alignment(batch, gates.detach(), logits, module, dropout[1] if dropout else None)
            terms["align"] = align * shares["align"]
            tokens += extra
        if batch_free and self.weights["sparse"] > 0:
            terms["sparse"] = sparsity_loss(t.bank.insertion_gates())
        if batch_free and self.weights["prior"] > 0:
            terms["prior"] = prior_loss(t.controller.soft_gates(), self.relation)
        return terms, tokens

    def _uses(self, row: int, module: int) -> bool:
        """Whether row `row`'s task gives `module` a gate (the served composition, as the forward pass uses it)."""
        return bool(self._served[self.trainer.row_tasks[row], module] > 0)

    def _alignment_module(self, indices: list[int], step: int) -> int | None:
        """The module the alignment loss of step `step` compares with: one drawn (seeded by the step) from those
        the batch's compositions use; None when none is used (every gate under the threshold)."""
        t = self.trainer
        with torch.no_grad():  # the gates the forward pass uses, per task
            self._served = t.controller(torch.arange(len(t.tasks), device=t.device))  # [num_tasks, N]
        active = torch.stack([self._served[t.row_tasks[i]] for i in indices]) > 0  # [batch, N]
        candidates = active.any(dim=0).nonzero().flatten().cpu()
        if len(candidates) == 0:
            return None
        gen = torch.Generator().manual_seed(t.config.seed * 1_000_003 + 7 * step + 1)
        return int(candidates[torch.randint(len(candidates), (1,), generator=gen)])

    def _alignment(self, batch: dict, gates: torch.Tensor, logits: torch.Tensor, module: int,
                   dropout: Dropout | None = None) -> tuple[torch.Tensor, int]:
        """KL from the composed model to `module` alone, on the pass's rows that use it."""
        t = self.trainer
        rows = (gates[:, module] > 0).nonzero().flatten()
        if len(rows) == 0:
            return torch.zeros((), device=t.device), 0
        alone = torch.zeros(len(rows), t.bank.num_modules, device=t.device)  # [rows, N]
        alone[:, module] = 1.0
        if dropout is not None:  # the same rows' seeds as in the composed forward, of the alignment's forward
            kept = rows.tolist()
            dropout = Dropout(dropout.p, tuple(dropout.row_seeds[i] for i in kept), tuple(dropout.lengths[i] for i in kept))
        with t.bank.gating(alone, dropout=dropout):
            module_logits = t.model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                                    use_cache=False).logits
        positions = batch["labels"][rows][:, 1:] != IGNORE  # [rows, seq - 1]
        target = logits[rows][:, :-1][positions]  # [positions, vocab]
        loss = alignment_loss(target, module_logits[:, :-1][positions])
        return loss, int(batch["attention_mask"][rows].sum())

    def _clip(self) -> float:
        """Clip the global norm of every trainable gradient to max_grad_norm; returns the norm before clipping."""
        t = self.trainer
        params = [p for group in t.optimizer.param_groups for p in group["params"] if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, t.config.max_grad_norm))


def _targets(labels: list[int]) -> int:
    """Positions a row's task loss averages over: its labels past the first that are not IGNORE."""
    return sum(label != IGNORE for label in labels[1:])


def lr_factor(config, step: int) -> float:
    """The multiplier of every learning rate at (0-based) optimiser step `step`: a linear warmup over
    `config.warmup` steps ((step + 1) / warmup), then `lr_schedule` over the remaining steps, as transformers'
    linear and cosine schedules compute it (1 at the first step after warmup, falling towards 0 at the end)."""
    warmup = config.warmup
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, config.steps - warmup)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

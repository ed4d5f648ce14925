"""The task-relation matrix R of the prior (training.losses.prior_loss): checked when given, else estimated.

Estimate, from the gradients of each task's loss with respect to the module weights B of the untrained
bank, with every module at gate 1/N:

    g_t = sum over the task's first `relation_batches` batches of  d task_loss / d [B_1, ..., B_N]
    R[t, u] = max(0, cos(g_t, g_u))  for t != u,      R[t, t] = 0

Two tasks whose losses fall along the same directions of the modules' output space want the same
modules, so the prior pulls their gate vectors together; tasks with unrelated or opposed gradients are
not pulled. With B = 0 the gradient is (alpha / r) (1 / N) sum_tokens (dL/dy) (A_j x)^T, well defined
at the very start of training, and the estimate costs one forward and backward per batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from training.losses import task_loss
from training.modules import ModuleBank

logger = logging.getLogger(__name__)


def check_relation(relation: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """R as float32 [num_tasks, num_tasks] if it is finite, non-negative and of that shape."""
    relation = torch.as_tensor(relation, dtype=torch.float32)
    expected = (len(tasks), len(tasks))
    if tuple(relation.shape) != expected:
        raise ValueError(f"relation must be [num_tasks, num_tasks] = {list(expected)} over tasks {tasks}, "
                         f"got {list(relation.shape)}")
    if not torch.isfinite(relation).all() or (relation < 0).any():
        raise ValueError("relation must hold finite values >= 0")
    return relation.clone()


def relation_from_mapping(mapping: Mapping[str, Mapping[str, float]], tasks: list[str]) -> torch.Tensor:
    """R [num_tasks, num_tasks] from {task: {other task: weight}}, as `tessera train --relation` reads it.

    Pairs not named are 0; a named pair is set both ways (the prior is symmetric in t and u), so naming
    it once is enough, and naming it twice with different weights is an error.
    """
    if not isinstance(mapping, Mapping):
        raise ValueError("relation must be an object {task: {other task: weight}}")
    relation = torch.zeros(len(tasks), len(tasks))  # [num_tasks, num_tasks]
    given: dict[tuple[int, int], float] = {}
    for task, row in mapping.items():
        if not isinstance(row, Mapping):
            raise ValueError(f"relation[{task!r}] must be an object {{other task: weight}}, got {row!r}")
        for other, weight in row.items():
            unknown = [name for name in (task, other) if name not in tasks]
            if unknown:
                raise ValueError(f"relation names unknown task {unknown[0]!r}; the tasks are {tasks}")
            ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
            if not ok or weight < 0 or task == other:
                raise ValueError(f"relation[{task!r}][{other!r}] must be a finite weight >= 0 between two "
                                 f"different tasks, got {weight!r}")
            key = tuple(sorted((tasks.index(task), tasks.index(other))))
            if given.setdefault(key, float(weight)) != float(weight):
                raise ValueError(f"relation gives {task!r} and {other!r} two different weights")
            relation[key[0], key[1]] = relation[key[1], key[0]] = float(weight)
    return relation


def estimate_relation(model, bank: ModuleBank, task_batches: list[list[dict]], device: torch.device) -> torch.Tensor:
    """R [num_tasks, num_tasks] from gradient cosines (module docstring); task_batches[t] are task t's batches."""
    params = [adapter.b for adapter in bank.adapters]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        vectors = torch.stack([_task_gradient(model, bank, batches, params, device) for batches in task_batches])
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    unit = F.normalize(vectors, dim=1)  # [num_tasks, num_params]
    relation = (unit @ unit.t()).clamp_min(0.0)  # [num_tasks, num_tasks]
    relation.fill_diagonal_(0.0)
    logger.info("estimated task relation from gradient cosines: %s", relation.tolist())
    return relation.cpu()


def _task_gradient(model, bank: ModuleBank, batches: list[dict], params: list, device: torch.device) -> torch.Tensor:
    total = None
    for batch in batches:
        rows = batch["input_ids"].shape[0]
        gates = torch.full((rows, bank.num_modules), 1.0 / bank.num_modules, device=device)  # [batch, N]
        with bank.gating(gates):
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
        grads = torch.autograd.grad(task_loss(logits, batch["labels"].to(device)), params)
        flat = torch.cat([g.reshape(-1) for g in grads]).float()  # [num_params]
        total = flat if total is None else total + flat
    return total

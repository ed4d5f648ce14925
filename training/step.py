"""One optimiser step of the trainer: batch, gates, forward with the bank, loss terms, AdamW.

Everything random in a step is a function of (seed, step): the batch is a slice of a stream of seeded
per-epoch permutations of the examples, and the alignment's module is drawn from a generator seeded by
the step. So a run resumed from a checkpoint takes exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from training.data import IGNORE
from training.losses import alignment_loss, decoupling_loss, prior_loss, sparsity_loss, task_loss

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

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.trainer.config.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.trainer.rows), generator=gen).tolist()
        return self._order

    def batch_indices(self, step: int) -> list[int]:
        """Rows of step `step`: positions [step * B, (step + 1) * B) of the epoch-permutation stream."""
        size, count = self.trainer.config.batch_size, len(self.trainer.rows)
        return [self._permutation(pos // count)[pos % count] for pos in range(step * size, (step + 1) * size)]

    def step(self, step: int) -> tuple[dict[str, float], int]:
        """Take optimiser step `step`; returns (unweighted terms and total as floats, tokens processed)."""
        t = self.trainer
        batch = {k: v.to(t.device) for k, v in t.batch(self.batch_indices(step)).items()}
        gates = t.controller(batch["task_ids"])  # [batch, N]
        decouple: list[torch.Tensor] = []

        def on_point(adapter, u):  # u [tokens, R_p]
            decouple.append(decoupling_loss(u, adapter.b, adapter.col_module, t.bank.num_modules))

        hook = on_point if self.weights["decouple"] > 0 else None
        mask = batch["attention_mask"].bool()
        with t.bank.gating(gates, token_mask=mask, on_point=hook):
            logits = t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        terms = {"task": task_loss(logits, batch["labels"])}
        tokens = int(mask.sum())
        if hook is not None:
            terms["decouple"] = torch.stack(decouple).mean()
        if self.weights["align"] > 0:
            terms["align"], extra = self._alignment(batch, gates.detach(), logits, step)
            tokens += extra
        if self.weights["sparse"] > 0:
            terms["sparse"] = sparsity_loss(t.bank.insertion_gates())
        if self.weights["prior"] > 0:
            terms["prior"] = prior_loss(t.controller.soft_gates(), self.relation)
        total = terms["task"] + sum(self.weights[name] * value for name, value in terms.items() if name != "task")
        values = {name: float(value.detach()) for name, value in (terms | {"total": total}).items()}
        if not torch.isfinite(total):
            raise FloatingPointError(f"training diverged at step {step}: loss terms {values}; lower the learning rates")
        t.optimizer.zero_grad(set_to_none=True)
        total.backward()
        t.optimizer.step()
        return values, tokens

    def _alignment(self, batch: dict, gates: torch.Tensor, logits: torch.Tensor,
                   step: int) -> tuple[torch.Tensor, int]:
        """KL from the composed model to one sampled active module alone, on the rows that use it."""
        t = self.trainer
        active = gates > 0  # [batch, N]
        candidates = active.any(dim=0).nonzero().flatten().cpu()
        if len(candidates) == 0:  # every gate of the batch is under the threshold: backbone only
            return torch.zeros((), device=t.device), 0
        gen = torch.Generator().manual_seed(t.config.seed * 1_000_003 + 7 * step + 1)
        module = int(candidates[torch.randint(len(candidates), (1,), generator=gen)])
        rows = active[:, module].nonzero().flatten()
        alone = torch.zeros(len(rows), t.bank.num_modules, device=t.device)  # [rows, N]
        alone[:, module] = 1.0
        with t.bank.gating(alone):
            module_logits = t.model(input_ids=batch["input_ids"][rows],
                                    attention_mask=batch["attention_mask"][rows]).logits
        positions = batch["labels"][rows][:, 1:] != IGNORE  # [rows, seq - 1]
        target = logits[rows][:, :-1][positions]  # [positions, vocab]
        loss = alignment_loss(target, module_logits[:, :-1][positions])
        return loss, int(batch["attention_mask"][rows].sum())

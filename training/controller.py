"""The trainable task controller: a gate-logit table [num_tasks, N], the router's `task_gate_logits`.

A task embedding followed by a linear layer, applied to a one-hot task id, is a [num_tasks, N] matrix
of rank at most the embedding width; the table is that same function class at full rank, with no width
to choose and nothing to convert at export. Gates are sigmoid(logits / T).

Training gates (per batch row, for the row's task):
  soft = sigmoid(logits[task] / T)                                   [batch, N]
  hard = soft on the top-k (stable descending order, as router.controller), zeroed under the
         threshold, renormalised to sum 1 (all zero if every kept gate is under the threshold)
  straight_through: gates = hard + soft - stop_grad(soft): the forward pass is exactly the served
         composition, the backward pass is the soft gates' (every module's gate gets a gradient, so a
         module outside the top-k can enter it).
  otherwise:        gates = soft.
"""

from __future__ import annotations

import torch
from torch import nn

from router.controller import ControllerSettings


class TaskController(nn.Module):
    """Gate logits per task over N modules."""

    def __init__(self, num_tasks: int, num_modules: int, settings: ControllerSettings, straight_through: bool):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_tasks, num_modules))  # [num_tasks, N]
        self.settings = settings
        self.straight_through = straight_through

    def init_random(self, std: float, seed: int) -> None:
        """logits ~ N(0, std^2) from a seeded generator."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.logits.copy_(torch.randn(self.logits.shape, generator=gen) * std)

    def soft_gates(self) -> torch.Tensor:
        """sigmoid(logits / T), [num_tasks, N]."""
        return torch.sigmoid(self.logits / self.settings.temperature)

    def hard_gates(self, soft: torch.Tensor) -> torch.Tensor:
        """The exported composition's gates for rows of soft gates [rows, N]: top-k, threshold, renormalise."""
        s = self.settings
        order = torch.argsort(soft, dim=-1, descending=True, stable=True)[:, : s.top_k]  # [rows, k]
        mask = torch.zeros_like(soft).scatter(1, order, 1.0)  # [rows, N]
        kept = (soft * mask * (soft >= s.threshold)).detach()  # [rows, N]
        if not s.renormalize:
            return kept
        total = kept.sum(dim=-1, keepdim=True)  # [rows, 1]
        return torch.where(total > 0, kept / total.clamp_min(1e-30), kept)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Training gates [batch, N] for task ids [batch] (module docstring)."""
        soft = self.soft_gates()[task_ids]  # [batch, N]
        if not self.straight_through:
            return soft
        return self.hard_gates(soft) + soft - soft.detach()

    def export_gates(self) -> torch.Tensor:
        """The served gates of every task, [num_tasks, N] (zero outside each task's composition)."""
        with torch.no_grad():
            return self.hard_gates(self.soft_gates())

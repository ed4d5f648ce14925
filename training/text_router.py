"""Training the text router: a small head over cached sentence embeddings of task-tagged prompts.

Every prompt is embedded once (router.text.TextEncoder); the head is then trained full-batch with
cross-entropy and AdamW for a fixed number of steps, so a run is deterministic for a seed. A stratified
split (every task in both parts) is held out, and the head's accuracy on it is returned with the head.

    head, accuracy = fit_text_router(prompts, tasks, list(library.tasks), TextRouterConfig())
    library = library.with_text_router(head, TextRouterConfig().settings)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from router.text import ENCODERS, EncoderConfig, TextEncoder, TextRouterHead, TextRouterSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextRouterConfig:
    """How the text router's head is trained and then run."""

    hidden: int = 64
    """Width of the head's hidden ReLU layer; 0 trains a linear head."""
    steps: int = 300
    """Full-batch AdamW steps."""
    lr: float = 1e-2
    """AdamW learning rate."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    holdout_fraction: float = 0.2
    """Share of each task's prompts held out to measure accuracy (at least one per task)."""
    min_confidence: float = 0.5
    """Written into the library: prompts whose top task probability is under this are refused."""
    seed: int = 0
    """Seed of the split and of the initial weights."""
    encoder: str = "all-MiniLM-L6-v2"
    """Sentence encoder, a key of router.text.ENCODERS."""

    def check(self) -> None:
        """Raise ValueError unless every field is usable."""
        problems = []
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 0:
            problems.append(f"hidden must be an integer >= 0, got {self.hidden!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            problems.append(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not 0 < self.holdout_fraction < 1:
            problems.append(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction!r}")
        if not 0 <= self.min_confidence < 1:
            problems.append(f"min_confidence must be in [0, 1), got {self.min_confidence!r}")
        if self.encoder not in ENCODERS:
            problems.append(f"encoder {self.encoder!r} is not supported; supported: {sorted(ENCODERS)}")
        if problems:
            raise ValueError("text router config: " + "; ".join(problems))

    @property
    def settings(self) -> TextRouterSettings:
        """The settings a library stores next to a head trained with this config."""
        return TextRouterSettings(encoder=self.encoder, min_confidence=self.min_confidence)


def fit_text_router(
    prompts: Sequence[str], tasks: Sequence[str], task_names: Sequence[str],
    config: TextRouterConfig = TextRouterConfig(),
) -> tuple[TextRouterHead, float]:
    """Train a head that predicts `tasks[i]` from `prompts[i]`; returns it and its held-out accuracy.

    `task_names` fixes the head's output order (pass the library's tasks, in library order); every one
    needs at least two prompts, one to train on and one to hold out.
    """
    config.check()
    labels = _labels(prompts, tasks, task_names)  # [n]
    train, held = _split(labels, len(task_names), config)
    embeddings = TextEncoder.shared(EncoderConfig(name=config.encoder)).encode(list(prompts))  # [n, embed_dim]
    head = _train(embeddings[train], labels[train], len(task_names), config)
    predicted = head.predict(embeddings[held]).argmax(dim=-1)  # [num_held]
    accuracy = float((predicted == labels[held]).float().mean())
    logger.info("text router: %d prompts, %d tasks, hidden %d: held-out accuracy %.3f on %d prompts",
                len(prompts), len(task_names), config.hidden, accuracy, len(held))
    return head, accuracy


def _labels(prompts: Sequence[str], tasks: Sequence[str], task_names: Sequence[str]) -> torch.Tensor:
    """Task indices [n] of the prompts, after checking the inputs."""
    if len(prompts) != len(tasks):
        raise ValueError(f"got {len(prompts)} prompts but {len(tasks)} task labels")
    if len(set(task_names)) != len(task_names) or len(task_names) < 2:
        raise ValueError(f"task_names must be at least two distinct names, got {list(task_names)}")
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("every prompt must be a non-empty string")
    index = {name: i for i, name in enumerate(task_names)}
    unknown = sorted({t for t in tasks if t not in index})
    if unknown:
        raise ValueError(f"task labels {unknown[:5]} are not in task_names {list(task_names)}")
    labels = torch.tensor([index[t] for t in tasks], dtype=torch.long)  # [n]
    counts = torch.bincount(labels, minlength=len(task_names))  # [num_tasks]
    short = [task_names[i] for i in range(len(task_names)) if counts[i] < 2]
    if short:
        raise ValueError(f"task {short[0]!r} has {int(counts[task_names.index(short[0])])} prompts; "
                         "every task needs at least 2 (one to train on, one to hold out)")
    return labels


def _split(labels: torch.Tensor, num_tasks: int, config: TextRouterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): a seeded shuffle of each task's prompts, the held part at least one."""
    gen = torch.Generator().manual_seed(config.seed)
    train, held = [], []
    for task in range(num_tasks):
        members = torch.nonzero(labels == task).flatten()  # [count]
        members = members[torch.randperm(len(members), generator=gen)]
        num_held = min(len(members) - 1, max(1, round(config.holdout_fraction * len(members))))
        held.append(members[:num_held])
        train.append(members[num_held:])
    return torch.cat(train), torch.cat(held)


def _train(embeddings: torch.Tensor, labels: torch.Tensor, num_tasks: int, config: TextRouterConfig) -> TextRouterHead:
    """Full-batch cross-entropy training of a freshly initialised head; returns it detached."""
    gen = torch.Generator().manual_seed(config.seed)
    embed_dim = embeddings.shape[1]
    width = config.hidden or embed_dim

    def uniform(*shape: int, fan_in: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return ((torch.rand(*shape, generator=gen) * 2 - 1) * bound).requires_grad_()

    w1 = uniform(config.hidden, embed_dim, fan_in=embed_dim) if config.hidden else None  # [hidden, embed_dim]
    b1 = uniform(config.hidden, fan_in=embed_dim) if config.hidden else None  # [hidden]
    w2 = uniform(num_tasks, width, fan_in=width)  # [num_tasks, width]
    b2 = uniform(num_tasks, fan_in=width)  # [num_tasks]
    head = TextRouterHead(w2, b2, w1, b1)
    params = [p for p in (w1, b1, w2, b2) if p is not None]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.steps):
        loss = F.cross_entropy(head.logits(embeddings), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    logger.debug("text router: final training loss %.4f after %d steps", float(loss.detach()), config.steps)
    return TextRouterHead(*(None if t is None else t.detach().clone() for t in (w2, b2, w1, b1)))

"""Per-block gradient sketches and energies of the frozen backbone, per task (step 2 of the search)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from training.placement.blocks import Block, target_linear
from training.placement.config import Point

logger = logging.getLogger(__name__)

PRIME = 2**31 - 1
"""Mersenne prime of the universal hashes; flat indices and hash coefficients stay below it."""
CHUNK_ELEMENTS = 1 << 22
"""Gradient elements hashed at once, which bounds the hashing temporaries to a few tens of MB."""
BATCH_KEYS = ("input_ids", "attention_mask", "labels")
"""Tensors every batch carries."""


@dataclass(frozen=True)
class GradientSketch:
    """What the frozen backbone's gradients say about every block, per task."""

    tasks: tuple[str, ...]
    """Task names, in the order of the task axis."""
    sketches: torch.Tensor
    """[num_blocks, num_tasks, sketch_dim] count sketch of the block's mean gradient over the task's batches."""
    energy: torch.Tensor
    """[num_blocks, num_tasks] mean over the task's batches of the block's squared gradient norm (exact)."""
    losses: torch.Tensor
    """[num_tasks] mean loss of the frozen backbone on the task's batches."""


def point_hash(seed: int, point: Point) -> tuple[int, int, int, int]:
    """Coefficients (a, b) of the bucket hash and (c, d) of the sign hash of one point's weight."""
    rng = random.Random(f"tessera-placement:{seed}:{point[0]}:{point[1]}")
    return tuple(rng.randrange(1, PRIME) for _ in range(4))


def count_sketch(
    matrix: torch.Tensor, row_block: torch.Tensor, num_blocks: int, sketch_dim: int, coeffs: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count sketch and squared norm of every row block of `matrix` [rows, cols].

    Element (i, j) has flat index n = i * cols + j, bucket h(n) = ((a n + b) mod p) mod sketch_dim and sign
    s(n) = +1 or -1 from the low bit of (c n + d) mod p; it adds s(n) * m_ij to bucket h(n) of the sketch of
    block row_block[i]. Rows are hashed in chunks, so no [numel, sketch_dim] matrix is ever made.
    """
    rows, cols = matrix.shape
    if rows * cols >= PRIME:
        raise ValueError(f"a weight of {rows}x{cols} elements is too large for the 31-bit sketch hash")
    a, b, c, d = coeffs
    sketch = torch.zeros(num_blocks * sketch_dim, dtype=torch.float32, device=matrix.device)  # [blocks * s]
    energy = torch.zeros(num_blocks, dtype=torch.float32, device=matrix.device)  # [blocks]
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        chunk = matrix[start : start + step].float()  # [chunk_rows, cols]
        flat = torch.arange(start * cols, start * cols + chunk.numel(), device=matrix.device)  # [chunk_numel]
        bucket = (a * flat + b) % PRIME % sketch_dim
        sign = ((c * flat + d) % PRIME % 2) * 2 - 1
        owner = row_block[start : start + chunk.shape[0]]  # [chunk_rows]
        slot = owner.repeat_interleave(cols) * sketch_dim + bucket
        sketch.index_add_(0, slot, chunk.reshape(-1) * sign)
        energy.index_add_(0, owner, chunk.square().sum(dim=1))
    return sketch.view(num_blocks, sketch_dim), energy


@contextmanager
def frozen_except(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode with gradients only for `params`; clears every .grad, restores modes and flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    keep = {id(p) for p in params}
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
            p.grad = None
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


def batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
    """Causal LM loss (mean over shifted labels != -100) of one batch, checked first."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise ValueError(f"{where}: batch lacks {missing}; every batch needs {list(BATCH_KEYS)}")
    shapes = {key: tuple(batch[key].shape) for key in BATCH_KEYS}
    if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 2:
        raise ValueError(f"{where}: input_ids, attention_mask and labels must share one [batch, seq] shape: {shapes}")
    if not (batch["labels"][:, 1:] != -100).any():
        raise ValueError(f"{where}: no label after the first position is != -100, so the loss is undefined")
    device = next(model.parameters()).device
    inputs = {key: batch[key].to(device) for key in BATCH_KEYS}
    loss = model(**inputs, use_cache=False).loss
    if not torch.isfinite(loss):
        raise ValueError(f"{where}: the loss is {loss.item()}")
    return loss


def check_task_batches(task_batches: Mapping[str, Sequence[Mapping]], batches_per_task: int) -> None:
    """Raise ValueError unless there is a task and each has at least `batches_per_task` batches."""
    if not task_batches:
        raise ValueError("task_batches is empty; the search needs at least one task")
    for task, batches in task_batches.items():
        if len(batches) < batches_per_task:
            raise ValueError(f"task {task!r} has {len(batches)} batches; batches_per_task={batches_per_task}")


def _point_layout(blocks: Sequence[Block]) -> dict[Point, tuple[int, int, int]]:
    """Point -> (axis, first block index, block count); a point's blocks are contiguous."""
    layout: dict[Point, tuple[int, int, int]] = {}
    for i, block in enumerate(blocks):
        axis, first, count = layout.get(block.point, (block.axis, i, 0))
        if first + count != i:
            raise ValueError(f"blocks of point {block.point} are not contiguous")
        layout[block.point] = (axis, first, count + 1)
    return layout


def _row_owner(blocks: Sequence[Block], first: int, count: int, device: torch.device) -> torch.Tensor:
    """[rows] block index (within the point) of every row of the point's oriented weight."""
    sizes = torch.tensor([blocks[first + k].stop - blocks[first + k].start for k in range(count)], device=device)
    return torch.repeat_interleave(torch.arange(count, device=device), sizes)  # [rows]


class _Accumulator:
    """Per-task running sketches and energies, filled by one post-accumulate hook per weight."""

    def __init__(self, blocks: Sequence[Block], num_tasks: int, config, device: torch.device):
        self.blocks, self.config, self.device, self.task = blocks, config, device, 0
        self.layout = _point_layout(blocks)
        self.sketches = torch.zeros(len(blocks), num_tasks, config.sketch_dim, device=device)  # [blocks, tasks, s]
        self.energy = torch.zeros(len(blocks), num_tasks, device=device)  # [blocks, tasks]

    def hook(self, point: Point):
        """The hook of `point`'s weight: sketch its gradient into the current task's rows, then free it."""
        axis, first, count = self.layout[point]
        owner = _row_owner(self.blocks, first, count, self.device)
        coeffs, scale = point_hash(self.config.seed, point), 1.0 / self.config.batches_per_task

        def accumulate(weight: nn.Parameter) -> None:
            grad = weight.grad if axis == 0 else weight.grad.t()  # [rows, cols], blocks are row ranges
            sketch, block_energy = count_sketch(grad, owner, count, self.config.sketch_dim, coeffs)
            self.sketches[first : first + count, self.task] += sketch * scale
            self.energy[first : first + count, self.task] += block_energy * scale
            weight.grad = None

        return accumulate


def sketch_gradients(
    model: nn.Module, task_batches: Mapping[str, Sequence[Mapping]], blocks: Sequence[Block], config
) -> GradientSketch:
    """Sketches [blocks, tasks, sketch_dim], energies [blocks, tasks] and base losses [tasks].

    Every weight's gradient is sketched in a post-accumulate hook and freed at once, so at most one weight's
    gradient exists at a time besides the activations of the batch.
    """
    check_task_batches(task_batches, config.batches_per_task)
    tasks, per_task = tuple(task_batches), config.batches_per_task
    accumulator = _Accumulator(blocks, len(tasks), config, next(model.parameters()).device)
    linears = {point: target_linear(model, *point) for point in accumulator.layout}
    losses = torch.zeros(len(tasks))  # [tasks]
    with frozen_except(model, [linear.weight for linear in linears.values()]):
        handles = [lin.weight.register_post_accumulate_grad_hook(accumulator.hook(p)) for p, lin in linears.items()]
        try:
            for t, task in enumerate(tasks):
                accumulator.task = t
                for i, batch in enumerate(task_batches[task][:per_task]):
                    loss = batch_loss(model, batch, f"task {task!r} batch {i}")
                    loss.backward()
                    losses[t] += loss.item() / per_task
        finally:
            for handle in handles:
                handle.remove()
    logger.info("sketched %d blocks over %d tasks; base losses %s", len(blocks), len(tasks), losses.tolist())
    return GradientSketch(tasks, accumulator.sketches.cpu(), accumulator.energy.cpu(), losses)

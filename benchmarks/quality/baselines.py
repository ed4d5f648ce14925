"""The LoRA baselines, trained with `peft` and served by Tessera from an imported library.

    examples --training.data.encode--> rows (labels on assistant tokens only)
    backbone (frozen) + peft LoraConfig(r, alpha, target_modules, dropout 0) -> AdamW on lora_A, lora_B
    each step: seeded epoch permutations (as training.step does), training.losses.task_loss
    end: save_pretrained into a PEFT directory (written atomically), then router.peft_io.import_peft

The adapters get Tessera's LoRA scale (alpha / r = TrainConfig.alpha / TrainConfig.rank), its targets,
learning rate, weight decay, batch size, sequence cut, seed, device and dtype; only rank and steps are
chosen by the caller (equal parameters, equal data; see benchmarks.quality.systems).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from router.atomic import write_directory
from router.controller import ControllerSettings
from router.fingerprint import BackboneFingerprint
from router.info import TaskInfo
from router.library import ModuleLibrary
from router.peft_io import import_peft
from training.config import TrainConfig
from training.data import IGNORE, DataError, Example, collate, encode
from training.losses import task_loss
from training.trainer import resolve_device

logger = logging.getLogger(__name__)

ON_LOGIT, OFF_LOGIT = 10.0, -10.0
"""Controller logits of a baseline library: a task's own module(s) on, every other module off."""


@dataclass(frozen=True)
class LoraReport:
    """One trained PEFT adapter."""

    path: Path
    """The PEFT directory (adapter_config.json + adapter_model.safetensors)."""
    rank: int
    """LoRA rank r."""
    alpha: float
    """lora_alpha; the scale is alpha / r."""
    trainable_params: int
    """Parameters the optimiser updated (every lora_A and lora_B element)."""
    steps: int
    """Optimiser steps taken."""
    seconds: float
    """Wall time of loading, training and saving."""
    task_loss_history: tuple[float, ...]
    """Task loss of every step."""


def batch_order(num_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Rows of step `step`: positions [step * B, (step + 1) * B) of a stream of seeded epoch permutations."""
    order: dict[int, list[int]] = {}
    rows = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch = position // num_rows
        if epoch not in order:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order[epoch] = torch.randperm(num_rows, generator=gen).tolist()
        rows.append(order[epoch][position % num_rows])
    return rows


def _encoded(tokenizer, examples: Sequence[Example], max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    rows = [encode(tokenizer, example, max_seq_len) for example in examples]
    rows = [(ids, labels) for ids, labels in rows if any(label != IGNORE for label in labels[1:])]
    if not rows:
        raise DataError(f"no example keeps an assistant token within max_seq_len={max_seq_len}")
    return rows


def train_peft_lora(model_dir: str | Path, examples: Sequence[Example], out: str | Path, config: TrainConfig,
                    rank: int, steps: int) -> LoraReport:
    """Train one PEFT LoRA of rank `rank` for `steps` steps on `examples`; write it to `out` (module docstring)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    device, dtype = resolve_device(config)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = _encoded(tokenizer, examples, config.max_seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    alpha = rank * config.alpha / config.rank
    torch.manual_seed(config.seed)
    backbone = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(config.targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(backbone, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    history = []
    for step in range(steps):
        chosen = [rows[i] for i in batch_order(len(rows), config.batch_size, step, config.seed)]
        batch = {k: v.to(device) for k, v in collate(chosen, [0] * len(chosen), pad).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = task_loss(logits, batch["labels"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"LoRA training diverged at step {step} (loss {float(loss)}); lower the rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    path = write_directory(Path(out), lambda tmp: model.save_pretrained(str(tmp)))
    seconds = time.perf_counter() - started
    count = sum(p.numel() for p in params)
    logger.info("trained PEFT LoRA r=%d on %d examples, %d steps, loss %.4f -> %.4f, %.1f s", rank, len(rows),
                steps, history[0] if history else float("nan"), history[-1] if history else float("nan"), seconds)
    return LoraReport(path, rank, alpha, count, steps, seconds, tuple(history))


def lora_library(backbone: BackboneFingerprint, adapters: Mapping[str, Path], tasks: Sequence[TaskInfo],
                 task_modules: Mapping[str, str]) -> ModuleLibrary:
    """A library of imported PEFT adapters (module name -> PEFT dir); task t's controller picks task_modules[t].

    Every task's composition is its own module at gate 1 (top_k 1); serving uses explicit weights anyway.
    """
    modules = {name: import_peft(path, backbone, name, f"PEFT LoRA baseline {name}") for name, path in adapters.items()}
    names = list(modules)
    unknown = sorted({m for m in task_modules.values() if m not in modules})
    if unknown or set(task_modules) != {t.name for t in tasks}:
        raise ValueError(f"task_modules must map every task to an adapter; unknown modules {unknown}, "
                         f"tasks {sorted(task_modules)} vs {sorted(t.name for t in tasks)}")
    logits = torch.full((len(tasks), len(names)), OFF_LOGIT)  # [num_tasks, num_modules]
    for row, task in enumerate(tasks):
        logits[row, names.index(task_modules[task.name])] = ON_LOGIT
    return ModuleLibrary.build(backbone, modules, tasks, logits, ControllerSettings(top_k=1))

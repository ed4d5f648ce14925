"""A quick held-out check of a module library on suite items, through transformers `generate`.

A task's composition (the library's controller) is merged into a copy of the backbone's weights,
W' = W + sum_j g_j * (alpha_j / r_j) * B_j A_j at every point a chosen module adapts, which is the exact
function the server computes; items are then decoded greedily in left-padded batches and compared with
their answers. This is a training-side check (the demo's build log, learnability measurements); the
quality benchmark evaluates through the serving engine instead.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch

from router.composition import Composition
from router.library import ModuleLibrary
from training.modules import target_linear
from training.suite.data import Item

logger = logging.getLogger(__name__)


def merge_composition(model: torch.nn.Module, library: ModuleLibrary, composition: Composition) -> torch.nn.Module:
    """A deep copy of the HF causal LM `model` with `composition`'s modules merged into its linears."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, gate in zip(composition.module_ids, composition.gates):
            info = library.modules[name]
            for point, (a, b) in library.module_weights(name).items():
                linear = target_linear(merged, point)
                delta = gate * (info.alpha / info.rank) * (b.float() @ a.float())  # [out, in]
                linear.weight += delta.to(linear.weight.dtype)
    return merged


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                     batch_size: int = 32) -> list[str]:
    """Greedy replies of `model` to single-turn user `prompts`, decoded without special tokens."""
    replies = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True)
                     for p in prompts[start: start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            width = batch["input_ids"].shape[1]
            replies += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [reply.strip("\n") for reply in replies]


def exact_match(model: torch.nn.Module, tokenizer, items: Sequence[Item]) -> float:
    """Share of `items` whose greedy reply equals the answer exactly (0.0 for no items)."""
    if not items:
        return 0.0
    longest = max(len(tokenizer(item.answer, add_special_tokens=False)["input_ids"]) for item in items)
    replies = generate_answers(model, tokenizer, [item.prompt for item in items], longest + 2)
    return sum(reply == item.answer for reply, item in zip(replies, items)) / len(items)


def library_exact_match(model_dir: str, library: ModuleLibrary, items: Sequence[Item]) -> dict[str, float]:
    """Held-out exact match per task of `items`, each task served with its controller composition
    (a composite "a+b" with the union of both tasks' compositions, gates summed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores = {}
    for task in dict.fromkeys(item.task for item in items):
        composition = task_composition(library, [t for t in task.split("+")])
        merged = merge_composition(model, library, composition)
        scores[task] = exact_match(merged, tokenizer, [item for item in items if item.task == task])
    return scores


def task_composition(library: ModuleLibrary, tasks: Sequence[str]) -> Composition:
    """The controller composition of one task, or of several tasks' union with gates summed."""
    gates: dict[str, float] = {}
    for task in tasks:
        composition = library.controller.gates_for_task(task)
        for name, gate in zip(composition.module_ids, composition.gates):
            gates[name] = gates.get(name, 0.0) + gate
    return Composition(tuple(gates), tuple(gates.values()), "tag", "+".join(tasks))

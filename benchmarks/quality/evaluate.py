"""Serving held-out items through the real engine and scoring them.

    item -> policy -> Composition (router.compose: a task tag, `auto` + the prompt, explicit weights, or none)
         -> chat template (generation prompt) -> token ids -> Request(greedy, max_tokens)
    all requests of one system -> Engine(EngineConfig(model, library)).generate_batch -> text, finish reason
         -> Outcome (benchmarks.quality.metrics.exact_match)

max_tokens is the longest reference answer in tokens plus a margin, the same for every system. A prompt
the text router refuses (confidence under its floor) is not served: its outcome is wrong, with finish
reason `refused`, as a server would answer it with an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from router.compose import compose
from router.composition import NO_COMPOSITION, Composition
from router.errors import RoutingError
from router.library import ModuleLibrary
from router.text import AUTO
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams

from benchmarks.quality.metrics import Outcome, exact_match

logger = logging.getLogger(__name__)

REFUSED = "refused"
"""Finish reason of an untagged item the text router refused."""


@dataclass(frozen=True)
class EvalItem:
    """One held-out item as the evaluation needs it."""

    task: str
    """Task tag: a base task, or "a+b" for a composite."""
    tasks: tuple[str, ...]
    """The base tasks it applies, in order."""
    input: str
    """The task input."""
    messages: list[dict]
    """The conversation up to (not including) the assistant's answer."""
    answer: str
    """The reference answer."""

    @property
    def prompt(self) -> str:
        """The user prompt an untagged request is routed by: the last user message (what the server embeds)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


Policy = Callable[[EvalItem], tuple[Composition | None, str | None]]
"""item -> (composition, routed task); composition None means the request is refused."""


def backbone_policy() -> Policy:
    """No composition: the backbone alone, prompted as the item is."""
    return lambda item: (NO_COMPOSITION, None)


def tagged_policy(library: ModuleLibrary) -> Policy:
    """The controller's composition for the item's task tag ("a+b" for a composite)."""
    return lambda item: (compose(library, task=item.task), None)


def untagged_policy(library: ModuleLibrary) -> Policy:
    """`auto`: the text router picks the task from the prompt; a refusal is recorded, not served."""

    def policy(item: EvalItem) -> tuple[Composition | None, str | None]:
        try:
            composition = compose(library, task=AUTO, text=item.prompt)
        except RoutingError as error:
            logger.debug("text router refused an item of task %s: %s", item.task, error)
            return None, None
        return composition, composition.task

    return policy


def explicit_policy(library: ModuleLibrary, task_modules: Mapping[str, str], max_k: int = 4) -> Policy:
    """The item's task's own module (task_modules[item.task]) at weight 1 when it has one; otherwise each base task
    of the item contributes its own module at weight 1 (a composite served by LoRA arithmetic)."""

    def policy(item: EvalItem) -> tuple[Composition | None, str | None]:
        tasks = (item.task,) if item.task in task_modules else item.tasks
        names = list(dict.fromkeys(task_modules[t] for t in tasks))
        return compose(library, modules={name: 1.0 for name in names}, max_k=max_k), None

    return policy


def max_new_tokens(tokenizer, items: Sequence[EvalItem], margin: int) -> int:
    """Longest reference answer in tokens, plus `margin` (room for the end-of-turn token and slack)."""
    return max(len(tokenizer(item.answer, add_special_tokens=False)["input_ids"]) for item in items) + margin


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat template rendered with the generation prompt (as training.data renders)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class ServeConfig:
    """How the evaluation engine is sized; the defaults fit a few hundred short requests."""

    device: str = "cpu"
    """Engine device (EngineConfig.device)."""
    dtype: str = "auto"
    """Engine dtype (EngineConfig.dtype)."""
    block_size: int = 16
    """Tokens per KV block."""
    max_num_seqs: int = 256
    """Requests decoded together at most."""
    max_num_batched_tokens: int = 4096
    """Tokens per engine step at most."""
    max_k: int = 4
    """Modules per request at most."""
    answer_margin: int = 4
    """Tokens allowed beyond the longest reference answer."""


def _engine(model_dir: str | Path, library_path: str | Path | None, library: ModuleLibrary | None,
            lengths: list[int], config: ServeConfig) -> Engine:
    blocks = sum(-(-length // config.block_size) for length in lengths) + 1
    return Engine(EngineConfig(
        model=str(model_dir), library=None if library_path is None else str(library_path), device=config.device,
        dtype=config.dtype, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, num_kv_blocks=blocks,
        max_loaded_modules=max(len(library.modules), 1) if library is not None else 1, max_k=config.max_k))


def serve(model_dir: str | Path, library_path: str | Path | None, items: Sequence[EvalItem], policy: Policy,
          config: ServeConfig, max_tokens: int) -> tuple[list[Outcome], float]:
    """Every item served greedily through one engine with `policy`'s compositions; (outcomes, seconds)."""
    started = time.perf_counter()
    library = ModuleLibrary.load(library_path) if library_path is not None else None
    decided = [policy(item) for item in items]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    requests = [Request(f"item{i}", prompt_ids(tokenizer, item.messages), sampling, composition)
                for i, (item, (composition, _)) in enumerate(zip(items, decided)) if composition is not None]
    results = {}
    if requests:
        engine = _engine(model_dir, library_path, library,
                         [len(r.prompt_token_ids) + max_tokens for r in requests], config)
        results = engine.generate_batch(requests)
    outcomes = []
    for i, (item, (composition, routed)) in enumerate(zip(items, decided)):
        increments = results.get(f"item{i}")
        text = "".join(o.text for o in increments) if increments else ""
        reason = increments[-1].finish_reason if increments else REFUSED
        chosen = composition or NO_COMPOSITION
        outcomes.append(Outcome(item.task, item.input, item.answer, text, reason, chosen.module_ids, chosen.gates,
                                routed, exact_match(text, item.answer, reason)))
    return outcomes, time.perf_counter() - started

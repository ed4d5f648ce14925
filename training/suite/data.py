"""Seeded train/test items of the suite, as chat Examples or as `tessera train --data` JSONL.

Train and test are disjoint by construction: an input belongs to the test side when a stable hash of
the input string (not of the task, not of the seed) falls in a fixed TEST_SHARE of its range, and to the
train side otherwise. So no test input of any task, base or composite, is ever a (clean) training input
of any task, whatever `n`, seed or lengths are asked for. Items are drawn by rejection: draw an input
from the task's generator, keep it if its side is the split asked for. Test items of a task are also
distinct from each other (each one counts once); training inputs may repeat.

Noise (SuiteConfig.noise) replaces each character of a TRAINING input, independently with probability
`noise`, by a different random ALPHABET character; the answer is still computed from the clean input, so
noise teaches wrong input -> answer pairs, which is what the robustness sweep measures. Test items are
always clean.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from router.atomic import write_file
from training.data import Example
from training.suite.tasks import ALPHABET, TASKS, answer_for, prompt_for, split_task

SPLITS = ("train", "test")
TEST_SHARE = 0.25
"""Share of the input space (by hash) reserved for test items."""
MAX_DRAWS_PER_ITEM = 200
"""Draws per asked item before make_items gives up (the asked lengths leave too few distinct inputs)."""


@dataclass(frozen=True)
class SuiteConfig:
    """How much suite data, of which lengths and noise, from which seed."""

    train_per_task: int = 400
    """Training examples per base task (1000 steps of batch 16 walk 6 tasks' 2400 examples 6.7 times)."""
    test_per_task: int = 50
    """Held-out examples per task (base and composite); each held-out input is distinct."""
    min_len: int = 3
    """Shortest input, in characters (as asked of Task.make_input)."""
    max_len: int = 8
    """Longest input, in characters; lengths are uniform in [min_len, max_len]. NOTE: on the small
    backbone, 1000 steps of a rank-8 bank reached a mean base-task exact match of 0.43 with inputs of
    3-8 characters against 0.29 with 4-10."""
    noise: float = 0.0
    """Share of each TRAINING input's characters replaced by random ALPHABET characters (answers are
    computed from the clean input); test inputs are always clean. The input-noise sweep knob."""
    seed: int = 0
    """Seeds every input draw and the noise (separate streams per task and split)."""

    def __post_init__(self) -> None:
        for name in ("train_per_task", "test_per_task", "min_len", "max_len", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"SuiteConfig.{name} must be an integer, got {value!r}")
        if self.train_per_task < 0 or self.test_per_task < 0:
            raise ValueError("SuiteConfig.train_per_task and test_per_task must be >= 0, got "
                             f"{self.train_per_task} and {self.test_per_task}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"SuiteConfig needs 1 <= min_len <= max_len, got min_len={self.min_len}, "
                             f"max_len={self.max_len}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not 0 <= self.noise <= 1:
            raise ValueError(f"SuiteConfig.noise must be a number in [0, 1], got {self.noise!r}")


@dataclass(frozen=True)
class Item:
    """One suite example: the input, the prompt built from it, and the expected answer."""

    tasks: tuple[str, ...]
    """The base tasks applied in order: ("reverse",), or ("reverse", "uppercase") for a composite."""
    input: str
    """The input as it appears in the prompt (noisy for a noisy training item)."""
    prompt: str
    """The user message: prompt_for(tasks, input)."""
    answer: str
    """The expected assistant reply: answer_for(tasks, clean input)."""
    clean_input: str | None = None
    """The clean input the answer was computed from, when noise changed `input`; None when `input` is clean."""

    @property
    def task(self) -> str:
        """The task name: the base task, or "first+second" for a composite."""
        return "+".join(self.tasks)


def is_test_input(text: str) -> bool:
    """Whether `text` lies on the test side of the fixed hash split."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < TEST_SHARE * 2 ** 64


def _corrupt(text: str, rate: float, rng: random.Random) -> str:
    """`text` with each character, with probability `rate`, replaced by a different ALPHABET character."""
    chars = list(text)
    for index, char in enumerate(chars):
        if rng.random() < rate:
            chars[index] = rng.choice([c for c in ALPHABET if c != char])
    return "".join(chars)


def _inputs(name: str, n: int, split: str, config: SuiteConfig) -> list[str]:
    """n clean inputs of task `name` on the `split` side, from the task's first base task's generator."""
    first = TASKS[split_task(name)[0]]
    rng = random.Random(f"suite:{config.seed}:{name}:{split}")
    want_test, distinct = split == "test", split == "test"
    chosen: list[str] = []
    seen: set[str] = set()
    for _ in range(n * MAX_DRAWS_PER_ITEM):
        if len(chosen) == n:
            break
        text = first.make_input(rng, rng.randint(config.min_len, config.max_len))
        if is_test_input(text) != want_test or (distinct and text in seen):
            continue
        chosen.append(text)
        seen.add(text)
    if len(chosen) < n:
        raise ValueError(f"task {name}: found only {len(chosen)} of {n} {split} inputs with lengths "
                         f"{config.min_len}-{config.max_len}; ask for fewer items or longer inputs")
    return chosen


def make_items(tasks: Sequence[str], n: int, split: str, config: SuiteConfig = SuiteConfig()) -> list[Item]:
    """`n` items of every task in `tasks` (base or composite names), task by task, seeded and deterministic.

    `split` "train" or "test": the two never share an input (module docstring); noise only on "train".
    """
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r} (use [{tasks!r}])")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n (items per task) must be an integer >= 0, got {n!r}")
    items = []
    for name in tasks:
        chain = split_task(name)
        noise_rng = random.Random(f"suite:{config.seed}:{name}:noise")
        for clean in _inputs(name, n, split, config):
            shown = _corrupt(clean, config.noise, noise_rng) if split == "train" and config.noise else clean
            items.append(Item(chain, shown, prompt_for(chain, shown), answer_for(chain, clean),
                              clean if shown != clean else None))
    return items


def to_examples(items: Sequence[Item]) -> list[Example]:
    """One chat Example per item: the prompt as the user turn, the answer as the assistant turn."""
    return [Example(item.task, [{"role": "user", "content": item.prompt},
                                {"role": "assistant", "content": item.answer}]) for item in items]


def write_jsonl(items: Sequence[Item], path: str | Path) -> Path:
    """Write `items` atomically as `tessera train --data` JSONL (task + messages, one per line).

    Only base-task items: a composite's name contains '+', which is no valid library task name (and
    composites are never trained on).
    """
    composite = next((item.task for item in items if len(item.tasks) != 1), None)
    if composite is not None:
        raise ValueError(f"write_jsonl writes training data of base tasks; {composite!r} is a composite "
                         "(its name is no valid library task name)")
    lines = [json.dumps({"task": e.task, "messages": e.messages}, ensure_ascii=False) + "\n"
             for e in to_examples(items)]
    path = Path(path)
    write_file(path, "".join(lines))
    return path

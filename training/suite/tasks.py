"""The synthetic task suite: six string tasks a small model can learn, and composites of two of them.

Every prompt and answer is made of ALPHABET characters, one token each in the suite's tokenizer
(training.suite.backbone), so a task is a pure character-level mapping:

    reverse    "reverse the string: ab3c"                    -> "c3ba"
    uppercase  "convert to uppercase: ab c"                  -> "AB C"
    sort       "sort the characters: dcab"                   -> "abcd"
    add        "add the two numbers: 12+305"                 -> "317"
    caesar     "shift each letter by 3: xyz"                 -> "abc"
    count      "count the letter a: banana"                  -> "3"

A composite "first+second" chains two of them: its prompt names both instructions in order ("reverse the
string, then convert to uppercase: ab3c"), its inputs come from the first task and its answer is
TASKS[second].answer(TASKS[first].answer(input)). Composites are for evaluation only: no module is ever
trained on them; each second task's training inputs cover every character its first task outputs
(chain_in_domain).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,:;!?+-=()'"
"""Every character a prompt or an answer may contain; each is one token of the suite tokenizer."""

CAESAR_SHIFT = 3
"""How far caesar moves every letter along the alphabet (wrapping z -> c, case kept)."""
COUNT_LETTER = "a"
"""The letter whose occurrences count counts."""
COMPOSITE_SEPARATOR = "+"
"""Joins the two task names of a composite ("reverse+uppercase")."""


def _letters(rng: random.Random, length: int, pool: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(pool) for _ in range(max(length, 1)))


def _words(rng: random.Random, length: int) -> str:
    """Lowercase letters with single spaces between runs of 2-5 letters, neither first nor last."""
    text = _letters(rng, length)
    chars = list(text)
    position = rng.randint(2, 5)
    while position < len(chars) - 1:
        chars[position] = " "
        position += rng.randint(3, 6)
    return "".join(chars)


def _sum_input(rng: random.Random, length: int) -> str:
    """Two non-negative integers "x+y" of about `length` characters in all (at least one digit each)."""
    digits = max(length - 1, 2)
    left = rng.randint(1, digits - 1)
    right = digits - left

    def number(width: int) -> str:
        return str(rng.randint(10 ** (width - 1) if width > 1 else 0, 10 ** width - 1))

    return f"{number(left)}+{number(right)}"


def _count_input(rng: random.Random, length: int) -> str:
    """Lowercase letters in which COUNT_LETTER is frequent (about one character in four)."""
    return "".join(COUNT_LETTER if rng.random() < 0.25 else rng.choice(string.ascii_lowercase)
                   for _ in range(max(length, 1)))


def _add(text: str) -> str:
    parts = text.split("+")
    if len(parts) != 2 or not all(part.isdigit() and part.isascii() for part in parts):
        raise ValueError(f"add expects two non-negative integers joined by '+', like '12+305'; got {text!r}")
    return str(int(parts[0]) + int(parts[1]))


def _caesar(text: str) -> str:
    def shift(char: str) -> str:
        for letters in (string.ascii_lowercase, string.ascii_uppercase):
            if char in letters:
                return letters[(letters.index(char) + CAESAR_SHIFT) % 26]
        return char

    return "".join(shift(char) for char in text)


@dataclass(frozen=True)
class Task:
    """One base task of the suite."""

    name: str
    """Task name, also the library task name ("reverse")."""
    instruction: str
    """What the prompt asks, lowercase and without a trailing colon ("reverse the string")."""
    description: str
    """One sentence for library.json and the README."""
    generate: Callable[[random.Random, int], str]
    """(rng, length) -> an input of about `length` characters; use make_input."""
    compute: Callable[[str], str]
    """input -> the exact expected output; use answer."""

    def make_input(self, rng: random.Random, length: int) -> str:
        """A valid input of about `length` characters (at least one), drawn from `rng`."""
        if length < 1:
            raise ValueError(f"task {self.name}: input length must be >= 1, got {length}")
        return self.generate(rng, length)

    def answer(self, text: str) -> str:
        """The exact expected output for input `text`."""
        return self.compute(text)


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("reverse", "reverse the string", "Writes the input string backwards, character by character.",
         lambda rng, n: _letters(rng, n, string.ascii_lowercase + string.digits), lambda text: text[::-1]),
    Task("uppercase", "convert to uppercase", "Converts every letter of the input to uppercase.",
         _words, str.upper),
    Task("sort", "sort the characters", "Sorts the characters of the input in ascending (code point) order.",
         _letters, lambda text: "".join(sorted(text))),
    Task("add", "add the two numbers", "Adds the two non-negative integers of an input like '12+305'.",
         _sum_input, _add),
    Task("caesar", f"shift each letter by {CAESAR_SHIFT}",
         f"Moves every letter {CAESAR_SHIFT} places along the alphabet (z wraps to c), keeping case.",
         _letters, _caesar),
    Task("count", f"count the letter {COUNT_LETTER}",
         f"Counts how often the letter '{COUNT_LETTER}' occurs in the input (a decimal number).",
         _count_input, lambda text: str(text.count(COUNT_LETTER))),
)}
"""The base tasks by name: modules are trained on these."""

COMPOSITES: dict[str, tuple[str, str]] = {
    "caesar+reverse": ("caesar", "reverse"),
    "sort+uppercase": ("sort", "uppercase"),
    "caesar+uppercase": ("caesar", "uppercase"),
    "sort+caesar": ("sort", "caesar"),
}
"""Composite tasks (evaluation only): name "first+second" -> (first, second). Every second task is defined on
any string, and each pair is chosen so that the second task was trained on every character its first task can
output (`chain_in_domain`): a composite asks modules to chain what they learned, never to transform characters
their task never saw. NOTE: until 2026-12-03 the set was reverse+uppercase, caesar+reverse, sort+uppercase and
uppercase+caesar; two of those left the domain (uppercase never sees digits, which reverse passes on, and caesar
never sees the uppercase letters that uppercase outputs), so they tested more than composition.
caesar+uppercase is the same function as uppercase+caesar (the two commute) with its chain inside the domain."""


def instruction_words(tasks: Sequence[str]) -> int:
    """Words in the instruction of the prompt of `tasks` (a base task, or a composite's chain): what the
    backbone's pretraining instructions must cover (training.suite.backbone.BackboneConfig.instruction_words)."""
    return len(prompt_for(tasks, "x").rsplit(":", 1)[0].split())


def alphabet_of(task: str, sample: int = 2000, max_len: int = 16, seed: int = 0) -> tuple[set[str], set[str]]:
    """(characters of the inputs, characters of the answers) of `task` over `sample` seeded inputs of 1-max_len
    characters: a sampled estimate of the task's training domain and range (at 2000 inputs every character of
    the suite generators' pools appears)."""
    rng = random.Random(f"alphabet:{seed}:{task}")
    inputs, outputs = set(), set()
    for _ in range(sample):
        text = TASKS[task].make_input(rng, rng.randint(1, max_len))
        inputs |= set(text)
        outputs |= set(TASKS[task].answer(text))
    return inputs, outputs


def chain_in_domain(first: str, second: str) -> bool:
    """Whether every character `first` can output is one `second`'s inputs contain (alphabet_of)."""
    return alphabet_of(first)[1] <= alphabet_of(second)[0]


def split_task(name: str) -> tuple[str, ...]:
    """The base tasks of a base or composite task name ("caesar+reverse" -> ("caesar", "reverse"))."""
    if name in TASKS:
        return (name,)
    if name in COMPOSITES:
        return COMPOSITES[name]
    raise ValueError(f"unknown suite task {name!r}; base tasks are {sorted(TASKS)}, composites {sorted(COMPOSITES)}")


def _check(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r} (use ({tasks!r},))")
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("tasks is empty: name at least one base task")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown base task {unknown[0]!r}; base tasks are {sorted(TASKS)}")
    return tasks


def prompt_for(tasks: Sequence[str], text: str) -> str:
    """The user message: the tasks' instructions in order, joined by ", then ", a colon, then the input."""
    instructions = ", then ".join(TASKS[t].instruction for t in _check(tasks))
    return f"{instructions}: {text}"


def answer_for(tasks: Sequence[str], text: str) -> str:
    """The chained answer: each task applied in order to the previous task's output."""
    for task in _check(tasks):
        text = TASKS[task].answer(text)
    return text

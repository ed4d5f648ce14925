"""A small synthetic set of clearly different prompt kinds, and a text router head trained on it once."""

from __future__ import annotations

import functools
import random

from training.text_router import TextRouterConfig, fit_text_router

TEMPLATES = {
    "reverse": [
        "reverse the letters of {w}", "write {w} backwards", "spell '{w}' in reverse order",
        "what is {w} read from right to left?", "flip the order of the characters in: {w}",
    ],
    "uppercase": [
        "convert {w} to uppercase", "write '{w}' in capital letters", "make every letter of {w} upper case",
        "shout this in all caps: {w}", "capitalize all the letters: {w}",
    ],
    "arithmetic": [
        "what is {a} plus {b}?", "compute {a} * {b}", "add {a} and {b}", "calculate {a} minus {b}",
        "how much is {a} times {b}?",
    ],
}
TASKS = tuple(TEMPLATES)
WORDS = (
    "apple river stone cloud garden window silver yellow tiger planet music bridge candle forest ocean pencil "
    "orange rocket castle dragon winter summer coffee marble violet thunder lantern puzzle harbor meadow"
).split()


def prompts(per_task: int, seed: int) -> tuple[list[str], list[str]]:
    """(prompts, task labels): `per_task` prompts of every kind, templates filled with random words or numbers."""
    rng = random.Random(seed)
    texts, labels = [], []
    for task, templates in TEMPLATES.items():
        for i in range(per_task):
            words = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
            a, b = rng.randint(2, 999), rng.randint(2, 999)
            texts.append(templates[i % len(templates)].format(w=words, a=a, b=b))
            labels.append(task)
    return texts, labels


@functools.cache
def trained_head(hidden: int = 32):
    """(head over TASKS, held-out accuracy), trained once per process on 40 prompts of each kind."""
    texts, labels = prompts(40, seed=0)
    return fit_text_router(texts, labels, TASKS, TextRouterConfig(hidden=hidden, steps=100, seed=0))

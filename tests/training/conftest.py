"""Fixtures for training tests: a tiny 2-task chat dataset and a small, fast TrainConfig."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoConfig

from router.library import fingerprint_from_hf_config
from training.config import TrainConfig
from training.data import Example

LETTERS = "abcdefgh"


def two_task_examples(count: int = 12, seed: int = 0) -> list[Example]:
    """`count` examples each of `reverse` and `upper` over short random words."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        word = "".join(rng.choice(LETTERS) for _ in range(5))
        examples.append(Example("reverse", [{"role": "user", "content": f"reverse {word}"},
                                            {"role": "assistant", "content": word[::-1]}]))
        examples.append(Example("upper", [{"role": "user", "content": f"uppercase {word}"},
                                          {"role": "assistant", "content": word.upper()}]))
    return examples


def write_jsonl(path, examples: list[Example]) -> None:
    path.write_text("".join(json.dumps({"task": e.task, "messages": e.messages}) + "\n" for e in examples))


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models run on one torch thread, restored afterwards.

    NOTE: on the shared 2-core test machine a 2-thread forward of the tiny Llama took 0.55 s against
    0.002-0.01 s with one thread (OpenMP workers waiting on each other under load).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def examples() -> list[Example]:
    return two_task_examples()


@pytest.fixture(scope="session")
def fingerprint(tiny_llama):
    return fingerprint_from_hf_config(AutoConfig.from_pretrained(tiny_llama))


@pytest.fixture(scope="session")
def small_config() -> TrainConfig:
    """4 modules of rank 4, a few steps with large learning rates, every loss term on; no text router."""
    return TrainConfig(num_modules=4, rank=4, alpha=8.0, steps=6, batch_size=4, learning_rate=1e-2,
                       gate_learning_rate=5e-2, checkpoint_every=2, max_seq_len=64, device="cpu",
                       lambda_decouple=0.01, lambda_align=0.1, lambda_sparse=0.01, lambda_prior=0.01,
                       relation_batches=1, text_router=False)

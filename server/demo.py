"""The offline demo: the suite backbone and a module library trained on the suite, built once into a cache.

    ensure_backbone(setting)      the char-level Llama pretrained on generic strings (training.suite), cached
                                  in the same directory and shared with the quality benchmark
    train_library(...)            modules + controller + text router on the six base tasks (training.suite.data)
    held-out check                greedy exact match per task, and one correctly answered prompt per task for
                                  the start-up banner, kept in DEMO_RECORD

Building is atomic: everything happens in a temporary sibling directory renamed into place, so a killed
build leaves no half-written cache entry.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from router.atomic import build_cache_entry
from training.config import TrainConfig
from training.suite.backbone import default_cache_dir, torch_threads
from training.suite.data import SuiteConfig

logger = logging.getLogger(__name__)

DEMO_VERSION = "demo-v3"
DEMO_MODEL = "tessera-demo"
DEMO_RECORD = "demo.json"
"""File in a demo cache entry: the setting, held-out exact match per task, and a correct example per task."""


@dataclass(frozen=True)
class DemoSetting:
    """What one demo setting builds."""

    backbone: str
    """Key of training.suite.backbone.SETTINGS."""
    suite: SuiteConfig
    """Training data: train_per_task items of each base task."""
    train: TrainConfig
    """How the library is trained (text router on, so untagged `auto` requests are routed)."""
    check_per_task: int
    """Held-out items per task of the exact-match check at the end of the build."""
    expected_seconds: int
    """Build time to announce, measured on 2 CPU cores with a cold cache."""


DEMO_SETTINGS: dict[str, DemoSetting] = {
    "small": DemoSetting(
        "small", SuiteConfig(train_per_task=400),
        TrainConfig(rank=8, steps=1000, batch_size=16, learning_rate=5e-3, max_seq_len=64, checkpoint_every=1000,
                    device="cpu", text_router=True), check_per_task=20, expected_seconds=150),
    "tiny": DemoSetting(
        "tiny", SuiteConfig(train_per_task=12),
        TrainConfig(num_modules=4, rank=4, steps=8, batch_size=8, learning_rate=1e-2, max_seq_len=64,
                    relation_batches=1, checkpoint_every=8, device="cpu", text_router=True),
        check_per_task=2, expected_seconds=20),
}
"""Demo settings: "small" (the default) learns the easier tasks; "tiny" builds in seconds for tests, and its
modules have learned next to nothing."""


def _check(model_dir: Path, library_dir: Path, setting: DemoSetting) -> dict:
    """Held-out exact match per task and the first correctly answered item of each task."""
    from router.library import ModuleLibrary
    from training.suite.data import make_items
    from training.suite.evaluate import library_replies
    from training.suite.tasks import TASKS

    items = make_items(list(TASKS), setting.check_per_task, "test", setting.suite)
    replies = library_replies(model_dir, ModuleLibrary.load(library_dir), items)
    scores: dict[str, list[bool]] = {}
    examples: dict[str, dict] = {}
    for item, reply in zip(items, replies):
        scores.setdefault(item.task, []).append(reply == item.answer)
        if reply == item.answer and item.task not in examples:
            examples[item.task] = {"prompt": item.prompt, "answer": item.answer}
    return {"exact_match": {t: sum(hits) / len(hits) for t, hits in scores.items()}, "examples": examples}


def _build(root: Path, cache: Path, name: str) -> None:
    from training.suite.backbone import SETTINGS, ensure_backbone
    from training.suite.data import make_items, to_examples
    from training.suite.tasks import TASKS
    from training.trainer import train_library

    setting, started = DEMO_SETTINGS[name], time.perf_counter()
    logger.info("demo step 1/3: the suite backbone %r (pretrained once, shared through %s)", setting.backbone, cache)
    backbone = ensure_backbone(SETTINGS[setting.backbone], cache)
    shutil.copytree(backbone, root / DEMO_MODEL)
    pretrained = time.perf_counter()
    logger.info("demo step 2/3: training a module library on %d tasks (%d steps)", len(TASKS), setting.train.steps)
    examples = to_examples(make_items(list(TASKS), setting.suite.train_per_task, "train", setting.suite))
    report = train_library(root / DEMO_MODEL, examples, root / "library", setting.train, progress=False,
                           descriptions={t.name: t.description for t in TASKS.values()})
    trained = time.perf_counter()
    logger.info("demo step 3/3: checking %d held-out items per task", setting.check_per_task)
    record = {"version": DEMO_VERSION, "setting": name, "routing_accuracy": report.routing_accuracy,
              **_check(root / DEMO_MODEL, root / "library", setting)}
    record["seconds"] = {"backbone": round(pretrained - started, 1), "library": round(trained - pretrained, 1),
                         "total": round(time.perf_counter() - started, 1)}
    (root / DEMO_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    scores = ", ".join(f"{task} {score:.2f}" for task, score in record["exact_match"].items())
    logger.info("demo built in %.0f s; held-out exact match per task: %s; text routing accuracy %s",
                record["seconds"]["total"], scores, report.routing_accuracy)


def _complete(target: Path) -> bool:
    return all((target / name).is_file() for name in ("library/library.json", f"{DEMO_MODEL}/config.json",
                                                      DEMO_RECORD))


def load_record(model_dir: Path) -> dict:
    """The DEMO_RECORD of the demo whose model directory is `model_dir`."""
    return json.loads((Path(model_dir).parent / DEMO_RECORD).read_text(encoding="utf-8"))


def ensure_demo(cache_dir: Path | None = None, setting: str = "small") -> tuple[Path, Path]:
    """(model dir, library dir) of the demo `setting` (a key of DEMO_SETTINGS), built into `cache_dir`
    (default ~/.cache/tessera) on first use and reused after.

    The build happens in a temporary sibling directory renamed into place, so a cache entry is either
    complete or absent; when two processes build at once, the first rename wins and the other is dropped.
    """
    if setting not in DEMO_SETTINGS:
        raise ValueError(f"unknown demo setting {setting!r}; choose from {sorted(DEMO_SETTINGS)}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / f"{DEMO_VERSION}-{setting}"
    if _complete(target):
        logger.info("reusing the demo backbone and library in %s", target)
        return target / DEMO_MODEL, target / "library"
    logger.info("building the demo %r into %s: this happens once and takes about %d s on 2 CPU cores", setting,
                target, DEMO_SETTINGS[setting].expected_seconds)

    def build(staging: Path) -> None:
        with torch_threads(1):  # the models are tiny: one thread is fastest under load (torch_threads' NOTE)
            _build(staging, cache, setting)

    build_cache_entry(target, build, _complete)
    return target / DEMO_MODEL, target / "library"

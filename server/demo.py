"""The offline demo: a small backbone and a small module library, built once into a cache directory.

The modules are random (untrained) until `training/` produces a trained demo library; the server says
so when it starts. Building is atomic: a killed build leaves no half-written cache entry.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from server.model.tiny import TinyConfig, write_checkpoint

logger = logging.getLogger(__name__)

DEMO_VERSION = "demo-v1"
DEMO_MODEL = "tessera-demo"
DEMO_TASKS = ("reverse", "uppercase", "summarize", "translate")
DEMO_BACKBONE = TinyConfig(
    architecture="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, seed=7,
)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tessera"


def _build(root: Path) -> None:
    from transformers import AutoConfig

    from router.library import fingerprint_from_hf_config, random_library

    model_dir = write_checkpoint(root / DEMO_MODEL, DEMO_BACKBONE)
    fingerprint = fingerprint_from_hf_config(AutoConfig.from_pretrained(str(model_dir)))
    library = random_library(fingerprint, num_modules=6, tasks=DEMO_TASKS, rank=8, std=0.1, seed=7)
    library.write(root / "library")


def _complete(target: Path) -> bool:
    return (target / "library" / "library.json").is_file() and (target / DEMO_MODEL / "config.json").is_file()


def ensure_demo(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(model dir, library dir) of the demo, built into `cache_dir` on first use and reused after.

    The build happens in a temporary sibling directory renamed into place, so a cache entry is either
    complete or absent; when two processes build at once, the first rename wins and the other is dropped.
    """
    logger.warning("the demo's modules are RANDOM (untrained): tagged outputs differ from the backbone's "
                   "but are noise until training/ provides a trained demo library")
    target = Path(cache_dir or default_cache_dir()).expanduser() / DEMO_VERSION
    if _complete(target):
        logger.info("reusing the demo backbone and library in %s", target)
        return target / DEMO_MODEL, target / "library"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        logger.warning("removing the incomplete demo cache entry %s", target)
        shutil.rmtree(target)
    logger.info("building the demo backbone and library in %s (once)", target)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}-", dir=target.parent))
    try:
        _build(staging)
        os.rename(staging, target)
    except OSError:
        if not _complete(target):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / DEMO_MODEL, target / "library"

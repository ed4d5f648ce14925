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
    library = random_library(fingerprint, num_modules=6, tasks=DEMO_TASKS, ranks=8, std=0.1, seed=7)
    library.write(root / "library")


def ensure_demo(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(model dir, library dir) of the demo, built into `cache_dir` on first use and reused after."""
    target = (cache_dir or default_cache_dir()) / DEMO_VERSION
    if not (target / "library" / "library.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("building the demo backbone and library in %s (once)", target)
        staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}-", dir=target.parent))
        try:
            _build(staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target / DEMO_MODEL, target / "library"

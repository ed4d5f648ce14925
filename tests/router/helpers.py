"""Edits of a written library's files, to build invalid libraries from valid ones."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file


def edit_json(root: Path, change) -> None:
    """Apply `change(meta)` to library.json in place."""
    meta = json.loads((root / "library.json").read_text())
    change(meta)
    (root / "library.json").write_text(json.dumps(meta))


def edit_tensors(root: Path, file: str, change) -> None:
    """Apply `change(tensors)` to one safetensors file of the library in place."""
    tensors = load_file(str(root / file))
    change(tensors)
    save_file(tensors, str(root / file))

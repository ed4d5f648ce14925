"""A whole library as vLLM serves it: one PEFT LoRA per task, and the `vllm serve` arguments that load them.

When a deployment outgrows one machine it runs on vLLM (tensor and pipeline parallel, many replicas), with
each task's composition exported as one exact PEFT LoRA (router.peft_io, stacked rank). vLLM names a LoRA
by the `model` field of a request, so a request tagged `"model": "reverse"` reaches the same composition on
both servers, and `tessera bench` runs one workload against either.

    OUT/
      vllm.json          the adapters (name, path, rank, the modules and gates each one stacks), the tasks
                         served by the base model alone, and the serve arguments below
      <task>/            adapter_config.json + adapter_model.safetensors, one directory per task

vLLM preallocates `max_loras` adapter slots of `max_lora_rank` on every layer; the rank is the smallest
value vLLM accepts (VLLM_MAX_LORA_RANKS) that holds every adapter, and `max_loras` defaults to the number
of adapters so that a batch may mix all of them, as Tessera's would.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from router.atomic import write_directory
from router.compose import compose
from router.errors import CompositionError
from router.peft_io import peft_files, write_peft_files

logger = logging.getLogger(__name__)

MANIFEST_FILE = "vllm.json"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks, read from vLLM 0.33.0)."""


@dataclass(frozen=True)
class ExportedAdapter:
    """One task's composition as a PEFT LoRA directory under the export."""

    name: str
    """The task tag; vLLM serves the adapter under this model name."""
    path: str
    """Directory relative to the export root."""
    rank: int
    """Stacked rank (the sum of its modules' ranks)."""
    gates: dict[str, float]
    """The modules it stacks, with their gates."""


@dataclass(frozen=True)
class VllmExport:
    """What export_vllm wrote: the adapters, and the tasks that need none."""

    path: Path
    """The export root (absolute)."""
    adapters: tuple[ExportedAdapter, ...]
    base_model_tasks: tuple[str, ...]
    """Tasks whose composition is empty: on vLLM they are the base model itself, under its own name."""
    max_lora_rank: int
    max_loras: int

    def serve_args(self) -> list[str]:
        """The `vllm serve MODEL ...` arguments that load every adapter (absolute paths)."""
        args = ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
        if self.adapters:
            args += ["--lora-modules", *(f"{a.name}={self.path / a.path}" for a in self.adapters)]
        return args

    def serve_command(self, base_model: str | None) -> str:
        """The whole command line, shell-quoted; `<MODEL>` stands for an unknown base model."""
        return shlex.join(["vllm", "serve", base_model or "<MODEL>", *self.serve_args()])


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of `rank`."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise CompositionError(f"rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


def export_vllm(
    library, out_dir: str | Path, tasks: Sequence[str] | None = None, base_model: str | None = None,
    max_loras: int | None = None, overwrite: bool = False,
) -> VllmExport:
    """Write `tasks` (default: every task of the library; composites `a+b` allowed) for vLLM, atomically.

    Each task's composition is what Tessera serves for that tag (router.compose.compose), exported exactly.
    Nothing is written unless every task composes and fits vLLM's largest rank.
    """
    names = list(library.tasks) if tasks is None else list(tasks)
    if not names:
        raise CompositionError("there are no tasks to export (the library has none, or none were given)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CompositionError(f"tasks repeated: {repeated}")
    if MANIFEST_FILE in names:
        raise CompositionError(f"a task named {MANIFEST_FILE!r} would collide with the export's manifest")
    files, adapters, bare = {}, [], []
    for name in names:
        composition = compose(library, task=name)
        if composition.k == 0:
            bare.append(name)
            continue
        config, tensors = peft_files(library, composition, base_model)
        try:
            vllm_max_lora_rank(config["r"])
        except CompositionError as error:
            raise CompositionError(f"task {name!r}: {error}") from None
        files[name] = (config, tensors)
        adapters.append(ExportedAdapter(name, name, config["r"], dict(zip(composition.module_ids, composition.gates))))
    if max_loras is not None and max_loras < 1:
        raise CompositionError(f"max_loras must be >= 1, got {max_loras}")
    rank = vllm_max_lora_rank(max((a.rank for a in adapters), default=1))
    slots = max_loras if max_loras is not None else max(len(adapters), 1)
    manifest = {
        "base_model": base_model, "max_lora_rank": rank, "max_loras": slots,
        "lora_modules": [{"name": a.name, "path": a.path, "rank": a.rank, "gates": a.gates} for a in adapters],
        "base_model_tasks": bare,
    }

    def fill(tmp: Path) -> None:
        for name, (config, tensors) in files.items():
            (tmp / name).mkdir()
            write_peft_files(tmp / name, config, tensors)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")

    path = write_directory(Path(out_dir), fill, overwrite)
    logger.info("exported %d tasks for vLLM to %s (max_lora_rank %d)", len(adapters), path, rank)
    return VllmExport(path, tuple(adapters), tuple(bare), rank, slots)

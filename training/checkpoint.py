"""Training checkpoints: safetensors + JSON in a sibling directory of the library, written atomically.

    OUT.ckpt/
      state.json          step, run signature, format
      tensors.safetensors "params.{name}" (bank and controller), "optim.{index}.{key}" (AdamW state),
                          "relation" (R, fixed at the start of the run)

Resuming restores parameters and optimiser state exactly; data order and the alignment's module sample
are functions of (seed, step), so a resumed run takes the same steps as an uninterrupted one. The run
signature hashes everything that changes the training math (config fields except checkpoint_every,
stop_after_steps, device, prune_threshold, which acts only at export, and the memory knobs micro_batch_size and
gradient_checkpointing; data; points; given relation; init library), and a checkpoint of a different run is
refused rather than silently resumed or discarded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from router.atomic import write_directory

logger = logging.getLogger(__name__)

FORMAT = "tessera-train-checkpoint-1"
UNSIGNED_FIELDS = ("checkpoint_every", "stop_after_steps", "device", "prune_threshold", "micro_batch_size",
                   "gradient_checkpointing")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run."""


def checkpoint_dir(out: str | Path) -> Path:
    """Where the checkpoints of a run writing library `out` live: the sibling `OUT.ckpt`."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".ckpt")


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())


def run_signature(config, examples, points, relation, init) -> str:
    """A hash of the arguments that determine the training run's math."""
    digest = hashlib.sha256()
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in UNSIGNED_FIELDS}
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for example in examples:
        digest.update(json.dumps([example.task, example.messages], sort_keys=True).encode())
    digest.update(json.dumps(sorted(points) if points is not None else None).encode())
    if relation is not None:
        _hash_tensor(digest, torch.as_tensor(relation))
    if init is not None:
        digest.update(json.dumps(init.to_json(), sort_keys=True).encode())
        for key, tensor in sorted(init.flat_tensors().items()):
            digest.update(key.encode())
            _hash_tensor(digest, tensor)
        _hash_tensor(digest, init.controller.logits)
    return digest.hexdigest()


def save(path: Path, step: int, signature: str, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         relation: torch.Tensor) -> None:
    """Write the checkpoint of `step` atomically, replacing the previous one."""
    tensors = {f"params.{name}": t.detach().cpu().contiguous() for name, t in params.items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["relation"] = relation.detach().cpu().contiguous()

    def fill(tmp: Path) -> None:
        meta = {"format": FORMAT, "step": step, "signature": signature}
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        save_file(tensors, str(tmp / "tensors.safetensors"))

    write_directory(path, fill, overwrite=True)
    logger.info("checkpoint at step %d in %s", step, path)


def load(path: Path, signature: str, params: dict[str, torch.nn.Parameter],
         optimizer: torch.optim.Optimizer) -> tuple[int, torch.Tensor]:
    """Restore parameters and optimiser state in place; returns (step, relation)."""
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        with safe_open(str(path / "tensors.safetensors"), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({error}); delete it to start over") from error
    missing = [name for name in params if f"params.{name}" not in tensors] + ["relation"] * ("relation" not in tensors)
    if meta.get("format") != FORMAT or meta.get("signature") != signature or missing:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different training run (other data, config, points or init); "
            "rerun with the same arguments to resume, or delete it to start over"
        )
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(tensors[f"params.{name}"])
    state = optimizer.state_dict()
    restored: dict[int, dict] = {}
    for key, tensor in tensors.items():
        if key.startswith("optim."):
            _, index, field = key.split(".", 2)
            restored.setdefault(int(index), {})[field] = tensor
    optimizer.load_state_dict({"state": restored, "param_groups": state["param_groups"]})
    logger.info("resuming from step %d of %s", meta["step"], path)
    return int(meta["step"]), tensors["relation"]

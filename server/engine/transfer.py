"""Host-to-device copies of a step's small host arrays, queued without making the host wait.

A `non_blocking` copy from ordinary (pageable) host memory is not guaranteed to be asynchronous: CUDA's
documented behaviour is that the driver may synchronize with the stream to stage pageable memory into
pinned memory, which under asynchronous scheduling would make filling step N+1 wait for step N's kernels.
So on CUDA every array goes through pinned memory first. `Tensor.pin_memory()` takes its block from
PyTorch's caching host allocator, which records the stream of the copy that reads it and hands the block
out again only after that copy has run, so a later step never overwrites bytes a queued copy still needs.
On the CPU the arrays are used as they are.
"""

from __future__ import annotations

import numpy as np
import torch


def host_tensor(array: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`array` as a CPU tensor a copy to `device` can read asynchronously (pinned when `device` is CUDA)."""
    tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    return tensor.pin_memory() if torch.device(device).type == "cuda" else tensor


def copy_into(dst: torch.Tensor, array: np.ndarray | torch.Tensor) -> None:
    """dst[...] = array, queued on the current stream (no host wait on CUDA)."""
    dst.copy_(host_tensor(array, dst.device), non_blocking=True)


def to_device(array: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A device copy of `array`, queued on the current stream (no host wait on CUDA)."""
    return host_tensor(array, device).to(device, non_blocking=True)

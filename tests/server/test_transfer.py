"""transfer: a step's host arrays reach the device through pinned memory on CUDA, unchanged on the CPU."""

import numpy as np
import pytest
import torch

from server.engine.transfer import copy_into, host_tensor, to_device


def test_cpu_arrays_are_used_as_they_are():
    array = np.arange(6, dtype=np.int64)
    tensor = host_tensor(array, "cpu")
    assert not tensor.is_pinned() and tensor.data_ptr() == array.__array_interface__["data"][0]
    dst = torch.zeros(8, dtype=torch.int64)
    copy_into(dst[:6], array)
    assert dst.tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert to_device(torch.tensor([1.5, -2.0]), "cpu").tolist() == [1.5, -2.0]


@pytest.mark.gpu
def test_cuda_copies_read_pinned_memory_and_survive_reuse():
    device = torch.device("cuda")
    assert host_tensor(np.ones(4, dtype=np.float32), device).is_pinned()
    slow = torch.randn(4096, 4096, device=device)
    for _ in range(3):  # queue work so the copies below wait behind it on the stream
        slow = slow @ slow / 64
    results = []
    for step in range(8):  # each step's host array is rebuilt; its copy must see its own values
        dst = torch.empty(1024, dtype=torch.int64, device=device)
        copy_into(dst, np.full(1024, step, dtype=np.int64))
        results.append(dst)
    torch.cuda.synchronize()
    assert [int(r.unique().item()) for r in results] == list(range(8))

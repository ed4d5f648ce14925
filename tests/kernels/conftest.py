"""Run the Triton kernels in Triton's interpreter on CPU tensors when there is no GPU.

The flag is read when a kernel is decorated, so it is set here, before any test module imports
`kernels.*.triton`. On a CUDA machine the kernels compile for the device as usual.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

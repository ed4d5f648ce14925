"""Batched GPU ops for Tessera, each with a plain-torch reference.

One folder per op: `__init__.py` holds the contract (`Semantics:` / `Shape:`) and dispatches to a
backend, `reference.py` is the oracle and the CPU path, `triton.py` is the GPU path. This package never
imports `server/` or `router/`.
"""

import os

NO_MODULE = -1
"""The one sentinel: a metadata entry that applies no module."""

TRITON_ON_CPU = os.environ.get("TESSERA_TRITON_ON_CPU") == "1"
"""Send CPU tensors down the Triton path too (set from TESSERA_TRITON_ON_CPU=1, or by tests). With
TRITON_INTERPRET=1 Triton's interpreter then runs the GPU path, the layers' wiring included, on the CPU."""


def use_triton(t) -> bool:
    """Whether an op takes its Triton kernels for tensor `t`: on CUDA, or on the CPU with TRITON_ON_CPU."""
    return t.is_cuda or TRITON_ON_CPU

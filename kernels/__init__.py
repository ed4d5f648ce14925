"""Batched GPU ops for Tessera, each with a plain-torch reference.

One folder per op: `__init__.py` holds the contract (`Semantics:` / `Shape:`) and dispatches to a
backend, `reference.py` is the oracle and the CPU path, `triton.py` is the GPU path. This package never
imports `server/` or `router/`.
"""

NO_MODULE = -1
"""The one sentinel: a metadata entry that applies no module."""

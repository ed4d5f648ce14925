"""Module libraries, the task-aware controller, and composition rules.

Pure CPU: this package never batches, never allocates device memory and never imports a web framework.
"""

from router.composition import NO_COMPOSITION, Composition
from router.errors import (
    CompositionError, LibraryError, LowConfidenceError, NoTextRouterError, RoutingError, UnknownModuleError,
    UnknownTaskError,
)

__all__ = [
    "Composition", "CompositionError", "LibraryError", "LowConfidenceError", "NO_COMPOSITION", "NoTextRouterError",
    "RoutingError", "UnknownModuleError", "UnknownTaskError",
]

"""Errors `router/` raises; the server maps them to HTTP statuses and the CLI to messages."""

from __future__ import annotations


class LibraryError(ValueError):
    """A module library on disk is invalid or does not fit the backbone."""


class _Unknown(LookupError):
    """An unknown name; the message lists up to ten known ones, or `detail` instead."""

    kind = "name"

    def __init__(self, name: str, known: list[str] | tuple[str, ...], detail: str = ""):
        self.name = name
        self.known = tuple(known)
        listed = ", ".join(sorted(known)[:10]) + (", ..." if len(known) > 10 else "")
        message = f"unknown {self.kind} {name!r}"
        message += f"; {detail}" if detail else f"; known: {listed or '(none)'}"
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UnknownTaskError(_Unknown):
    """A request names a task the library does not have."""

    kind = "task"


class UnknownModuleError(_Unknown):
    """A request names a module the library does not have."""

    kind = "module"


class CompositionError(ValueError):
    """Explicit module weights that cannot form a composition."""


class RoutingError(LookupError):
    """Text routing (`auto`) could not pick a task for a prompt; the base of the two cases below."""


class NoTextRouterError(RoutingError):
    """`auto` was asked for, but the library has no text router (or no library is loaded).

    The API answers 404 (`model_not_found`): the model `auto` does not exist on this server, exactly as
    an unknown task name does not, and GET /v1/models does not list it.
    """


class LowConfidenceError(RoutingError):
    """The text router's top task probability is under the library's `min_confidence`.

    The API answers 400 (`low_routing_confidence`), not 404: the model `auto` exists and the body is
    well formed, but this prompt does not say clearly enough which task it is, and the server refuses
    to guess (never a silent fallback). The client fixes it by changing the request, e.g. by tagging a
    task, which is what 400 means; a 404 would wrongly tell clients that `auto` is missing.
    """

    def __init__(self, task: str, confidence: float, min_confidence: float):
        self.task = task
        self.confidence = confidence
        self.min_confidence = min_confidence
        super().__init__(
            f"text routing is not confident enough: the best task {task!r} has probability {confidence:.3f}, "
            f"under the library's min_confidence {min_confidence}; tag the task explicitly"
        )

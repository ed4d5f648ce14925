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

"""API-key check as a plain ASGI middleware, so streamed responses and disconnects pass through untouched."""

from __future__ import annotations

import hmac

from server.api.errors import APIError, error_response

OPEN_PATHS = frozenset({"/health", "/ping", "/version"})
"""Routes reachable without the key (load balancers probe them)."""


class APIKeyMiddleware:
    """Answers 401 in OpenAI's error shape unless `Authorization: Bearer KEY` matches (constant time)."""

    def __init__(self, app, api_key: str, on_error=lambda error: None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.on_error = on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or route_path(scope) in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "invalid or missing API key: send `Authorization: Bearer KEY`", None, "invalid_api_key")
        self.on_error(error)
        await error_response(error)(scope, receive, send)

    def _authorized(self, scope) -> bool:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected)


def route_path(scope) -> str:
    """The request's path within the app: behind `--root-path`, ASGI servers put the prefix into the path too."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path

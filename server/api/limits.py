"""A bound on generation calls in flight (`--max-concurrent-requests`, as TGI's and LoRAX's): past it a call
is answered at once with a 429 in OpenAI's shape and a `Retry-After`, so a saturated server sheds load that a
balancer can send elsewhere, and OpenAI clients back off and retry on their own, instead of queueing without
bound. Without a bound (the default, as vLLM's) every call waits for the engine."""

from __future__ import annotations

from server.api.auth import route_path
from server.api.errors import APIError, error_response

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


class ConcurrencyLimit:
    """ASGI middleware: at most `limit` generation calls at once; a call counts until its response (a whole
    stream) is sent or its client leaves."""

    def __init__(self, app, limit: int, on_error=lambda error: None):
        if limit < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {limit}")
        self.app, self.limit, self.on_error = app, limit, on_error
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or route_path(scope) not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            error = APIError(429, f"the server is at its limit of {self.limit} concurrent requests; retry shortly",
                             None, "overloaded")
            self.on_error(error)
            response = error_response(error)
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

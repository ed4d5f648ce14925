"""Every HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.errors import (
    CompositionError, LibraryError, LowConfidenceError, NoTextRouterError, RoutingError, UnknownModuleError,
    UnknownTaskError,
)

logger = logging.getLogger(__name__)

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


class APIError(Exception):
    """An error the API answers with; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


ROUTER_ERRORS = (UnknownTaskError, UnknownModuleError, CompositionError, LibraryError, RoutingError)
"""What `router.compose` raises for a request it cannot serve."""


def from_router(error: Exception, param: str) -> APIError:
    """Map one of ROUTER_ERRORS onto HTTP: unknown names are 404, bad compositions 400.

    `auto` without a text router is an unknown model (404); a prompt routed under the library's
    `min_confidence` is a request to change (400; see router.errors.LowConfidenceError).
    """
    if isinstance(error, (UnknownTaskError, NoTextRouterError)):
        return APIError(404, str(error), param, "model_not_found")
    if isinstance(error, UnknownModuleError):
        return APIError(404, str(error), param, "module_not_found")
    if isinstance(error, LowConfidenceError):
        return APIError(400, str(error), param, "low_routing_confidence")
    return APIError(400, str(error), param, "invalid_composition")


def _param_path(location) -> str | None:
    """`messages.0.content` from pydantic's location, without `body` and union-branch tags like `list[int]`."""
    parts = [str(part) for part in location[1:] if isinstance(part, int) or _is_field(str(part))]
    return ".".join(parts) or None


def _is_field(part: str) -> bool:
    return bool(_FIELD.fullmatch(part)) and part not in _TYPE_TAGS


def _from_validation(error: RequestValidationError) -> APIError:
    """A 400 naming the first invalid parameter (None when the body as a whole is wrong)."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "parse error")
        return APIError(400, f"request body is not valid JSON: {reason}", None, "invalid_json")
    location = tuple(first.get("loc", ()))
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if location == ("body",):
        return APIError(400, f"request body: {message}", None, "invalid_value")
    param = _param_path(location)
    return APIError(400, f"{param}: {message}" if param else message, param, "invalid_value")


def install_handlers(app, on_error: Callable[[APIError], None] = lambda error: None) -> None:
    """Answer every error in OpenAI's shape; `on_error` sees each one (metrics)."""

    def respond(error: APIError) -> JSONResponse:
        on_error(error)
        return error_response(error)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError):
        return respond(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        return respond(_from_validation(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            return respond(APIError(404, f"no route {request.method} {request.url.path}", None, "not_found"))
        return respond(APIError(error.status_code, str(error.detail), None, None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, error: Exception):
        logger.exception("unhandled error", exc_info=error)
        return respond(APIError(500, f"internal error: {type(error).__name__}", None, "internal_error"))

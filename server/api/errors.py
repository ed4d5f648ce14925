"""Every HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.errors import CompositionError, LibraryError, UnknownModuleError, UnknownTaskError

logger = logging.getLogger(__name__)


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
        return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}.get(
            self.status, "server_error"
        )


def error_response(error: APIError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status)


def from_router(error: Exception, param: str) -> APIError:
    """Map router errors onto HTTP: unknown names are 404, bad compositions 400."""
    if isinstance(error, UnknownTaskError):
        return APIError(404, str(error), param, "model_not_found")
    if isinstance(error, UnknownModuleError):
        return APIError(404, str(error), param, "module_not_found")
    if isinstance(error, (CompositionError, LibraryError)):
        return APIError(400, str(error), param, "invalid_composition")
    raise error


def _validation_param(error: RequestValidationError) -> tuple[str, str]:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return None, "request body is not valid JSON"
    return param, f"{param}: {message}" if param else message


def install_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        param, message = _validation_param(error)
        return error_response(APIError(400, message, param, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException):
        return error_response(APIError(error.status_code, str(error.detail), None, None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, error: Exception):
        logger.exception("unhandled error", exc_info=error)
        return error_response(APIError(500, f"internal error: {type(error).__name__}", None, "internal_error"))

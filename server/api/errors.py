"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``.

Every failure leaves the server in this shape, with the status OpenAI clients expect;
validation failures (including malformed JSON) are 400, never FastAPI's 422, and an
unexpected exception is a bare 500 with the traceback kept in the log only (rendered by
``app.RequestIdMiddleware``, which logs it once, with the request id).
"""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
          503: "service_unavailable"}


class APIError(Exception):
    """Raised by routes; rendered by the handler below."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        return "request body is not valid JSON", None
    # a union reports one error per member: the deepest one went furthest into the body (for
    # ``speculative: "none" | {...}``, the object's field, not "input should be 'none'")
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    # loc is ("body", field, ...) with the union member's model name as a step: the field path is what a
    # client can act on
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not str(p)[:1].isupper()]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unrecognized request argument (this server does not implement it)"
    elif first.get("type") == "value_error":
        msg = msg.removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


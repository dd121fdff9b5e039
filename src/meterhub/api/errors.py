"""One error shape everywhere: ``{"error": {"message": ..., "code": <protocol code or null>}}``.

HTTP status by protocol code: 2003 (device not exist) -> 404, 2001 (offline) -> 409,
1100/1101/1102/1103 (bad value) -> 422, 2002 (not supported) -> 400. Request validation errors are
422 with ``code: null`` and the list of problems in ``error.details``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.protocol.errors import ErrorCode

log = get_logger(__name__)
_repeats = RateLimitedLog(log)  # per-message lines: one per kind and interval, counted

_BODY_PARSE_ERROR = "There was an error parsing the body"

STATUS_FOR_CODE: dict[int, int] = {
    ErrorCode.DEVICE_NOT_EXIST: 404,
    ErrorCode.DEVICE_OFFLINE: 409,
    ErrorCode.PARAMS_EMPTY: 422,
    ErrorCode.PARAMS_RANGE_INVALID: 422,
    ErrorCode.PARAMS_NULL: 422,
    ErrorCode.PARAMS_TYPE_INCORRECT: 422,
    ErrorCode.NOT_SUPPORTED: 400,
    ErrorCode.REQUEST_TIME_INVALID: 422,
}


class ApiError(Exception):
    """An error answer: HTTP ``status``, human ``message``, protocol ``code`` (or None), extra fields."""

    def __init__(
        self,
        status: int,
        message: str,
        code: int | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers
        self.extra = extra

    @classmethod
    def from_code(cls, code: int, message: str, **extra: Any) -> ApiError:
        return cls(STATUS_FOR_CODE.get(code, 500), message, int(code), **extra)


def error_body(message: str, code: int | None = None, **extra: Any) -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "code": code}
    details = extra.pop("details", None)
    if details is not None:
        err["details"] = details
    return {"error": err, **extra}


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found")


def device_not_found(cid: str) -> ApiError:
    return ApiError(404, f"device {cid!r} does not exist", int(ErrorCode.DEVICE_NOT_EXIST))


def _jsonable_errors(errors: list[Any]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        out.append({"loc": loc, "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.code, **exc.extra), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _jsonable_errors(list(exc.errors()))
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p not in ("body", "query", "path")) or "request"
        message = f"invalid {where}: {first['msg']}"
        return JSONResponse(error_body(message, None, details=details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        status = exc.status_code
        if status == 400 and message == _BODY_PARSE_ERROR:
            # FastAPI's answer to a body that is not even text; a malformed JSON body is 422 already.
            status, message = 422, "the request body is not valid JSON"
        return JSONResponse(error_body(message, None), status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _repeats.error(
            "unexpected",
            "unexpected API failure",
            path=request.url.path,
            method=request.method,
            exc_info=True,
        )
        return JSONResponse(error_body("internal error, see the server log", 500), status_code=500)

"""Errors as RFC 9457 problem details (`application/problem+json`): every 4xx names the field and what was expected.

The anchors answer a broken ControlNet unit with HTTP 200 and uncontrolled images; here a request that cannot be
served as asked is refused with one of: 400 (bad Host), 401 (auth, with WWW-Authenticate), 403 (cross-site),
404 (unknown job or route), 409 (job not finished, or a model whose file has gone), 413 (body or image too large), 415 (not JSON), 422 (a bad
value, naming `field`), 429 (queue full, with Retry-After), 503 (shutting down). A 500 is a bug of ours.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from controlnet.errors import ImageTooLarge
from controlnet.serve.models import ModelGone, UnknownModel
from controlnet.serve.service import JobCancelled, QueueFull, ServiceClosed

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://controlnet.invalid/problems/"  # stable identifiers, not fetched


class ApiError(Exception):
    """A client error with its HTTP status and the request field at fault."""

    def __init__(
        self,
        status: int,
        detail: str,
        field: str | None = None,
        headers: dict | None = None,
        errors: list | None = None,
    ):
        super().__init__(detail)
        self.status, self.detail, self.field, self.headers, self.errors = status, detail, field, headers, errors


def problem_body(status: int, detail: str, field: str | None = None, errors: list | None = None) -> dict:
    title = HTTPStatus(status).phrase
    body = {
        "type": TYPE_BASE + title.lower().replace(" ", "-"),
        "title": title,
        "status": status,
        "detail": detail,
    }
    if field is not None:
        body["field"] = field
    if errors:
        body["errors"] = errors
    return body


def problem(
    status: int, detail: str, field: str | None = None, errors: list | None = None, headers: dict | None = None
) -> Response:
    body = json.dumps(problem_body(status, detail, field, errors)).encode()
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _loc(loc) -> str:
    """('body', 'units', 0, 'scale') -> 'units[0].scale'."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path") and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_errors(errors) -> list[dict]:
    out = []
    for err in errors:
        field = _loc(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            message = f"unknown field {field!r}; it is not part of this request's schema"
        elif kind == "json_invalid":
            message = "the body is not valid JSON"
        else:
            message = err.get("msg", "invalid value")
        out.append({"field": field, "message": message})
    return out


def allowed_methods(request: Request) -> list[str]:
    methods = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "__none__"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def error_status(err: BaseException) -> int:
    """The status of a library error met while serving a request, by its type: an image over a size limit is 413
    (Content Too Large), any other ValueError 422."""
    return 413 if isinstance(err, ImageTooLarge) else 422


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, err: ApiError):
        return problem(err.status, err.detail, err.field, err.errors, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        errors = validation_errors(err.errors())
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]) or "invalid request"
        return problem(422, detail, errors[0]["field"] if errors else None, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        detail = err.detail if isinstance(err.detail, str) else HTTPStatus(err.status_code).phrase
        if err.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path}"
        headers = getattr(err, "headers", None)
        if err.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
            # Starlette's Allow names the first matching route's methods only; a path served by several routes
            # (GET and DELETE /v1/jobs/{id}) allows all of theirs
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return problem(err.status_code, detail, headers=headers)

    @app.exception_handler(UnknownModel)
    async def _unknown(request: Request, err: UnknownModel):
        return problem(422, str(err), getattr(err, "field", None) or err.kind)

    @app.exception_handler(ModelGone)
    async def _gone(request: Request, err: ModelGone):
        return problem(409, str(err), getattr(err, "field", None) or err.kind)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, err: QueueFull):
        return problem(429, str(err), headers={"Retry-After": str(err.retry_after_s)})

    @app.exception_handler(ServiceClosed)
    async def _closed(request: Request, err: ServiceClosed):
        return problem(503, str(err), headers={"Retry-After": "5"})

    @app.exception_handler(JobCancelled)
    async def _cancelled(request: Request, err: JobCancelled):
        return problem(409, f"job {err} was cancelled")

    @app.exception_handler(ValueError)
    async def _value(request: Request, err: ValueError):
        status = error_status(err)
        return problem(
            status, str(err).splitlines()[0] if str(err) else "invalid value", getattr(err, "field", None)
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return problem(500, "internal server error (a bug: the log has the details)")

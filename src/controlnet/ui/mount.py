"""Mounting the page on the server's FastAPI app, with gradio's own safety settings on.

- no share link, no analytics (GRADIO_ANALYTICS_ENABLED=False before gradio is imported, and on the Blocks), no
  MCP server, no monitoring dashboard, no server-side rendering (it would start a node process), no PWA;
- uploads bounded by gradio's `max_file_size` (the server's --max-body-mb) on top of the body limit that
  serve/security.py enforces for every route; no `allowed_paths`, no file explorer or proxy components: the page
  serves only what gradio itself cached (uploads and results, deleted after an hour: `delete_cache`);
- the same Host, origin and HTTP Basic checks as the API: serve/security.py's middleware wraps the whole app,
  so the page and its queue routes sit behind it (no second login of gradio's own);
- a queue request for an event the page does not have, or with the wrong number of values, is a 422 before gradio
  reads it (gradio answered an unknown event with a 500 and ~190 lines of tracebacks);
- gradio's dev-mode reload route (a stream that polls 20 times a second, for as many connections as a client
  opens; the page only uses it in gradio's dev mode) answers 404;
- a client error that gradio raises after its response has started (an unknown session on the queue's event
  stream: it has already sent the client its "session not found" message) is one log line, not the two
  tracebacks of ~200 lines that uvicorn and the server's error handler would log for it;
- gradio >= 6.16 (pyproject's `ui` extra), the version with the published advisories' fixes.
"""

from __future__ import annotations

import json
import logging
import os

from starlette.exceptions import HTTPException

from controlnet.serve.problems import PROBLEM_JSON, problem_body

logger = logging.getLogger(__name__)

UI_PATH = "/ui"
DEV_RELOAD_ROUTE = "/gradio_api/dev/reload"  # gradio's own paths, under UI_PATH
QUEUE_JOIN_ROUTE = "/gradio_api/queue/join"
INSTALL_HINT = 'the web page needs the ui extra: pip install -e ".[ui]" (or run with --no-ui)'


def ui_available() -> bool:
    try:
        import gradio  # noqa: F401
    except ImportError:
        return False
    return True


def mount_ui(app, service, max_file_bytes: int) -> None:
    """Serve the page at UI_PATH on `app` (and redirect / to it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from fastapi.responses import RedirectResponse

    from controlnet.ui.page import CSS, THEME, build_page

    page = build_page(service)

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse(UI_PATH + "/")

    gr.mount_gradio_app(
        app,
        page,
        path=UI_PATH,
        max_file_size=max_file_bytes,
        footer_links=[],
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        pwa=False,
        show_error=True,
        theme=THEME,
        css=CSS,
    )
    _guard_mounted_page(app, page)


def _guard_mounted_page(app, page) -> None:
    """Put a GradioGuard in front of the gradio app that mount_gradio_app mounted at UI_PATH."""
    from starlette.routing import Mount

    mounts = [route for route in app.router.routes if isinstance(route, Mount) and route.path == UI_PATH]
    assert len(mounts) == 1, f"expected gradio mounted once at {UI_PATH}, found {len(mounts)}"
    mounts[0].app = GradioGuard(mounts[0].app, page)


class GradioGuard:
    """ASGI wrapper of the mounted gradio app: no dev-reload stream, queue requests for events the page does not
    have refused before gradio sees them, and no tracebacks for client errors raised after a response started (see
    the module docstring)."""

    def __init__(self, app, page):
        self.app = app
        # event id -> how many values its handler takes (the page builds no events at run time: no gr.render)
        self.inputs = {fn_id: len(fn.inputs) for fn_id, fn in page.fns.items()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        route = path[len(root) :] if path.startswith(root) else path
        if route.rstrip("/") == DEV_RELOAD_ROUTE:
            return await _not_found(send)
        if route.rstrip("/") == QUEUE_JOIN_ROUTE and scope["method"] == "POST":
            body = await _read_body(receive)
            if body is None:
                return  # the client went away
            refusal = self._check_join(body)
            if refusal is not None:
                return await _send_problem(send, 422, *refusal)
            receive = _replay(body, receive)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            status = _client_error_status(exc)
            if not started or status is None:
                raise
            # the client already has its answer (gradio streamed it before raising): end the response, log one line
            logger.warning("page: %s %s ended with %d after its response started", scope["method"], path, status)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _check_join(self, body: bytes) -> tuple[str, str] | None:
        """(detail, field) when a queue/join body names an event the page does not have or gives it the wrong
        number of values: gradio answered an unknown fn_index with a 500 and two ~190-line tracebacks, and a wrong
        count with a printed traceback once the event ran. Bodies gradio refuses itself are passed on."""
        try:
            request = json.loads(body)
        except ValueError:
            return None
        if not isinstance(request, dict):
            return None
        fn_index, data = request.get("fn_index"), request.get("data")
        if fn_index is None or isinstance(fn_index, bool) or not isinstance(fn_index, int):
            return None
        if fn_index not in self.inputs:
            return f"fn_index {fn_index}: the page has no such event", "fn_index"
        if isinstance(data, list) and not request.get("batched") and len(data) != self.inputs[fn_index]:
            return f"data: event {fn_index} takes {self.inputs[fn_index]} values, got {len(data)}", "data"
        return None


async def _read_body(receive) -> bytes | None:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that gives `body` once, then what the client sends next (its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_problem(send, status: int, detail: str, field: str) -> None:
    body = json.dumps(problem_body(status, detail, field)).encode()
    headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _client_error_status(exc: BaseException) -> int | None:
    """The status of a 4xx HTTPException that caused `exc` (through __cause__, __context__, exception groups)."""
    seen, todo = set(), [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, HTTPException) and 400 <= err.status_code < 500:
            return err.status_code
        todo += [err.__cause__, err.__context__, *getattr(err, "exceptions", ())]
    return None


async def _not_found(send) -> None:
    body = b'{"detail":"Not Found"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": body})

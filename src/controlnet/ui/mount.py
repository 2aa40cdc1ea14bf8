"""Mounting the page on the server's FastAPI app, with gradio's own safety settings on.

- no share link, no analytics (GRADIO_ANALYTICS_ENABLED=False before gradio is imported, and on the Blocks), no
  MCP server, no monitoring dashboard, no server-side rendering (it would start a node process), no PWA;
- uploads bounded by gradio's `max_file_size` (the server's --max-body-mb) on top of the body limit that
  serve/security.py enforces for every route; no `allowed_paths`, no file explorer or proxy components: the page
  serves only what gradio itself cached (uploads and results, deleted after an hour: `delete_cache`);
- the same Host, origin and HTTP Basic checks as the API: serve/security.py's middleware wraps the whole app,
  so the page and its queue routes sit behind it (no second login of gradio's own);
- gradio's dev-mode reload route (a stream that polls 20 times a second, for as many connections as a client
  opens; the page only uses it in gradio's dev mode) answers 404;
- a client error that gradio raises after its response has started (an unknown session on the queue's event
  stream: it has already sent the client its "session not found" message) is one log line, not the two
  tracebacks of ~200 lines that uvicorn and the server's error handler would log for it;
- gradio >= 6.16 (pyproject's `ui` extra), the version with the published advisories' fixes.
"""

from __future__ import annotations

import logging
import os

from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

UI_PATH = "/ui"
DEV_RELOAD_ROUTE = "/gradio_api/dev/reload"  # gradio's own path, under UI_PATH
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
    _guard_mounted_page(app)


def _guard_mounted_page(app) -> None:
    """Put a GradioGuard in front of the gradio app that mount_gradio_app mounted at UI_PATH."""
    from starlette.routing import Mount

    mounts = [route for route in app.router.routes if isinstance(route, Mount) and route.path == UI_PATH]
    assert len(mounts) == 1, f"expected gradio mounted once at {UI_PATH}, found {len(mounts)}"
    mounts[0].app = GradioGuard(mounts[0].app)


class GradioGuard:
    """ASGI wrapper of the mounted gradio app: no dev-reload stream, and no tracebacks for client errors raised
    after a response started (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        route = path[len(root) :] if path.startswith(root) else path
        if route.rstrip("/") == DEV_RELOAD_ROUTE:
            return await _not_found(send)
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

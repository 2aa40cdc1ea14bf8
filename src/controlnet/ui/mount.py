"""Mounting the page on the server's FastAPI app, with gradio's own safety settings on.

- no share link, no analytics (GRADIO_ANALYTICS_ENABLED=False before gradio is imported, and on the Blocks), no
  MCP server, no monitoring dashboard, no server-side rendering (it would start a node process), no PWA;
- uploads bounded by gradio's `max_file_size` (the server's --max-body-mb) on top of the body limit that
  serve/security.py enforces for every route; no `allowed_paths`, no file explorer or proxy components: the page
  serves only what gradio itself cached (uploads and results, deleted after an hour: `delete_cache`);
- the same Host, origin and HTTP Basic checks as the API: serve/security.py's middleware wraps the whole app,
  so the page and its queue routes sit behind it (no second login of gradio's own);
- gradio >= 6.16 (pyproject's `ui` extra), the version with the published advisories' fixes.
"""

from __future__ import annotations

import os

UI_PATH = "/ui"
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

"""The web-UI compatible routes (/sdapi/v1/*, /controlnet/*) on the service layer (serve/service.py)."""

from __future__ import annotations


def add_routes(app, service) -> None:
    """Add the web-UI compatible routes to `app` (a FastAPI app), backed by `service` (a serve.service.Service)."""
    pass

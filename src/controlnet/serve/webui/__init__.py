"""The web-UI compatible routes (/sdapi/v1/*, /controlnet/*) on the service layer (serve/service.py).

routes.py: the routes; generation.py: a txt2img/img2img body -> GenerationJob; units.py: ControlNet units ->
ControlUnits; modules.py: web-UI preprocessor names -> our annotators; payload.py: base64 images in and out;
info.py: the response's `info` and infotexts.
"""

from __future__ import annotations


def add_routes(app, service) -> None:
    """Add the web-UI compatible routes to `app` (a FastAPI app), backed by `service` (a serve.service.Service)."""
    from controlnet.serve.webui.routes import add_routes as add

    add(app, service)

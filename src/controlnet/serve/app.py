"""The FastAPI app: native /v1 routes, the web-UI compatible routes, problem details, the security middleware.

`create_app(service, settings)` builds it around a running `Service`; `controlnet serve` (serve/commands.py)
runs it under uvicorn. Nothing here reveals the command line, the environment or the file system.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from controlnet import __version__
from controlnet.serve import native, webui
from controlnet.serve.problems import install_handlers
from controlnet.serve.security import SecurityMiddleware, SecuritySettings
from controlnet.serve.service import Service

DESCRIPTION = """\
ControlNet generation over HTTP (Zhang, Rao & Agrawala, ICCV 2023): the native API under /v1 and the web-UI
compatible API (/sdapi/v1, /controlnet) on one job queue. Images travel as base64 or data: URIs; errors are
application/problem+json naming the field."""


def create_app(service: Service, settings: SecuritySettings | None = None) -> FastAPI:
    settings = settings or SecuritySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close(cancel_running=True)

    app = FastAPI(title="controlnet", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    install_handlers(app)
    native.add_routes(app, service)
    webui.add_routes(app, service)
    app.add_middleware(SecurityMiddleware, settings=settings)
    return app

"""The FastAPI app: native /v1 routes, the web-UI compatible routes, problem details, the security middleware.

`create_app(service, settings)` builds it around a running `Service`; `controlnet serve` (serve/commands.py)
runs it under uvicorn. Nothing here reveals the command line, the environment or the file system. The interactive
docs (/docs) come from Swagger UI's files on this machine, never a CDN; FastAPI's /redoc (CDN only) is off.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from controlnet import __version__
from controlnet.serve import native, webui
from controlnet.serve.problems import PROBLEM_JSON, install_handlers
from controlnet.serve.security import BODY_METHODS, STATE_CHANGING, SecurityMiddleware, SecuritySettings
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

    # FastAPI's own /docs and /redoc load their scripts from a CDN: off; /docs is served below from a package
    app = FastAPI(
        title="controlnet",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.docs = add_docs(app)
    install_handlers(app)
    native.add_routes(app, service)
    webui.add_routes(app, service)
    app.add_middleware(SecurityMiddleware, settings=settings)
    document_refusals(app)
    return app


def document_refusals(app: FastAPI) -> None:
    """Document on every operation the problem responses that come from outside its handler (each one a
    handler has documented itself is kept): the security middleware's 400 (Host) and 401 (auth) on any route,
    403 (cross-site) on state-changing ones, 413/415 (body size, content type) where a body is read, and the
    422 (application/problem+json, not FastAPI's default application/json) that every validation error becomes."""
    problem = {
        "description": "problem details",
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        codes = [400, 401]
        if route.methods & STATE_CHANGING:
            codes.append(403)
        if route.methods & BODY_METHODS:
            codes += [413, 415]
        params = route.dependant
        if route.body_field is not None or params.path_params or params.query_params or params.header_params:
            codes.append(422)
        for code in codes:
            if code not in route.responses and str(code) not in route.responses:
                route.responses[code] = problem


DOCS_PATH = "/docs"
DOCS_ASSETS = {  # name served under /docs/assets/ -> (file in swagger-ui's folder, media type); nothing else
    "swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript"),
    "swagger-ui.css": ("swagger-ui.css", "text/css"),
    "favicon.png": ("favicon-32x32.png", "image/png"),
}
DOCS_HINT = 'the /docs page needs swagger-ui-bundle-v2 (in the serve extra: pip install -e ".[serve]")'


def swagger_ui_folder():
    """The folder of Swagger UI's files shipped by the swagger-ui-bundle-v2 package, or None without it."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    folder = Path(str(swagger_ui_path))
    return folder if all((folder / name).is_file() for name, _ in DOCS_ASSETS.values()) else None


def add_docs(app: FastAPI) -> bool:
    """Serve the interactive API docs at /docs from Swagger UI's files on this machine (no CDN, nothing fetched
    from another host); False, with no /docs, when they are not installed (/openapi.json is served either way)."""
    folder = swagger_ui_folder()
    if folder is None:
        return False
    assets = f"{DOCS_PATH}/assets"

    @app.get(DOCS_PATH, include_in_schema=False)
    def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} API",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
            # Swagger UI would otherwise send the schema's address to validator.swagger.io for its badge
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(assets + "/{name}", include_in_schema=False)
    def docs_asset(name: str):
        if name not in DOCS_ASSETS:
            raise StarletteHTTPException(404)
        file, media_type = DOCS_ASSETS[name]
        return FileResponse(folder / file, media_type=media_type, headers={"Cache-Control": "max-age=86400"})

    return True

"""CLI: `controlnet serve`. Thin: parse, check, build the registry, the service and the app, run uvicorn."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys

from controlnet.serve.limits import describe as describe_limits
from controlnet.serve.logs import DEFAULT_BURST as LOG_BURST
from controlnet.serve.logs import DEFAULT_STDERR_LINES as STDERR_LINES

# the values shown in --help, without importing the server's dependencies (uvicorn) to build the parser
DEFAULT_MAX_CONNECTIONS = 8192  # serve/connections.py's, checked by tests/serve/test_connections.py
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
FD_RESERVE = 256
AUTH_ENV = "CONTROLNET_AUTH"

logger = logging.getLogger(__name__)

DEFAULT_PORT = 7860  # the web UI's, so clients find us where they look
DEFAULT_MAX_BODY_MB = 32.0
INSTALL_HINT = 'controlnet serve needs the serve extra: pip install -e ".[serve]"'

DESCRIPTION = """\
Serve ControlNet generation over HTTP: a native JSON API under /v1 (OpenAPI at /openapi.json, browsable at /docs
from the swagger-ui-bundle-v2 package's files: no page loads anything from another host) and the
web-UI compatible API that existing clients (the `webuiapi` package, image-editor plug-ins, scripts written for
AUTOMATIC1111 + sd-webui-controlnet) speak: /sdapi/v1/* and /controlnet/*.

The web page (gradio, at /ui/; / redirects there) calls the same job queue as the APIs, so the same settings give
the same pixels; --no-ui leaves it out. It needs the ui extra (pip install -e ".[ui]").

With no arguments it serves the built-in base models (`builtin`, and the transformer base `builtin-dit` where it is
shipped) and the built-in ControlNets (names `builtin:<name>`, `builtin-dit:<name>`) on http://127.0.0.1:7860.
--models DIR adds every base and ControlNet found in DIR (original single files and diffusers folders, as
`controlnet inspect` recognises them; names are paths relative to DIR without the suffix, also accepted as
`name [hash8]` with the web UI's short hash, or the bare file stem).

Jobs run one at a time per device, in order, from one bounded queue: a full queue answers 429 with Retry-After.
A job's progress is polled (GET /v1/jobs/{id}) or streamed (GET /v1/jobs/{id}/events); DELETE cancels it at the
next sampler step. SIGTERM (or Ctrl-C) stops accepting requests, cancels queued and running jobs and exits 0.

Security:
  - binds 127.0.0.1 by default; a non-loopback --host refuses to start without credentials (HTTP Basic: one for
    the API, /docs and the UI; use TLS in front of it, Basic sends the password in clear). Give them in a file
    only you can read (--auth-file, mode 600) or in the CONTROLNET_AUTH=USER:PASS environment variable: every
    local user can read a command line (ps), so --auth USER:PASS shows the password to them
  - no client-supplied file paths anywhere: images are base64 or data: URIs (a path string is a 422), model
    names are the registry's names (never looked up on disk; symlinks out of the --models folders are not listed)
  - weights load through safe loaders only (safetensors; .pth/.ckpt with torch.load(weights_only=True))
  - request bodies over --max-body-mb are refused while they are read (413); images over --max-pixels before
    they are decoded (413); cross-site requests (foreign Origin/Referer) 403; a foreign Host header 400 (DNS
    rebinding); POST bodies other than application/json 415
  - no route reveals the command line, the environment or the file system
  - no other site may frame a page (Content-Security-Policy: frame-ancestors 'none', X-Frame-Options: DENY)
  - the same request limits on /v1, the web-UI API and the page (serve/limits.py): {limits}
  - connections: a request's line and headers must arrive within --header-timeout s of connecting (or of the
    last response), and its body may pause at most --body-timeout s, or the connection is closed (408); at
    --max-connections open connections the oldest one that has waited over a second for its headers is closed
    to make room, or else the new one is answered 503 (requests under way and event streams are never cut). The
    open-files limit (ulimit -n) is raised towards its hard limit to fit the cap.
  - the log keeps at most {log_burst} lines of each kind a minute, then one line saying how many it left out (what
    writes to stderr without logging, such as gradio's tracebacks: {stderr_lines} lines a minute)"""

EPILOG = """\
examples:
  controlnet serve                                   built-in models on http://127.0.0.1:7860
  controlnet serve --models ~/sd/models/ControlNet --models ~/sd/models/Stable-diffusion \\
      --base v1-5-pruned-emaonly --tokenizer ~/sd/tokenizer --device cuda
  install -m 600 /dev/null ~/.controlnet-auth && echo 'alice:s3cret' > ~/.controlnet-auth
  controlnet serve --host 0.0.0.0 --auth-file ~/.controlnet-auth --allow-host gpu-box.lan
  curl -s localhost:7860/v1/health
  curl -s localhost:7860/v1/generate -H 'Content-Type: application/json' \\
      -d '{"prompt": "a red circle", "steps": 10}' | python -c 'import json,sys; print(json.load(sys.stdin)["seeds"])'
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve generation over HTTP (native /v1 API + the web-UI compatible API)",
        description=DESCRIPTION.replace("{limits}", describe_limits())
        .replace("{log_burst}", str(LOG_BURST))
        .replace("{stderr_lines}", str(STDERR_LINES)),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("network")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s; anything but loopback needs --auth-file or --auth)",
    )
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s, the web UI's)")
    g.add_argument(
        "--auth-file",
        default=None,
        metavar="PATH",
        help="require HTTP Basic auth for every route with the USER:PASS on the one line of this file, which other "
        f"users may not read (chmod 600); or set {AUTH_ENV}=USER:PASS (default: no auth on loopback)",
    )
    g.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASS",
        help="as --auth-file, on the command line: other local users can read it there (ps); prefer --auth-file",
    )
    g.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host header name to accept (default: loopback names and --host); repeatable",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help=f"open client connections at most (default: {DEFAULT_MAX_CONNECTIONS}, or fewer if the open-files "
        f"hard limit minus {FD_RESERVE} is lower)",
    )
    g.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        metavar="S",
        help="seconds a client has to send a request's line and headers (default: %(default)g)",
    )
    g.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        metavar="S",
        help="longest pause in seconds while a request body is being sent (default: %(default)g)",
    )
    g.add_argument(
        "--no-ui",
        action="store_true",
        help="serve only the APIs, not the web page at /ui (the page needs the ui extra)",
    )
    g = p.add_argument_group("models")
    g.add_argument(
        "--models",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of bases and ControlNets to offer (repeatable; default: only the built-in ones)",
    )
    g.add_argument(
        "--base",
        default="builtin",
        help="the base used when a request names none (a registry name, e.g. builtin-dit; default: %(default)s)",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="tokenizer folder for single-file SD bases (they hold none; see `controlnet generate`)",
    )
    # an SD3 / Flux checkpoint file's parts, as `controlnet generate` takes them (one schema: options.BaseParts);
    # given to every SD3 / Flux single-file base of the server
    from controlnet.generate.commands import add_base_config_argument, add_part_arguments

    add_part_arguments(g)
    add_base_config_argument(
        g,
        "SD3/Flux single-file bases of a non-standard (tiny) architecture: JSON of the configs their weights do not "
        "give (see `controlnet generate`)",
    )
    g.add_argument(
        "--max-controlnet-mb",
        type=float,
        default=2048.0,
        metavar="MB",
        help="memory for loaded ControlNets; least recently used ones are dropped (default: %(default)g)",
    )
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-queue",
        type=int,
        default=16,
        metavar="N",
        help="jobs waiting at most; more are answered 429 with Retry-After (default: %(default)s)",
    )
    g.add_argument(
        "--max-units",
        type=int,
        default=4,
        metavar="N",
        help="ControlNet units per request; more are a 422, never dropped (default: %(default)s)",
    )
    g.add_argument(
        "--max-body-mb",
        type=float,
        default=DEFAULT_MAX_BODY_MB,
        metavar="MB",
        help="request body size limit (default: %(default)g)",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help="pixels per uploaded image, checked before decoding (default: io/images.py MAX_IMAGE_PIXELS, 2**26)",
    )
    g = p.add_argument_group("device")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument(
        "--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="model dtype (default: %(default)s)"
    )
    g.add_argument(
        "--threads", type=int, default=None, metavar="N", help="CPU threads for torch (default: torch's)"
    )
    p.set_defaults(func=run_serve)


def check_arguments(args, environ=None) -> None:
    """Refuse unsafe or impossible settings before anything loads; sets args.credentials (None: no auth)."""
    from controlnet.serve.security import is_loopback, load_credentials

    args.credentials, _ = load_credentials(args.auth, args.auth_file, os.environ if environ is None else environ)
    if not is_loopback(args.host) and args.credentials is None:
        raise ValueError(
            f"--host {args.host}: serving beyond this machine needs credentials (anyone on the network could use "
            f"the GPU and read every job): --auth-file PATH or {AUTH_ENV}=USER:PASS, or keep --host 127.0.0.1"
        )
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: expected 1..65535")
    for name in ("max_queue", "max_units"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    if args.max_body_mb <= 0 or args.max_controlnet_mb <= 0:
        raise ValueError("--max-body-mb and --max-controlnet-mb: expected positive numbers")
    if args.max_pixels is not None and args.max_pixels < 64 * 64:
        raise ValueError(f"--max-pixels {args.max_pixels}: expected at least 4096")
    from controlnet.serve.connections import ConnectionLimits, connection_cap

    # raises the open-files limit to fit the cap, or says why it cannot
    args.connection_limits = ConnectionLimits(
        max_connections=connection_cap(args.max_connections),
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
    )


def file_base_options(args) -> dict:
    """The loader's keywords for single-file bases (generate/base.py `check_base`): --tokenizer, the SD3 / Flux
    parts and --base-config as given, and `flags` naming them as this command spells them."""
    from controlnet.generate.commands import BASE_FLAGS, part_options

    options = {"tokenizer": args.tokenizer, "configs": args.base_config, **part_options(args)}
    return {**{key: value for key, value in options.items() if value}, "flags": BASE_FLAGS}


def _mount_page(app, service, settings, no_ui: bool) -> str:
    """Mount the web page unless --no-ui; without the ui extra the APIs still run (one line says so)."""
    if no_ui:
        return ""
    from controlnet.ui.mount import INSTALL_HINT as UI_HINT
    from controlnet.ui.mount import UI_PATH, mount_ui, ui_available

    if not ui_available():
        print(f"controlnet serve: no web page: {UI_HINT}", file=sys.stderr)
        return ""
    mount_ui(app, service, max_file_bytes=settings.max_body_bytes)
    return f"web page at {UI_PATH}/, "


def _stop_while_starting(signum, frame):
    # os._exit, not SystemExit: an exception raised from a signal handler lands wherever start-up is, and a bare
    # `except:` in a library being imported swallowed it (the server then started anyway). Nothing is open for
    # writing while starting (the hash cache is written by rename), so there is nothing to flush but stderr.
    print("controlnet serve: stopped while starting (SIGTERM)", file=sys.stderr, flush=True)
    os._exit(0)


def run_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    check_arguments(args)
    # SIGTERM while starting (the scan, the imports, the page) stops at once and cleanly: exit 0 and one line, not
    # the default termination by signal; uvicorn installs its own handlers once it runs
    signal.signal(signal.SIGTERM, _stop_while_starting)
    import torch

    from controlnet.serve import logs
    from controlnet.serve.app import DOCS_HINT, create_app
    from controlnet.serve.connections import protocol_class
    from controlnet.serve.models import ModelRegistry
    from controlnet.serve.security import SecuritySettings
    from controlnet.serve.service import Service

    limits = args.connection_limits
    logs.install(burst=LOG_BURST)

    registry = ModelRegistry(args.models, base=args.base)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    base_options = file_base_options(args)
    service = Service(
        registry,
        max_queue=args.max_queue,
        max_units=args.max_units,
        device=args.device,
        max_controlnet_mb=args.max_controlnet_mb,
        dtype=dtype,
        base_options=base_options,
        threads=args.threads,
        max_pixels=args.max_pixels,
    )
    from controlnet.precision import precision_warning

    warning = precision_warning(dtype, service.device, f"--dtype {args.dtype}")
    if warning:
        print(f"controlnet serve: warning: {warning}", file=sys.stderr)
    settings = SecuritySettings(
        host=args.host,
        port=args.port,
        auth=args.credentials,
        allowed_hosts=args.allow_host,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    app = create_app(service, settings)
    page = _mount_page(app, service, settings, args.no_ui)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        http=protocol_class(limits),
        log_config=None,  # uvicorn's loggers propagate to the rate-limited handler that logs.install set up
        log_level="warning",
        timeout_graceful_shutdown=10,
        server_header=False,
    )

    docs = "docs at /docs" if app.state.docs else f"no /docs page: {DOCS_HINT}"
    banner = (
        f"controlnet serve: http://{args.host}:{args.port} ({page}{docs}); models: "
        f"{len(registry.bases())} bases, {len(registry.controlnets())} ControlNets; at most "
        f"{limits.max_connections} connections"
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # the banner once the port is bound: a client that reads it can connect at once
                print(banner, file=sys.stderr, flush=True)

        def handle_exit(self, sig, frame):
            # SIGTERM/SIGINT: refuse new jobs and cancel running ones now, so that open requests end promptly and
            # uvicorn's graceful shutdown does not wait for a long generation
            service.stop_accepting(cancel_running=True)
            super().handle_exit(sig, frame)

    # uvicorn restores the handlers it found and re-raises the signal it stopped on; a SIGTERM we have handled
    # (jobs cancelled, connections closed) then lands on this no-op, so the exit status is 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # A full collection of the cyclic garbage collector walks every object with the event loop stopped: with torch,
    # diffusers and the page loaded, ~630,000 objects and 0.4-0.5 s (2-3 s on a busy machine, the longest health
    # answers under load). What exists now lives as long as the server: the collector's walks leave it out.
    gc.collect()
    gc.freeze()
    Server(config).run()
    service.close(cancel_running=True)
    return 0

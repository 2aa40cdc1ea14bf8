"""Safety by default: Host check, HTTP Basic auth, cross-site refusal, content types, body size.

One pure-ASGI middleware in front of every route (the API, /docs, the web-UI routes), in this order:
1. Host header: only the server's own names (loopback names, the bound host, `--allow-host`): a page on another
   site that rebinds its DNS name to 127.0.0.1 still sends its own Host, and is refused (400).
2. HTTP Basic auth when credentials are set (`--auth-file`, the CONTROLNET_AUTH variable or `--auth`): one credential for everything, compared in constant time
   (hmac.compare_digest); 401 with `WWW-Authenticate: Basic` otherwise.
3. Cross-site: a state-changing request (POST, PUT, PATCH, DELETE) whose Origin (or, without it, Referer) is not
   this server's own host, or whose `Sec-Fetch-Site` says cross-site, is refused (403). No CORS headers are sent,
   so other sites' scripts cannot read any response either.
4. Content type: a POST/PUT/PATCH body must be application/json or multipart/form-data (415): an HTML form on
   another site can only send text/plain, urlencoded or multipart without a preflight.
5. Body size: a Content-Length over the limit is refused at once, and the bytes actually received are counted
   while the body is read, before anything parses it (uvicorn has no limit of its own): 413.
Every response, refusals included, says that no other site may frame it (FRAME_HEADERS).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from controlnet.serve.problems import PROBLEM_JSON, problem_body

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
BODY_METHODS = {"POST", "PUT", "PATCH"}
ACCEPTED_BODY_TYPES = ("application/json", "multipart/form-data")
REALM = "controlnet"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None, source: str = "--auth") -> tuple[str, str] | None:
    """'USER:PASS' -> (user, password); ValueError naming `source` (never echoing the text) when malformed."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{source}: expected USER:PASS (both non-empty)")
    return user, password


AUTH_ENV = "CONTROLNET_AUTH"
# group and other users may neither read nor write the credentials file (as ssh requires of private keys)
AUTH_FILE_FORBIDDEN_MODE = 0o066


def load_credentials(
    auth: str | None, auth_file: str | None, environ: Mapping[str, str]
) -> tuple[tuple[str, str] | None, str | None]:
    """The HTTP Basic credentials and where they came from: --auth, --auth-file or the CONTROLNET_AUTH variable.

    A command line is readable by every local user (ps, /proc/PID/cmdline); a file only its owner may read and the
    environment (/proc/PID/environ is the owner's alone) are not. A flag wins over the variable; both flags at once,
    a missing, unreadable, shared or malformed file are one ValueError naming it (the secret is never echoed)."""
    if auth is not None and auth_file is not None:
        raise ValueError("--auth and --auth-file: give the credentials one way")
    if auth is not None:
        return parse_auth(auth, "--auth"), "--auth"
    if auth_file is not None:
        source = f"--auth-file {auth_file}"
        path = Path(auth_file)
        if not path.is_file():
            raise ValueError(f"{source}: no such file")
        mode = path.stat().st_mode
        if os.name == "posix" and mode & AUTH_FILE_FORBIDDEN_MODE:
            raise ValueError(
                f"{source}: other users may read or change it (mode {stat.S_IMODE(mode):o}); chmod 600 {auth_file}"
            )
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{source}: cannot read it ({type(err).__name__})") from None
        if len(lines) != 1:
            raise ValueError(f"{source}: expected one line USER:PASS, found {len(lines)} non-empty lines")
        return parse_auth(lines[0], source), "--auth-file"
    text = environ.get(AUTH_ENV)
    if text:
        return parse_auth(text, f"the {AUTH_ENV} environment variable"), AUTH_ENV
    return None, None


@dataclass
class SecuritySettings:
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    allowed_hosts: list[str] = field(default_factory=list)
    max_body_bytes: int = 32 * 2**20

    def host_names(self) -> set[str]:
        names = {*LOOPBACK_NAMES, *self.allowed_hosts}
        if self.host not in ("0.0.0.0", "::"):
            names.add(self.host)
        return {n.lower() for n in names}


def _hostname(hostport: str) -> str:
    """'127.0.0.1:7860' -> '127.0.0.1'; '[::1]:80' -> '::1'."""
    hostport = hostport.strip().lower()
    if hostport.startswith("["):
        return hostport[1 : hostport.find("]")] if "]" in hostport else hostport
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


class SecurityMiddleware:
    """See the module docstring. Wraps the whole ASGI app."""

    def __init__(self, app, settings: SecuritySettings):
        self.app, self.settings = app, settings
        self.hosts = settings.host_names()
        self.open_all_hosts = "*" in self.hosts
        self.credentials = None
        if settings.auth is not None:
            self.credentials = f"{settings.auth[0]}:{settings.auth[1]}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _unframeable(send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refuse(scope, headers)
        if refusal is not None:
            return await _send_problem(send, *refusal)
        if scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        # the body is read here, counted chunk by chunk, before any parser sees it (FastAPI would turn an error
        # raised from inside its own read into a 400), then replayed to the app
        limit = self.settings.max_body_bytes
        chunks, received, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                return await _send_problem(
                    send, 413, f"request body over the limit of {limit:,} bytes (--max-body-mb)"
                )
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for http.disconnect (is_disconnected polls this)

        await self.app(scope, replay, send)

    def _refuse(self, scope, headers: dict) -> tuple | None:
        method = scope["method"]
        host = headers.get("host", "")
        if not self.open_all_hosts and _hostname(host) not in self.hosts:
            return 400, f"Host header {host!r} is not one of this server's names (--allow-host adds one)", None
        if self.credentials is not None and not self._authorized(headers.get("authorization", "")):
            return (
                401,
                "authentication required (HTTP Basic, the --auth credentials)",
                {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            )
        if method in STATE_CHANGING:
            site = headers.get("sec-fetch-site", "")
            if site == "cross-site":
                return 403, "cross-site request refused (Sec-Fetch-Site: cross-site)", None
            origin = headers.get("origin") or headers.get("referer")
            if origin is not None:
                netloc = urlsplit(origin).netloc.lower() if origin != "null" else "null"
                if netloc != host.lower():
                    return 403, f"cross-site request refused: Origin/Referer {origin!r} is not this server", None
        if method in BODY_METHODS:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            length = headers.get("content-length")
            if ctype not in ACCEPTED_BODY_TYPES and (ctype or length not in (None, "0")):
                return 415, f"content type {ctype or '(none)'!r}: request bodies are application/json", None
            if length is not None:
                try:
                    too_big = int(length) > self.settings.max_body_bytes
                except ValueError:
                    return 400, "Content-Length is not a number", None
                if too_big:
                    return (
                        413,
                        (
                            f"request body of {int(length):,} bytes is over the limit of "
                            f"{self.settings.max_body_bytes:,} bytes (--max-body-mb)"
                        ),
                        None,
                    )
        return None

    def _authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self.credentials)  # constant time in the length of the secret


# No other site may show our pages in a frame (clickjacking): every response says so, in both spellings browsers read.
FRAME_HEADERS = ((b"content-security-policy", b"frame-ancestors 'none'"), (b"x-frame-options", b"DENY"))


def _unframeable(send):
    """`send` with FRAME_HEADERS added to each response's start (a header the app set itself is kept)."""

    async def wrapped(message):
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in FRAME_HEADERS if k not in present]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


async def _send_problem(send, status: int, detail: str, headers: dict | None = None) -> None:
    body = json.dumps(problem_body(status, detail)).encode()
    raw = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})

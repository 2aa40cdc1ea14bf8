"""HTTP Basic auth on a REAL server (credentials from a file only its owner may read, or the environment; never on
its command line), the refusal to serve the network without it, /docs served from this machine only, and fuzzing
(bounded, loopback only): schemathesis over every operation of the served /openapi.json, native and web-UI, and
hypothesis bodies built from the web-UI field names: no 5xx, responses match the schema."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest

from controlnet import cli
from controlnet.serve.limits import MAX_IMAGES, MAX_SIDE, MAX_STEPS
from controlnet.testing.live_server import TINY_CONTROLNET, start_server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

AUTH = ("alice", "s3cret-pass")
FUZZ_EXAMPLES = 8  # per operation of the OpenAPI document
WEBUI_EXAMPLES = 60  # web-UI bodies built from the field names the server reads
GENERATION = {"/v1/generate", "/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"}
SHRUNK = {  # field -> (lowest and highest valid value, the value sent instead of a valid one)
    "width": (64, MAX_SIDE, 64),
    "height": (64, MAX_SIDE, 64),
    "steps": (1, MAX_STEPS, 2),
    "batch_size": (1, MAX_IMAGES, 1),
    "n_iter": (1, MAX_IMAGES, 1),
}


def _cheap(body):
    """A generation body whose valid (or absent) sizes, steps and image counts are replaced by a tiny job's (values
    out of range are kept: their refusal is what is tested), so that a request the server accepts costs a fraction of a
    second instead of minutes of CPU."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for name, (low, high, cheap) in SHRUNK.items():
        value = body.get(name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is None or (number and low <= value <= high):  # None or absent: the server's default, not tiny
            body[name] = cheap
    return body


def _auth_file(folder, text: str, mode: int = 0o600):
    path = folder / "auth"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def server(models_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("log")
    auth_file = _auth_file(folder, f"{AUTH[0]}:{AUTH[1]}\n")
    srv = start_server(models_folder, folder / "server.log", "--auth-file", str(auth_file), auth=AUTH)
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def test_wrong_or_missing_auth_is_401_with_challenge(server):
    for auth in (None, ("alice", "wrong"), ("bob", AUTH[1])):
        response = httpx.get(server.url + "/v1/health", auth=auth)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Basic")
        assert response.headers["content-type"].startswith("application/problem+json")
    for path in ("/docs", "/openapi.json"):  # one auth for everything
        assert httpx.get(server.url + path).status_code == 401
    assert httpx.get(server.url + "/v1/health", auth=AUTH).status_code == 200
    assert httpx.get(server.url + "/docs", auth=AUTH).status_code == 200


def _command_line(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


@pytest.mark.slow  # 11 s (two server starts): the default suite's 15-minute budget; run with -m slow
@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="needs /proc")
def test_credentials_from_file_or_environment_are_not_on_the_command_line(server, tmp_path):
    assert AUTH[1] not in _command_line(server.pid)
    env_auth = ("carol", "env-secret-9")
    srv = start_server(
        None, tmp_path / "server.log", "--no-ui", auth=env_auth, env={"CONTROLNET_AUTH": ":".join(env_auth)}
    )
    try:
        assert env_auth[1] not in _command_line(srv.pid)
        assert httpx.get(srv.url + "/v1/health").status_code == 401
        assert httpx.get(srv.url + "/v1/health", auth=AUTH).status_code == 401
        assert httpx.get(srv.url + "/v1/health", auth=env_auth).status_code == 200
    finally:
        assert srv.stop() == 0, srv.log.read_text()


def _serve_error(capsys, *args: str) -> str:
    """`controlnet serve ARGS` in this process, which must refuse them before serving: its one stderr line."""
    assert cli.main(["serve", "--no-ui", *args]) == cli.EXIT_USER_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_bad_credentials_file_or_variable_is_one_error_line_that_never_shows_the_secret(
    capsys, tmp_path, monkeypatch
):
    secret = "hunter2-do-not-print"
    shared = _auth_file(tmp_path, f"alice:{secret}\n", mode=0o644)
    line = _serve_error(capsys, "--auth-file", str(shared))
    assert "chmod 600" in line and "644" in line
    assert "no such file" in _serve_error(capsys, "--auth-file", str(tmp_path / "missing"))
    for text in (f"alice{secret}", f"alice:{secret}\nbob:{secret}", ":" + secret, ""):
        line = _serve_error(capsys, "--auth-file", str(_auth_file(tmp_path, text)))
        assert "--auth-file" in line and "USER:PASS" in line and secret not in line, line
    line = _serve_error(capsys, "--auth", "a:b", "--auth-file", str(_auth_file(tmp_path, "alice:x")))
    assert "one way" in line
    monkeypatch.setenv("CONTROLNET_AUTH", secret)
    line = _serve_error(capsys)
    assert "CONTROLNET_AUTH" in line and secret not in line


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_docs_page_loads_nothing_from_another_host(server):
    response = httpx.get(server.url + "/docs", auth=AUTH)
    assert response.status_code == 200
    links = _Links()
    links.feed(response.text)
    assert len(links.urls) >= 3, links.urls  # the script, the style sheet, the icon
    for url in links.urls:
        assert not urlsplit(url).netloc and not urlsplit(url).scheme, url
        asset = httpx.get(server.url + url, auth=AUTH)
        assert asset.status_code == 200 and len(asset.content) > 500, url
    assert "cdn" not in response.text.lower() and "validatorUrl" in response.text
    assert httpx.get(server.url + "/docs/assets/index.html", auth=AUTH).status_code == 404  # only the named files
    assert httpx.get(server.url + "/redoc", auth=AUTH).status_code == 404  # FastAPI's loads its script from a CDN
    assert httpx.get(server.url + "/openapi.json", auth=AUTH).json()["paths"]


def test_non_loopback_host_without_auth_refuses_to_start():
    cmd = [sys.executable, "-m", "controlnet.cli", "serve", "--host", "0.0.0.0"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--auth" in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def api_schema(server):
    # every operation of the served document: the native API and the web-UI API (generation included, made
    # cheap by `_cheap`); the page's gradio routes are not in it
    spec = httpx.get(server.url + "/openapi.json", auth=AUTH, timeout=60).json()
    paths = set(spec["paths"])
    assert paths >= GENERATION | {"/v1/annotate", "/controlnet/detect", "/sdapi/v1/options"}, paths
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=server.url)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_native_and_webui_api(case):
    if case.operation.path in GENERATION:
        case.body = _cheap(case.body)
    # every check but "schema-valid data is accepted": a schema cannot say "a decodable image" (any string is
    # valid base64 to it), and refusing those with 422 is the point
    case.call_and_validate(auth=AUTH, timeout=120, excluded_checks=[positive_data_acceptance])


# ---------------------------------------------------------------------------------------------------------------
# The web-UI bodies are free-form objects in the OpenAPI document (clients send many spellings), so a schema-driven
# fuzzer almost never sends a field the server reads. These bodies use the field names the parsers read: valid
# values for most of them (so that requests get past the first check, and some run), and one or two fields, in the
# body or in a ControlNet unit, given any JSON value at all (NaN and Infinity included).
HOSTILE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, -1, 2, 8, 64, 150, 151, 2048, 2049, 10**6, 1e308, -1e308, 0.5, 1e-300]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
        st.sampled_from(
            ["", "none", "depth", "openpose", "ip-adapter_clip", "inpaint_only", "/etc/passwd", "\ud800"]
        ),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _mostly_valid(valid: dict, most_bad: int = 2) -> st.SearchStrategy:
    """Objects with any of `valid`'s fields (valid values), then up to `most_bad` of them set to HOSTILE values."""
    bad = st.lists(st.tuples(st.sampled_from(sorted(valid)), HOSTILE), max_size=most_bad)
    return st.tuples(st.fixed_dictionaries({}, optional=valid), bad).map(lambda pair: {**pair[0], **dict(pair[1])})


def _tiny_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


TINY_PNG = _tiny_png()
IMAGE = st.sampled_from([TINY_PNG, "data:image/png;base64," + TINY_PNG])
UNIT = _mostly_valid(
    {
        "enabled": st.just(True),
        "module": st.sampled_from(["none", "canny"]),
        "model": st.sampled_from([TINY_CONTROLNET, "None"]),
        "weight": st.floats(0, 2),
        "image": IMAGE,
        "mask": IMAGE,
        "resize_mode": st.sampled_from([0, 1, 2, "Just Resize", "Crop and Resize", "Resize and Fill"]),
        "lowvram": st.booleans(),
        "processor_res": st.integers(64, 256),
        "threshold_a": st.floats(1, 255),
        "threshold_b": st.floats(1, 255),
        "guidance_start": st.floats(0, 0.5),
        "guidance_end": st.floats(0.5, 1),
        "control_mode": st.sampled_from([0, 1, 2, "Balanced", "My prompt is more important"]),
        "pixel_perfect": st.booleans(),
        "save_detected_map": st.booleans(),
        "advanced_weighting": st.none(),
    },
    most_bad=1,
)
GENERATION_FIELDS = {
    "prompt": st.text(max_size=30),
    "negative_prompt": st.text(max_size=10),
    "steps": st.integers(1, 3),
    "cfg_scale": st.floats(0, 30),
    "batch_size": st.integers(1, 2),
    "n_iter": st.integers(1, 2),
    "width": st.sampled_from([64, 72]),
    "height": st.sampled_from([64, 72]),
    "seed": st.integers(-1, 2**32 - 1),
    "sampler_name": st.sampled_from(["Euler", "Euler a", "DDIM", "DPM++ 2M Karras", "UniPC"]),
    "scheduler": st.sampled_from(["Automatic", "Karras"]),
    "eta": st.floats(0, 1),
    "denoising_strength": st.floats(0.1, 1),
    "init_images": st.lists(IMAGE, min_size=1, max_size=1),
    "mask": IMAGE,
    "resize_mode": st.integers(0, 2),
    "enable_hr": st.just(False),
    "restore_faces": st.just(False),
    "tiling": st.just(False),
    "styles": st.just([]),
    "script_name": st.none(),
    "subseed_strength": st.just(0),
    "send_images": st.booleans(),
    "save_images": st.booleans(),
    "override_settings": st.fixed_dictionaries(
        {}, optional={"sd_model_checkpoint": st.just("builtin"), "CLIP_stop_at_last_layers": st.integers(1, 2)}
    ),
    "alwayson_scripts": st.fixed_dictionaries(
        {"ControlNet": st.fixed_dictionaries({"args": st.lists(UNIT, max_size=2)})}
    ),
}
DETECT_FIELDS = {
    "controlnet_module": st.sampled_from(["none", "canny"]),
    "controlnet_input_images": st.lists(IMAGE, min_size=1, max_size=2),
    "controlnet_processor_res": st.integers(64, 256),
    "controlnet_threshold_a": st.floats(1, 255),
    "controlnet_threshold_b": st.floats(1, 255),
}
OPTIONS_FIELDS = {"sd_model_checkpoint": st.just("builtin"), "CLIP_stop_at_last_layers": st.integers(1, 2)}
WEBUI_BODIES = st.one_of(
    st.tuples(st.sampled_from(["/sdapi/v1/txt2img", "/sdapi/v1/img2img"]), _mostly_valid(GENERATION_FIELDS)),
    st.tuples(st.just("/controlnet/detect"), _mostly_valid(DETECT_FIELDS)),
    st.tuples(st.just("/sdapi/v1/options"), _mostly_valid(OPTIONS_FIELDS)),
)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, auth=AUTH, timeout=120) as c:
        yield c


@given(request=WEBUI_BODIES)
@settings(max_examples=WEBUI_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_webui_fields(client, request):
    path, body = request
    if path in GENERATION:
        body = _cheap(body)
    # json.dumps writes NaN and Infinity as bare words (not JSON, but what Python clients send): the server must
    # refuse them, not compute with them
    response = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (path, body, response.status_code, response.text[:2000])
    assert response.status_code in (200, 413, 422, 429), (path, body, response.status_code, response.text[:500])
    payload = response.json()
    if response.status_code == 200:
        assert isinstance(payload, dict)
    else:
        assert response.headers["content-type"].startswith("application/problem+json")
        assert payload["status"] == response.status_code and payload["detail"], payload

"""HTTP Basic auth on a REAL server, the refusal to serve the network without it, and schemathesis fuzzing of the
native API from its own /openapi.json (bounded, loopback only): no 5xx, responses match the schema."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from controlnet.testing.live_server import start_server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

AUTH = ("alice", "s3cret-pass")
FUZZ_EXAMPLES = 8  # per operation; the cheap operations only (no generation: a fuzzer would queue real work)


@pytest.fixture(scope="module")
def server(models_folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = start_server(models_folder, log, "--auth", f"{AUTH[0]}:{AUTH[1]}", auth=AUTH)
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


def test_non_loopback_host_without_auth_refuses_to_start():
    cmd = [sys.executable, "-m", "controlnet.cli", "serve", "--host", "0.0.0.0"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--auth" in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def api_schema(server):
    # the native API's cheap operations only, cut from the served document itself: schemathesis' own include()
    # filter was not applied under pytest's from_fixture here (the web-UI routes, which generate, were fuzzed too)
    spec = httpx.get(server.url + "/openapi.json", auth=AUTH, timeout=60).json()
    wanted = re.compile(r"^/v1/(health|models|annotators|annotate|jobs/\{job_id\})$")
    spec["paths"] = {path: item for path, item in spec["paths"].items() if wanted.match(path)}
    assert len(spec["paths"]) == 5, sorted(spec["paths"])
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=server.url)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_native_api(case):
    # every check but "schema-valid data is accepted": a schema cannot say "a decodable image" (any string is
    # valid base64 to it), and refusing those with 422 is the point
    case.call_and_validate(auth=AUTH, timeout=60, excluded_checks=[positive_data_acceptance])

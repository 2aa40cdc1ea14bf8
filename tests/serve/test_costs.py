"""What a request costs the REAL server, bounded before the work (issue 27): threads held by waiting clients, pixels,
annotator resolutions, client disconnects. Each test names the defect it guards and asserts a time or memory bound."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from controlnet.testing.live_server import TINY_CONTROLNET, start_server

LONG_STEPS = 150  # a job long enough (~5-10 s on 2 cores) to be caught running
STREAMS_PER_JOB = 8  # serve/native.py MAX_STREAMS_PER_JOB


@pytest.fixture(scope="module")
def server(models_folder, tmp_path_factory):
    # the watchdog turns a regression of the memory bounds tested here (a thin image resized to 268 Mpx took >4 GB)
    # into a failed test (the server killed), not a machine out of memory
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = start_server(models_folder, log, "--max-queue", "16", max_rss_mb=3000)
    yield srv
    assert srv.stop(timeout=60) == 0, srv.log.read_text()


@pytest.fixture
def url(server):
    yield server.url
    # every test leaves the queue empty: cancel what is left
    for job_id in _live_jobs(server.url):
        httpx.delete(f"{server.url}/v1/jobs/{job_id}")
    assert httpx.get(server.url + "/v1/health", timeout=5).status_code == 200


_submitted: list[str] = []


def _live_jobs(url: str) -> list[str]:
    live = []
    for job_id in _submitted:
        r = httpx.get(f"{url}/v1/jobs/{job_id}")
        if r.status_code == 200 and r.json()["state"] in ("queued", "running"):
            live.append(job_id)
    return live


def submit(url: str, **fields) -> str:
    r = httpx.post(url + "/v1/jobs", json={"prompt": "x", "steps": LONG_STEPS, **fields})
    assert r.status_code == 202, r.text
    _submitted.append(r.json()["id"])
    return r.json()["id"]


def wait_running(url: str, timeout: float = 60.0) -> str:
    """The running job's id, once it is sampling (past loading its models)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = httpx.get(url + "/v1/health").json()["running"]
        if running and httpx.get(f"{url}/v1/jobs/{running}").json()["step"] > 0:
            return running
        time.sleep(0.05)
    raise AssertionError("no job started sampling")


def open_stream(url: str, job_id: str) -> socket.socket:
    """An event-stream client that reads its response headers and then just waits (as a browser tab does)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the event stream before its headers"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def test_waiting_streams_hold_no_thread(url):
    """Defect: 60 event-stream clients on queued jobs froze every other route for 27-30 s (each held one of the
    framework's 40 threads). Now 64 streams wait and the synchronous routes still answer within a second."""
    jobs = [submit(url) for _ in range(8)]
    socks = [open_stream(url, job_id) for job_id in jobs for _ in range(STREAMS_PER_JOB)]
    try:
        for path in (
            "/v1/health",
            "/v1/models",
            "/sdapi/v1/sd-models",
            "/controlnet/model_list",
            "/v1/annotators",
        ):
            started = time.monotonic()
            r = httpx.get(url + path, timeout=10)
            assert r.status_code == 200, (path, r.text)
            assert time.monotonic() - started < 1.0, f"{path} took {time.monotonic() - started:.1f} s"
        # one more stream on a job that has its fill is refused, the others are unaffected
        r = httpx.get(f"{url}/v1/jobs/{jobs[0]}/events", timeout=10)
        assert r.status_code == 429 and "event streams" in r.json()["detail"]
    finally:
        for sock in socks:
            sock.close()
    # the closed streams are forgotten: a new one on the same job is served again
    time.sleep(0.5)
    with httpx.stream("GET", f"{url}/v1/jobs/{jobs[0]}/events", timeout=10) as r:
        assert r.status_code == 200


def test_webui_job_cancelled_when_its_client_goes(url):
    """Defect: web-UI jobs kept running after their client disconnected (native jobs were cancelled)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = json.dumps({"prompt": "x", "steps": LONG_STEPS, "width": 64, "height": 64})
    conn.request("POST", "/sdapi/v1/txt2img", body, {"Content-Type": "application/json"})
    job_id = wait_running(url)
    _submitted.append(job_id)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    started = time.monotonic()
    while time.monotonic() - started < 10:
        state = httpx.get(f"{url}/v1/jobs/{job_id}").json()["state"]
        if state != "running":
            break
        time.sleep(0.1)
    assert state == "cancelled", state
    assert time.monotonic() - started < 3  # within a sampler step or two, plus the disconnect poll


def test_many_streams_then_health_under_a_second_while_generating(url):
    """Streams, a running generation and the web-UI progress route together: health stays under a second."""
    job_id = submit(url)
    wait_running(url)
    done = threading.Event()
    latencies = []

    def probe():
        while not done.is_set():
            started = time.monotonic()
            assert httpx.get(url + "/sdapi/v1/progress", timeout=5).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)

    socks = [open_stream(url, job_id) for _ in range(STREAMS_PER_JOB)]
    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(2)
    done.set()
    thread.join()
    for sock in socks:
        sock.close()
    assert latencies and max(latencies) < 1.0, max(latencies)


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def post_json(url: str, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    # json.dumps writes NaN and Infinity as the bare tokens a careless client sends (httpx's json= refuses them)
    return httpx.post(
        url + path,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        timeout=timeout,
    )


def assert_refused(response: httpx.Response, status: int, field: str, text: str) -> None:
    assert response.status_code == status, response.text
    problem = response.json()
    assert problem["field"] == field, problem
    assert text in problem["detail"], problem


def test_a_thin_image_is_refused_before_any_annotator_runs(url, server):
    """Defect: a 91-byte 1x1024 PNG cost over 4 GB and 11-28 s in any annotator (the short side scaled to 512 made
    a 512x524288 image). Refused on every door, within a second, the server's peak memory unchanged."""
    thin = b64_png(Image.new("RGB", (1024, 1), "white"))
    peak_before = server.peak_rss_mb()
    started = time.monotonic()
    response = post_json(url, "/v1/annotate", {"annotator": "canny", "image": thin})
    assert_refused(response, 422, "image", "512x524288")
    unit = {"model": TINY_CONTROLNET, "image": thin, "annotator": "canny"}
    response = post_json(url, "/v1/generate", {"prompt": "x", "steps": 2, "units": [unit]})
    assert_refused(response, 422, "units[0].image", "512x524288")
    response = post_json(
        url, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [thin]}
    )
    assert_refused(response, 422, "controlnet_input_images[0]", "512x524288")
    webui_unit = {"enabled": True, "module": "canny", "model": TINY_CONTROLNET, "image": thin}
    body = {"prompt": "x", "steps": 2, "alwayson_scripts": {"ControlNet": {"args": [webui_unit]}}}
    response = post_json(url, "/sdapi/v1/txt2img", body)
    assert_refused(response, 422, "alwayson_scripts.ControlNet.args[0].image", "512x524288")
    assert time.monotonic() - started < 5
    assert server.peak_rss_mb() < peak_before + 100  # nothing was resized


def test_all_images_of_a_request_share_one_pixel_budget(url, server):
    """Defect: 16 images of 64 Mpx in a 4 MB detect request went past 9 GB. Every image is under --max-pixels,
    but together they are over the request's budget (serve/limits.py MAX_REQUEST_PIXELS): 413 naming the image
    that crossed it, read from its header before it is decoded."""
    side = 4096  # 16.8 Mpx; MAX_REQUEST_PIXELS = 2**26 holds exactly four
    big = b64_png(Image.new("L", (side, side), 0))  # ~17 KB of PNG
    started = time.monotonic()
    response = post_json(
        url, "/controlnet/detect", {"controlnet_module": "none", "controlnet_input_images": [big] * 6}
    )
    assert_refused(response, 413, "controlnet_input_images[4]", "all of a request's images")
    unit = {"model": TINY_CONTROLNET, "image": big}
    response = post_json(url, "/v1/jobs", {"prompt": "x", "steps": 2, "init_image": big, "units": [unit] * 4})
    assert_refused(response, 413, "init_image", "all of a request's images")  # the units are read first
    assert time.monotonic() - started < 30
    assert server.peak_rss_mb() < 2048  # four decoded greyscale images at most, never six


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        ({"width": 2048, "height": 2048, "steps": 150, "batch_size": 8}, "steps", "pixel-steps"),
        (
            {"width": 2048, "height": 2048, "steps": 60, "batch_size": 4},
            "steps",
            "1024x1024 px, 50 steps, 8 images",
        ),
    ],
)
def test_a_generation_is_priced_before_it_is_queued(url, body, field, text):
    """Each factor under its own cap can multiply to hours of work: pixels x steps x images is refused at once."""
    started = time.monotonic()
    assert_refused(post_json(url, "/v1/jobs", {"prompt": "x", **body}), 422, field, text)
    webui = {"prompt": "x", "steps": body["steps"], "width": body["width"], "height": body["height"]}
    webui["batch_size"] = body["batch_size"]
    response = post_json(url, "/sdapi/v1/txt2img", webui)
    assert response.status_code == 422 and text in response.json()["detail"], response.text
    assert time.monotonic() - started < 5
    assert httpx.get(url + "/v1/health").json()["queue_depth"] == 0


@pytest.mark.parametrize(
    ("annotator", "options", "field", "text"),
    [
        ("softedge", {"sigmas": [1.0, 1e9]}, "options.sigmas.1", "64"),
        ("softedge", {"sigmas": [1.0] * 17}, "options.sigmas", "16"),
        ("canny", {"low_threshold": 300, "high_threshold": 200}, "options.high_threshold", "low_threshold"),
        ("canny", {"low_threshold": 1e9}, "options.low_threshold", ""),
        ("scribble", {"stroke_width": 100000}, "options.stroke_width", "64"),
        ("tile", {"blur_sigma": 1e5}, "options.blur_sigma", "64"),
        ("shuffle", {"seed": -1}, "options.seed", "0"),
    ],
)
def test_every_annotator_option_has_a_range(url, annotator, options, field, text):
    """The ranges come from the annotators' own fields (annotate/: `setting(ge=, le=)`), published in
    GET /v1/annotators and checked before anything is queued."""
    schema = {a["name"]: a["options"] for a in httpx.get(url + "/v1/annotators").json()}[annotator]
    key = next(iter(options))
    prop = schema["properties"][key]
    bounded = prop.get("items", prop) if prop.get("type") == "array" else prop
    assert "maximum" in json.dumps(bounded) or "maxItems" in json.dumps(prop), prop
    image = b64_png(Image.new("RGB", (64, 64), "white"))
    response = post_json(url, "/v1/annotate", {"annotator": annotator, "image": image, "options": options})
    assert_refused(response, 422, field, text)


def test_bodies_that_would_fail_only_after_the_job_are_refused_before_it(url):
    """Defects: a 500-deep nested web-UI field ran the job, then the response failed (500); a lone-surrogate
    prompt reached the tokenizer mid-job (500). Both are a 422 naming the field, with nothing queued."""
    deep = 1
    for _ in range(500):
        deep = [deep]
    started = time.monotonic()
    response = post_json(url, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "comments": deep})
    assert response.status_code == 422 and response.json()["field"].startswith("comments[0]"), response.text
    for path, body in [
        ("/sdapi/v1/txt2img", {"prompt": "a \ud800 b", "steps": 2}),
        ("/v1/generate", {"prompt": "a \ud800 b", "steps": 2}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "negative_prompt": "\udfff", "steps": 2}),
    ]:
        response = post_json(url, path, body)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["field"] in ("prompt", "negative_prompt"), response.text
    assert time.monotonic() - started < 5
    assert httpx.get(url + "/v1/health").json()["queue_depth"] == 0


def test_block_scales_are_finite_and_bounded_on_both_apis(url, models_folder):
    """Defect (silent garbage): a per-output scale of NaN, Infinity or 1e308 made a 200 with a black image."""
    from controlnet.serve.models import ModelRegistry

    outputs = ModelRegistry([models_folder], hash_now=False).controlnet(TINY_CONTROLNET).num_control_outputs
    image = b64_png(Image.new("RGB", (64, 64), "white"))
    for bad in (float("nan"), float("inf"), 1e308):
        scales = [1.0] * (outputs - 1) + [bad]  # the right count: only the value is wrong
        unit = {"enabled": True, "module": "none", "model": TINY_CONTROLNET, "image": image}
        body = {
            "prompt": "x",
            "steps": 2,
            "alwayson_scripts": {"ControlNet": {"args": [{**unit, "advanced_weighting": scales}]}},
        }
        response = post_json(url, "/sdapi/v1/txt2img", body)
        assert_refused(response, 422, f"alwayson_scripts.ControlNet.args[0].advanced_weighting[{outputs - 1}]", "")
        native = {"model": TINY_CONTROLNET, "image": image, "block_scales": scales}
        response = post_json(url, "/v1/jobs", {"prompt": "x", "steps": 2, "units": [native]})
        assert response.status_code == 422 and "block_scales" in response.json()["field"], response.text
    assert httpx.get(url + "/v1/health").json()["queue_depth"] == 0


def test_checks_that_need_the_base_run_before_queueing_once_it_is_loaded(url):
    """Defect: some validation ran only after queueing (a 202 job that then failed). Once the base is loaded, a size
    off its VAE factor and a clip_skip past its text encoder's depth are refused before anything is queued."""
    assert post_json(url, "/v1/generate", {"prompt": "x", "steps": 1}).status_code == 200  # the base is loaded
    for body, field in [({"width": 66, "height": 64}, "width"), ({"clip_skip": 100}, "clip_skip")]:
        response = post_json(url, "/v1/jobs", {"prompt": "x", "steps": 1, **body})
        assert_refused(response, 422, field, "")
    webui = {"prompt": "x", "steps": 1, "override_settings": {"CLIP_stop_at_last_layers": 100}}
    response = post_json(url, "/sdapi/v1/txt2img", webui)
    assert response.status_code == 422 and "layers" in response.json()["detail"], response.text
    assert httpx.get(url + "/v1/health").json()["queue_depth"] == 0


def test_a_web_ui_response_stays_proportionate_to_its_prompt(url):
    """Defect: a 1 MB web-UI prompt gave a 55 MB response (the prompt echoed per image in several fields). Prompts
    are capped (serve/limits.py MAX_PROMPT_CHARS) and the largest allowed one gives a bounded response."""
    from controlnet.serve.limits import MAX_PROMPT_CHARS

    response = post_json(url, "/sdapi/v1/txt2img", {"prompt": "a" * 2**20, "steps": 1})
    assert_refused(response, 422, "prompt", f"{MAX_PROMPT_CHARS:,}")
    prompt = "a " * (MAX_PROMPT_CHARS // 2)
    body = {"prompt": prompt, "steps": 1, "batch_size": 4, "n_iter": 2, "width": 64, "height": 64}
    response = post_json(url, "/sdapi/v1/txt2img", body, timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.content) < 60 * len(prompt), len(response.content)  # 8 images; ~30 copies at most

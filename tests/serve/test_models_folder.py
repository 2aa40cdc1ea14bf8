"""The models folder as the REAL server sees it over time: files that vanish, symlinks out of it, big files whose
hashes must not hold up the listings, and the names A1111 clients hard-code (issues 27 and 28)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import struct
import time

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from controlnet.serve.model_hashes import HashCache
from controlnet.testing.ldm_files import sd15_parts_config, write_controlnet_file, write_sd_file
from controlnet.testing.live_server import TINY_CONTROLNET, start_server
from controlnet.testing.tiny_models import TINY_UNET_CONFIGS, write_clip_vocab

BIG_BYTES = 2**31  # a sparse 2 GiB "base": hashing it reads 2 GiB, listing it must not


def write_sparse_base(path) -> None:
    """A valid .safetensors holding one 2 GiB uint8 tensor under an SD key (so the scan lists it as a base); the
    data is a hole in the file, so it costs no disk and no time to write, but hashing reads every byte."""
    header = json.dumps(
        {
            "model.diffusion_model.out.2.weight": {
                "dtype": "U8",
                "shape": [BIG_BYTES],
                "data_offsets": [0, BIG_BYTES],
            }
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
    os.truncate(path, 8 + len(header) + BIG_BYTES)


@pytest.fixture(scope="module")
def folder(models_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(models_folder / TINY_CONTROLNET, root / TINY_CONTROLNET)
    shutil.copytree(models_folder / TINY_CONTROLNET, root / "control_doomed_canny")  # deleted mid-test
    # a ControlNet folder whose weights are a symlink to a file outside the models folder
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(models_folder / TINY_CONTROLNET / "diffusion_pytorch_model.safetensors", outside / "secret.bin")
    (root / "control_sneaky_canny").mkdir()
    shutil.copy(models_folder / TINY_CONTROLNET / "config.json", root / "control_sneaky_canny" / "config.json")
    (root / "control_sneaky_canny" / "diffusion_pytorch_model.safetensors").symlink_to(outside / "secret.bin")
    write_sparse_base(root / "v1-5-pruned-emaonly.safetensors")
    # a ControlNet whose header reads as one but whose weights do not fit any UNet: it fails only when loaded
    state = load_file(models_folder / TINY_CONTROLNET / "diffusion_pytorch_model.safetensors")
    key = next(k for k in state if k.endswith("conv_in.weight"))
    state[key] = torch.zeros(3, 3, 3, 3)
    # a tiny SD1.5 single-file base and a ControlNet made for SDXL: another family, told from the headers
    write_sd_file(root / "tiny15.safetensors", sd15_parts_config("tiny"))
    write_controlnet_file(root / "control_sdxl_canny.safetensors", TINY_UNET_CONFIGS["sdxl"])
    (root / "broken").mkdir()
    save_file(state, root / "broken" / "control_broken_canny.safetensors")
    return root


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    tokenizer = write_clip_vocab(tmp_path_factory.mktemp("tokenizer"))
    srv = start_server(None, log, "--models", str(folder), "--tokenizer", str(tokenizer))
    yield srv
    assert srv.stop(timeout=60) == 0, log.read_text()


def small_image() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def names(url: str) -> set[str]:
    return {m["name"] for m in httpx.get(url + "/v1/models").json()}


def test_a_symlink_out_of_the_models_folder_is_not_served(server):
    """Defect: a symlinked weights file inside a listed model folder escaped --models."""
    assert "control_sneaky_canny" not in names(server.url)
    response = httpx.post(
        server.url + "/v1/jobs",
        json={"prompt": "x", "units": [{"model": "control_sneaky_canny", "image": small_image()}]},
    )
    assert response.status_code == 422 and response.json()["field"] == "units[0].model", response.text
    assert str(server.log.parent) not in response.text


def test_listings_do_not_wait_for_hashes_and_hashes_are_cached(server, folder):
    """Defect: the first /sdapi/v1/sd-models hashed every base in full at every start (46 s for three)."""
    started = time.monotonic()
    models = httpx.get(server.url + "/sdapi/v1/sd-models", timeout=30).json()
    assert time.monotonic() - started < 1.0
    entry = next(m for m in models if m["model_name"] == "v1-5-pruned-emaonly")
    deadline = time.monotonic() + 120
    while entry["sha256"] is None and time.monotonic() < deadline:  # the background hasher fills it in
        time.sleep(0.5)
        models = httpx.get(server.url + "/sdapi/v1/sd-models").json()
        entry = next(m for m in models if m["model_name"] == "v1-5-pruned-emaonly")
    digest = hashlib.sha256()
    with open(folder / "v1-5-pruned-emaonly.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    assert entry["sha256"] == digest.hexdigest()
    cache = HashCache()  # the same cache folder as the server (CONTROLNET_CACHE_DIR of this test session)
    assert cache.get(folder / "v1-5-pruned-emaonly.safetensors") == digest.hexdigest()
    # A1111's own title (file name + sha256[:10]) and the bare file name name the same base
    for name in (
        f"v1-5-pruned-emaonly.safetensors [{digest.hexdigest()[:10]}]",
        "v1-5-pruned-emaonly.safetensors",
    ):
        response = httpx.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert response.status_code == 200, response.text
        assert response.json()["sd_model_checkpoint"].startswith("v1-5-pruned-emaonly")
    wrong = f"v1-5-pruned-emaonly.safetensors [{'0' * 10}]"
    assert httpx.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": wrong}).status_code == 422
    httpx.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "builtin"})


def test_the_cache_is_keyed_by_file_version(tmp_path):
    """A file rewritten in place with the same size and time keeps its cached hash (the cache trusts the version);
    a new modification time makes it hashed again."""
    cache = HashCache(tmp_path / "cache")
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"a" * 1000)
    first = cache.compute(file)
    stat = file.stat()
    file.write_bytes(b"b" * 1000)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert HashCache(tmp_path / "cache").get(file) == first  # read back from disk by a new process's cache
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.get(file) is None
    assert cache.compute(file) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_a_failed_job_tells_its_client_no_path_and_no_internals(server, folder):
    """Defect: error details and job status carried the models folder's absolute path and raw exception text."""
    unit = {"model": "broken/control_broken_canny", "image": small_image()}
    job = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", "steps": 2, "units": [unit]}).json()
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{server.url}/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status["state"] == "failed" and status["error_type"] == "invalid", status
    assert str(folder) not in status["error"] and "Traceback" not in status["error"], status
    response = httpx.post(
        server.url + "/v1/generate", json={"prompt": "x", "steps": 2, "units": [unit]}, timeout=120
    )
    assert response.status_code == 422, response.text
    assert str(folder) not in response.text and "/tmp" not in response.text, response.text


def test_a_model_file_that_vanishes_is_a_409_naming_it(server, folder):
    """Defect: /v1/models after a model file disappeared was a 500 (and a dropped connection)."""
    assert "control_doomed_canny" in names(server.url)
    shutil.rmtree(folder / "control_doomed_canny")
    listed = httpx.get(server.url + "/v1/models")
    assert listed.status_code == 200 and "control_doomed_canny" not in {m["name"] for m in listed.json()}
    assert httpx.get(server.url + "/controlnet/model_list").status_code == 200
    unit = {"model": "control_doomed_canny", "image": small_image()}
    response = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", "units": [unit]})
    assert response.status_code == 409, response.text
    problem = response.json()
    assert "control_doomed_canny" in problem["detail"] and str(folder) not in problem["detail"]


def test_a_controlnet_of_another_family_is_refused_before_queueing(server):
    """Defect (issue 28): in serve, a unit's ControlNet of the wrong family was a 422 after 13 s of loading (a
    key-by-key mismatch). Now it is refused from the headers, naming both, before anything is queued or loaded."""
    unit = {"model": "control_sdxl_canny", "image": small_image()}
    started = time.monotonic()
    response = httpx.post(
        server.url + "/v1/jobs", json={"prompt": "x", "base": "tiny15", "steps": 1, "units": [unit]}
    )
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["field"] == "units[0].model" and "SDXL" in problem["detail"], problem
    assert "tiny15" in problem["detail"] and time.monotonic() - started < 2
    assert httpx.get(server.url + "/v1/health").json()["queue_depth"] == 0


def test_a_single_file_base_without_a_tokenizer_is_refused_at_start_up(folder, tmp_path):
    """Defect: a single-file default base without --tokenizer started, then answered every request with a 422
    telling the API client to "pass tokenizer DIR". Now the server refuses to start, in one line naming the flag."""
    import subprocess
    import sys

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "controlnet.cli", "serve", "--models", str(folder), "--base", "v1-5-pruned-emaonly",
         "--port", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error" in line]  # the scan's warnings aside
    assert len(errors) == 1 and "--tokenizer" in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert time.monotonic() - started < 60

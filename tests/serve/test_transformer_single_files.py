"""SD3 / Flux bases saved as single files through the REAL server (subprocess, loopback; issue 29 acceptance).

The models folder holds a tiny Flux transformer file (BFL's names) and a tiny SD3 checkpoint file (Stability's,
`model.diffusion_model.*`: the prefix of an SD1.x file too, told apart by `joint_blocks`), written from tiny diffusers
folders (testing/tiny_transformer_bases.py), and a ControlNet of each family. The parts a file lacks are server flags,
as `controlnet generate` takes them (--vae, --clip-l, --clip-g, --t5, --base-config); Flux's ae.safetensors and the
encoder folders lie outside the models folder (not offered to clients).

Bound of the image comparisons: exact (`np.array_equal`): the server and the test load the same file with the same
options and run the same pipeline, on one CPU thread each.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.testing.live_server import start_server

SIZE = 32  # pixels (the tiny VAE has factor 1)
STEPS = 2
SEED = 5
FLUX, SD3 = "flux1-tiny", "sd3_tiny"  # the files' registry names (their stems)


def _net(transformer, arch: str, folder, seed: int) -> None:
    """A ControlNet of `transformer`'s family, its zero layers given small random values so that it acts."""
    from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet

    if arch == "sd3":
        net = SD3ControlNet.from_transformer(transformer, num_layers=1)
    else:
        net = FluxControlNet.from_transformer(transformer, num_layers=1, num_single_layers=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in net.named_parameters():
            if key.startswith(("controlnet_", "pos_embed_input")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.save_pretrained(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """models/ (flux1-tiny.safetensors, sd3_tiny.safetensors, flux_canny/, sd3_canny/) and parts/ (the rest)."""
    from controlnet.generate.base import load_base
    from controlnet.testing.tiny_transformer_bases import (
        write_flux_base,
        write_flux_files,
        write_sd3_base,
        write_sd3_file,
    )

    root = tmp_path_factory.mktemp("transformer_files")
    models, parts = root / "models", root / "parts"
    w = {"models": models, "parts": parts, "flux": write_flux_base(parts / "flux")}
    w["sd3"] = write_sd3_base(parts / "sd3", t5=False)  # SD3 runs without T5: its server needs no --t5
    bfl_file, w["ae"], w["flux_config"] = write_flux_files(w["flux"], parts / "bfl")
    models.mkdir()
    w["flux_file"] = bfl_file.rename(models / f"{FLUX}.safetensors")
    w["sd3_file"], w["sd3_config"] = write_sd3_file(w["sd3"], parts / f"{SD3}.safetensors", encoders=False)
    w["sd3_file"] = w["sd3_file"].rename(models / f"{SD3}.safetensors")
    for arch in ("flux", "sd3"):
        _net(load_base(str(w[arch])).transformer, arch, models / f"{arch}_canny", seed=7)
    w["cond"] = root / "cond.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(w["cond"])
    return w


def flux_flags(w, t5: bool = True) -> list[str]:
    flags = ["--vae", str(w["ae"]), "--clip-l", str(w["flux"] / "text_encoder")]
    flags += ["--base-config", str(w["flux_config"])]
    return flags + (["--t5", str(w["flux"] / "text_encoder_2")] if t5 else [])


def sd3_flags(w) -> list[str]:
    flags = ["--clip-l", str(w["sd3"] / "text_encoder"), "--clip-g", str(w["sd3"] / "text_encoder_2")]
    return flags + ["--base-config", str(w["sd3_config"])]


def options_of(flags: list[str]) -> dict:
    """The loader's keywords of server flags (what the test loads in-process)."""
    names = {"--vae": "vae", "--clip-l": "clip_l", "--clip-g": "clip_g", "--t5": "t5", "--base-config": "configs"}
    return {names[flag]: value for flag, value in zip(flags[::2], flags[1::2], strict=True)}


@pytest.fixture(scope="module")
def flux_server(world, tmp_path_factory):
    srv = start_server(
        world["models"],
        tmp_path_factory.mktemp("log") / "server.log",
        "--no-ui",
        "--base",
        FLUX,
        *flux_flags(world),
    )
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",")[-1]))).convert("RGB"))


def native_body(arch: str, cond) -> dict:
    unit = {"model": f"{arch}_canny", "image": b64(cond), "scale": 0.8, "end": 0.5}
    body = {"prompt": "a red cat", "base": FLUX if arch == "flux" else SD3, "steps": STEPS, "seed": SEED}
    return {
        **body,
        "width": SIZE,
        "height": SIZE,
        "guidance_scale": 4.0 if arch == "sd3" else 0.0,
        "units": [unit],
    }


def in_process(w, arch: str, flags: list[str]) -> np.ndarray:
    """`run_job` on the same file base and ControlNet, loaded here as the service loads them (one thread)."""
    from controlnet.generate.base import check_base, load_base
    from controlnet.generate.jobs import run_job
    from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.io.api import load_controlnet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = load_base(check_base(w[f"{arch}_file"], **options_of(flags)))
        net = load_controlnet(w["models"] / f"{arch}_canny", unet=base.unet, dtype=base.transformer.dtype)
        pipe = ControlNetPipeline.from_components(base, [net.eval().requires_grad_(False)])
        unit = ControlUnit(model=f"{arch}_canny", image=Image.open(w["cond"]).convert("RGB"), scale=0.8, end=0.5)
        options = GenerationOptions(
            steps=STEPS, width=SIZE, height=SIZE, seed=SEED, guidance_scale=4.0 if arch == "sd3" else 0.0
        )
        job = GenerationJob(prompt="a red cat", base=arch, units=[unit], options=options)
        with torch.inference_mode():
            return np.asarray(run_job(pipe, job).images[0].convert("RGB"))
    finally:
        torch.set_num_threads(threads)


# -------------------------------------------------------------------------------------------------------------
def test_file_bases_are_listed_with_their_family(flux_server):
    """Both files are found by their headers (the SD3 one is not taken for an SD1.x checkpoint), with family sd3 /
    flux, A1111 titles (`name [hash8]`); nothing else in the folder is offered."""
    url = flux_server.url
    models = {m["name"]: m for m in httpx.get(url + "/v1/models").json()}
    assert (models[FLUX]["kind"], models[FLUX]["family"]) == ("base", "flux")
    assert (models[SD3]["kind"], models[SD3]["family"]) == ("base", "sd3")
    assert {name for name in models if not name.startswith("builtin")} == {FLUX, SD3, "flux_canny", "sd3_canny"}
    listed = {m["model_name"]: m for m in httpx.get(url + "/sdapi/v1/sd-models").json()}
    for name in (FLUX, SD3):
        assert listed[name]["title"] == f"{name} [{models[name]['hash8']}]", listed[name]
    options = httpx.get(url + "/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == listed[FLUX]["title"]


def test_flux_file_generates_as_in_process(flux_server, world):
    """/v1/generate on the Flux file base with a Flux ControlNet: the image `run_job` gives in-process, exactly;
    an SD3 net on it is a 422 naming both families before queueing (the family check reads the file's plan)."""
    answer = httpx.post(flux_server.url + "/v1/generate", json=native_body("flux", world["cond"]), timeout=120)
    assert answer.status_code == 200, answer.text
    served = pixels(answer.json()["images"][0])
    assert served.shape == (SIZE, SIZE, 3)
    assert np.array_equal(served, in_process(world, "flux", flux_flags(world)))
    body = native_body("flux", world["cond"])
    body["units"][0]["model"] = "sd3_canny"
    refused = httpx.post(flux_server.url + "/v1/jobs", json=body)
    assert refused.status_code == 422, refused.text
    assert refused.json()["field"] == "units[0].model", refused.json()


@pytest.mark.slow  # a server of its own (13-15 s); the default suite's 15-minute budget
def test_a_server_without_t5_refuses_a_flux_file_job_naming_the_flag(world, tmp_path):
    """Started without --t5 (default base: the built-in one), a job naming the Flux file is a 422 naming --t5 before
    queueing, and no path of the server's."""
    srv = start_server(world["models"], tmp_path / "server.log", "--no-ui", *flux_flags(world, t5=False))
    try:
        started = time.monotonic()
        answer = httpx.post(srv.url + "/v1/jobs", json=native_body("flux", world["cond"]))
        assert answer.status_code == 422, answer.text
        problem = answer.json()
        assert problem["field"] == "base" and "without --t5 DIR" in problem["detail"], problem
        assert FLUX in problem["detail"] and str(world["parts"]) not in problem["detail"], problem
        assert time.monotonic() - started < 5
        assert httpx.get(srv.url + "/v1/health").json()["queue_depth"] == 0
    finally:
        assert srv.stop() == 0, srv.log.read_text()


@pytest.mark.slow  # a server of its own (13-15 s); the default suite's 15-minute budget
def test_a_default_flux_file_base_without_t5_is_refused_at_start_up(world):
    """Exit 2 with one line naming --t5, before the port is bound."""
    done = subprocess.run(
        [sys.executable, "-m", "controlnet.cli", "serve", "--models", str(world["models"]), "--base", FLUX,
         "--port", "1", *flux_flags(world, t5=False)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "--t5" in errors[0] and "Traceback" not in done.stderr, done.stderr


# SD3's is slow: its server and its first job load two CLIP encoders (10-20 s on 2 shared cores)
@pytest.mark.slow
def test_sd3_file_generates_as_in_process(world, tmp_path):
    flags = sd3_flags(world)
    srv = start_server(world["models"], tmp_path / "server.log", "--no-ui", "--base", SD3, *flags)
    try:
        answer = httpx.post(srv.url + "/v1/generate", json=native_body("sd3", world["cond"]), timeout=240)
        assert answer.status_code == 200, answer.text
        served = pixels(answer.json()["images"][0])
        assert np.array_equal(served, in_process(world, "sd3", flags))
    finally:
        assert srv.stop() == 0, srv.log.read_text()

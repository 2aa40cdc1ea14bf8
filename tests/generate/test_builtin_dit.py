"""The shipped transformer base `builtin-dit` (issue 30) through every door: the spec, its sampling defaults, its
ControlNets' names, generation and training.

builtin-dit was trained with no zero tokens in T5's place (`max_sequence_length` 0 in its sampling.json), where
diffusers' SD3 pipelines append 256 by default; these tests pin that every door passes the base's value: the
pixels equal diffusers' `StableDiffusion3Pipeline` with max_sequence_length=0, guidance 4, 20 steps (exact), and
differ from its default 256. ControlNets are made from the base by `from_transformer` (zero-initialised: the base's
own image, paper Eq. 3).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import cli
from controlnet.generate import builtin_format
from controlnet.generate.base import base_kind, check_base, controlnet_path, load_base, sampling_defaults
from controlnet.generate.builtin_format import BUILTIN_DIT, CONTROLNETS_FOLDER, builtin_dit_folder
from controlnet.generate.jobs import run_job
from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.generate.sizes import vae_factor_on_disk
from controlnet.model.transformer_controlnet import SD3ControlNet

SIZE = 64  # px: the base's native size (16x16 latents, 8x8 patches)
PROMPT = "a red circle on a blue background"
SEED = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is far faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A zero-initialised ControlNet of the shipped base, a condition image, and a copy of the shipped folder (its
    components linked) with that net shipped as controlnets/fill."""
    root = tmp_path_factory.mktemp("builtin_dit")
    base = load_base(BUILTIN_DIT)
    torch.manual_seed(0)
    net = SD3ControlNet.from_transformer(base.transformer, num_layers=1)
    net.save_pretrained(root / "zero")
    Image.new("RGB", (SIZE, SIZE), (255, 0, 0)).save(root / "cond.png")
    shipped = root / "shipped"
    shipped.mkdir()
    for entry in builtin_dit_folder().iterdir():
        if entry.name != CONTROLNETS_FOLDER:
            os.symlink(entry, shipped / entry.name)
    (shipped / CONTROLNETS_FOLDER).mkdir()
    os.symlink(root / "zero", shipped / CONTROLNETS_FOLDER / "fill")
    return {"net": root / "zero", "cond": root / "cond.png", "shipped": shipped}


def test_the_spec_names_the_shipped_sd3_folder_and_its_sampling_defaults():
    kind, folder = base_kind(BUILTIN_DIT)
    assert kind == "diffusers" and folder == builtin_dit_folder()
    source = check_base(BUILTIN_DIT)
    assert source.name == BUILTIN_DIT and source.arch == "sd3" and "text_encoder_3" not in source.components
    sampling = sampling_defaults(BUILTIN_DIT)
    assert (sampling.guidance_scale, sampling.steps, sampling.max_sequence_length) == (4.0, 20, 0)
    assert vae_factor_on_disk(BUILTIN_DIT) == 4  # the shipped VAE: 64 px <-> 16x16 latents


def test_generate_cli_writes_a_png_with_the_bases_defaults(world, tmp_path):
    out = tmp_path / "out"
    argv = ["generate", PROMPT, "--base", BUILTIN_DIT, "--controlnet", str(world["net"]), "--cond"]
    argv += [str(world["cond"]), "--seed", "5", "--out", str(out), "--device", "cpu"]
    assert cli.main(argv) == 0
    png = Image.open(out / "controlnet-5.png")
    assert png.size == (SIZE, SIZE)
    settings = json.loads(png.text["controlnet"])
    assert settings["base"] == BUILTIN_DIT and settings["arch"] == "sd3"
    assert settings["steps"] == 20 and settings["guidance_scale"] == 4.0


def _diffusers(pipe, max_sequence_length: int) -> np.ndarray:
    from diffusers import StableDiffusion3Pipeline

    b = pipe.base
    scheduler = type(b.scheduler).from_config(b.scheduler.config)
    sd3 = StableDiffusion3Pipeline(
        b.transformer, scheduler, b.vae, b.text_encoder, b.tokenizer, b.text_encoder_2, b.tokenizer_2, None, None
    )
    sd3.set_progress_bar_config(disable=True)
    return sd3(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=20,
        guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(SEED)],
        output_type="np",
        max_sequence_length=max_sequence_length,
    ).images


def test_pipeline_with_the_sampling_defaults_equals_diffusers_with_no_zero_tokens(world):
    pipe = ControlNetPipeline.from_pretrained(BUILTIN_DIT, controlnets=[world["net"]])
    assert pipe.base_name == BUILTIN_DIT and pipe.sampling.max_sequence_length == 0
    unit = ControlUnit(model=str(world["net"]), image=Image.open(world["cond"]).convert("RGB"))
    ours = run_job(
        pipe, GenerationJob(prompt=PROMPT, base=BUILTIN_DIT, units=[unit], options=GenerationOptions(seed=SEED))
    )
    assert ours.settings["steps"] == 20 and ours.settings["guidance_scale"] == 4.0
    assert np.array_equal(ours.array, _diffusers(pipe, 0))  # exact: the zero net adds 0 * x
    # diffusers' default 256 zero tokens pass through the context embedder: another image
    assert np.abs(ours.array - _diffusers(pipe, 256)).max() > 1e-2


def test_shipped_controlnets_are_named_builtin_dit_colon_name(world, monkeypatch):
    from controlnet.serve.models import ModelRegistry

    monkeypatch.setattr(builtin_format, "builtin_dit_folder", lambda: world["shipped"])
    assert controlnet_path("builtin-dit:fill") == world["shipped"] / CONTROLNETS_FOLDER / "fill"
    with pytest.raises(ValueError) as error:
        controlnet_path("builtin-dit:nope")
    message = str(error.value)
    assert "\n" not in message and "'builtin-dit:nope'" in message and "builtin-dit:fill" in message
    registry = ModelRegistry(hash_now=False)
    assert registry.base(BUILTIN_DIT).family == "sd3"
    net = registry.controlnet("builtin-dit:fill")
    assert net.family == "sd3" and net.condition == "fill" and net.stem == "fill"


def test_a_missing_shipped_folder_is_one_clear_line(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(builtin_format, "builtin_dit_folder", lambda: tmp_path / "weights_dit")
    with pytest.raises(ValueError, match="builtin-dit: the built-in transformer base is not shipped"):
        check_base(BUILTIN_DIT)
    with pytest.raises(
        ValueError, match="unknown built-in ControlNet 'builtin-dit:fill'.*none in this installation"
    ):
        controlnet_path("builtin-dit:fill")
    argv = [
        "generate",
        PROMPT,
        "--base",
        BUILTIN_DIT,
        "--controlnet",
        str(world["net"]),
        "--cond",
        str(world["cond"]),
    ]
    code = cli.main(argv)
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert "not shipped in this installation" in err and "\n" not in err and "Traceback" not in err


def test_training_encodes_prompts_with_the_bases_zero_tokens(tmp_path):
    from controlnet.train.config import resolve_config
    from controlnet.train.trainer import Trainer
    from controlnet.world.dataset import write_dataset

    data = write_dataset("fill", 2, SIZE, tmp_path / "fill", seed=0, workers=1)
    contexts = {}
    for length in (None, 5):  # None: the base's own (0); 5: the flag's
        values = {
            "model.base": BUILTIN_DIT,
            "model.transformer_layers": "1",
            "data.path": str(data),
            "data.resolution": str(SIZE),
            "train.output_dir": str(tmp_path / f"run{length}"),
            "train.batch_size": "2",
            "checkpoint.every": "0",
        }
        if length is not None:
            values["flow.max_sequence_length"] = str(length)
        trainer = Trainer(resolve_config(None, values))
        trainer.setup()
        contexts[length] = trainer.data.micro_batch(0).context
    clip_tokens = trainer.base.tokenizer.model_max_length  # both CLIP encoders' tokens, joined along channels
    assert contexts[None].shape[1] == clip_tokens  # no zero tokens: as builtin-dit was trained
    assert contexts[5].shape[1] == clip_tokens + 5

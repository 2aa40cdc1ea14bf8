"""`controlnet train` on SD3 / Flux bases given as single files (issue 29 acceptance): Stability's SD3 checkpoint
(here without its VAE and text encoders, all four given as `--model.vae --model.clip_l --model.clip_g --model.t5`) and
BFL's Flux transformer file with ae.safetensors and text encoder folders; validation images during training on a
transformer base; the part options declared as generate's `BaseParts` declares them; the refusals before any weight.

The files hold exactly the tiny diffusers folders' weights (testing/tiny_transformer_bases.py), so the folder form and
the file form of a base train the same: the first step's loss is compared exactly (`==`: the same float32 modules,
the same caches' contents, the same draws).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from train_tiny import make_fill_dataset

from controlnet import cli
from controlnet.config_docs import field_docs
from controlnet.generate.options import BaseParts
from controlnet.generate.transformer_base import PART_OPTIONS
from controlnet.testing.tiny_transformer_bases import (
    make_t5_encoder,
    write_flux_base,
    write_flux_files,
    write_sd3_base,
    write_sd3_file,
)
from controlnet.train import trainer as trainer_module
from controlnet.train.config import BASE_FLAGS, BASE_PARTS, ModelConfig, resolve_config
from controlnet.train.trainer import Trainer
from controlnet.train.transformer_step import ControlledTransformer, micro_loss

SIZE = 8  # px; the tiny bases' VAE has factor 1 (Flux: 16 packed tokens)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("single-file-train")
    w = {
        "data": make_fill_dataset(root / "fill", n=6),
        "sd3": write_sd3_base(root / "sd3" / "base"),
        "flux": write_flux_base(root / "flux" / "base"),
    }
    # SD3: the MMDiT alone in the file; the VAE and the three text encoders from the folder's parts
    w["sd3_file"], w["sd3_config"] = write_sd3_file(w["sd3"], root / "sd3.safetensors", encoders=False, vae=False)
    w["flux_file"], w["ae"], w["flux_config"] = write_flux_files(w["flux"], root / "bfl")
    return w


def file_args(w: dict, arch: str) -> dict[str, str]:
    """The model section of a file form: the file, its base config JSON and its parts."""
    if arch == "sd3":
        return {
            "model.base": str(w["sd3_file"]),
            "model.base_config": str(w["sd3_config"]),
            "model.vae": str(w["sd3"] / "vae"),
            "model.clip_l": str(w["sd3"] / "text_encoder"),
            "model.clip_g": str(w["sd3"] / "text_encoder_2"),
            "model.t5": str(w["sd3"] / "text_encoder_3"),
        }
    return {
        "model.base": str(w["flux_file"]),
        "model.base_config": str(w["flux_config"]),
        "model.vae": str(w["ae"]),
        "model.clip_l": str(w["flux"] / "text_encoder"),
        "model.t5": str(w["flux"] / "text_encoder_2"),
    }


def settings(w: dict, arch: str, out: Path, form: str = "file", **extra) -> dict[str, str]:
    values = file_args(w, arch) if form == "file" else {"model.base": str(w[arch])}
    values.update(
        {
            "model.transformer_layers": "1",
            "data.path": str(w["data"]),
            "data.resolution": str(SIZE),
            "train.output_dir": str(out),
            "train.max_steps": "2",
            "train.batch_size": "2",
            "train.log_every": "1",
            "optim.lr": "1e-3",
            "checkpoint.every": "0",
            **extra,
        }
    )
    if arch == "flux":
        values.setdefault("model.transformer_single_layers", "1")
    return values


def argv(values: dict[str, str]) -> list[str]:
    return ["train", "--quiet", *[a for key, value in values.items() for a in (f"--{key}", value)]]


def first_loss(config) -> float:
    trainer = Trainer(config)
    trainer.setup()
    trainer.build_model()
    return trainer.step(0).loss


def logged_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


# ---------------------------------------------------------------------------------------------------------------
# the part options: one schema
def test_part_options_are_generates_base_parts():
    parts = tuple(f.name for f in dataclasses.fields(BaseParts))
    assert BASE_PARTS == parts == PART_OPTIONS
    ours, theirs = field_docs(ModelConfig), field_docs(BaseParts)
    for name in parts:
        assert " ".join(ours[name].split()) == " ".join(theirs[name].split()), name  # the same help text
        assert BASE_FLAGS[name] == f"--model.{name}"
    config = resolve_config(None, {"model.t5": "t5-folder", "model.clip_l": "clip"})
    assert (config.model.t5, config.model.clip_l, config.model.vae) == ("t5-folder", "clip", "")


# ---------------------------------------------------------------------------------------------------------------
# training on the file forms through the command line
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_cli_trains_on_the_single_file_as_on_the_folder(world, arch, tmp_path, capsys):
    """The CLI on the file form finishes, its loss falls and its export loads back; its first step's loss equals the
    folder form's exactly (same weights, same draws), and the folder form shares the file form's text cache (its key
    hashes the encoders' weights, not where they came from)."""
    from controlnet.io.api import load_controlnet

    cache = tmp_path / "cache"
    run = tmp_path / "file-run"
    extra = {"data.cache_dir": str(cache), "train.max_steps": "8", "train.batch_size": "4", "optim.lr": "3e-3"}
    values = settings(world, arch, run, **extra)
    assert cli.main(argv(values)) == 0
    assert "finished at step 8" in capsys.readouterr().out
    losses = logged_losses(run)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert (
        json.loads((run / "config.json").read_text())["model"]["t5"] == values["model.t5"]
    )  # the parts, recorded
    texts = sorted(p.name for p in cache.glob("text-*"))
    # the folder form: the same draws; a cache hit on the same encoders' embeddings; the same first loss
    trainer = Trainer(resolve_config(None, settings(world, arch, tmp_path / "folder-run", "folder", **extra)))
    trainer.setup()
    trainer.build_model()
    assert sorted(p.name for p in cache.glob("text-*")) == texts
    batches = [trainer.data.micro_batch(k) for k in range(4)]  # the file run's first micro-batches

    @torch.no_grad()
    def loss(net) -> float:  # the mean flow loss of `net` on them (fixed noise and s)
        model = ControlledTransformer(net, trainer.base.transformer, arch, 3.5)
        return float(torch.stack([micro_loss(model, b, torch.float32, "logit_normal") for b in batches]).mean())

    before = loss(trainer.controlnet)  # the fresh net: zero layers, the base alone (Eq. 3)
    assert trainer.step(0).loss == losses[0]
    exported = load_controlnet(run / "final" / "controlnet", unet=trainer.base.transformer.float())
    after = loss(exported)
    print(f"{arch} file: flow loss {before:.3f} at step 0 -> {after:.3f} after 8 steps")
    assert after < 0.9 * before, (before, after)


def test_a_different_t5_is_a_different_text_cache(world, tmp_path):
    """The text cache's key holds what the parts are: another T5 folder (other weights) is a new cache, never the
    old embeddings."""
    from controlnet.train.transformer_step import TransformerBatches

    other = tmp_path / "t5" / "text_encoder_2"  # another T5 beside its tokenizer, as a diffusers folder has it
    shutil.copytree(world["flux"] / "tokenizer_2", tmp_path / "t5" / "tokenizer_2")
    vocab = json.loads((world["flux"] / "text_encoder_2" / "config.json").read_text())["vocab_size"]
    make_t5_encoder(vocab, seed=99).save_pretrained(str(other))
    keys = []
    for t5 in (world["flux"] / "text_encoder_2", other):
        values = settings(world, "flux", tmp_path / "run", **{"model.t5": str(t5)})
        trainer = Trainer(resolve_config(None, values))
        trainer.setup()
        assert isinstance(trainer.data, TransformerBatches)
        keys.append(trainer.data._cache_keys()[0])
    assert keys[0] != keys[1]


# ---------------------------------------------------------------------------------------------------------------
# validation during training on a transformer base
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_validation_on_a_transformer_base_writes_its_images(world, arch, tmp_path):
    run = tmp_path / "run"
    values = settings(
        world,
        arch,
        run,
        **{
            "validation.every": "2",
            "validation.num_samples": "2",
            "validation.steps": "2",
            "validation.guidance_scale": "2.0",  # SD3: CFG; the tiny Flux base (no guidance embedding): none passed
        },
    )
    summary = trainer_module.train(resolve_config(None, values))
    assert summary.status == "finished" and summary.validation and summary.validation[0][0] == 2
    assert summary.floor is not None and summary.ceiling is not None
    assert (run / "samples" / "reference.png").is_file() and (run / "samples" / "step-0000002.png").is_file()


def test_validation_guidance_by_family():
    from controlnet.train.validation import transformer_guidance

    config = resolve_config(None, {"validation.guidance_scale": "4.0", "flow.guidance": "3.0"})
    assert transformer_guidance(config, {}, "sd3") == 4.0  # SD3: CFG
    assert transformer_guidance(config, {"guidance_embeds": True}, "flux") == 3.0  # dev: as trained
    assert transformer_guidance(config, {"guidance_embeds": False}, "flux") is None  # schnell: none


# ---------------------------------------------------------------------------------------------------------------
# refusals: one line, before any weight is read
@pytest.mark.parametrize(
    "drop, extra, expected",
    [
        ("model.t5", {}, "--model.t5"),
        ("model.vae", {}, "--model.vae"),
        ("model.clip_l", {}, "--model.clip_l"),
        (None, {"model.t5": "/no/such/t5"}, "--model.t5 /no/such/t5: folder not found"),
        # the file's own VAE factor (1) x Flux's 2x2 packing, not an SD checkpoint's 8x
        (None, {"data.resolution": "7"}, "data.resolution=7: expected a multiple of 2 on this FLUX base"),
    ],
)
def test_flux_file_without_a_part_is_refused_before_loading(
    world, tmp_path, capsys, monkeypatch, drop, extra, expected
):
    monkeypatch.setattr(trainer_module, "load_base", _no_loading)
    values = settings(world, "flux", tmp_path / "run", **extra)
    values.pop(drop, None)
    assert cli.main(argv(values)) != 0
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_part_option_with_a_folder_base_is_refused(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer_module, "load_base", _no_loading)
    values = settings(world, "flux", tmp_path / "run", "folder", **{"model.vae": str(world["ae"])})
    assert cli.main(argv(values)) != 0
    err = capsys.readouterr().err.strip()
    assert "--model.vae" in err and "only for an SD3/Flux checkpoint file" in err and len(err.splitlines()) == 1


def _no_loading(*args, **kwargs):
    raise AssertionError("the base was loaded before the options were checked")

"""The one base loader (generate/base.py) through the commands: every kind of base, the same options and checks.

Checkpoint files are the tiny SD1.x-layout file of test_single_file.py (real LDM keys, a real CLIP BPE vocabulary);
exported folders are written by `save_builtin_base`, the function `controlnet world export-base` calls.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_tiny import save_random_builtin_base
from safetensors.torch import load_file, save_file
from test_single_file import checkpoint  # noqa: F401 - the tiny checkpoint-file fixture

from controlnet.cli import main
from controlnet.generate.base import load_base
from controlnet.io.tokenizers import MIN_WORD_TOKENS, check_tokenizer
from controlnet.testing.tiny_models import condition_image, write_clip_vocab


@pytest.fixture(scope="module")
def sd_file(request):
    """test_single_file.py's tiny SD1.x-layout checkpoint file (path, tokenizer folder, configs, ...)."""
    return request.getfixturevalue("checkpoint")


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "controlnet.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def base_config(sd_file, tmp_path_factory):
    """--base-config FILE for the tiny file: its family and the diffusers configs of its parts."""
    path = tmp_path_factory.mktemp("cfg") / "tiny_sd15.json"
    path.write_text(json.dumps({"family": "sd15", **sd_file["configs"]}))
    return path


@pytest.fixture(scope="module")
def ema_file(sd_file, tmp_path_factory):
    """The tiny file plus EMA twins of every UNet weight (`model_ema.<key without dots>`), as v1-5-pruned holds."""
    state = load_file(str(sd_file["path"]))
    torch.manual_seed(5)
    twins = {
        "model_ema." + "".join(k.split(".")[1:]): v + 0.05 * torch.randn_like(v)
        for k, v in state.items()
        if k.startswith("model.diffusion_model.")
    }
    path = tmp_path_factory.mktemp("ema") / "tiny_ema.safetensors"
    save_file({**state, **twins, "model_ema.decay": torch.tensor(0.9999)}, str(path))
    return path, twins


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random built-in-architecture base in the layout `controlnet world export-base` writes, and a ControlNet."""
    from controlnet.model.controlnet import ControlNet
    from controlnet.world.fill import FILL_VOCABULARY

    root = tmp_path_factory.mktemp("exported")
    parts = save_random_builtin_base(root / "base", FILL_VOCABULARY)
    net = ControlNet.from_unet(parts["unet"], hint_downscale_factor=4)
    from controlnet.io.api import save_controlnet

    save_controlnet(net, root / "cn", format="diffusers")
    return root


# ---------------------------------------------------------------------------------------------------------------
# tokenizers
def test_wrong_tokenizer_folders_are_refused_before_any_weights_are_read(
    sd_file,
    base_config,
    tmp_path,
    capsys,
):
    """The model root instead of its tokenizer/, or an empty folder: one line naming --tokenizer, in < 2 s.

    Timed in-process (the libraries already imported, as they are by then in a real run) so the number is the
    check's, not the interpreter's start-up.
    """
    root = tmp_path / "sd15"
    write_clip_vocab(root / "tokenizer")
    (root / "model_index.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    # a file whose weights cannot be read (truncated after its header): the tokenizer error proves nothing was read
    data = sd_file["path"].read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: header + 16])
    for folder, expected in ((root, "tokenizer/ subfolder"), (tmp_path / "empty", "holds no tokenizer")):
        for base in (sd_file["path"], truncated):
            started = time.perf_counter()
            rc = main(
                [
                    "generate",
                    "a cat",
                    "--base",
                    str(base),
                    "--base-config",
                    str(base_config),
                    "--tokenizer",
                    str(folder),
                    "--out",
                    str(tmp_path / "o"),
                ]
            )
            elapsed = time.perf_counter() - started
            lines = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(lines) == 1, lines
            assert f"--tokenizer {folder}" in lines[0] and expected in lines[0], lines[0]
            assert elapsed < 2, elapsed
    assert not (tmp_path / "o").exists()
    # the same through a real process (train's flag)
    result = _cli(
        "train",
        "--model.base",
        truncated,
        "--model.base_config",
        base_config,
        "--model.tokenizer",
        root,
        "--train.output_dir",
        tmp_path / "run",
    )
    assert result.returncode == 2 and f"--model.tokenizer {root}" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_that_cannot_encode_a_sentence_is_refused(tmp_path):
    """A real tokenizer file with a useless vocabulary: "a photo of a cat" is all <unk>: refused by name."""
    from controlnet.builtin.text import build_tokenizer

    build_tokenizer(["zebra"], max_length=8).save_pretrained(tmp_path / "tok")
    rc = main(["generate", "a cat", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o")])
    assert rc == 2
    with pytest.raises(ValueError, match=f"cannot encode a plain sentence.*expected >= {MIN_WORD_TOKENS}"):
        check_tokenizer(build_tokenizer(["zebra"], max_length=8), "tok")
    from transformers import CLIPTokenizer

    good = CLIPTokenizer.from_pretrained(str(write_clip_vocab(tmp_path / "clip")))
    assert check_tokenizer(good, "clip") is good


def test_missing_tokenizer_names_the_flag_of_each_command(sd_file, tmp_path, capsys):
    rc = main(["generate", "a cat", "--base", str(sd_file["path"]), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    # the tiny file's family is not recognisable; the family error comes first and names our flag
    assert rc == 2 and len(err) == 1 and "--base-config FILE" in err[0] and "configs=" not in err[0]
    rc = main(["generate", "a cat", "--base", str(sd_file["path"]), "--base-config", str(tmp_path / "no.json")])
    assert rc == 2 and "--base-config" in capsys.readouterr().err
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"family": "sd15", **sd_file["configs"]}))
    rc = main(["generate", "a cat", "--base", str(sd_file["path"]), "--base-config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pass --tokenizer DIR" in err[0] and "tokenizer=" not in err[0]
    rc = main(
        [
            "train",
            "--model.base",
            str(sd_file["path"]),
            "--model.base_config",
            str(cfg),
            "--train.output_dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "pass --model.tokenizer DIR" in err[-1], err
    assert not (tmp_path / "run").exists()  # refused before the run folder is written


def test_base_not_found_names_every_kind(tmp_path, capsys):
    rc = main(["generate", "a cat", "--base", str(tmp_path / "v1-5-pruned.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "base model not found" in err and "checkpoint file" in err and "export-base" in err
    (tmp_path / "folder").mkdir()
    rc = main(["evaluate", str(tmp_path), "--base", str(tmp_path / "folder")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a diffusers model folder" in err and "export-base" in err


# ---------------------------------------------------------------------------------------------------------------
# checkpoint files: EMA weights, training
@pytest.mark.slow  # the default suite's 15-minute budget; run with -m slow
def test_ema_weights_are_offered_and_diffusers_advice_is_not_shown(
    sd_file,
    ema_file,
    base_config,
    tmp_path,
    caplog,
):
    path, twins = ema_file
    options = dict(tokenizer=sd_file["tokenizer"], configs=str(base_config))
    with caplog.at_level(logging.INFO):
        ema = load_base(path, **options)  # default: the EMA weights, as diffusers' advice says for sampling
    raw = load_base(path, ema=False, **options)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "extract_ema" not in messages and "--no-ema" not in messages  # library wording: ema=False
    assert "tiny_ema.safetensors: using the EMA UNet weights (model_ema.*); ema=False for the raw ones" in messages
    assert (ema.ema, raw.ema) == (True, False)
    key = "conv_in.weight"
    assert torch.equal(ema.unet.state_dict()[key], twins["model_ema.diffusion_modelinput_blocks00weight"])
    assert not torch.equal(raw.unet.state_dict()[key], ema.unet.state_dict()[key])
    with pytest.raises(ValueError, match="holds no EMA UNet weights"):
        load_base(sd_file["path"], ema=True, **options)

    args = [
        "generate",
        "a red cat",
        "--base",
        path,
        "--tokenizer",
        sd_file["tokenizer"],
        "--base-config",
        base_config,
        "--steps",
        "1",
        "--no-grid",
        "--width",
        "64",
        "--height",
        "64",
    ]
    a = _cli(*args, "--out", tmp_path / "ema")
    b = _cli(*args, "--out", tmp_path / "raw", "--no-ema")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "extract_ema" not in a.stderr + b.stderr
    assert "using the EMA UNet weights (model_ema.*); --no-ema for the raw ones" in a.stderr
    assert "using the raw UNet weights (model.diffusion_model.*), not the EMA ones; --ema for those" in b.stderr
    img = lambda d: np.asarray(Image.open(next(d.glob("*.png"))), dtype=int)  # noqa: E731
    assert np.abs(img(tmp_path / "ema") - img(tmp_path / "raw")).max() > 0
    # the weights used are part of every output's settings: two different images never carry the same ones
    for folder, used in (("ema", True), ("raw", False)):
        with Image.open(next((tmp_path / folder).glob("*.png"))) as png:
            assert json.loads(png.text["controlnet"])["ema"] is used
        sidecar = json.loads(next((tmp_path / folder).glob("*.json")).read_text())
        assert sidecar["settings"]["ema"] is used


@pytest.mark.slow  # the default suite's 15-minute budget (the clean-clone run took 906 s); -m slow
def test_train_starts_from_a_checkpoint_file(sd_file, base_config, tmp_path):
    """Acceptance: `controlnet train --model.base FILE --model.tokenizer DIR` trains and exports."""
    from controlnet.world.dataset import write_dataset

    data = write_dataset("fill", 6, 64, tmp_path / "data", seed=0, workers=1)
    run = tmp_path / "run"
    result = _cli(
        "train",
        "--model.base",
        sd_file["path"],
        "--model.tokenizer",
        sd_file["tokenizer"],
        "--model.base_config",
        base_config,
        "--data.path",
        data,
        "--data.resolution",
        64,
        "--train.output_dir",
        run,
        "--train.max_steps",
        2,
        "--train.batch_size",
        2,
        "--model.hint_channels",
        "4,8,8,16",
        "--checkpoint.every",
        0,
        "--train.log_every",
        1,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "should be kept in float32" not in result.stderr and "Loading weights" not in result.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2]
    assert (run / "final" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((run / "config.json").read_text())["model"]["tokenizer"] == str(sd_file["tokenizer"])


# ---------------------------------------------------------------------------------------------------------------
# exported folders and the base's own sampling defaults
@pytest.mark.slow  # the default suite's 15-minute budget; run with -m slow
def test_generate_and_evaluate_take_an_exported_folder(exported, tmp_path):
    """Acceptance: `controlnet generate/evaluate --base DIR` on an export-base folder; its defaults (guidance 4)."""
    cond = tmp_path / "cond.png"
    Image.fromarray(np.asarray(condition_image(1).resize((64, 64)))).save(cond)
    out = tmp_path / "gen"
    result = _cli(
        "generate",
        "red circle with blue background",
        "--base",
        exported / "base",
        "--controlnet",
        exported / "cn",
        "--cond",
        cond,
        "--out",
        out,
        "--name",
        "x",
    )
    assert result.returncode == 0, result.stderr
    settings = json.loads((out / "x.json").read_text())["settings"]
    assert settings["guidance_scale"] == 4.0 and settings["steps"] == 20 and settings["width"] == 64
    assert "guidance 4 (the defaults of base" in result.stderr
    result = _cli(
        "generate",
        "red circle",
        "--base",
        exported / "base",
        "--out",
        out,
        "--name",
        "y",
        "--cfg",
        2,
        "--steps",
        1,
    )
    assert result.returncode == 0 and json.loads((out / "y.json").read_text())["settings"]["guidance_scale"] == 2.0
    report = tmp_path / "report.json"
    result = _cli(
        "evaluate", exported / "cn", "--base", exported / "base", "--n", 2, "--steps", 1, "--json", report
    )
    assert result.returncode == 0, result.stderr
    rows = {r["metric"]: r for r in json.loads(report.read_text())["rows"]}
    assert rows["disk IoU"]["model"] == rows["disk IoU"]["floor"]  # a fresh ControlNet changes nothing


def test_builtin_base_carries_its_model_cards_sampling():
    from controlnet.builtin.base import DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLE_STEPS
    from controlnet.generate.base import sampling_defaults
    from controlnet.generate.builtin_format import SamplingDefaults, builtin_folder

    d = sampling_defaults("builtin")
    assert (d.guidance_scale, d.steps) == (DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLE_STEPS) == (4.0, 20)
    assert SamplingDefaults.read(builtin_folder().parent) == SamplingDefaults()  # no file: the generic ones


@pytest.mark.slow  # the default suite's 15-minute budget (the clean-clone run took 906 s); -m slow
def test_verbose_logs_what_is_loaded(exported, tmp_path):
    result = _cli("-v", "generate", "red circle", "--base", exported / "base", "--steps", 1, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert f"loading the base's {part} from {exported / 'base'}" in result.stderr


def test_progress_reports_each_component(exported):
    seen = []
    load_base(exported / "base", progress=lambda name, k, n: seen.append((name, k, n)))
    assert seen == [
        ("unet", 0, 5),
        ("vae", 1, 5),
        ("text_encoder", 2, 5),
        ("tokenizer", 3, 5),
        ("scheduler", 4, 5),
        ("done", 5, 5),
    ]


def test_a_corrupt_component_is_one_line_naming_it(tmp_path, capsys):
    """A folder whose UNet weights are garbage: one error line naming the component, exit 2, nothing written."""
    import shutil

    from controlnet.generate.builtin_format import builtin_folder

    folder = tmp_path / "base"
    shutil.copytree(builtin_folder(), folder, ignore=shutil.ignore_patterns("controlnets"))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 1000)
    assert (
        main(["generate", "a red circle", "--base", str(folder), "--steps", "2", "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot load the unet" in err and str(folder / "unet") in err
    assert not (tmp_path / "o").exists()

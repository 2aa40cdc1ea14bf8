"""`controlnet generate`: files, embedded settings, grid, annotators, manifest resume, errors as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pipeline_tiny import base_args

from controlnet.cli import main


def test_generate_writes_pngs_with_settings_sidecar_and_grid(saved, sd_pipe, tmp_path, capsys):
    args = base_args(saved, tmp_path, "a red cat", "--cond", str(saved / "cond1.png"), "--seed", "3")
    rc = main(
        [*args, "--batch-size", "2", "--scheduler", "DPM++ 2M Karras", "--scale", "0.8", "--control-end", "0.5"]
    )
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["controlnet-3-0.png", "controlnet-3-1.png", "controlnet-3-grid.png", "controlnet-3.json"]
    with Image.open(tmp_path / "controlnet-3-1.png") as img:
        params, meta = img.text["parameters"], json.loads(img.text["controlnet"])
        pixels = np.asarray(img)
    assert params.startswith("a red cat\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 4, Size: 64x64")
    assert 'ControlNet 0: "Module: none, Model: cn_diffusers, Weight: 0.8' in params
    assert "Guidance End: 0.5, Control Mode: Balanced" in params
    assert meta["seed"] == 4 and meta["controlnets"][0]["end"] == 0.5
    sidecar = json.loads((tmp_path / "controlnet-3.json").read_text())
    assert sidecar["images"] == ["controlnet-3-0.png", "controlnet-3-1.png"] and sidecar["settings"]["steps"] == 2
    with Image.open(tmp_path / "controlnet-3-grid.png") as grid:
        assert grid.size == (3 * 64, 64)  # condition | 2 outputs
    # the CLI gives exactly the library's images
    lib = sd_pipe.__class__.from_pretrained(saved / "base", controlnets=[saved / "cn_diffusers"])
    ref = lib(
        "a red cat",
        [saved / "cond1.png"],
        steps=2,
        seed=3,
        batch_size=2,
        scheduler="dpmpp_2m_karras",
        control_scale=0.8,
        control_end=0.5,
    )
    assert np.array_equal(np.asarray(ref.images[1]), pixels)


def test_annotator_turns_a_photo_into_the_condition(saved, tmp_path):
    args = base_args(saved, tmp_path, "a cat", "--cond", str(saved / "cond1.png"), "--annotator", "canny")
    assert main([*args, "--name", "edges", "--cfg", "1"]) == 0
    with Image.open(tmp_path / "edges.png") as img:
        assert "Module: canny" in img.text["parameters"]
    from controlnet.annotate.registry import get_annotator

    with Image.open(tmp_path / "edges-grid.png") as grid, Image.open(saved / "cond1.png") as photo:
        cond_tile = np.asarray(grid)[:, :64]
        edges = get_annotator("canny")(np.asarray(photo.convert("RGB")))
    assert np.array_equal(cond_tile, edges)  # the grid shows the edge map the net saw, not the photo
    assert not np.array_equal(cond_tile, np.asarray(Image.open(saved / "cond1.png")))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--steps", "0"], "steps=0: expected an integer >= 1"),
        (["--scheduler", "heun9"], "unknown scheduler 'heun9'"),
        (["--control-start", "0.6", "--control-end", "0.4"], "start=0.6, end=0.4"),
        (["--scale", "-1"], "control_scale[0]=-1.0: expected >= 0"),
        (["--strength", "-0.5", "--image", "IMG"], "strength=-0.5"),
        (["--width", "50"], "width x height = 50 x auto: both must be positive multiples of 8"),
        (["--cond", "COND"], "--cond given 2 times for 1 --controlnet"),
        (["--annotator", "nope"], "unknown name 'nope'"),
        (["--ema"], "base holds one set of weights, no EMA UNet (model_ema.*)"),
        (["--true-cfg", "2"], "true_cfg_scale=2.0: true CFG is for guidance-distilled Flux bases"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(saved, tmp_path, capsys, extra, message):
    cond = str(saved / "cond1.png")
    extra = [cond if e in ("IMG", "COND") else e for e in extra]
    rc = main(base_args(saved, tmp_path, "a cat", "--cond", cond, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("controlnet generate: error: ") and message in err[0], err


def test_missing_files_are_one_line(saved, tmp_path, capsys):
    assert main(base_args(saved, tmp_path, "a cat", "--cond", str(tmp_path / "missing.png"))) == 2
    assert "condition image not found" in capsys.readouterr().err
    args = ["generate", "a cat", "--base", str(tmp_path / "nobase"), "--out", str(tmp_path)]
    assert main(args) == 2
    assert "base model not found" in capsys.readouterr().err
    args = base_args(saved, tmp_path, "--manifest", str(tmp_path / "none.jsonl"))
    assert main(args) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_help_reads_like_a_manual(capsys):
    with pytest.raises(SystemExit) as code:
        main(["generate", "--help"])
    assert code.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "Control modes",
        "0.825 ** 12",
        "--manifest",
        "accelerate launch",
        "crop_and_resize",
        "examples:",
    ):
        assert needle in text


def write_manifest(path, saved, n=3):
    lines = [json.dumps({"prompt": f"a cat {k}", "cond": str(saved / "cond1.png")}) for k in range(n - 1)]
    lines.append(json.dumps({"id": "dog", "prompt": "a dog", "cond": str(saved / "cond2.png"), "seed": 42}))
    path.write_text("# jobs\n" + "\n".join(lines) + "\n")
    return path


def test_manifest_one_output_per_line_and_resume(saved, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "jobs.jsonl", saved)
    out = tmp_path / "out"
    args = base_args(saved, out, "--manifest", str(manifest), "--seed", "100", "--no-grid", "--cfg", "1")
    assert main(args) == 0
    assert "generated 3, skipped 0" in capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["dog.png", "line-000000.png", "line-000001.png"]
    assert json.loads((out / "line-000001.json").read_text())["settings"]["seed"] == 101  # seed + line number
    assert json.loads((out / "dog.json").read_text())["settings"]["seed"] == 42
    before = (out / "dog.png").stat().st_mtime_ns
    (out / "line-000001.json").unlink()  # as if the run crashed before finishing this line
    assert main(args) == 0
    assert "generated 1, skipped 2" in capsys.readouterr().out
    assert (out / "dog.png").stat().st_mtime_ns == before


def test_manifest_errors_name_the_line(saved, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "cond": "x.png"}\n{"prompt": "a", "cond": ["a.png", "b.png"]}\n')
    assert main(base_args(saved, tmp_path, "--manifest", str(bad))) == 2
    assert "bad.jsonl line 2: 2 condition images for 1 ControlNets" in capsys.readouterr().err
    bad.write_text('{"prompt": "ok", "cond": "x.png", "colour": 3}\n')
    assert main(base_args(saved, tmp_path, "--manifest", str(bad))) == 2
    assert "line 1: unknown key(s) colour" in capsys.readouterr().err


def test_manifest_excludes_prompt_and_cond(saved, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "jobs.jsonl", saved)
    assert main(base_args(saved, tmp_path, "a cat", "--manifest", str(manifest))) == 2
    assert "drop the prompt/--cond" in capsys.readouterr().err

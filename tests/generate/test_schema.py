"""One description of a generation: the CLI, the manifest, the native API, the web-UI table and the page's form all
derive from generate/options.py (docs/architecture.md#one-generation-one-description)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from pipeline_tiny import base_args

from controlnet.cli import main
from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
from controlnet.settings_cli import meta


def test_manifest_sidecar_equals_a_single_runs(saved, tmp_path):
    """The same settings through a manifest line and through one command line: the same sidecar (settings, per-unit
    model and resize mode included) and the same pixels; only the line's own bookkeeping differs."""
    cond = saved / "cond1.png"
    settings = [
        "--seed",
        "5",
        "--scale",
        "0.7",
        "--control-end",
        "0.6",
        "--annotator",
        "canny",
        "--cfg",
        "3",
        "--cond-resize-mode",
        "crop_and_resize",
        "--eta",
        "0.0",
    ]
    single = tmp_path / "single"
    assert main([*base_args(saved, single, "a red cat", "--cond", str(cond), "--name", "one"), *settings]) == 0
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"id": "one", "prompt": "a red cat", "cond": str(cond), "seed": 5}) + "\n")
    batch = tmp_path / "batch"
    assert main([*base_args(saved, batch, "--manifest", str(manifest)), *settings]) == 0
    one = json.loads((single / "one.json").read_text())
    two = json.loads((batch / "one.json").read_text())
    assert {key: two.pop(key) for key in ("line", "process", "processes")} == {
        "line": 0,
        "process": 0,
        "processes": 1,
    }
    assert two == one
    unit = one["settings"]["controlnets"][0]
    assert (unit["model"], unit["resize_mode"], unit["module"]) == (
        str(saved / "cn_diffusers"),
        "crop_and_resize",
        "canny",
    )
    assert (single / "one.png").read_bytes() == (batch / "one.png").read_bytes()


def _api_fields(cls) -> set[str]:
    return {meta(f, "api_name") or f.name for f in dataclasses.fields(cls) if meta(f, "api", True)}


def test_native_request_models_have_exactly_the_schemas_fields():
    from controlnet.serve.native import GenerateIn, UnitIn

    job_fields = {f.name for f in dataclasses.fields(GenerationJob)} - {"options"}
    assert set(GenerateIn.model_fields) == _api_fields(GenerationOptions) | job_fields
    assert set(UnitIn.model_fields) == _api_fields(ControlUnit)
    # the fields the Python API alone has (per-net lists, output type) are not request fields
    assert not {"control_scale", "control_mode", "output_type"} & set(GenerateIn.model_fields)
    # defaults and bounds come from the schema
    steps = GenerateIn.model_fields["steps"]
    assert steps.default is None and any(getattr(m, "ge", None) == 1 for m in steps.metadata)
    assert UnitIn.model_fields["scale"].default == ControlUnit().scale


# Settings of ours that the web UI's txt2img/img2img API has no field for (its ControlNet units are parsed by
# serve/webui/units.py, against the unit's own names; A1111's API has no true CFG for Flux).
NOT_IN_WEBUI = {"guess_mode_form", "inpaint_paste", "output_type", "control_scale", "block_scales",
                "control_start", "control_end", "control_mode", "control_type", "units", "options", "true_cfg_scale"}  # fmt: skip


def test_webui_table_covers_the_schema_and_only_names_the_parser_reads():
    from controlnet.serve.webui.generation import webui_names

    table = webui_names()
    schema = {f.name for cls in (GenerationJob, GenerationOptions) for f in dataclasses.fields(cls)}
    assert set(table.values()) | NOT_IN_WEBUI == schema, "a schema field with neither a web-UI name nor a reason"
    assert set(table.values()) <= schema
    # the unit table: every unit field the web UI has is named (its other names are the unit parser's aliases)
    unit_names = {meta(f, "webui") for f in dataclasses.fields(ControlUnit) if meta(f, "webui")}
    assert unit_names == {
        "weight",
        "guidance_start",
        "guidance_end",
        "control_mode",
        "resize_mode",
        "advanced_weighting",
        "union_control_type",
    }


def test_webui_request_maps_every_named_field_into_the_schema():
    """A txt2img body that sets every mapped field lands in the job with the web UI's meaning."""
    from controlnet.serve.models import ModelRegistry
    from controlnet.serve.service import Service
    from controlnet.serve.webui.generation import parse_request

    service = Service(ModelRegistry(), max_units=2, device="cpu")
    try:
        body = {
            "prompt": "a cat",
            "negative_prompt": "dog",
            "steps": 3,
            "cfg_scale": 2.5,
            "seed": 11,
            "width": 64,
            "height": 48,
            "batch_size": 2,
            "sampler_name": "DDIM",
            "eta": 0.5,
            "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "builtin"},
        }
        job = parse_request(body, service, img2img=False).job
    finally:
        service.close()
    o = job.options
    assert (job.prompt, job.base, o.negative_prompt, o.steps, o.guidance_scale, o.seed) == (
        "a cat",
        "builtin",
        "dog",
        3,
        2.5,
        11,
    )
    assert (o.width, o.height, o.batch_size, o.scheduler, o.eta, getattr(o, "clip_" + "skip")) == (
        64,
        48,
        2,
        "ddim",
        0.5,
        1,
    )


def test_cli_flags_come_from_the_schema(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(GenerationOptions):
        if meta(f, "cli", True):
            assert (meta(f, "flags") or (f"--{f.name.replace('_', '-')}",))[0] in text, f.name
    for flag in (
        "--controlnet",
        "--cond",
        "--annotator",
        "--scale",
        "--control-start",
        "--control-end",
        "--control-mode",
        "--block-scales",
        "--cond-resize-mode",
        "--cfg",
        "--guidance-scale",
    ):
        assert flag in text


def test_a_prepared_condition_is_not_converted_again(saved, sd_pipe):
    """run_job owns resizing: a condition that is already RGB at the output size reaches the pipeline as the same
    object and comes back as the result's control image (no second resize, no round trip through a tensor)."""
    from PIL import Image

    from controlnet.generate.jobs import run_job

    with Image.open(saved / "cond1.png") as img:
        cond = img.convert("RGB").resize((64, 64))
    other = cond.transpose(Image.FLIP_LEFT_RIGHT)
    units = [ControlUnit("net0", image=cond), ControlUnit("net1", image=other)]
    result = run_job(sd_pipe, GenerationJob(prompt="x", units=units, options=GenerationOptions(steps=1)))
    assert result.control_images[0] is cond and result.control_images[1] is other
    smaller = cond.resize((32, 32))
    units = [ControlUnit("net0", image=smaller), ControlUnit("net1", image=other)]
    job = GenerationJob(prompt="x", units=units, options=GenerationOptions(steps=1, width=64, height=64))
    resized = run_job(sd_pipe, job).control_images[0]
    assert resized.size == (64, 64) and resized is not smaller


def test_a_manifest_lines_per_net_settings_equal_the_same_flags(saved, tmp_path):
    """`control_scale`, `control_mode`, `block_scales` in a line (the pipeline's Python spelling) set the units as
    --scale, --control-mode and --block-scales do on one command line; a list of the wrong length names the line."""
    cond = saved / "cond1.png"
    blocks = ",".join(["0.5"] * 7)
    flags = ["--seed", "2", "--scale", "0.4", "--control-mode", "prompt", "--block-scales", blocks]
    single = tmp_path / "single"
    assert main([*base_args(saved, single, "a cat", "--cond", str(cond), "--name", "one"), *flags]) == 0
    per_net = {"control_scale": 0.4, "control_mode": ["prompt"], "block_scales": [0.5] * 7}
    line = {"id": "one", "prompt": "a cat", "cond": str(cond), "seed": 2, **per_net}
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps(line) + "\n")
    batch = tmp_path / "batch"
    assert main(base_args(saved, batch, "--manifest", str(manifest))) == 0
    one, two = (json.loads((folder / "one.json").read_text()) for folder in (single, batch))
    assert one["settings"]["controlnets"] == two["settings"]["controlnets"]
    assert (
        one["settings"]["controlnets"][0]["scale"] == 0.4 and one["settings"]["controlnets"][0]["mode"] == "prompt"
    )
    assert (single / "one.png").read_bytes() == (batch / "one.png").read_bytes()
    manifest.write_text(json.dumps({**line, "id": "two", "control_scale": [0.4, 0.5]}) + "\n")
    assert main(base_args(saved, batch, "--manifest", str(manifest))) == 2

"""`controlnet world base-quality` on an SD3-layout base (builtin-dit): the model card's colour and shape tests, sampled
by diffusers' StableDiffusion3Pipeline with the base's sampling.json, image k's noise from seed + k."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from controlnet.builtin.base_dit import sample_dit
from controlnet.builtin.config import DitModelConfig, PretrainConfig, TextEncoderConfig
from controlnet.builtin.pretrain_dit import export_dit, pretrain_dit
from controlnet.cli import main
from controlnet.generate.base import load_base
from controlnet.generate.builtin_format import builtin_dit_folder

# the recipe tests' size (tests/builtin/test_dit_pretrain.py) with 2 blocks (a ControlNet copies 1..n - 1), untrained:
# the sampler, not the model, is tested
TINY_DIT = DitModelConfig(
    layers=2,
    heads=1,
    head_dim=8,
    text=TextEncoderConfig(hidden_size=8, num_layers=2, num_heads=1, intermediate_size=16),
)
PROMPTS = [
    "red circle with blue background",
    "green square with yellow background",
    "white triangle with black background",
]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """An export-base folder of a tiny sd3 run (its initial weights: no step taken), with builtin-dit's sampling.json."""
    root = tmp_path_factory.mktemp("dit")
    config = PretrainConfig(
        out=str(root / "run"), family="sd3", steps=1, batch_size=2, scene_fraction=0.0, fill_pool=4, dit=TINY_DIT
    )
    pretrain_dit(config, stop_after=0)
    export_dit(root / "run", root / "model")
    return root / "model"


def quality_table(output: str) -> dict[str, tuple[float, float, int]]:
    """{test name: (model, truth, n)} from base-quality's table."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"^(colour pairs|colour placement|shape word).*?\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", line)
        if match:
            rows[match[1]] = (float(match[2]), float(match[3]), int(match[4]))
    return rows


def test_base_quality_runs_on_an_exported_dit_folder_with_its_sampling(dit_folder, capsys):
    argv = ["world", "base-quality", "--model", str(dit_folder), "--n", "3", "--shape-pairs", "1", "--steps", "2"]
    assert main([*argv, "--batch", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    table = quality_table(out)
    assert set(table) == {"colour pairs", "colour placement", "shape word"}
    for name, (model, truth, n) in table.items():
        assert truth == 1.0, name  # the measurement itself works on the ground-truth renderings
        assert 0.0 <= model <= 1.0 and n == 3, name  # 3 colour prompts; 1 colour pair x 3 shape words
    # guidance and zero tokens from the folder's sampling.json (4.0, 0), steps from the flag
    assert "steps 2, guidance 4.0, max_sequence_length 0, seed 0" in out
    assert "SD3Transformer2DModel" in out and "shape confusion" in out


def test_base_quality_refuses_conflicting_flags_in_one_line(dit_folder, capsys):
    assert main(["world", "base-quality", "--model", str(dit_folder), "--base", "builtin"]) == 2
    assert "give one" in capsys.readouterr().err
    assert (
        main(["world", "base-quality", "--base", "builtin", "--batch", "4"]) == 2
    )  # the UNet sampler has no batches
    err = capsys.readouterr().err.strip()
    assert "--batch" in err and "\n" not in err
    assert main(["world", "base-quality", "--model", str(dit_folder), "--batch", "0"]) == 2
    assert "--batch=0" in capsys.readouterr().err


def test_sample_dit_draws_image_k_from_seed_plus_k_whatever_the_batches(dit_folder):
    base = load_base(dit_folder)
    steps, guidance, tokens = 2, base.sampling.guidance_scale, base.sampling.max_sequence_length
    whole = sample_dit(base, PROMPTS, steps, seed=5, guidance_scale=guidance, max_sequence_length=tokens)
    one_by_one = sample_dit(
        base, PROMPTS, steps, seed=5, guidance_scale=guidance, max_sequence_length=tokens, batch_size=1
    )
    assert len(whole) == 3 and whole[0].shape == (64, 64, 3) and whole[0].dtype == np.uint8
    for a, b in zip(whole, one_by_one, strict=True):  # batched matmuls may round differently: one level at most
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    second = sample_dit(base, PROMPTS[1:2], steps, seed=6, guidance_scale=guidance, max_sequence_length=tokens)
    assert (
        np.abs(second[0].astype(int) - whole[1].astype(int)).max() <= 1
    )  # image 1 of seed 5 is image 0 of seed 6
    other = sample_dit(base, PROMPTS[:1], steps, seed=7, guidance_scale=guidance, max_sequence_length=tokens)
    assert np.abs(other[0].astype(int) - whole[0].astype(int)).max() > 1  # ... and the seed matters


def test_sample_dit_equals_the_controlnet_pipeline_users_get_at_scale_zero(dit_folder):
    """The generate path (TransformerControlNetPipeline over diffusers' SD3 ControlNet pipeline) with a net whose
    residuals are scaled by 0 samples the base alone: its images are sample_dit's, pixel for pixel."""
    from controlnet.builtin.base_dit import float_to_uint8
    from controlnet.generate.options import GenerationOptions
    from controlnet.generate.transformer_pipeline import TransformerControlNetPipeline
    from controlnet.model.transformer_controlnet import SD3ControlNet

    base = load_base(dit_folder)
    torch.manual_seed(0)
    net = SD3ControlNet.from_transformer(base.transformer, num_layers=1).eval().requires_grad_(False)
    torch.nn.init.normal_(
        net.controlnet_blocks[0].weight
    )  # zero-initialised: made to change the images at scale 1
    pipe = TransformerControlNetPipeline(base, [net])
    control = np.zeros((64, 64, 3), np.uint8)

    def generate(scale: float) -> list[np.ndarray]:
        options = GenerationOptions(steps=2, seed=3, control_scale=scale, output_type="np")
        return float_to_uint8(pipe(PROMPTS[:2], [control], options=options).array)

    ours = sample_dit(
        base,
        PROMPTS[:2],
        steps=2,
        seed=3,
        guidance_scale=base.sampling.guidance_scale,
        max_sequence_length=base.sampling.max_sequence_length,
    )
    for a, b in zip(generate(0.0), ours, strict=True):
        np.testing.assert_array_equal(
            a, b
        )  # (another max_sequence_length, e.g. the pipeline's 256: 19 levels off)
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(generate(1.0), ours, strict=True)) > 1


@pytest.mark.skipif(
    not (builtin_dit_folder() / "model_index.json").is_file(), reason="builtin-dit is not in this installation"
)
def test_base_quality_on_the_shipped_builtin_dit(capsys):
    """The command as the model card runs it, on the shipped weights (tiny n and steps: the numbers are not checked)."""
    argv = ["world", "base-quality", "--base", "builtin-dit", "--n", "3", "--shape-pairs", "1", "--steps", "2"]
    assert main([*argv, "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert [truth for _, truth, _ in quality_table(out).values()] == [1.0, 1.0, 1.0]
    assert "builtin-dit" in out and "max_sequence_length 0" in out


def test_base_quality_of_the_unet_base_is_its_sampler_s_as_before(capsys):
    """`--base builtin` (the default) keeps builtin/base.py's sampler, defaults and output."""
    from controlnet.builtin.base import load_builtin_base, sample
    from controlnet.builtin.quality import measure_quality

    assert main(["world", "base-quality", "--n", "3", "--shape-pairs", "1", "--steps", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    base = load_builtin_base()
    report = measure_quality(
        lambda prompts, seed: sample(base, prompts, steps=2, seed=seed, guidance_scale=4.0), 64, 3, 1, seed=0
    )
    assert out.endswith(f"steps 2, guidance 4.0, seed 0\n{report.table()}\n")

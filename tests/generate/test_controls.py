"""Every control of the pipeline does what it says, on the tiny SD1.x-style base."""

from __future__ import annotations

import numpy as np
import torch
from pipeline_tiny import diffusers_sd_pipeline

from controlnet.generate.guidance import cfg_resolution_weights, guess_mode_scales
from controlnet.generate.pipeline import output_heights
from controlnet.testing.tiny_models import condition_image

PROMPT = "the red circle"


def gen(pipe, conds=None, **kw):
    conds = conds if conds is not None else [condition_image(1), condition_image(2)][: len(pipe.controlnets)]
    kw.setdefault("steps", 1)
    return pipe(PROMPT, conds, output_type="np", **kw).array


class Calls:
    """Counts forward calls of a module and records the batch size of its first input."""

    def __init__(self, module):
        self.batches = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        self.batches.append(first.shape[0])

    def remove(self):
        self.handle.remove()


def counting(*modules):
    return [Calls(m) for m in modules]


def test_scale_zero_equals_base_model_and_nets_never_run(sd_parts, sd_pipe):
    calls = counting(*sd_pipe.controlnets)
    ours = gen(sd_pipe, control_scale=0.0, seed=5, steps=2)
    assert [len(c.batches) for c in calls] == [0, 0]
    for c in calls:
        c.remove()
    p = sd_parts
    base = diffusers_sd_pipeline(p)
    theirs = base(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="np")
    assert np.abs(ours - theirs.images).max() <= 1e-5
    assert np.abs(ours - gen(sd_pipe, seed=5, steps=2)).max() > 1e-2  # the nets do change the image at scale 1


def test_hint_once_cfg_one_batch_and_window_skips_the_net(sd_pipe):
    embeds = counting(*[n.controlnet_cond_embedding for n in sd_pipe.controlnets])
    nets = counting(*sd_pipe.controlnets)
    unet = counting(sd_pipe.unet)[0]
    gen(sd_pipe, steps=4, batch_size=2, control_start=[0.0, 0.5], control_end=[0.5, 1.0])
    assert [len(e.batches) for e in embeds] == [1, 1]  # E(c) once per generation, not per step
    assert unet.batches == [4, 4, 4, 4]  # 2 images x (uncond, cond) in one batch per step
    assert [n.batches for n in nets] == [[4, 4], [4, 4]]  # each net runs only on its 2 of 4 steps


def test_conditional_only_modes_run_the_nets_on_half_the_batch(sd_pipe):
    for mode in ("controlnet", "cfg_resolution"):
        nets = counting(*sd_pipe.controlnets)
        gen(sd_pipe, control_mode=mode)
        assert [n.batches for n in nets] == [[1], [1]], mode
        for n in nets:
            n.remove()
    nets = counting(sd_pipe.controlnets[0])
    gen(sd_pipe, guidance_scale=1.0)  # CFG off: one branch only
    assert nets[0].batches == [1]


def test_per_image_seeds_are_reproducible(sd_pipe):
    batch = gen(sd_pipe, seed=10, batch_size=2)
    single = gen(sd_pipe, seed=11)
    assert np.abs(batch[1] - single[0]).max() <= 1e-5
    assert np.abs(batch[0] - batch[1]).max() > 1e-2


def test_prompt_negative_prompt_and_guidance_change_the_image(sd_pipe):
    a = gen(sd_pipe)
    assert np.abs(a - gen(sd_pipe, negative_prompt="a dog")).max() > 1e-3
    assert np.abs(a - gen(sd_pipe, guidance_scale=3.0)).max() > 1e-3
    assert (
        np.abs(
            a - sd_pipe("a blue dog", [condition_image(1), condition_image(2)], steps=2, output_type="np").array
        ).max()
        > 1e-3
    )


def test_prompt_mode_is_balanced_with_soft_block_scales(sd_pipe):
    n = sd_pipe.controlnets[0].num_control_outputs
    soft = gen(sd_pipe, control_mode="My prompt is more important")
    manual = gen(sd_pipe, block_scales=guess_mode_scales(n, "reference"))
    assert np.abs(soft - manual).max() <= 1e-5
    assert np.abs(soft - gen(sd_pipe)).max() > 1e-3


def test_cfg_resolution_weighting_profile(sd_pipe):
    net = sd_pipe.controlnets[0]
    heights = output_heights(net, 8)
    assert heights == [8, 8, 8, 4, 4, 4, 4]  # conv_in, 2 resnets, downsample, 2 resnets, middle
    assert cfg_resolution_weights(heights) == [1, 1, 1, 2, 2, 2, 2]  # w_i = 64 / h_i at 512 px, i.e. H / h_i
    # SD1.5 at 512 px (latent 64): the paper's 64/h_i for h = 64, 32, 16, 8
    assert (
        cfg_resolution_weights([64] * 3 + [32] * 3 + [16] * 3 + [8] * 4) == [1] * 3 + [2] * 3 + [4] * 3 + [8] * 4
    )
    # the mode = conditional branch only (as guess mode) with w_i instead of the soft profile
    w = cfg_resolution_weights(heights)
    soft = guess_mode_scales(len(w))
    paper = gen(sd_pipe, control_mode="cfg_resolution")
    manual = gen(sd_pipe, control_mode="controlnet", block_scales=[a / b for a, b in zip(w, soft, strict=True)])
    assert np.abs(paper - manual).max() <= 1e-5


def test_block_scales_and_strength(sd_pipe):
    n = sd_pipe.controlnets[0].num_control_outputs
    zero_blocks = gen(sd_pipe, block_scales=[0.0] * n, seed=3)
    assert np.abs(zero_blocks - gen(sd_pipe, control_scale=0.0, seed=3)).max() <= 1e-6
    doubled = gen(sd_pipe, block_scales=[[2.0] * n, None])
    assert np.abs(doubled - gen(sd_pipe, control_scale=[2.0, 1.0])).max() <= 1e-5
    assert np.abs(doubled - gen(sd_pipe)).max() > 1e-3


def test_guess_mode_forms_differ_and_are_named(sd_pipe):
    ref = gen(sd_pipe, control_mode="controlnet", guess_mode_form="reference")
    dif = gen(sd_pipe, control_mode="controlnet", guess_mode_form="diffusers")
    assert np.abs(ref - dif).max() > 0  # 0.825 ** (n-1-i) vs logspace(-1, 0, n)


def test_single_condition_with_batch_and_settings(sd_pipe):
    result = sd_pipe(
        [PROMPT, "a blue dog"],
        [condition_image(1), [condition_image(2), condition_image(3)]],
        steps=2,
        batch_size=2,
        seed=4,
        scheduler="euler_a",
        control_end=[1.0, 0.5],
    )
    assert len(result.images) == 4 and result.seeds == [4, 5, 6, 7]
    s = result.settings
    assert s["sampler"] == "Euler a" and s["steps"] == 2 and s["controlnets"][1]["end"] == 0.5
    assert result.images[0].size == (64, 64)

"""img2img (strength), inpainting (mask + the v1.1 inpaint condition) and a pixel-space base (vae=None)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from controlnet.generate.control_images import INPAINT_MASKED_VALUE, inpaint_condition
from controlnet.testing.tiny_models import condition_image

PROMPT = "a red circle"
SIZE = 16


def gen(pipe, **kw):
    kw.setdefault("steps", 4)
    return pipe(PROMPT, [kw.pop("cond", condition_image(1, SIZE))], output_type="np", **kw).array


def test_pixel_space_text_to_image_runs_and_follows_the_condition(pixel_pipe):
    a = gen(pixel_pipe)
    assert a.shape == (1, SIZE, SIZE, 3) and a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - gen(pixel_pipe, cond=condition_image(2, SIZE))).max() > 1e-3


def test_img2img_runs_the_last_strength_fraction(pixel_pipe):
    init = condition_image(7, SIZE)
    calls = []
    handle = pixel_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    a = gen(pixel_pipe, image=init, strength=0.5)
    handle.remove()
    assert len(calls) == 2  # 4 steps x strength 0.5
    b = gen(pixel_pipe, image=condition_image(8, SIZE), strength=0.5)
    assert np.abs(a - b).max() > 1e-2  # the init image matters
    # the lower the strength, the closer the result stays to the init image
    target = np.asarray(init, dtype=np.float32)[None] / 255
    near = gen(pixel_pipe, image=init, strength=0.25, steps=8)
    far = gen(pixel_pipe, image=init, strength=1.0, steps=8)
    assert np.abs(near - target).mean() < np.abs(far - target).mean()


def test_strength_one_ignores_the_init_image(pixel_pipe):
    t2i = gen(pixel_pipe, seed=3)
    i2i = gen(pixel_pipe, seed=3, image=condition_image(7, SIZE), strength=1.0)
    assert np.abs(t2i - i2i).max() <= 1e-6


def test_inpainting_keeps_unmasked_pixels_and_feeds_the_inpaint_condition(pixel_pipe):
    init = condition_image(7, SIZE)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    seen = []
    net = pixel_pipe.controlnets[0]
    handle = net.controlnet_cond_embedding.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    out = pixel_pipe(PROMPT, ["inpaint"], image=init, mask=Image.fromarray(mask), steps=4, output_type="np").array
    handle.remove()
    target = np.asarray(init, dtype=np.float32) / 255
    keep = mask == 0
    assert np.abs(out[0][keep] - target[keep]).max() <= 1 / 255  # known region restored (pixel space: exact)
    assert np.abs(out[0][~keep] - target[~keep]).mean() > 0.05  # masked region repainted
    cond = seen[0][0]  # (3, H, W)
    assert torch.all(cond[:, 4:12, 4:12] == INPAINT_MASKED_VALUE)
    assert torch.allclose(cond[:, 0, 0], torch.tensor(target[0, 0]), atol=1e-6)


def test_inpaint_condition_marks_masked_pixels():
    image = torch.rand(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1, 2] = 1
    cond = inpaint_condition(image, mask)
    assert torch.all(cond[0, :, 1, 2] == -1.0)
    cond[0, :, 1, 2] = image[0, :, 1, 2]
    assert torch.equal(cond, image)


def test_inpaint_paste_restores_the_source_outside_the_mask(sd_pipe):
    """Latent base: the VAE round trip alters unmasked pixels; inpaint_paste puts the source back exactly."""
    init = condition_image(7)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    kw = dict(image=init, mask=Image.fromarray(mask), steps=2, output_type="np")
    conds = [condition_image(1), condition_image(2)]
    plain = sd_pipe("a cat", conds, **kw).array[0]
    pasted = sd_pipe("a cat", conds, inpaint_paste=True, **kw).array[0]
    target = np.asarray(init, dtype=np.float32) / 255
    keep = mask == 0
    assert np.abs(pasted[keep] - target[keep]).max() <= 1e-6
    assert np.abs(plain[keep] - target[keep]).mean() > 0.01
    assert np.abs(pasted[~keep] - plain[~keep]).max() <= 1e-6

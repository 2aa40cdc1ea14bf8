"""The ControlNet module: parity with diffusers both ways, the zero-init property, hint encoder layout."""

import pytest
import torch
from diffusers import ControlNetModel

from controlnet import ControlNet
from controlnet.model.controlnet import NUM_CONTROL_OUTPUTS_SD15
from controlnet.testing.tiny_models import controlled_unet_output, make_tiny_unet, randomize, tiny_inputs

EXPECTED_OUTPUTS = {"sd15": 1 + 3 + 2 + 1, "sd21": 1 + 3 + 2 + 1, "sdxl": 1 + 3 + 3 + 2 + 1}


def _diffusers_outputs(ref: ControlNetModel, inputs: dict, scale=1.0):
    down, mid = ref(
        inputs["sample"],
        inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        controlnet_cond=inputs["cond"],
        conditioning_scale=scale,
        added_cond_kwargs=inputs.get("added_cond_kwargs"),
        return_dict=False,
    )
    return list(down) + [mid]


def _our_outputs(net: ControlNet, inputs: dict, scale=1.0):
    out = net(**inputs, conditioning_scale=scale)
    return out.down + [out.mid]


@torch.no_grad()
def test_ours_loads_into_diffusers_and_matches(family):
    net = randomize(ControlNet.from_unet(make_tiny_unet(family)), seed=3)
    ref = ControlNetModel(**net.diffusers_config())
    ref.load_state_dict(net.state_dict(), strict=True)
    inputs = tiny_inputs(family)
    ours, theirs = _our_outputs(net, inputs), _diffusers_outputs(ref, inputs)
    assert len(ours) == EXPECTED_OUTPUTS[family] == net.num_control_outputs
    for a, b in zip(ours, theirs, strict=True):
        assert a.abs().max() > 0  # random zero convs: residuals are not trivially zero
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
def test_diffusers_loads_into_ours_and_matches(family):
    torch.manual_seed(4)
    net = ControlNet.from_unet(make_tiny_unet(family))
    ref = randomize(ControlNetModel(**net.diffusers_config()), seed=5)
    net.load_state_dict(ref.state_dict(), strict=True)
    inputs = tiny_inputs(family)
    for a, b in zip(_our_outputs(net, inputs, 0.7), _diffusers_outputs(ref, inputs, 0.7), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_from_unet_copies_encoder_weights_and_leaves_unet_alone():
    unet = make_tiny_unet("sd15")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    net = ControlNet.from_unet(unet)
    for name, value in net.state_dict().items():
        if name in before:
            assert torch.equal(value, before[name]), name
    assert any(k.startswith("up_blocks") for k in before)
    assert not any(k.startswith("up_blocks") for k in net.state_dict())  # only the encoder is copied
    with torch.no_grad():
        next(net.down_blocks.parameters()).add_(1.0)  # a deep copy: training the copy leaves the UNet locked
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


@torch.no_grad()
def test_fresh_controlnet_leaves_unet_output_bitwise_unchanged(family):
    """Paper Eq. 3: with zero convolutions at zero, y_c = y for any condition image."""
    unet = make_tiny_unet(family).eval()
    net = ControlNet.from_unet(unet)
    inputs = tiny_inputs(family)
    plain = controlled_unet_output(unet, inputs)
    for cond in (inputs["cond"], torch.ones_like(inputs["cond"]), torch.rand_like(inputs["cond"]) * 100):
        out = net(**{**inputs, "cond": cond})
        assert all(torch.count_nonzero(d) == 0 for d in out.down) and torch.count_nonzero(out.mid) == 0
        assert torch.equal(controlled_unet_output(unet, inputs, out), plain)


def test_gradients_reach_zero_convs_then_the_copy():
    """Paper Sec. 3.1: dL/dW of a zero conv is its non-zero input, so one step makes W != 0 and the
    gradient then flows into the trainable copy, and one step later through the hint encoder's zero conv."""
    unet = make_tiny_unet("sd15").requires_grad_(False)
    net = ControlNet.from_unet(unet)
    inputs = tiny_inputs("sd15")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    def step():
        optimizer.zero_grad()
        controlled_unet_output(unet, inputs, net(**inputs)).square().mean().backward()

    step()
    zero_conv_grads = [m.weight.grad for m in net.controlnet_down_blocks] + [net.controlnet_mid_block.weight.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in zero_conv_grads)
    copy_grad = next(net.down_blocks.parameters()).grad
    assert copy_grad is None or copy_grad.abs().sum() == 0  # blocked by the zero weights at step 0
    optimizer.step()
    step()
    assert next(net.down_blocks.parameters()).grad.abs().sum() > 0
    hint = net.controlnet_cond_embedding
    assert hint.conv_out.weight.grad.abs().sum() > 0  # the hint's own zero conv now learns ...
    assert hint.conv_in.weight.grad.abs().sum() == 0  # ... and still blocks the layers before it
    optimizer.step()
    step()
    assert hint.conv_in.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_precomputed_hint_equals_condition_image():
    net = randomize(ControlNet.from_unet(make_tiny_unet("sd15")))
    inputs = tiny_inputs("sd15")
    hint = net.embed_condition(inputs["cond"])
    a = net(**inputs)
    b = net(**{**inputs, "cond": None}, hint=hint)
    assert all(torch.equal(x, y) for x, y in zip(a.down + [a.mid], b.down + [b.mid], strict=True))


@torch.no_grad()
def test_per_block_scales_multiply_each_output():
    net = randomize(ControlNet.from_unet(make_tiny_unet("sd15")))
    inputs = tiny_inputs("sd15")
    scales = [0.1 * (i + 1) for i in range(net.num_control_outputs)]
    full, scaled = _our_outputs(net, inputs), _our_outputs(net, inputs, scales)
    for s, a, b in zip(scales, full, scaled, strict=True):
        torch.testing.assert_close(b, a * s)
    with pytest.raises(ValueError, match="per-block values"):
        net(**inputs, conditioning_scale=[1.0, 2.0])


def test_hint_encoder_reference_layout():
    """Eight 3x3 convs, channels 16,16,32,32,96,96,256 -> C, stride 2 at convs 3, 5 and 7, last conv zero."""
    net = ControlNet.from_unet(make_tiny_unet("sd15"))
    enc = net.controlnet_cond_embedding
    convs = [enc.conv_in, *enc.blocks, enc.conv_out]
    assert len(convs) == 8 and all(c.kernel_size == (3, 3) for c in convs)
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 96, 96, 256, 32]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert torch.count_nonzero(enc.conv_out.weight) == 0 and torch.count_nonzero(enc.conv_out.bias) == 0


@torch.no_grad()
def test_pixel_space_hint_encoder_keeps_resolution():
    net = ControlNet.from_unet(make_tiny_unet("sd15"), hint_downscale_factor=1)
    assert [c.stride[0] for c in net.controlnet_cond_embedding.blocks] == [1] * 6
    inputs = tiny_inputs("sd15", downscale=1)
    out = net(**inputs)
    assert out.down[0].shape[-2:] == inputs["sample"].shape[-2:]
    with pytest.raises(ValueError, match="8x the latent|1x the latent"):
        net(**tiny_inputs("sd15", downscale=8))
    with pytest.raises(ValueError, match="power of two"):
        ControlNet.from_unet(make_tiny_unet("sd15"), hint_downscale_factor=3)


def test_condition_must_be_one_of_image_or_hint():
    net = ControlNet.from_unet(make_tiny_unet("sd15"))
    inputs = tiny_inputs("sd15")
    with pytest.raises(ValueError, match="exactly one"):
        net(**{**inputs, "cond": None})
    with pytest.raises(ValueError, match=r"cond must be \(B, 3, H, W\)"):
        net(**{**inputs, "cond": inputs["cond"][:, :1]})


def test_sdxl_requires_added_condition():
    net = ControlNet.from_unet(make_tiny_unet("sdxl"))
    inputs = tiny_inputs("sdxl")
    inputs.pop("added_cond_kwargs")
    with pytest.raises(ValueError, match="text_embeds"):
        net(**inputs)


def test_meta_device_build_is_free():
    from controlnet.io.api import build_unet
    from controlnet.io.formats import builtin_unet_config

    unet = build_unet(builtin_unet_config("sd15"), device="meta")
    net = ControlNet.from_unet(unet)
    assert net.device.type == "meta"
    assert net.num_control_outputs == NUM_CONTROL_OUTPUTS_SD15
    assert sum(p.numel() for p in net.parameters()) == 361_279_120  # fixtures/cldm/README.md, keys_sd15.json

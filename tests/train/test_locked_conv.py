"""LockedConv2d: same values and gradients as nn.Conv2d, less memory kept for backward through the locked UNet."""

from __future__ import annotations

import copy

import pytest
import torch

from controlnet.model.controlled_unet import ControlledUNet
from controlnet.model.controlnet import ControlNet
from controlnet.testing.tiny_models import make_tiny_unet, randomize, tiny_inputs
from controlnet.train.locked_conv import LockedConv2d, lock_convolutions
from controlnet.train.model import decoder_parameters

pytestmark = pytest.mark.cpu_isa  # oneDNN picks its convolution algorithm by CPU, size, layout and threads


def controlled(family: str, lock: bool):
    unet = randomize(make_tiny_unet(family)).requires_grad_(False)
    net = randomize(ControlNet.from_unet(unet, cond_channels=3), seed=3)
    if lock:
        assert lock_convolutions(unet) > 0
    return ControlledUNet(net, unet)


def step(model: ControlledUNet, inputs: dict, channels_last: bool = False, autocast: bool = False):
    """Loss gradient of one step; returns (prediction, ControlNet gradients, bytes saved for backward, bytes of the
    decoder convolutions' inputs)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    saved: dict[int, int] = {}
    conv_inputs: dict[int, int] = {}

    def record(module, args):
        conv_inputs[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()

    decoder = [*model.unet.up_blocks.modules(), model.unet.conv_out]
    hooks = [m.register_forward_pre_hook(record) for m in decoder if isinstance(m, torch.nn.Conv2d)]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", enabled=autocast):
        pred = model(
            inputs["sample"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            inputs["cond"],
            inputs.get("added_cond_kwargs"),
        )
    for hook in hooks:
        hook.remove()
    pred.float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return pred.detach(), grads, sum(saved.values()), sum(conv_inputs.values())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("channels_last,autocast", [(False, False), (True, False), (False, True)])
def test_locked_convolutions_give_bitwise_equal_gradients_and_keep_less(family, channels_last, autocast):
    inputs = tiny_inputs(family)
    pred_ref, grads_ref, saved_ref, conv_inputs = step(
        controlled(family, lock=False), inputs, channels_last, autocast
    )
    pred, grads, saved, _ = step(controlled(family, lock=True), inputs, channels_last, autocast)
    assert torch.equal(pred, pred_ref)
    assert len(grads) == len(grads_ref) > 0
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref, strict=True))
    # the decoder convolutions' inputs are no longer kept, except those another op keeps too (a GroupNorm reading
    # the same concatenation, measured about a third here)
    assert saved_ref - saved >= 0.5 * conv_inputs > 0, (saved_ref, saved, conv_inputs)


def test_trainable_decoder_still_gets_weight_gradients():
    """sd_locked=False: the decoder's convolutions train, so they must behave as nn.Conv2d (weights' gradients)."""
    inputs = tiny_inputs("sd15")
    models = [controlled("sd15", lock=False), controlled("sd15", lock=True)]
    results = []
    for model in models:
        for p in decoder_parameters(model.unet):
            p.requires_grad_(True)
        results.append(step(model, inputs))
    (_, grads_ref, _, _), (_, grads, _, _) = results
    n_decoder = len(decoder_parameters(models[0].unet))
    assert len(grads) == len(grads_ref) > n_decoder
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref, strict=True))


def test_lock_convolutions_keeps_parameters_and_state_dict():
    unet = make_tiny_unet("sd15")
    before = copy.deepcopy(unet.state_dict())
    n_convs = sum(type(m) is torch.nn.Conv2d for m in unet.modules())
    assert lock_convolutions(unet) == n_convs > 0
    assert all(type(m) is not torch.nn.Conv2d for m in unet.modules())
    assert isinstance(unet.conv_in, LockedConv2d)
    after = unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_locked_convolutions_under_gradient_checkpointing():
    """model.gradient_checkpointing: the blocks' forward runs again in backward; the locked convolutions' gradients
    must still equal plain convolutions without checkpointing."""
    inputs = tiny_inputs("sd15")
    _, grads_ref, _, _ = step(controlled("sd15", lock=False), inputs)
    model = controlled("sd15", lock=True)
    model.unet.enable_gradient_checkpointing()
    model.controlnet.enable_gradient_checkpointing()
    model.train()
    recomputed = []
    resnet = model.unet.up_blocks[0].resnets[0]
    hook = resnet.register_forward_pre_hook(lambda *_: recomputed.append(True))  # (a recomputation stops early)
    _, grads, _, _ = step(model, inputs)
    hook.remove()
    assert len(recomputed) == 2  # a decoder resnet ran in forward and again in backward
    assert len(grads) == len(grads_ref)
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-7)


# SD1.5-sized decoder layers (channels, latent size, kernel, stride): a 1x1 shortcut from a concatenation, a 3x3
# conv, and a strided 3x3 (oneDNN chooses its algorithm by size, layout and threads, so the tiny UNets above do not
# reach every path)
SD_LAYERS = [(960, 320, 32, 1, 1), (1920, 640, 16, 1, 1), (640, 320, 32, 3, 1), (320, 320, 32, 3, 2)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c_in,c_out,size,kernel,stride", SD_LAYERS)
def test_input_gradient_is_bitwise_at_sd15_layer_sizes(c_in, c_out, size, kernel, stride, dtype, threads):
    """The input gradient of one locked layer equals nn.Conv2d's, computed by autograd from the real input, with the
    same strides (a matmul over channels for the 1x1 layers differed in the last bits in bfloat16 here)."""
    generator = torch.Generator().manual_seed(0)
    plain = torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2).requires_grad_(False)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    plain = plain.to(dtype=dtype, memory_format=torch.channels_last)
    locked = copy.deepcopy(plain)
    locked.__class__ = LockedConv2d
    x = torch.randn(1, c_in, size, size, generator=generator).to(dtype=dtype, memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for conv in (plain, locked):
            leaf = x.clone().requires_grad_(True)
            y = conv(leaf)
            grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype=dtype)
            y.backward(grad_out.contiguous(memory_format=torch.channels_last))
            results.append((y.detach(), leaf.grad))
    finally:
        torch.set_num_threads(previous)
    (y_ref, g_ref), (y, g) = results
    assert torch.equal(y, y_ref)
    assert g.shape == g_ref.shape and g.stride() == g_ref.stride()
    assert torch.equal(g, g_ref)

"""Transformer ControlNets (SD3, Flux): the zero-init identity, parity with diffusers' classes, the block mapping,
state-dict round trips both ways, the trainable copy, clear errors. Tiny random models, CPU, seeded."""

import json

import pytest
import torch
from diffusers import FluxControlNetModel, SD3ControlNetModel

from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet, control_index, per_base_block
from controlnet.testing.tiny_models import randomize
from controlnet.testing.tiny_transformers import (
    base_inputs,
    flux_inputs,
    make_flux_transformer,
    make_sd3_transformer,
    sd3_inputs,
)

FAMILIES = {
    # family: (our class, diffusers' class, base maker, inputs maker, from_transformer kwargs with fewer blocks)
    "sd3": (SD3ControlNet, SD3ControlNetModel, make_sd3_transformer, sd3_inputs, dict(num_layers=3)),
    "flux": (
        FluxControlNet,
        FluxControlNetModel,
        make_flux_transformer,
        flux_inputs,
        dict(num_layers=3, num_single_layers=3),
    ),
}
ZERO_LAYERS = ("controlnet_blocks.", "controlnet_single_blocks.", "pos_embed_input.", "controlnet_x_embedder.")


def _build(family: str, **kwargs):
    ours, _, make_base, make_inputs, fewer = FAMILIES[family]
    base = make_base()
    return base, ours.from_transformer(base, **(kwargs or fewer)), make_inputs()


def _samples(out) -> list[torch.Tensor]:
    """Every residual of a ControlNet output, double then single blocks."""
    single = getattr(out, "controlnet_single_block_samples", None) or []
    return [*out.controlnet_block_samples, *single]


def _perturb_zero_layers(net: torch.nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(ZERO_LAYERS):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_zero_init_controlled_transformer_is_exactly_the_base(family):
    base, net, inputs = _build(family)
    assert inputs["controlnet_cond"].abs().max() > 0  # a real (random) condition
    out = net(**inputs)
    controlled = base(**base_inputs(inputs), **net.residual_kwargs(out)).sample
    plain = base(**base_inputs(inputs)).sample
    assert all(torch.equal(r, torch.zeros_like(r)) for r in _samples(out))  # Z(.; Theta_z2) = 0 (Eq. 3)
    assert torch.equal(controlled, plain)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_perturbed_zero_layers_change_the_output(family):
    base, net, inputs = _build(family)
    _perturb_zero_layers(net)
    controlled = base(**base_inputs(inputs), **net.residual_kwargs(net(**inputs))).sample
    plain = base(**base_inputs(inputs)).sample
    assert (controlled - plain).abs().max() > 1e-3
    # ... and the condition matters: another condition, other residuals
    other = net(**{**inputs, "controlnet_cond": inputs["controlnet_cond"].flip(0)})
    assert not torch.equal(_samples(other)[0], _samples(net(**inputs))[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_from_transformer_equals_diffusers_from_transformer_tensor_for_tensor(family):
    ours, theirs, make_base, _, fewer = FAMILIES[family]
    base = make_base()
    config_before = dict(base.config)
    net = ours.from_transformer(base, **fewer)
    if family == "sd3":
        ref = theirs.from_transformer(make_base(), num_extra_conditioning_channels=0, **fewer)
    else:  # diffusers' Flux constructor takes the heads from its own defaults (24 x 128) unless told the base's
        c = base.config
        ref = theirs.from_transformer(
            make_base(),
            attention_head_dim=c.attention_head_dim,
            num_attention_heads=c.num_attention_heads,
            **fewer,
        )
    assert dict(base.config) == config_before
    if family == "sd3":  # ours: the copy reads the base's pooled text; diffusers' keeps InstantX's zeros
        assert not net.config.force_zeros_for_pooled_projection and ref.config.force_zeros_for_pooled_projection
    ours_sd, ref_sd = net.state_dict(), ref.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    for key in ours_sd:
        assert torch.equal(ours_sd[key], ref_sd[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_from_transformer_is_a_trainable_copy_and_leaves_the_base_alone(family):
    base = FAMILIES[family][2]().requires_grad_(False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = FAMILIES[family][0].from_transformer(base, **FAMILIES[family][4])
    base_sd = base.state_dict()
    copied = 0
    for name, value in net.state_dict().items():
        if name.startswith(ZERO_LAYERS):
            assert not value.any(), name
        elif name in base_sd:
            assert torch.equal(value, base_sd[name]), name
            assert value.data_ptr() != base_sd[name].data_ptr(), name  # a copy, not shared storage
            copied += 1
        else:
            raise AssertionError(f"{name}: neither copied nor zero-initialised")
    assert copied > 20
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_from_transformer_keeps_the_base_dtype_and_device(family):
    """A bf16 base gives a bf16 copy (no float32 detour), equal to the base's blocks; a meta base a meta net."""
    ours, _, make_base, _, fewer = FAMILIES[family]
    base = make_base().to(torch.bfloat16)
    net = ours.from_transformer(base, **fewer)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert torch.equal(
        net.transformer_blocks[0].norm1.linear.weight, base.transformer_blocks[0].norm1.linear.weight
    )
    with torch.device("meta"):
        meta_base = type(base)(**base.config)
    meta_net = ours.from_transformer(meta_base, **fewer)
    assert {p.device.type for p in meta_net.parameters()} == {"meta"}
    assert sum(p.numel() for p in meta_net.parameters()) == sum(p.numel() for p in net.parameters())


def test_fresh_parts_are_initialised_and_the_hint_zero_layer_is_zero():
    """XLabs' hint encoder and x embedder and a union net's mode embedding: torch's default init (materialised
    from the meta device, so never left as uninitialised memory); the hint encoder's last conv is zero."""
    net = FluxControlNet.from_transformer(make_flux_transformer(), num_layers=1, pixel_hint=True, num_mode=3)
    for module in (net.input_hint_block.conv_in, net.controlnet_x_embedder, net.controlnet_mode_embedder):
        assert module.weight.isfinite().all() and module.weight.std() > 0.01
        assert module.weight.abs().max() < 10
    assert not net.input_hint_block.conv_out.weight.any() and not net.input_hint_block.conv_out.bias.any()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_same_weights_same_residuals_as_diffusers(family):
    """Ours -> diffusers' class and diffusers' -> ours (strict), then the residuals and the controlled base: exact."""
    base, net, inputs = _build(family)
    _perturb_zero_layers(net)
    ref = FAMILIES[family][1].from_config(net.config)
    ref.load_state_dict(net.state_dict(), strict=True)
    ours_out, ref_out = net(**inputs), ref(**inputs)
    for a, b in zip(_samples(ours_out), _samples(ref_out), strict=True):
        assert a.abs().max() > 0
        assert torch.equal(a, b)

    randomize(ref, seed=11)
    net.load_state_dict(ref.state_dict(), strict=True)
    for a, b in zip(_samples(net(**inputs)), _samples(ref(**inputs)), strict=True):
        assert torch.equal(a, b)


def test_control_index_rules():
    # 4 base blocks, 3 ControlNet blocks: SD3's float interval, Flux's ceil interval, XLabs' repeat
    assert [control_index(k, 4, 3, "sd3-interval") for k in range(4)] == [0, 0, 1, 2]
    assert [control_index(k, 4, 3, "flux-interval") for k in range(4)] == [0, 0, 1, 1]
    assert [control_index(k, 4, 3, "repeat") for k in range(4)] == [0, 1, 2, 0]
    # published shapes: InstantX SD3 6 of 24 -> 4 blocks each; x-flux 2 of 19 by repeat; Union 5 of 19 -> ceil 4
    assert [control_index(k, 24, 6, "sd3-interval") for k in (0, 3, 4, 23)] == [0, 0, 1, 5]
    assert [control_index(k, 19, 2, "repeat") for k in (0, 1, 18)] == [0, 1, 0]
    assert [control_index(k, 19, 5, "flux-interval") for k in (3, 4, 18)] == [0, 1, 4]
    with pytest.raises(ValueError, match="rule"):
        control_index(0, 4, 3, "nearest")


@pytest.mark.parametrize(
    ("family", "base_blocks", "ctrl_blocks", "mapping", "sources"),
    [
        # 6 base blocks, 4 copied: SD3's float interval k / 1.5 (Flux's ceil rule would give 0, 0, 1, 1, 2, 2)
        ("sd3", dict(num_layers=6), dict(num_layers=4), None, [0, 0, 1, 2, 2, 3]),
        # 4 base blocks, 3 copied: Flux's ceil interval k // 2 (SD3's rule would give 0, 0, 1, 2)
        ("flux", {}, dict(num_layers=3, num_single_layers=3), "interval", [0, 0, 1, 1]),
        ("flux", {}, dict(num_layers=3, num_single_layers=3), "repeat", [0, 1, 2, 0]),
    ],
    ids=["sd3", "flux", "flux-repeat"],
)
@torch.no_grad()
def test_block_mapping_matches_diffusers_base(family, base_blocks, ctrl_blocks, mapping, sources):
    """The base fed fewer residuals than it has blocks (diffusers maps them) equals the base fed our expansion to one
    residual per block; the expansion takes the outputs the published rule names."""
    ours_cls, _, make_base, make_inputs, _ = FAMILIES[family]
    base = make_base(**base_blocks)
    net = ours_cls.from_transformer(base, **ctrl_blocks)
    inputs = make_inputs()
    _perturb_zero_layers(net)
    out = net(**inputs)
    if family == "sd3":
        n_base = len(base.transformer_blocks)
        theirs = net.residual_kwargs(out)
        ours = net.residual_kwargs(out, base_blocks=n_base)
        expanded = ours["block_controlnet_hidden_states"]
        assert [net.control_index(k, n_base) for k in range(n_base)] == sources
    else:
        blocks = (len(base.transformer_blocks), len(base.single_transformer_blocks))
        theirs = net.residual_kwargs(out, mapping=mapping)
        ours = net.residual_kwargs(out, base_blocks=blocks, mapping=mapping)
        expanded = ours["controlnet_block_samples"]
        assert len(ours["controlnet_single_block_samples"]) == blocks[1]
    samples = out.controlnet_block_samples
    assert [next(i for i, s in enumerate(samples) if s is e) for e in expanded] == sources
    plain = base(**base_inputs(inputs)).sample
    mapped_by_diffusers = base(**base_inputs(inputs), **theirs).sample
    mapped_by_us = base(**base_inputs(inputs), **ours).sample
    assert (mapped_by_diffusers - plain).abs().max() > 1e-3
    assert torch.equal(mapped_by_us, mapped_by_diffusers)


@torch.no_grad()
def test_expanded_residuals_of_nets_of_different_depths_add():
    """Two SD3 nets with 1 and 3 blocks compose per base block (diffusers' multi-net zips them: it would stop at 1)."""
    base = make_sd3_transformer()
    inputs = sd3_inputs()
    nets = [SD3ControlNet.from_transformer(base, num_layers=n) for n in (1, 3)]
    for i, net in enumerate(nets):
        _perturb_zero_layers(net, seed=20 + i)
    n_base = len(base.transformer_blocks)
    kwargs = [net.residual_kwargs(net(**inputs), base_blocks=n_base) for net in nets]
    summed = [a + b for a, b in zip(*(k["block_controlnet_hidden_states"] for k in kwargs), strict=True)]
    both = base(**base_inputs(inputs), block_controlnet_hidden_states=summed).sample
    assert not torch.equal(both, base(**base_inputs(inputs), **kwargs[1]).sample)
    assert per_base_block(None, n_base, "sd3-interval") is None


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("sd3", dict(num_layers=2)),
        ("sd3", dict(num_layers=2, extra_conditioning_channels=1)),  # inpainting: + a mask channel
        ("flux", dict(num_layers=2, num_single_layers=1)),
        ("flux", dict(num_layers=2, pixel_hint=True)),  # XLabs: input_hint_block, repeat mapping
        ("flux", dict(num_layers=1, num_mode=3)),  # union: controlnet_mode_embedder
    ],
    ids=["sd3", "sd3-mask", "flux", "flux-xlabs", "flux-union"],
)
def test_state_dicts_round_trip_with_diffusers_classes(family, config, tmp_path):
    ours, theirs = FAMILIES[family][:2]
    net = ours.from_transformer(FAMILIES[family][2](), **config)
    ref = randomize(theirs.from_config(net.config), seed=5)
    net.load_state_dict(ref.state_dict(), strict=True)
    back = theirs.from_config(net.config)
    back.load_state_dict(net.state_dict(), strict=True)
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    assert ref_sd.keys() == back_sd.keys() == net.state_dict().keys()
    assert all(torch.equal(ref_sd[k], back_sd[k]) for k in ref_sd)
    # a folder we save is diffusers' own: its class name, loadable by diffusers' class
    net.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == theirs.__name__
    loaded = theirs.from_pretrained(tmp_path)
    assert all(torch.equal(v, ref_sd[k]) for k, v in loaded.state_dict().items())


def test_flux_pixel_hint_net_takes_an_image_and_maps_by_repeat():
    base = make_flux_transformer()
    net = FluxControlNet.from_transformer(base, num_layers=2, pixel_hint=True)
    assert net.blocks_repeat and net.residual_kwargs(None) == {}
    inputs = flux_inputs()
    image = torch.rand(2, 3, 64, 64)  # 4x4 tokens = 64 px / (8x hint encoder * 2x2 packing)
    with torch.no_grad():
        out = net(**{**inputs, "controlnet_cond": image})
    assert out.controlnet_block_samples[0].shape == (2, 16, net.inner_dim)
    assert net.residual_kwargs(out)["controlnet_blocks_repeat"] is True


def test_bad_inputs_are_clear_errors():
    sd3, flux = make_sd3_transformer(), make_flux_transformer()
    with pytest.raises(ValueError, match="SD3Transformer2DModel, got FluxTransformer2DModel"):
        SD3ControlNet.from_transformer(flux, num_layers=1)
    with pytest.raises(ValueError, match=r"num_layers must be an integer in 1\.\.3 .*got 4"):
        SD3ControlNet.from_transformer(sd3, num_layers=4)  # the last block is context_pre_only
    with pytest.raises(ValueError, match=r"num_single_layers must be an integer in 0\.\.4 .*got 5"):
        FluxControlNet.from_transformer(flux, num_layers=1, num_single_layers=5)
    with pytest.raises(ValueError, match="mapping"):
        FluxControlNet.from_transformer(flux, num_layers=1).residual_kwargs(object(), mapping="nearest")
    net = SD3ControlNet.from_transformer(sd3, num_layers=1)
    inputs = sd3_inputs()
    with pytest.raises(ValueError, match=r"controlnet_cond must be \(B or 1, 8, h, w\)"):
        net(**{**inputs, "controlnet_cond": inputs["controlnet_cond"][:, :, :4]})
    flux_net = FluxControlNet.from_transformer(flux, num_layers=1)
    inputs = flux_inputs()
    with pytest.raises(ValueError, match="packed latents shaped like hidden_states"):
        flux_net(**{**inputs, "controlnet_cond": inputs["controlnet_cond"][:, :8]})

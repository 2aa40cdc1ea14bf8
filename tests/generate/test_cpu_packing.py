"""Pre-packed oneDNN weights (generate/cpu_packing.py): same outputs as the plain layers up to float rounding, layers
restored afterwards, autograd and changed weights handled, and the pipeline's images unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from controlnet.generate import cpu_packing
from controlnet.generate.cpu_packing import packed_weights

pytestmark = pytest.mark.skipif(not cpu_packing.available(), reason="this torch build has no oneDNN")


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    scale = float(b.abs().max())
    assert scale > 0
    bound = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: 8 mantissa bits, another summation order
    assert float((a - b).abs().max()) <= bound * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=128, out_channels=160, kernel_size=3, padding=1),
        dict(in_channels=128, out_channels=128, kernel_size=3, stride=2, padding=1),  # SD's downsampler
        dict(in_channels=512, out_channels=256, kernel_size=1),  # skip projection
        dict(in_channels=256, out_channels=256, kernel_size=3, padding=1, groups=2, bias=False),
    ],
)
def test_convolutions_match_the_plain_layer(conv, dtype):
    torch.manual_seed(0)
    layer = nn.Conv2d(**conv).to(dtype)
    x = torch.randn(2, conv["in_channels"], 9, 12, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
        with packed_weights(layer) as n:
            got = layer(x)
            again = layer(x[:1])  # another input shape: packed again for it
    assert n == 1
    _close(got, expected, dtype)
    _close(again, expected[:1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 320), (2, 77, 320), (2, 3, 5, 320)])
def test_linear_layers_match_the_plain_layer(shape, dtype):
    torch.manual_seed(1)
    layer = nn.Linear(320, 640).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
        with packed_weights(layer) as n:
            got = layer(x)
    assert n == 1 and got.shape == expected.shape
    _close(got, expected, dtype)


def test_layers_are_restored_and_nothing_else_changes():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.SiLU(), nn.Conv2d(128, 128, 3, padding=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), packed_weights(model, model) as n:
        assert n == 2  # a module reached twice is switched once
        model(torch.randn(1, 128, 8, 8))
        raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # the packed copies stay for the next block (making them costs more than a step), until released
    assert cpu_packing.packed_bytes(model) == 0
    assert cpu_packing.release_packed(model) == 2 and cpu_packing.release_packed(model) == 0
    assert cpu_packing.packed_bytes(model) == 2 * 128 * 128 * 9 * 4


def test_small_layers_and_other_kinds_keep_their_own_forward():
    small = nn.Conv2d(8, 8, 3, padding=1)  # below MIN_CONV_WEIGHTS: oneDNN's per-call overhead would dominate
    same = nn.Conv2d(128, 128, 3, padding="same")
    reflect = nn.Conv2d(128, 128, 3, padding=1, padding_mode="reflect")

    class Custom(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with packed_weights(small, same, reflect, Custom(128, 128, 3)) as n:
        assert n == 0
    with packed_weights(nn.Conv2d(128, 128, 3), enabled=False) as n:
        assert n == 0


def test_a_weight_changed_inside_the_block_is_packed_again():
    torch.manual_seed(3)
    layer = nn.Conv2d(128, 128, 3, padding=1)
    x = torch.randn(1, 128, 8, 8)
    with torch.no_grad(), packed_weights(layer):
        first = layer(x)
        layer.weight.mul_(-1)  # in place: the version counter moves
        flipped = layer(x)
        layer.weight = nn.Parameter(torch.zeros_like(layer.weight))  # replaced: another storage
        zeros = layer(x)
    bias = layer.bias.detach().view(1, -1, 1, 1)
    _close(flipped - bias, -(first - bias), torch.float32)
    assert torch.allclose(zeros, bias.expand_as(zeros))


def test_autograd_runs_the_plain_path_inside_the_block():
    torch.manual_seed(4)
    layer = nn.Conv2d(128, 128, 3, padding=1)
    x = torch.randn(1, 128, 6, 6, requires_grad=True)
    with packed_weights(layer):
        layer(x).square().sum().backward()
    grad_packed_block = layer.weight.grad.clone()
    layer.weight.grad = None
    layer(x).square().sum().backward()
    assert torch.equal(grad_packed_block, layer.weight.grad)  # the same (plain) computation both times


def test_the_packed_copies_are_counted_against_free_memory():
    big = nn.Sequential(nn.Conv2d(256, 256, 3), nn.Linear(512, 512), nn.Conv2d(4, 4, 3))  # the last stays plain
    expected = (256 * 256 * 9 + 512 * 512) * 4
    assert cpu_packing.packed_bytes(big, None, big) == expected
    free = cpu_packing.available_memory()
    assert free is None or free > 0
    assert cpu_packing.packing_fits(big)  # a few MB fit on any machine that runs the tests
    assert not cpu_packing.packing_fits(big, headroom=float(2**50))

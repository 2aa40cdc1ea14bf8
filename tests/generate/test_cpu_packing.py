"""Pre-packed oneDNN weights (generate/cpu_packing.py): same outputs as the plain layers up to float rounding, layers
restored afterwards, autograd and changed weights handled, and the pipeline's images unchanged. Packing a dtype is
asked of oneDNN once: where this CPU cannot pack it (bfloat16 without AVX-512), the layers run their plain forward.
These tests run again with AVX2 kernels only (the `cpu_isa` pass of the README's test command)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from controlnet.generate import cpu_packing
from controlnet.generate.cpu_packing import packed_weights

pytestmark = [
    pytest.mark.cpu_isa,
    pytest.mark.skipif(not cpu_packing.available(), reason="this torch build has no oneDNN"),
]
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # a CPU without AVX-512, on any x86 CPU


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    scale = float(b.abs().max())
    assert scale > 0
    bound = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: 8 mantissa bits, another summation order
    assert float((a - b).abs().max()) <= bound * scale


def _check_outcome(layer: nn.Module, n: int, dtype: torch.dtype, got: list, expected: list) -> None:
    """Where this CPU packs `dtype`: the layer was switched, holds a pack, and agrees up to rounding; elsewhere it
    ran its plain forward: not switched, no pack, bitwise the plain outputs."""
    if cpu_packing.can_pack(dtype):
        assert n == 1 and cpu_packing.holds_packs(layer)
        for a, b in zip(got, expected, strict=True):
            _close(a, b, dtype)
    else:
        assert n == 0 and not cpu_packing.holds_packs(layer)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


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
    _check_outcome(layer, n, dtype, [got, again], [expected, expected[:1]])


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
    assert got.shape == expected.shape
    _check_outcome(layer, n, dtype, [got], [expected])


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


def test_the_probe_agrees_with_packing_an_sd_sized_layer():
    """can_pack is asked once per dtype, and says what packing a 320-channel SD1.5 convolution does on this CPU."""
    assert cpu_packing.can_pack(torch.float32)
    assert not cpu_packing.can_pack(torch.float16)  # no pre-packed fp16 path here: plain forward
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(320, 320, 3, 3).to(dtype)
        try:
            torch.ops.mkldnn._reorder_convolution_weight(weight, [1, 1], [1, 1], [1, 1], 1, [2, 320, 8, 8])
            packs = True
        except RuntimeError as error:  # "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
            assert "needs the cpu support" in str(error)
            packs = False
        assert cpu_packing.can_pack(dtype) == packs
    hits = cpu_packing.can_pack.cache_info().hits
    cpu_packing.can_pack(torch.bfloat16)
    assert cpu_packing.can_pack.cache_info().hits == hits + 1  # cached: oneDNN is not asked again


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_sd_sized_block_runs_in_every_dtype(dtype):
    """A 320-channel conv and a 320 -> 1280 linear layer (SD1.5's first level) inside the block: packed where this
    CPU can pack the dtype, plain otherwise; never an error."""
    torch.manual_seed(5)
    conv, linear = nn.Conv2d(320, 320, 3, padding=1).to(dtype), nn.Linear(320, 1280).to(dtype)
    x, tokens = (
        torch.randn(2, 320, 4, 4, dtype=dtype),
        torch.randn(2, 16, 320, dtype=dtype),
    )  # (B, C, H, W), (B, L, C)
    with torch.no_grad():
        expected = [conv(x), linear(tokens)]
        with packed_weights(conv, linear) as n:
            got = [conv(x), linear(tokens)]
    assert n == (2 if cpu_packing.can_pack(dtype) else 0)
    assert cpu_packing.holds_packs(conv) == cpu_packing.holds_packs(linear) == cpu_packing.can_pack(dtype)
    for a, b in zip(got, expected, strict=True):
        if cpu_packing.can_pack(dtype):
            _close(a, b, dtype)
        else:
            assert torch.equal(a, b)


def test_bfloat16_with_avx2_kernels_only_runs_plain_or_packed():
    """The same block in a process limited to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA): on a CPU with AVX-512
    this is the CPU without it; the probe decides in that process, and the outputs match the plain layers."""
    script = textwrap.dedent(
        """
        import torch
        from torch import nn
        from controlnet.generate import cpu_packing

        torch.manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            conv, linear = nn.Conv2d(320, 320, 3, padding=1).to(dtype), nn.Linear(320, 1280).to(dtype)
            x, tokens = torch.randn(2, 320, 4, 4, dtype=dtype), torch.randn(2, 16, 320, dtype=dtype)
            with torch.no_grad():
                expected = [conv(x), linear(tokens)]
                with cpu_packing.packed_weights(conv, linear) as n:
                    got = [conv(x), linear(tokens)]
            can = cpu_packing.can_pack(dtype)
            assert n == (2 if can else 0) and cpu_packing.holds_packs(conv) == can
            for a, b in zip(got, expected):
                error = float((a.float() - b.float()).abs().max()) / float(b.float().abs().max())
                assert (error <= (1e-5 if dtype == torch.float32 else 2e-2)) if can else torch.equal(a, b)
            print(str(dtype), can)
        """
    )
    env = {**os.environ, **AVX2_ONLY}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = dict(line.split() for line in done.stdout.splitlines())
    assert answers["torch.float32"] == "True" and answers["torch.bfloat16"] in ("True", "False")

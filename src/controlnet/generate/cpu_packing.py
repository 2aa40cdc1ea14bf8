"""Pre-packed oneDNN weights for CPU inference: the same convolutions and linear layers, without a weight reorder
per call.

On a CPU, `nn.Conv2d` in plain (NCHW, OIHW) tensors reaches oneDNN, which first reorders the weight into its
blocked layout and then convolves, on every call. At SD1.5 size in a denoising loop that reorder is much of the
work: a 1280-channel 3x3 convolution holds 59 MB of weights but sees only an 8x8 (or 4x4) latent, so moving the
weight costs more than the arithmetic (measured on 2 cores, batch 2: 96 ms plain vs 46 ms pre-packed at 8x8,
70 vs 14 ms at 4x4). `packed_weights(*modules)` reorders each weight once and, inside a block (the denoising
loop), runs the layers through oneDNN's pre-packed kernels (the ops torch.compile's CPU backend
uses when it freezes weights). The arithmetic is the same up to float rounding (another summation order: a
UNet output differs by ~1e-5 from the plain path on activations of std ~0.6).

The packed copies stay on their layers after the block (one extra copy of the conv and linear weights, 3.4 GB
for an SD1.5 UNet in float32; `packing_fits` tells whether that fits in free memory, `release_packed` frees
them): making them takes longer than a denoising step (fresh pages: 5.8 s for the UNet's 2.35 GB of conv weights
on 2 cores, where one plain SD1.5 step at 256 px takes ~3.5 s), so they are made once per weights, not once per
generation. A weight changed in place or replaced is re-packed (version counter + storage), and anything outside
the fast path's preconditions runs the layer's own forward: autograd, other devices, dtypes other than
float32/bfloat16, `padding="same"`, non-zero padding modes, subclasses with their own forward.

Not every CPU can pack every dtype: torch refuses to pack bfloat16 weights without AVX-512 (BW, VL, DQ) or
AVX-NE-CONVERT ("mkldnn_reorder_conv2d_weight: bf16 path needs the cpu support ..." on an AVX2-only AMD EPYC).
`can_pack(dtype)` asks oneDNN once per dtype and process, by packing and running a tiny convolution and linear
layer; where it cannot, layers of that dtype keep their plain forward (slow on such a CPU, and said so once by
controlnet/precision.py, but running).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator

import torch
from torch import nn

PACKED_DTYPES = (torch.float32, torch.bfloat16)
# Smaller layers stay on their plain path: there the reorder is cheap and oneDNN's per-call overhead (~15 us) is
# not; measured on 1 core, batch 2 (benchmarks/generation.py --model tiny shows the whole-model effect): a 64-ch
# 3x3 conv ran 0.94-1.15x, a 128x128 linear 0.73-0.99x, a 256-ch conv 1.14x, a 320x320 linear 1.04-1.12x.
MIN_CONV_WEIGHTS = 2**17  # elements: a 3x3 conv from 128 channels up
MIN_LINEAR_WEIGHTS = 2**16  # a 256x256 linear layer


def available() -> bool:
    """oneDNN with the pre-packed ops (every CPU build of torch >= 2.1 has them)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


@functools.cache
def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and runs `dtype` weights on this CPU, asked once per dtype: a tiny convolution and linear
    layer are packed and run, and must give the plain layers' values (sums of ones, exact in any order); torch
    raises RuntimeError where the CPU lacks the instructions."""
    if dtype not in PACKED_DTYPES or not available():
        return False
    geometry = ([1, 1], [1, 1], [1, 1], 1)  # padding, stride, dilation, groups
    weight, x = torch.ones(8, 8, 3, 3, dtype=dtype), torch.ones(1, 8, 4, 4, dtype=dtype)  # x: (B, C, H, W)
    matrix, rows = torch.ones(8, 8, dtype=dtype), torch.ones(2, 8, dtype=dtype)  # rows: (N, in_features)
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, list(x.shape))
            conv = torch.ops.mkldnn._convolution_pointwise(x, packed, None, *geometry, "none", [], "")
            packed = torch.ops.mkldnn._reorder_linear_weight(matrix, rows.shape[0])
            linear = torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
    except RuntimeError:
        return False
    with torch.no_grad():
        expected_conv = nn.functional.conv2d(x, weight, padding=1)
        expected_linear = nn.functional.linear(rows, matrix)
    return torch.equal(conv, expected_conv) and torch.equal(linear, expected_linear)


def compiled(module: nn.Module) -> bool:
    """True for a `torch.compile`d module (its graph is traced: packing belongs to the compiler then)."""
    return hasattr(module, "_orig_mod")  # torch._dynamo's OptimizedModule, without importing dynamo


class _Packed:
    """The packed weight of one layer, valid for one (weight storage, weight version, input shape)."""

    __slots__ = ("key", "weight")

    def __init__(self):
        self.key = None
        self.weight = None


def _usable(module: nn.Module, x: torch.Tensor) -> bool:
    w = module.weight
    if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype or not can_pack(w.dtype):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False  # the pre-packed ops have no backward
    return not (x.is_mkldnn or w.is_mkldnn)


def _key(module: nn.Module, x: torch.Tensor):
    w = module.weight
    try:
        version = w._version
    except RuntimeError:  # an inference tensor has no version counter: pack per call (still correct)
        version = None
    return (w.data_ptr(), version, tuple(x.shape)) if version is not None else None


PACKED = "_controlnet_packed"  # the attribute holding a layer's packed weight (not a buffer: not in state dicts)


def _packed_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d.forward through a pre-packed weight. x: (B, C_in, H, W) -> (B, C_out, H', W')."""
    if x.dim() != 4 or not _usable(self, x):
        return type(self).forward(self, x)
    geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
    key, cache = _key(self, x), self._controlnet_packed
    if key is None or cache.key != key:
        cache.weight = torch.ops.mkldnn._reorder_convolution_weight(self.weight, *geometry, list(x.shape))
        cache.key = key
    return torch.ops.mkldnn._convolution_pointwise(x, cache.weight, self.bias, *geometry, "none", [], "")


def _packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward through a pre-packed weight. x: (..., in_features) -> (..., out_features)."""
    if x.dim() < 2 or not _usable(self, x):
        return type(self).forward(self, x)
    key, cache = _key(self, x), self._controlnet_packed
    if key is None or cache.key != key:
        rows = x.numel() // x.shape[-1]  # oneDNN picks the packed layout for this many rows
        cache.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
        cache.key = key
    return torch.ops.mkldnn._linear_pointwise(x, cache.weight, self.bias, "none", [], "")


def _packable(module: nn.Module) -> types.FunctionType | None:
    """The packed forward for `module`, or None (only plain layers: a subclass may compute something else; only
    dtypes this CPU can pack)."""
    if type(module).forward is nn.Conv2d.forward and isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return None
        forward, minimum = _packed_conv_forward, MIN_CONV_WEIGHTS
    elif type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
        forward, minimum = _packed_linear_forward, MIN_LINEAR_WEIGHTS
    else:
        return None
    return forward if module.weight.numel() >= minimum and can_pack(module.weight.dtype) else None


def packed_bytes(*modules: nn.Module | None) -> int:
    """Bytes that packing `modules`' layers would add (as many as their weights: the same values, reordered);
    layers already holding a packed copy of their current weight count nothing."""
    layers = {id(m): m for root in modules if root is not None for m in root.modules() if _packable(m)}
    return sum(m.weight.numel() * m.weight.element_size() for m in layers.values() if not _holds_pack(m))


def holds_packs(*modules: nn.Module | None) -> bool:
    """Whether some layer of `modules` holds a packed copy of its current weight (kept from an earlier block)."""
    return any(_holds_pack(m) for root in modules if root is not None for m in root.modules())


def _holds_pack(layer: nn.Module) -> bool:
    cache = vars(layer).get(PACKED)
    return isinstance(cache, _Packed) and cache.key is not None and cache.key[0] == layer.weight.data_ptr()


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def packing_fits(*modules: nn.Module | None, headroom: float = 1.25) -> bool:
    """Whether the packed copies fit in free memory with room to spare (SDXL in float32 would need ~14 GB more)."""
    free = available_memory()
    return free is None or packed_bytes(*modules) * headroom + 2**30 <= free


@contextlib.contextmanager
def packed_weights(*modules: nn.Module | None, enabled: bool = True) -> Iterator[int]:
    """Run the Conv2d / Linear layers of `modules` through pre-packed oneDNN weights inside the block.

    Yields the number of layers switched (0 when disabled or oneDNN is missing). Each layer's own `forward` is
    restored on exit, also after an exception; the packed copies are kept for the next block (`release_packed`).
    State dicts, parameters and autograd are never touched.
    """
    patched: list[nn.Module] = []
    if enabled and available():
        for root in modules:
            if root is None:
                continue
            for layer in root.modules():
                forward = _packable(layer)
                if forward is None or "forward" in vars(layer):  # already patched (a module shared by two roots)
                    continue
                if not isinstance(getattr(layer, PACKED, None), _Packed):
                    setattr(layer, PACKED, _Packed())  # kept after the block: see the module docstring
                layer.forward = types.MethodType(forward, layer)
                patched.append(layer)
    try:
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward


def release_packed(*modules: nn.Module | None) -> int:
    """Free the packed copies kept on `modules`' layers; returns how many layers had one."""
    count = 0
    for root in modules:
        for layer in root.modules() if root is not None else ():
            if PACKED in vars(layer):
                delattr(layer, PACKED)
                count += 1
    return count

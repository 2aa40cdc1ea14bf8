"""Memory per GPU of a ControlNet's training state under DDP, FSDP2, ZeRO-2 and ZeRO-3 (issue 32 item 4), computed
from parameter counts of models built on the meta device (no weights, seconds, no GPU).

    python benchmarks/scale_out_memory.py                          # prints the table
    python benchmarks/scale_out_memory.py --doc docs/scale-out.md  # and writes it between its results markers

Models: SD1.5 and SDXL UNets from the configs the package ships (io/configs/*_unet.json) with our `ControlNet.from_unet`
(the trainer's net: hint encoder, encoder copy, zero convolutions); SD3.5 Large and Flux.1-dev transformers with
Stability's SD3.5 Large ControlNet, Shakker/InstantX's Flux Union-Pro and XLabs' Flux ControlNet, the configs of
benchmarks/transformer_sizes.py (diffusers' classes).

What is counted, per GPU (the rank holding the most, padding included), as `train.mixed_precision bf16` runs it:
- the locked base: its parameters and buffers in bf16, whole on every rank under every engine (the trainer never
  shards it: train/sharding.py and train/deepspeed_engine.py keep it outside FSDP and outside the engine, frozen);
- the trainable ControlNet's weights, gradients and AdamW's two moments:
  DDP     fp32 weights + fp32 grads + 2 fp32 moments, whole on every rank (autocast over fp32 weights): 16 B/param;
  FSDP2   the same tensors, each sharded on dim 0 across the ranks (`fully_shard`; the optimizer is built after
          sharding, so the moments are DTensor shards too): 16/N B/param;
  ZeRO-2  DeepSpeed's bf16 mode: bf16 weights whole on every rank; bf16 grads, the fp32 master copy and the 2 fp32
          moments partitioned (the ZeRO paper's 2 + (2 + 12)/N B/param);
  ZeRO-3  the same with the bf16 weights partitioned too: (2 + 2 + 12)/N B/param.
Not counted: activations, the text encoders and the VAE (latents and text embeddings taken as cached), the CUDA
context and allocator slack, and each engine's transient buffers (listed by `TRANSIENTS`).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_sizes import FLUX_DEV_BASE, INSTANTX_UNION_PRO, SD35_LARGE_BASE, STABILITY_SD35L, XLABS, build

GB = 1e9  # decimal GB, as README's training-memory table
BF16, FP32 = 2, 4  # bytes per value
WORLDS = (1, 8, 32)
ENGINES = ("DDP", "FSDP2", "ZeRO-2", "ZeRO-3")
MARKER = "scale_out_memory"  # <!-- results:NAME --> ... <!-- /results:NAME --> in the doc

# bytes per trainable parameter as (replicated on every rank, sharded 1/N) for each part, per engine
PARTS = {
    "DDP": {"weights": (FP32, 0), "grads": (FP32, 0), "moments": (2 * FP32, 0)},
    "FSDP2": {"weights": (0, FP32), "grads": (0, FP32), "moments": (0, 2 * FP32)},
    "ZeRO-2": {"weights": (BF16, 0), "grads": (0, BF16), "master": (0, FP32), "moments": (0, 2 * FP32)},
    "ZeRO-3": {"weights": (0, BF16), "grads": (0, BF16), "master": (0, FP32), "moments": (0, 2 * FP32)},
}
TRANSIENTS = {  # what each engine adds on top, not in the table
    "DDP": "its reducer's gradient buckets, another fp32 copy of the grads (4 B/param): the trainer leaves "
    "accelerate's gradient_as_bucket_view=False",
    "FSDP2": "one or two FSDP groups gathered whole in fp32 (the group running and the one prefetched), and "
    "their unsharded grads before the reduce-scatter",
    "ZeRO-2": "the fp32 gradient partition made at the step, and DeepSpeed's reduce buckets (reduce_bucket_size, "
    "default 5e8 values, not set by the trainer)",
    "ZeRO-3": "the parameters gathered for the running and prefetched modules (stage3_prefetch_bucket_size, "
    "stage3_max_live_parameters: DeepSpeed's defaults), the step's fp32 gradient partition, the reduce buckets",
}


@dataclass(frozen=True)
class Pair:
    """A locked base and the ControlNet trained on it, counted on the meta device."""

    name: str  # "SD1.5 -> ControlNet" as the table shows it
    base_values: int  # the base's parameters and buffers (held in bf16 on every rank)
    net_shapes: tuple[tuple[int, ...], ...]  # shapes of the ControlNet's trainable parameters
    note: str = ""  # what the trainer does not support yet for this base

    @property
    def net_params(self) -> int:
        return sum(math.prod(s) for s in self.net_shapes)


def values(module: torch.nn.Module) -> int:
    """Parameters and buffers of `module` (what it holds in memory)."""
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def pair_of(name: str, base: torch.nn.Module, net: torch.nn.Module, note: str = "") -> Pair:
    shapes = tuple(tuple(p.shape) for p in net.parameters() if p.requires_grad)
    return Pair(name, values(base), shapes, note)


def unet_pair(family: str, name: str) -> Pair:
    """An SD UNet (the package's shipped config of `family`) and our ControlNet copied from it, on the meta device."""
    from diffusers import UNet2DConditionModel

    from controlnet.io.formats import builtin_unet_config
    from controlnet.model.controlnet import ControlNet

    config = {k: v for k, v in builtin_unet_config(family).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return pair_of(name, unet, ControlNet.from_unet(unet))  # new layers on the UNet's (meta) device


def pairs() -> list[Pair]:
    transformer = "the trainer refuses transformer bases under fsdp/deepspeed yet: computed for the same scheme"
    return [
        unet_pair("sd15", "SD1.5 -> ControlNet"),
        unet_pair("sdxl", "SDXL -> ControlNet"),
        pair_of(
            "SD3.5 Large -> Stability ControlNet (19 blocks)",
            build("sd3", SD35_LARGE_BASE, base=True),
            build("sd3", STABILITY_SD35L),
            transformer,
        ),
        pair_of(
            "Flux.1-dev -> Union-Pro (5+10 blocks)",
            build("flux", FLUX_DEV_BASE, base=True),
            build("flux", INSTANTX_UNION_PRO),
            transformer,
        ),
        pair_of(
            "Flux.1-dev -> XLabs (2 double blocks)",
            build("flux", FLUX_DEV_BASE, base=True),
            build("flux", XLABS),
            transformer,
        ),
    ]


def shard_values(shapes, world: int, engine: str) -> int:
    """Values of the trainable parameters held by the fullest rank when sharded across `world` ranks: FSDP2 shards
    each parameter on dim 0 (rank 0 holds ceil(dim0 / N) rows); ZeRO flattens all of them and splits the flat buffer
    (ceil(total / N))."""
    if engine == "FSDP2":
        return sum(math.ceil(s[0] / world) * math.prod(s[1:]) if s else 1 for s in shapes)
    return math.ceil(sum(math.prod(s) for s in shapes) / world)


def per_gpu_bytes(pair: Pair, engine: str, world: int) -> dict[str, int]:
    """Bytes per GPU of `pair`'s training state under `engine` with `world` ranks, by part (base, weights, grads,
    master, moments)."""
    if engine not in PARTS:
        raise ValueError(f"engine={engine!r}; expected one of {ENGINES}")
    if world < 1:
        raise ValueError(f"world={world}; expected a number of ranks >= 1")
    whole, sharded = pair.net_params, shard_values(pair.net_shapes, world, engine)
    out = {"base": pair.base_values * BF16}
    for part, (replicated, per_shard) in PARTS[engine].items():
        out[part] = whole * replicated + sharded * per_shard
    return out


def bytes_per_param(engine: str) -> str:
    """The formula in bytes per trainable parameter, e.g. '2 + 14/N'."""
    replicated = sum(r for r, _ in PARTS[engine].values())
    sharded = sum(s for _, s in PARTS[engine].values())
    return " + ".join(x for x in (str(replicated) if replicated else "", f"{sharded}/N" if sharded else "") if x)


def table(rows: list[Pair]) -> str:
    head = (
        "| Base -> ControlNet | Locked base (bf16) | ControlNet (trainable) | Engine | B/trainable param | "
        + " | ".join(f"N={n}" for n in WORLDS)
        + " |"
    )
    lines = [head, "|" + "---|" * (5 + len(WORLDS))]
    for pair in rows:
        for engine in ENGINES:
            cells = [f"{sum(per_gpu_bytes(pair, engine, n).values()) / GB:.1f}" for n in WORLDS]
            lines.append(
                f"| {pair.name} | {pair.base_values / 1e9:.3f} B, {pair.base_values * BF16 / GB:.1f} GB "
                f"| {pair.net_params / 1e9:.3f} B | {engine} | {bytes_per_param(engine)} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


def assumptions(rows: list[Pair]) -> str:
    lines = [
        "GB per GPU (10^9 bytes) of the training state, computed from meta-device parameter counts, not measured on "
        "GPUs: the locked base's parameters and buffers in bf16 on every rank (never sharded by the trainer) + the "
        "trainable ControlNet's weights, grads and AdamW moments as train.mixed_precision bf16 holds them; the "
        "fullest rank, shard padding included. N=1 under FSDP2/ZeRO is the formula only (the trainer needs N >= 2).",
        "Not counted: activations, text encoders and VAE (latents and text embeddings cached), CUDA context and "
        "allocator slack, and transient buffers:",
        *(f"  {engine}: {what}" for engine, what in TRANSIENTS.items()),
        "Without train.mixed_precision the ZeRO engines hold fp32 weights plus a separate fp32 master copy: ZeRO-2 "
        "4 + 16/N, ZeRO-3 20/N B/param.",
    ]
    notes = {p.note for p in rows if p.note}
    lines += [f"SD3.5 Large and Flux rows: {n}." for n in notes]
    return "\n".join(lines) + "\n"


def write_doc(doc: Path, text: str) -> bool:
    """Replace the block between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in `doc` with `text`; False when
    the markers are absent (marked duplication of benchmarks/paper/common.py's update_doc, which has one fixed doc)."""
    start, end = f"<!-- results:{MARKER} -->", f"<!-- /results:{MARKER} -->"
    content = doc.read_text()
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{text}{end}{tail}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, help="also write the table between this file's results markers")
    args = parser.parse_args(argv)
    rows = pairs()
    text = table(rows)
    print(assumptions(rows))
    print(text)
    if args.doc is not None:
        if not write_doc(args.doc, text):
            print(f"--doc {args.doc}: no <!-- results:{MARKER} --> ... <!-- /results:{MARKER} --> markers in it")
            return 1
        print(f"written into {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Transformer ControlNets at real size (issue 29 item 6): parameters, file sizes and peak RSS of `controlnet inspect`
and `controlnet convert` on SD3.5-Large- and Flux.1-dev-sized stand-ins, the peak RSS of making a ControlNet from a
base (`SD3ControlNet.from_transformer`), and the memory a Flux ControlNet training step needs per GPU.

    python benchmarks/transformer_sizes.py                 # ~25 GB of temporary files under --work, deleted after
    python benchmarks/transformer_sizes.py --paper-only    # the computed tables only (seconds, no files)

Stand-ins: random bf16 weights (seeded per tensor name), in the layouts the publishers ship, with no config in the
file (the config comes from the shapes, as for a downloaded file): Stability's SD3.5 Large ControlNets (19 single
blocks at width 2432, `stability` layout), InstantX/Shakker's Flux Union-Pro (5 double + 10 single blocks, 10 modes,
one file in diffusers names) and XLabs' Flux ControlNets (2 double blocks, pixel hint, `xlabs` layout). Each is built
on the meta device and written one tensor at a time (`write_safetensors_streamed`): never a whole model in memory.

Measured: every command runs in a fresh process and reports its own peak RSS (VmHWM at exit, file pages included;
benchmarks/convert.py's `peak_rss`). Round trips: layout -> `--to diffusers` -> `--to <layout>`; every tensor's
bytes are hashed (sha256) in the source and the result; exit 1 if one differs.

Init: `controlnet init` on a base folder as diffusers writes it (the transformer's file memory-mapped, only the
copied blocks' pages read, `SD3ControlNet.from_transformer`, then the write). A Flux.1-dev base (11.9 B parameters, 23.8 GB in bf16) or an SD3.5 Large one (16.1 GB) does
not fit this benchmark's disk and memory budget, so the measured init uses an SD3.5-Medium-sized base file (4.5 GB);
the large ones are counted on the meta device and their peak is computed from the same terms (copied parts + net +
the process's baseline), checked against the measured SD3.5 Medium case.

Training memory (computed, `training_memory`): frozen base in bf16; the ControlNet's fp32 weights, fp32 gradients and
AdamW's two fp32 moments (diffusers' train_controlnet_flux.py with --mixed_precision bf16), or bf16 weights and
gradients with fp32 moments; activations from the bytes autograd saves per token and hidden unit in one Flux double /
single block, measured here on small-width blocks in bf16 (saved_tensors_hooks; trainable and frozen), extrapolated
to width 3072 as a + b/width. Latents and text embeddings are taken as cached (VAE and T5/CLIP not on the GPU).

Measured at 2a1c095's parent on a shared, loaded 2-core AMD EPYC VM (torch 2.13.0 CPU, diffusers 0.42.1):
    SD3.5 Large (Stability) 2.154 B, 4.31 GB: inspect 0.24 GiB; convert to diffusers 0.55 GiB, back 0.51 GiB; exact
    Flux Union-Pro 3.302 B, 6.60 GB: inspect 0.24 GiB; convert 0.55 GiB, back 0.55 GiB; exact
    XLabs 0.744 B, 1.49 GB: inspect 0.24 GiB; convert 0.64 GiB, back 0.55 GiB; exact
    init on an SD3.5-Medium-sized base (2.243 B, 4.94 GB), 12 blocks (1.261 B): 5.91 GiB (computed 5.80 once the
    position table buffers were counted; 4.95 before)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import torch
from convert import peak_rss  # benchmarks/convert.py: a child's own VmHWM

GB = 1e9  # sizes in decimal GB, as download pages give them
GiB = 1024**3
SEED = 0
STD = 0.02  # random weights' scale

# -- configs (diffusers' classes; shapes as the published files hold them) -------------------------------------
SD35_LARGE_BASE = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
SD35_MEDIUM_BASE = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)  # fmt: skip
FLUX_DEV_BASE = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)  # fmt: skip
_FLUX_NET = {k: v for k, v in FLUX_DEV_BASE.items()}
# Stability's SD3.5 Large ControlNets: 19 single blocks at SD3.5 Large's width, no context embedder (diffusers'
# conversion script), control_type 1.0 (canny)
STABILITY_SD35L = {
    **{k: SD35_LARGE_BASE[k] for k in ("sample_size", "in_channels", "attention_head_dim", "num_attention_heads")},
    **dict(patch_size=2, num_layers=19, joint_attention_dim=None, caption_projection_dim=2432, pooled_projection_dim=2048),
    **dict(out_channels=16, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False, qk_norm=None),
    "force_zeros_for_pooled_projection": False,
    "stability_control_type": {"value": 1.0, "dtype": "float32", "shape": []},
}  # fmt: skip
INSTANTX_UNION_PRO = {**_FLUX_NET, "num_layers": 5, "num_single_layers": 10, "num_mode": 10}  # Shakker Union-Pro
XLABS = {
    **_FLUX_NET,
    "patch_size": 2,
    "num_layers": 2,
    "num_single_layers": 0,
    "conditioning_embedding_channels": 16,
}
STANDINS = [  # name, family, config, layout (controlnet convert --to ...)
    ("SD3.5 Large ControlNet (Stability)", "sd3", STABILITY_SD35L, "stability"),
    ("Flux Union-Pro (InstantX/Shakker)", "flux", INSTANTX_UNION_PRO, "diffusers-file"),
    ("Flux ControlNet (XLabs)", "flux", XLABS, "xlabs"),
]

# -- training step on paper -------------------------------------------------------------------------------------
IMAGE_TOKENS = (1024 // 16) ** 2  # 1024x1024 px: VAE /8, 2x2 patches -> 64 x 64 = 4096 tokens
TEXT_TOKENS = 512  # Flux.1-dev's T5 sequence
FLUX_WIDTH = 3072  # 24 heads x 128
BF16, FP32 = 2, 4  # bytes
BLOCK_INPUT_BYTES = BF16  # gradient checkpointing keeps a block's input: one bf16 value per token and hidden unit
OPTIMIZERS = {  # bytes per trainable parameter: weights, gradients, AdamW's two moments
    "fp32 weights+grads, fp32 AdamW (diffusers' --mixed_precision bf16)": FP32 + FP32 + 2 * FP32,
    "bf16 weights+grads, fp32 AdamW": BF16 + BF16 + 2 * FP32,
}


def build(family: str, config: dict, base: bool = False):
    """The diffusers model of `config` on the meta device."""
    import diffusers

    cls = {
        (False, "sd3"): diffusers.SD3ControlNetModel,
        (False, "flux"): diffusers.FluxControlNetModel,
        (True, "sd3"): diffusers.SD3Transformer2DModel,
        (True, "flux"): diffusers.FluxTransformer2DModel,
    }[base, family]
    with torch.device("meta"):
        return cls(**{k: v for k, v in config.items() if k != "stability_control_type"})


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _random(name: str, spec: torch.Tensor) -> torch.Tensor:
    """Seeded random values for one tensor (float32 transiently for this tensor only, then its dtype)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1000003 * SEED)
    return (torch.randn(spec.shape, generator=gen) * STD).to(spec.dtype)


def write_standin(family: str, config: dict, layout: str, path: Path) -> Path:
    """A ControlNet of `config` with random bf16 weights, in `layout`, streamed; no config in the file."""
    from controlnet.io.safe_load import write_safetensors_streamed
    from controlnet.io.transformer_layouts import transformer_file_layout

    state = build(family, config).state_dict()
    meta = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in state.items()}
    plan = transformer_file_layout(family, config, list(meta), path, layout)
    specs = {}
    for key, names in plan.keys.items():  # a fused qkv: the parts' rows together
        first = meta[names[0]]
        specs[key] = torch.empty((sum(meta[n].shape[0] for n in names), *first.shape[1:]), dtype=first.dtype)
    specs.update({k: torch.empty(v.shape, dtype=v.dtype) for k, v in plan.extras.items()})
    specs = {k: v.to("meta") for k, v in specs.items()}

    def produce(key: str) -> torch.Tensor:
        return plan.extras[key] if key in plan.extras else _random(key, specs[key])

    write_safetensors_streamed(specs, produce, path, {"format": "pt"})  # as published: no config metadata
    return path


def write_base(family: str, config: dict, path: Path) -> Path:
    """A base transformer of `config` with random bf16 weights in diffusers names, streamed."""
    from controlnet.io.safe_load import write_safetensors_streamed

    state = build(family, config, base=True).state_dict()
    specs = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in state.items()}
    write_safetensors_streamed(specs, lambda key: _random(key, specs[key]), path, {"format": "pt"})
    return path


def write_base_folder(folder: Path) -> Path:
    """An SD3.5-Medium-sized base as `controlnet init` takes it: model_index.json naming the transformer, and
    transformer/{config.json, diffusion_pytorch_model.safetensors} (random bf16, streamed)."""
    (folder / "transformer").mkdir(parents=True)
    write_base("sd3", SD35_MEDIUM_BASE, folder / "transformer" / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "SD3Transformer2DModel", **SD35_MEDIUM_BASE}
    (folder / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def tensor_hashes(path: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes, from the safetensors header's offsets (file or diffusers folder)."""
    if path.is_dir():
        path = path / "diffusion_pytorch_model.safetensors"
    out = {}
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for key, entry in header.items():
            start, end = entry["data_offsets"]
            f.seek(8 + length + start)
            h, left = hashlib.sha256(), end - start
            while left:
                chunk = f.read(min(left, 1 << 24))
                h.update(chunk)
                left -= len(chunk)
            out[key] = f"{entry['dtype']}{entry['shape']}:{h.hexdigest()}"
    return out


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


# The init measured is the command's: `controlnet init <base folder> <out> --num-layers 12` (io/transformer_init.py:
# the base's file memory-mapped, only the copied blocks' pages touched, `SD3ControlNet.from_transformer`, a write).
INIT_LAYERS = 12  # SD3ControlNet.from_transformer's default (diffusers' too)


def copied_params(base, prefixes: tuple[str, ...]) -> int:
    """Values of `base`'s state dict under `prefixes`: parameters and stored buffers (SD3's sin-cos position table,
    0.45 GB in SD3.5 Medium, is read and copied too)."""
    return sum(t.numel() for n, t in base.state_dict().items() if n.startswith(prefixes))


def stored(model) -> int:
    """Values a model's file holds (parameters and persistent buffers)."""
    return sum(t.numel() for t in model.state_dict().values())


def init_on_paper(baseline_gib: float) -> list[tuple[str, int, float]]:
    """(what, the net's parameters, computed peak GiB) for from_transformer on SD3.5 Large and Flux.1-dev bases:
    the copied base parts read in bf16 + the net in bf16 + the process's baseline (measured)."""
    from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet

    rows = []
    sd3 = build("sd3", SD35_LARGE_BASE, base=True)
    net = SD3ControlNet.from_transformer(sd3, num_layers=INIT_LAYERS)  # meta base -> meta net
    read = copied_params(
        sd3, ("pos_embed.", "time_text_embed.", "context_embedder.", *_blocks("transformer", INIT_LAYERS))
    )
    rows.append(
        ("SD3.5 Large base, 12 joint blocks", count(net), baseline_gib + (read + stored(net)) * BF16 / GiB)
    )
    flux = build("flux", FLUX_DEV_BASE, base=True)
    net = FluxControlNet.from_transformer(flux, num_layers=5, num_single_layers=10)
    prefixes = ("time_text_embed.", "context_embedder.", "x_embedder.", *_blocks("transformer", 5))
    read = copied_params(flux, (*prefixes, *_blocks("single_transformer", 10)))
    rows.append(
        ("Flux.1-dev base, 5 double + 10 single", count(net), baseline_gib + (read + stored(net)) * BF16 / GiB)
    )
    return rows


def _blocks(kind: str, n: int) -> tuple[str, ...]:
    return tuple(f"{kind}_blocks.{i}." for i in range(n))


# -- activations: bytes autograd saves per token and hidden unit, measured on small Flux blocks -------------------


def saved_bytes_per_token_unit(single: bool, trainable: bool, heads: int, tokens=(64, 16)) -> float:
    """Bytes autograd keeps for backward in one bf16 Flux block (its weights excluded), per token per hidden unit."""
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    width = heads * 128
    torch.manual_seed(SEED)
    cls = FluxSingleTransformerBlock if single else FluxTransformerBlock
    block = cls(width, heads, 128).to(torch.bfloat16).requires_grad_(trainable)
    image = torch.randn(1, tokens[0], width, dtype=torch.bfloat16, requires_grad=True)  # (B, L_img, D)
    text = torch.randn(1, tokens[1], width, dtype=torch.bfloat16, requires_grad=True)  # (B, L_txt, D)
    temb = torch.randn(1, width, dtype=torch.bfloat16)  # (B, D)
    rope = FluxPosEmbed(10000, FLUX_DEV_BASE["axes_dims_rope"])(torch.zeros(sum(tokens), 3))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(hidden_states=image, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    return sum(b for ptr, b in saved.items() if ptr not in weights) / (sum(tokens) * width)


def activation_coefficients() -> dict[tuple[bool, bool], float]:
    """(single, trainable) -> bytes per token per hidden unit at Flux's width, a + b/width fitted at widths 256, 512."""
    out = {}
    for single in (False, True):
        for trainable in (False, True):
            w1, w2 = 256, 512
            c1, c2 = (saved_bytes_per_token_unit(single, trainable, w // 128) for w in (w1, w2))
            b = (c1 - c2) / (1 / w1 - 1 / w2)
            out[single, trainable] = c2 - b / w2 + b / FLUX_WIDTH
    return out


def training_memory(net: dict, coefficients: dict, checkpointing: bool) -> dict[str, float]:
    """GB per GPU of one Flux ControlNet training step (batch 1, 1024x1024, 512 text tokens) without sharding.

    net: the ControlNet's config (num_layers double, num_single_layers single blocks). The base's blocks are frozen
    but backward runs through all of them (the residuals enter every block), so their activations are kept too.
    """
    tokens = IMAGE_TOKENS + TEXT_TOKENS
    per_block = tokens * FLUX_WIDTH  # token x hidden unit values of one block
    base_double, base_single = FLUX_DEV_BASE["num_layers"], FLUX_DEV_BASE["num_single_layers"]
    n_double, n_single = net["num_layers"], net["num_single_layers"]
    params = count(build("flux", net))
    out = {"base weights (bf16)": count(build("flux", FLUX_DEV_BASE, base=True)) * BF16 / GB}
    for what, per_param in OPTIMIZERS.items():
        out[what] = params * per_param / GB
    residuals = (n_double + n_single) * IMAGE_TOKENS * FLUX_WIDTH * BF16  # the net's outputs, kept for the base
    if checkpointing:  # every block's input, plus one trainable double block recomputed in backward
        blocks = base_double + base_single + n_double + n_single
        act = blocks * per_block * BLOCK_INPUT_BYTES + per_block * coefficients[False, True]
    else:
        act = per_block * (
            base_double * coefficients[False, False]
            + base_single * coefficients[True, False]
            + n_double * coefficients[False, True]
            + n_single * coefficients[True, True]
        )
    out["activations"] = (act + residuals) / GB
    return out


def paper_tables(baseline_gib: float | None) -> None:
    coefficients = activation_coefficients()
    print("\nbytes autograd saves per token per hidden unit in one bf16 Flux block (measured at widths 256/512, "
          f"extrapolated to {FLUX_WIDTH}):")  # fmt: skip
    for (single, trainable), c in coefficients.items():
        print(f"  {'single' if single else 'double'} block, {'trainable' if trainable else 'frozen'}: {c:.1f}")
    print(f"\nFlux ControlNet training step per GPU (computed; batch 1, 1024x1024 = {IMAGE_TOKENS} image + "
          f"{TEXT_TOKENS} text tokens, latents and text embeddings cached, no sharding), GB:")  # fmt: skip
    for name, config in (("Union-Pro 5+10", INSTANTX_UNION_PRO), ("XLabs 2+0", XLABS)):
        for ckpt in (False, True):
            m = training_memory(config, coefficients, ckpt)
            weights, acts = m["base weights (bf16)"], m["activations"]
            opts = [v for k, v in m.items() if k in OPTIMIZERS]
            print(
                f"  {name:15s} checkpointing {'on ' if ckpt else 'off'}: base {weights:5.1f} + net/grads/AdamW "
                f"{opts[0]:5.1f} (fp32) or {opts[1]:5.1f} (bf16 w+g) + activations {acts:5.1f} = "
                f"{weights + opts[0] + acts:5.1f} or {weights + opts[1] + acts:5.1f}"
            )
    if baseline_gib is not None:
        print(f"\ninit on paper (computed: copied base parts + net, bf16, + the {baseline_gib:.2f} GiB baseline):")
        for what, params, gib in init_on_paper(baseline_gib):
            print(f"  {what:38s} net {params / 1e9:5.2f} B params  peak RSS ~{gib:5.2f} GiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where temporary files go")
    parser.add_argument("--paper-only", action="store_true", help="only the computed tables (no files)")
    parser.add_argument(
        "--init-only", action="store_true", help="only the measured init (and the computed tables)"
    )
    args = parser.parse_args(argv)
    if args.paper_only:
        paper_tables(None)
        return 0
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "controlnet.cli"]
    work = Path(tempfile.mkdtemp(prefix="transformer-sizes-", dir=args.work))
    exact = True
    print("measured: peak RSS (GiB, VmHWM of a fresh process) and wall time per command; files bf16", flush=True)
    try:
        for name, family, config, layout in [] if args.init_only else STANDINS:
            path = write_standin(family, config, layout, work / f"{layout}.safetensors")
            print(f"{name}: {count(build(family, config)) / 1e9:.3f} B params, {size_of(path) / GB:.2f} GB "
                  f"({layout} layout)", flush=True)  # fmt: skip
            folder, back = work / "diffusers", work / f"back-{layout}.safetensors"
            for argv in (
                ["inspect", str(path)],
                ["convert", str(path), str(folder), "--to", "diffusers"],
                ["convert", str(folder), str(back), "--to", layout],
            ):
                rss, seconds = peak_rss([*cli, *argv], env)
                label = " ".join(Path(a).name if os.sep in a else a for a in argv)
                print(f"  controlnet {label:58s}"
                      f" peak RSS {rss:5.2f} GiB  {seconds:6.1f} s", flush=True)  # fmt: skip
            same = tensor_hashes(path) == tensor_hashes(back)
            exact &= same
            print(
                f"  round trip {layout} -> diffusers -> {layout}: every tensor identical: {'yes' if same else 'NO'}"
            )
            shutil.rmtree(folder)
            back.unlink()
            path.unlink()
        base = write_base_folder(work / "sd35m")
        base_params = count(build("sd3", SD35_MEDIUM_BASE, base=True))
        print(
            f"SD3.5 Medium-sized base: {base_params / 1e9:.3f} B params, {size_of(base) / GB:.2f} GB", flush=True
        )
        out = work / "init"
        rss, seconds = peak_rss([*cli, "init", str(base), str(out), "--num-layers", str(INIT_LAYERS)], env)
        net = build("sd3", json.loads((out / "config.json").read_text()))
        net_params = count(net)
        print(f"  init (from_transformer, {INIT_LAYERS} joint blocks): net {net_params / 1e9:.3f} B params, "
              f"{size_of(out) / GB:.2f} GB; peak RSS {rss:5.2f} GiB  {seconds:6.1f} s", flush=True)  # fmt: skip
        rss_idle, _ = peak_rss([sys.executable, "-c", "import torch, diffusers, controlnet.io.safe_load"], env)
        read = copied_params(
            build("sd3", SD35_MEDIUM_BASE, base=True),
            ("pos_embed.", "time_text_embed.", "context_embedder.", *_blocks("transformer", INIT_LAYERS)),
        )
        print(f"  computed the same way as below: {rss_idle + (read + stored(net)) * BF16 / GiB:5.2f} GiB "
              f"(baseline: importing torch + diffusers {rss_idle:.2f} GiB)")  # fmt: skip
        shutil.rmtree(base)
        shutil.rmtree(out)
        paper_tables(rss_idle)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not exact:
        print("a round trip was not exact", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A training checkpoint as full weights, in one process and without a process group: `controlnet export`.

A checkpoint of a sharded run holds no file a user can load: FSDP2 (`train.distributed=fsdp`, train/sharding.py)
writes `sharded/`, torch.distributed.checkpoint's folder of every rank's shards; DeepSpeed ZeRO
(train/deepspeed_engine.py) writes `deepspeed/`, the engine's partitions. This module turns any checkpoint folder
`RUN/checkpoints/step-N/` into the files the trainer's final export writes (`final/`: the diffusers folder and the
original-format file, train/preflight.py `export_path`), so a run killed before its export, or any step of it, can be
sampled, evaluated and shared:

1. check the folder (a checkpoint, its engine, the run's `config.json` two folders up) and the destination;
2. rebuild the ControlNet on the meta device from the run's config (the base's UNet config and VAE factor, or its SD3 /
   Flux transformer's config, read from its files; no base weights are loaded), as the trainer builds it;
3. read the full weights: FSDP2 through `torch.distributed.checkpoint.load` with `no_dist=True` (every shard of
   each weight, only the weights and the EMA's shards, not the optimizer state); DeepSpeed through its `zero_to_fp32`
   utilities (the fp32 master weights, as the trainer's export writes them; they unpickle DeepSpeed's own files, as
   resuming does); a DDP checkpoint is already full. When the run kept an EMA, its values replace the trained ones,
   as the trainer's export does;
4. write the export formats into a hidden folder renamed into place: the destination is complete or absent.

Memory: the process holds the trainable net's full fp32 weights (with an EMA, its values too: 4 bytes a parameter
each; 12 GB for a 3B-parameter Flux ControlNet), never the base's weights. An FSDP2 checkpoint's optimizer state is not
read; DeepSpeed's zero_to_fp32 maps each rank's optimizer file (the fp32 masters live there) and drops Adam's moments.

Resharding for a resume needs none of this: torch.distributed.checkpoint reads the shards into any number of ranks
(`--checkpoint.reshard true`, train/preflight.py `check_resume_world`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from controlnet.atomic import atomic_path
from controlnet.progress import phase
from controlnet.train import checkpoint as ckpt
from controlnet.train.config import EXPORT_FORMATS, TrainConfig, config_from_dict
from controlnet.train.deepspeed_engine import DEEPSPEED_DIR, DEEPSPEED_TAG
from controlnet.train.preflight import CONFIG_FILE, DECODER_FILE, export_formats, export_path
from controlnet.train.sharded_validation import EMA_KEY
from controlnet.train.sharding import MODEL_KEY, SHARDED_DIR

logger = logging.getLogger(__name__)

DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards, written last by the save


@dataclass
class CheckedCheckpoint:
    """What `check_checkpoint` found: the folder, the engine that wrote it, its step and the run's config."""

    folder: Path
    kind: str  # "ddp" (full weights), "fsdp" or "deepspeed"
    step: int
    config: TrainConfig


def check_checkpoint(folder: str | Path, config: str | Path | None = None) -> CheckedCheckpoint:
    """Check a checkpoint folder and its run config without reading weights; one ValueError / FileNotFoundError
    line per problem. `config`: the run's config.json (default: RUN/config.json of RUN/checkpoints/step-N)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint not found: {folder}")
    if not folder.is_dir() or not (folder / ckpt.STATE_FILE).is_file():
        found = ckpt.list_checkpoints(folder) if folder.is_dir() else []  # a run folder: name its newest
        hint = f"; this run's newest is {found[-1]}" if found else ""
        raise ValueError(
            f"{folder}: not a training checkpoint (expected a folder RUN/checkpoints/step-N holding "
            f"{ckpt.STATE_FILE}){hint}"
        )
    kind = ckpt.checkpoint_kind(folder)
    needs = {
        "ddp": folder / "controlnet.safetensors",
        "fsdp": folder / SHARDED_DIR / DCP_METADATA,
        "deepspeed": folder / DEEPSPEED_DIR / DEEPSPEED_TAG,
    }[kind]
    if not needs.exists():
        raise ValueError(
            f"{folder}: a train.distributed={kind} checkpoint without {needs.relative_to(folder)}; it is incomplete"
        )
    if kind == "deepspeed":
        from controlnet.train.deepspeed_engine import INSTALL_HINT, installed

        if not installed():
            raise ValueError(f"{folder}: a DeepSpeed checkpoint; reading it needs deepspeed ({INSTALL_HINT})")
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    config_path = Path(config) if config else folder.parent.parent / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"run config not found: {config_path} (the run folder's {CONFIG_FILE}, which says how the net was built; "
            "give it with --config)"
        )
    c = config_from_dict(json.loads(config_path.read_text()))
    if c.model.architecture != "controlnet":
        raise ValueError(
            f"{folder}: a model.architecture={c.model.architecture} run; the export rebuilds the paper's ControlNet "
            "(model.architecture=controlnet) only yet: use the run's final/ export"
        )
    return CheckedCheckpoint(folder, kind, int(state.get("step", 0)), c)


def check_formats(formats: Sequence[str] | None, c: TrainConfig) -> tuple[str, ...]:
    """The formats to write: `formats` (each one of EXPORT_FORMATS), else the run's checkpoint.export_formats."""
    if not formats:
        return export_formats(c)
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"--formats {','.join(formats)}: {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    return tuple(dict.fromkeys(formats))


def base_skeleton(c: TrainConfig) -> tuple[str, nn.Module]:
    """(arch, the run's locked base network on the meta device): "unet" and its UNet, or "sd3" / "flux" and its
    transformer; its architecture only, from the base's config files. A single checkpoint file's config is told from
    its tensors' names and shapes (headers, or memory-mapped: not read)."""
    from controlnet.generate.base import MODEL_INDEX, base_kind
    from controlnet.generate.transformer_base import transformer_arch, transformer_file_arch
    from controlnet.train.config import BASE_FLAGS

    kind, path = base_kind(c.model.base, BASE_FLAGS["base"])
    if kind == "file":
        arch = transformer_file_arch(path)
    else:
        arch = transformer_arch(json.loads((path / MODEL_INDEX).read_text())) if kind == "diffusers" else None
    if arch is not None:
        return arch, _transformer_skeleton(c, arch)
    from controlnet.io.api import build_unet

    if kind == "file":
        from controlnet.io.api import load_unet

        config = dict(load_unet(path, ema=c.model.ema).config)
    else:
        config_file = path / "unet" / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model.base={c.model.base}: no UNet config ({config_file}) to rebuild the net on")
        config = json.loads(config_file.read_text())
    return "unet", build_unet(config, device="meta")


def _transformer_skeleton(c: TrainConfig, arch: str) -> nn.Module:
    """An SD3 / Flux base's transformer on the meta device, from the config its files give (train/transformer_step.py
    `base_geometry`: a folder's transformer/config.json, a single file's derived from its headers)."""
    import diffusers

    from controlnet.generate.base import check_base
    from controlnet.train.config import base_options
    from controlnet.train.transformer_step import base_geometry

    _, config = base_geometry(check_base(c.model.base, **base_options(c.model)))
    if config is None:
        raise ValueError(f"model.base={c.model.base}: its files do not tell the transformer's config")
    cls = diffusers.SD3Transformer2DModel if arch == "sd3" else diffusers.FluxTransformer2DModel
    with torch.device("meta"):
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def net_skeleton(c: TrainConfig, arch: str, base: nn.Module) -> nn.Module:
    """The run's trainable ControlNet as the trainer builds it (train/trainer.py `_build_model`, transformer_step.py
    `build_transformer_controlnet`) on the meta `base` (`base_skeleton`): its parameters on the meta device (a
    continued net: its file's architecture, its tensors memory-mapped)."""
    from controlnet.generate.sizes import vae_factor_on_disk

    if arch != "unet":
        from controlnet.train.transformer_step import build_transformer_controlnet

        return build_transformer_controlnet(c, SimpleNamespace(transformer=base, arch=arch))
    if c.model.controlnet:
        from controlnet.generate.base import controlnet_path
        from controlnet.io.api import load_controlnet

        return load_controlnet(controlnet_path(c.model.controlnet), unet=base)
    from controlnet.model.controlnet import ControlNet

    factor = vae_factor_on_disk(c.model.base)  # None: no VAE config, a pixel-space base (BaseComponents: 1)
    kwargs = {"hint_block_channels": c.model.hint_channels} if c.model.hint_channels else {}
    return ControlNet.from_unet(
        base, cond_channels=c.model.cond_channels, hint_downscale_factor=factor or 1, **kwargs
    )


def read_sharded(folder: Path, skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of an FSDP2 checkpoint's `sharded/` folder (every rank's shards joined), in one process: only
    the entries `skeleton` names are read (not the optimizer state). A run that kept an EMA (its entries `ema.0`,
    `ema.1`, ... in the parameters' order) is exported with the EMA values, as the trainer's export does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = folder / SHARDED_DIR
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    names = [n for n, _ in skeleton.named_parameters()]
    has_ema = any(k.startswith(f"{EMA_KEY}.") for k in stored)
    wanted = {f"{MODEL_KEY}.{name}": (name, value.shape) for name, value in skeleton.state_dict().items()}
    if has_ema:
        shapes = dict(skeleton.named_parameters())
        wanted |= {f"{EMA_KEY}.{k}": (str(k), shapes[name].shape) for k, name in enumerate(names)}
    state: dict[str, dict[str, torch.Tensor]] = {MODEL_KEY: {}, EMA_KEY: {}}
    for key, (name, shape) in wanted.items():
        entry = stored.get(key)
        if entry is None or not hasattr(entry, "size") or tuple(entry.size) != tuple(shape):
            found = "missing" if entry is None else f"shape {tuple(getattr(entry, 'size', ()))}"
            raise ValueError(
                f"{folder}: its weights do not fit the net its run config builds ({key}: {found}, expected "
                f"{tuple(shape)}); was the run's config.json changed?"
            )
        state[key.partition(".")[0]][name] = torch.empty(shape, dtype=entry.properties.dtype)
    if not has_ema:
        del state[EMA_KEY]
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)  # no process group: this process reads every shard
    weights = state[MODEL_KEY]
    for k, name in enumerate(names if has_ema else ()):
        weights[name] = state[EMA_KEY][str(k)]
    return weights


def read_deepspeed(folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a DeepSpeed checkpoint's `deepspeed/` folder (ZeRO-2 or 3), gathered from every
    rank's partition by DeepSpeed's zero_to_fp32 (CPU, no process group)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}


def read_full(
    folder: Path, skeleton: nn.Module, unet: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """A DDP (or one-process) checkpoint's weights as the trainer exports them: (the net's, the UNet decoder's or
    None). With EMA kept, the EMA values replace the trained ones, as the export does; the EMA file lists them in
    `Trainer.trainable` order: the net's parameters, then the decoder's (train/model.py `decoder_parameters`, here
    named from the meta `unet`)."""
    from safetensors.torch import load_file

    from controlnet.train.model import DECODER_MODULES

    net = load_file(str(folder / "controlnet.safetensors"))
    decoder_file = folder / "decoder.safetensors"
    decoder = load_file(str(decoder_file)) if decoder_file.is_file() else None
    ema_file = folder / "ema.safetensors"
    if ema_file.is_file():
        ema = load_file(str(ema_file))
        names = [(net, n) for n, _ in skeleton.named_parameters()]
        if decoder is not None:
            modules = [(m, getattr(unet, m, None)) for m in DECODER_MODULES]
            names += [
                (decoder, f"{m}.{n}")
                for m, module in modules
                if module is not None
                for n, _ in module.named_parameters()
            ]
        if len(ema) != len(names):
            raise ValueError(
                f"{folder}: its EMA holds {len(ema)} tensors, the net its run config builds has {len(names)} "
                "trained parameters; was the run's config.json changed?"
            )
        for k, (state, name) in enumerate(names):
            state[name] = ema[str(k)]
    return net, decoder


def export_checkpoint(
    folder: str | Path,
    out: str | Path,
    formats: Sequence[str] | None = None,
    config: str | Path | None = None,
) -> CheckedCheckpoint:
    """Write checkpoint `folder`'s full weights to `out` as the trainer's final export (a diffusers folder
    `out/controlnet`, an original-format file `out/controlnet.safetensors`, per format). `out` must not exist; it is
    complete or absent afterwards. Returns what `check_checkpoint` found."""
    from controlnet.io.api import save_controlnet
    from controlnet.io.transformer_layouts import save_transformer_controlnet
    from controlnet.train.transformer_step import export_layout

    out = Path(out)
    checked = check_checkpoint(folder, config)
    c = checked.config
    fmts = check_formats(formats, c)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new destination")
    with phase("rebuilding the ControlNet from the run config"):
        arch, base = base_skeleton(c)
        net = net_skeleton(c, arch, base)
    decoder = None
    with phase(f"reading the {checked.kind} checkpoint {checked.folder.name}"):
        if checked.kind == "fsdp":
            weights = read_sharded(checked.folder, net)
        elif checked.kind == "deepspeed":
            weights = read_deepspeed(checked.folder)
        else:
            weights, decoder = read_full(checked.folder, net, base)
    try:
        net.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:  # names or shapes: the run config describes another net
        first = str(err).strip().splitlines()
        raise ValueError(
            f"{checked.folder}: its weights do not fit the net its run config builds ({' '.join(first[1:2])[:200]})"
        ) from None
    with phase(f"writing {', '.join(fmts)} to {out}"), atomic_path(out, exists="error") as tmp:
        tmp.mkdir()
        for fmt in fmts:
            if arch == "unet":
                save_controlnet(net, export_path(tmp, fmt), format=fmt)
            else:  # a diffusers folder, or the publisher's one file (transformer_step.export_layout), as the trainer
                save_transformer_controlnet(net, export_path(tmp, fmt), export_layout(net, fmt))
        if decoder is not None:
            from controlnet.io.safe_load import write_state_dict

            write_state_dict(decoder, tmp / DECODER_FILE)
    logger.info("exported %s (step %d) to %s", checked.folder, checked.step, out)
    return checked

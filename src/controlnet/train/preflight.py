"""What a training run settles before it loads or writes anything.

`check_run`: every option that can be checked without weights (the base's files and tokenizer, a ControlNet's
base family from the headers, the training size against the VAE's factor, the dataset's path and layout, the
trackers, an explicit resume folder), so that a bad option costs a second and leaves no run folder behind, not a
minute of loading and a `config.json`. `finished_state`: a rerun of a run that has nothing left to do (trained to
`train.max_steps` or stopped for good, exported, reported) is answered from its newest checkpoint's state.json,
without loading the base.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from controlnet.generate.base import (
    BaseComponents,
    BaseSource,
    check_base,
    check_controlnet_families,
    controlnet_path,
)
from controlnet.generate.sizes import check_size, vae_factor_on_disk
from controlnet.train import checkpoint as ckpt
from controlnet.train.config import BASE_FLAGS, TrainConfig, base_options
from controlnet.train.loop import check_trackers
from controlnet.train.report import REPORT_FILE

FINAL_DIR = "final"  # the run folder's export: the trained ControlNet in each of checkpoint.export_formats
DECODER_FILE = "unet_decoder.safetensors"  # beside it when model.sd_locked is false
CONFIG_FILE = "config.json"  # the run folder's resolved config: how its net was built


def export_path(final: Path, fmt: str) -> Path:
    """Where the export of format `fmt` goes: a diffusers folder or one original-format file."""
    return final / "controlnet" if fmt == "diffusers" else final / "controlnet.safetensors"


def export_formats(c: TrainConfig) -> tuple[str, ...]:
    """The formats a UNet-base run exports: checkpoint.export_formats; a union net has the diffusers layout only
    (xinsir's files are that layout; there is no original one)."""
    return ("diffusers",) if c.model.architecture == "union" else c.checkpoint.export_formats


def check_run(config: TrainConfig, base: BaseComponents | None = None) -> BaseSource | None:
    """Check everything `config` says that needs no weights; the checked base source (None when the caller brings
    its loaded `base`). One ValueError / FileNotFoundError line per problem, naming the option."""
    c = config
    # the size rule of generation (generate/sizes.py), from the base's config files (an SD checkpoint file: 8x; an
    # SD3 / Flux file: its VAE's, known once its header is checked, below)
    if not c.data.bucketing and not _transformer_file(c.model.base, base):  # bucketing: multiples of 64
        factor = vae_factor_on_disk(c.model.base) if base is None else base.vae_scale_factor
        if factor is not None:
            check_size(c.data.resolution, c.data.resolution, factor, option="data.resolution")
    source = None if base is not None else check_base(c.model.base, **base_options(c.model))
    arch = source.arch if source is not None else getattr(base, "arch", "unet")
    geometry = (None, None)  # (VAE factor, transformer config) of a transformer base, from its files
    if source is not None and arch != "unet":
        from controlnet.train.transformer_step import base_geometry

        geometry = base_geometry(source)
        if source.plan is not None and geometry[0] is not None and not c.data.bucketing:
            check_size(c.data.resolution, c.data.resolution, geometry[0], option="data.resolution")
    # SD3/Flux: what their trainer cannot do, from config files and headers (transformer_step.py)
    if arch != "unet":
        from controlnet.train.transformer_step import check_transformer_run, size_multiple

        multiple = size_multiple(arch, *geometry)
        if multiple and not c.data.bucketing and c.data.resolution % multiple:
            raise ValueError(
                f"data.resolution={c.data.resolution}: expected a multiple of {multiple} on this "
                f"{arch.upper()} base (VAE factor x {'2x2 packing' if arch == 'flux' else 'patch size'})"
            )
        check_transformer_run(c, geometry[1], arch)
    if c.model.controlnet:
        path = controlnet_path(c.model.controlnet)
        if source is not None:  # the ControlNet's family against the base's, from the headers
            check_controlnet_families(source, [str(path)], c.model.base_config or None, BASE_FLAGS)
    _check_data_path(c)
    union = c.model.architecture == "union" and arch == "unet"
    if union or c.data.union_columns:  # the data index against model.union_types / data.union_columns
        from controlnet.train.union import check_union_data

        check_union_data(c)
    if c.model.controlnet and arch == "unet":  # a union file and model.architecture agree (headers only)
        from controlnet.train.union import check_continued_net

        check_continued_net(c)
    check_trackers(c.train.log_with)
    check_resume_world(c, ckpt.find_resume(Path(c.train.output_dir), c.checkpoint.resume))  # a folder must exist
    return source


def check_resume_world(c: TrainConfig, folder: Path | None, world: int | None = None) -> None:
    """The checkpoint to resume was written by this run's train.distributed (ddp, fsdp, deepspeed: their folders
    differ) and by as many processes as this launch has (`world`: WORLD_SIZE, which `accelerate launch` sets), or
    checkpoint.reshard allows another number (not for DeepSpeed): one line before any weights load, since the global
    batch and the data order would change silently."""
    state_file = None if folder is None else folder / ckpt.STATE_FILE
    if state_file is None or not state_file.is_file():
        return
    kind = ckpt.checkpoint_kind(folder)
    if kind != c.train.distributed:
        raise ValueError(
            f"checkpoint.resume={str(folder)!r}: a checkpoint of a train.distributed={kind} run, this run is "
            f"train.distributed={c.train.distributed}; resume it with --train.distributed {kind}"
        )
    written = json.loads(state_file.read_text()).get("world_size")
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if written is None or written == world:
        return
    if c.train.distributed == "deepspeed":
        raise ValueError(
            f"checkpoint.resume={str(folder)!r}: written by {written} processes, this launch has {world}; a DeepSpeed "
            f"checkpoint holds one partition per rank: launch {written} processes"
        )
    if not c.checkpoint.reshard:
        raise ValueError(
            f"checkpoint.resume={str(folder)!r}: written by {written} processes, this launch has {world}; the global "
            f"batch and the data order would change: launch {written} processes, or set checkpoint.reshard true"
        )


def _transformer_file(spec: str, base: BaseComponents | None) -> bool:
    """`spec` is an SD3 / Flux checkpoint file (its header alone; the base loader's test)."""
    from controlnet.generate.transformer_base import transformer_file_arch

    path = Path(spec)
    return base is None and path.is_file() and transformer_file_arch(path) is not None


def _check_data_path(c: TrainConfig) -> None:
    """The dataset's path exists and holds a known layout (its files are scanned later, with the base loaded)."""
    from controlnet.data.sources import detect_format

    if not c.data.path:
        raise ValueError("data.path is empty: expected a dataset folder or file")
    path = Path(c.data.path)
    if c.data.format == "auto":
        detect_format(path)
    elif not path.exists() and not glob.glob(str(path)):
        raise FileNotFoundError(f"data.path={str(path)!r}: no such folder or file")


def finished_state(config: TrainConfig) -> dict | None:
    """The newest checkpoint's state when rerunning `config` has nothing to do, else None (nothing is loaded).

    Nothing to do: the checkpoint reached `train.max_steps`, or stopped early, or used up `train.max_minutes`
    (as `Trainer.run` decides from the same state), and the run's export and report are in place (a run killed
    between its last checkpoint and its export is rerun: it exports).
    """
    c = config
    run_dir = Path(c.train.output_dir)
    folder = ckpt.find_resume(run_dir, c.checkpoint.resume)
    if folder is None or not (folder / ckpt.STATE_FILE).is_file():
        return None
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    step, status = int(state.get("step", 0)), state.get("status")
    out_of_time = bool(c.train.max_minutes) and state.get("elapsed_s", 0.0) / 60 >= c.train.max_minutes
    if not (step >= c.train.max_steps or status == "early_stop" or (status == "time_limit" and out_of_time)):
        return None
    final = run_dir / FINAL_DIR
    if c.model.architecture == "lite":  # its own folder format, in place of the diffusers folder
        exports = [export_path(final, "diffusers")]
    else:
        exports = [export_path(final, f) for f in export_formats(c)]
        if not c.model.sd_locked:
            exports.append(final / DECODER_FILE)
    if not all(p.exists() for p in [*exports, run_dir / REPORT_FILE]):
        return None
    return state

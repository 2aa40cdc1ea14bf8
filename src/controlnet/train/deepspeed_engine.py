"""DeepSpeed ZeRO-2/3 training of the trainable ControlNet through accelerate's DeepSpeed plugin:
`train.distributed=deepspeed`, `train.zero_stage` 2 or 3.

Launched like DDP (`accelerate launch --multi_gpu --num_processes N ... --train.distributed deepspeed`): the trainer
gives the Accelerator a `DeepSpeedPlugin` built here from the training config, and accelerate's `prepare` puts the
trainable ControlNet and its torch optimizer into a DeepSpeed engine. Without a GPU the Accelerator must not be told
`cpu=True` (that turns DeepSpeed off) and needs gloo named as its backend: without it accelerate 1.16 believes each
process is alone under DeepSpeed (every rank index 0, world 1) while DeepSpeed's own process group has N ranks.

What is partitioned: ZeRO-2 splits the gradients and the optimizer state (Adam's moments and the fp32 master copy)
across the ranks, every rank holds the whole net's weights; ZeRO-3 splits the weights too (gathered block by block
in forward and backward). The optimizer is the trainer's torch optimizer (AdamW), not DeepSpeed's compiled CPUAdam
(`zero_force_ds_cpu_optimizer: false`). The locked base is outside the engine: frozen, replicated, in the compute
dtype, as under DDP and FSDP. With train.mixed_precision=bf16 the engine holds the net in bf16 and the optimizer
keeps fp32 masters (DeepSpeed's bf16 mode; the forward runs under torch.autocast, accelerate's being off).

A step: each micro-batch's `engine.backward` (DeepSpeed reduces the gradients), `engine.step()` after each; the last
one is the accumulation boundary, where DeepSpeed clips (optim.max_grad_norm) and updates, or skips the update when a
gradient is not finite (it checks even in fp32). The trainer's LR schedule steps the torch optimizer's groups, which
the ZeRO optimizer uses.

Checkpoints (`checkpoints/step-N/`): `deepspeed/` is the engine's `save_checkpoint` folder (every rank writes its
partition of the optimizer state; rank 0 the module weights, under ZeRO-3 each rank its partition); rank 0 writes
`scheduler.pt` and `state.json` beside it. Written under a `.partial-` name and renamed into place when complete, as
the other checkpoints. Resuming needs the same number of processes (DeepSpeed's checkpoints are per rank). The export
gathers the optimizer's full fp32 master weights (`deepspeed.utils.safe_get_full_fp32_param`, one parameter at a time)
into a copy on rank 0's CPU and writes the same files as a DDP run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from controlnet.train import checkpoint as ckpt
from controlnet.train.config import TrainConfig

logger = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"  # the engine's checkpoint folder inside a checkpoint folder
DEEPSPEED_TAG = "state"  # the engine's tag (sub-folder) inside DEEPSPEED_DIR
SCHEDULER_FILE = "scheduler.pt"
INSTALL_HINT = "pip install 'controlnet[deepspeed]'"


def installed() -> bool:
    """deepspeed can be imported (without importing it: that takes seconds and probes the accelerator)."""
    return importlib.util.find_spec("deepspeed") is not None


def check_deepspeed(config: TrainConfig, arch: str) -> None:
    """One ValueError line for what `train.distributed=deepspeed` does not support yet (before any weights load)."""
    c, name = config, "train.distributed=deepspeed"
    if c.train.distributed != "deepspeed":
        return
    if not installed():
        raise ValueError(f"{name}: deepspeed is not installed ({INSTALL_HINT}; or use train.distributed=fsdp)")
    if arch != "unet":
        raise ValueError(
            f"{name}: a {arch} base is not supported yet (UNet bases only; use train.distributed=ddp)"
        )
    if c.model.architecture != "controlnet":
        raise ValueError(
            f"{name} with model.architecture={c.model.architecture!r}: only the paper's ControlNet "
            "(model.architecture=controlnet) is trained under DeepSpeed yet"
        )
    refused = {
        # fp16 needs DeepSpeed's dynamic loss scaling, which is untested here (and fp16 needs a GPU anyway)
        "train.mixed_precision=fp16": c.train.mixed_precision == "fp16",
        # the engine takes the GPUs when there are any (accelerate's cpu=True turns DeepSpeed off)
        "train.cpu on a machine with CUDA": c.train.cpu and torch.cuda.is_available(),
        "optim.ema_decay": bool(c.optim.ema_decay),
        "model.sd_locked=false": not c.model.sd_locked,
        "train.reward": c.train.reward,
        "optim.use_8bit_adam": c.optim.use_8bit_adam,
        # validation runs the net on rank 0 alone; under ZeRO-3 its forward needs every rank
        "validation.every": c.validation.every > 0 and c.validation.metric != "none",
    }
    for option, on in refused.items():
        if on:
            raise ValueError(f"{name}: {option} is not supported with deepspeed yet; turn it off or use ddp")


def accelerator_kwargs(config: TrainConfig, cpu: bool) -> dict:
    """The Accelerator's arguments for a DeepSpeed run: the plugin, and on the CPU gloo named as the backend. A single
    process is refused first: the plugin would turn this process's accelerate state to DeepSpeed for good."""
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    from controlnet.train.sharding import check_world

    check_world(int(os.environ.get("WORLD_SIZE", "1")), "deepspeed")  # set by `accelerate launch` (torchrun)
    c = config
    ds_config = {
        "train_micro_batch_size_per_gpu": c.train.batch_size,
        "gradient_accumulation_steps": c.optim.grad_accum,
        "gradient_clipping": c.optim.max_grad_norm,  # 0: no clipping, as optim.max_grad_norm=0 means
        "zero_optimization": {
            "stage": c.train.zero_stage,
            # the weights the export gathers are the fp32 ones (no 16-bit copy exists without mixed precision)
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "zero_allow_untested_optimizer": True,  # the trainer's torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # not DeepSpeed's compiled CPUAdam
        # bf16: the engine holds the net in bf16 and keeps fp32 masters in the optimizer (the export writes those)
        "bf16": {"enabled": c.train.mixed_precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
    }
    # zero3_init_flag=False: models built later are not partitioned at construction (zero.Init); the base stays whole
    kwargs = {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=False)}
    if cpu:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return kwargs


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward's autocast, as a no-argument factory: accelerate's is off under DeepSpeed, and the locked base (in
    the compute dtype `dtype`) and a bf16 engine are given fp32 inputs."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def keep_base_whole() -> None:
    """After the Accelerator exists: forget the DeepSpeed config accelerate handed to transformers. Under ZeRO-3 it
    makes transformers' `from_pretrained` build every model partitioned (zero.Init), so the locked text encoder
    would load as empty shards; the locked base is meant to be whole on every rank, outside the engine."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def prepare(acc, net: nn.Module, optimizer) -> tuple[nn.Module, object, nn.Module]:
    """Put `net` and its `optimizer` into a DeepSpeed engine (every rank). Returns (engine, the wrapped optimizer,
    a meta-device skeleton of `net` that `full_net` fills for the export)."""
    from controlnet.train.sharding import meta_skeleton

    skeleton = meta_skeleton(net)
    engine, optimizer = acc.prepare(net, optimizer)
    return engine, optimizer, skeleton


def backward(engine, loss: torch.Tensor, accum: int, last: bool) -> None:
    """One micro-batch's backward of its `loss` (divided by `accum` here, as under DDP); before the last micro-batch
    of a step, the engine's micro-step (no update)."""
    engine.backward(loss / accum, scale_wrt_gas=False)
    if not last:
        engine.step()


def update(engine) -> bool:
    """The accumulation boundary: DeepSpeed clips and updates. True when it skipped the update (a gradient that is
    not finite); the gradients are cleared either way."""
    skipped = engine.skipped_steps
    engine.step()
    return engine.skipped_steps > skipped


def full_net(engine, skeleton: nn.Module, main: bool) -> nn.Module | None:
    """Every rank: gather the optimizer's fp32 master weights (ZeRO partitions them; under bf16 the net itself holds a
    bf16 copy) one parameter at a time; rank 0 (`main`) gets `skeleton` holding them (on the CPU), others None. The
    skeleton's buffers are the net's from before the engine (not trained; a bf16 engine casts them)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = {}
    for name, p in engine.module.named_parameters():
        value = safe_get_full_fp32_param(p)  # collective under ZeRO-3
        if main:
            full[name] = value.detach().to("cpu", copy=True)
    if not main:
        return None
    missing, unexpected = skeleton.load_state_dict(full, strict=False, assign=True)
    assert not unexpected and set(missing) <= {n for n, _ in skeleton.named_buffers()}, (missing, unexpected)
    return skeleton


def save(run_dir: Path, step: int, engine, scheduler, state: dict, keep: int, main: bool) -> Path:
    """Every rank: write checkpoint `step` through the engine's `save_checkpoint` atomically, then prune to the
    newest `keep`. Returns its folder."""
    import torch.distributed as dist

    folder = Path(run_dir) / ckpt.CHECKPOINT_DIR
    final = folder / ckpt.checkpoint_name(step)
    tmp = folder / f"{ckpt.PARTIAL_PREFIX}{final.name}-deepspeed"  # one name every rank knows
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)  # collective; fsyncs nothing itself
    dist.barrier()
    if main:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        (tmp / ckpt.STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():  # re-saving a step (the final save after a periodic one): the old one goes aside first
            ckpt._remove(final)
        os.rename(tmp, final)
        for old in ckpt.list_checkpoints(run_dir)[:-keep]:
            ckpt._remove(old)
        logger.info("saved deepspeed checkpoint %s", final)
    dist.barrier()
    return final


def load(folder: Path, engine, scheduler, world: int) -> dict:
    """Every rank: read checkpoint `folder` into the engine (weights and optimizer state) and `scheduler`; its
    state. The checkpoint must come from `world` processes."""
    folder = Path(folder)
    if not (folder / DEEPSPEED_DIR).is_dir():
        other = "fsdp (sharded)" if (folder / "sharded").is_dir() else "ddp (full weights)"
        raise ValueError(
            f"checkpoint.resume={str(folder)!r}: a checkpoint of a train.distributed={other} run; resume it with "
            f"--train.distributed {other.split()[0]}"
        )
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    if state.get("world_size", world) != world:
        raise ValueError(
            f"checkpoint.resume={str(folder)!r}: written by {state['world_size']} processes, resuming with {world}; "
            f"a DeepSpeed checkpoint holds one partition per rank: launch {state['world_size']} processes"
        )
    path, _ = engine.load_checkpoint(
        str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise ValueError(f"checkpoint.resume={str(folder)!r}: DeepSpeed could not read {folder / DEEPSPEED_DIR}")
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
    return state

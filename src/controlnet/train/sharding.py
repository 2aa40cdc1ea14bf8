"""Sharded data parallel training (FSDP2, PyTorch's `fully_shard`) of the trainable ControlNet: `train.distributed=fsdp`.

Launched like DDP (`accelerate launch --multi_gpu --num_processes N ... --train.distributed fsdp`): accelerate sets up
the processes, devices and process group; the sharding is done here with torch's `fully_shard`, not through
accelerate's FSDP plugin, because with accelerate 1.16 and no GPU `accelerate launch --use_fsdp --fsdp_version 2`
falls back to independent single processes and a `FullyShardedDataParallelPlugin(fsdp_version=2)` given in code under
`--multi_gpu` is ignored on CPU. `fully_shard` is the call accelerate's FSDP2 path makes on GPUs, and it runs under
gloo on CPU, so the tests exercise what a GPU run executes.

What is sharded: the trainable ControlNet, one FSDP group per block (a UNet ControlNet's hint encoder, down blocks and
middle block; an SD3/Flux ControlNet's joint/double and single transformer blocks), plus the root group (embeddings,
the zero layers: what no block holds). Its parameters become DTensors sharded on dim 0 across the ranks, and the
optimizer is built after sharding, so Adam's moments are sharded too. The locked base is frozen (no gradient, no
optimizer state) and by default replicated: every process holds it whole in the compute dtype. With
`train.fsdp_shard_base` the base's UNet or transformer is sharded the same way (a group per down, middle and up block
of a UNet, per block of a transformer, plus its root), so each rank holds 1/N of it and all-gathers one block at a time
in the forward and backward passes. `train.fsdp_cpu_offload` keeps the sharded parameters, their gradients and Adam's
state on the CPU (FSDP2's `CPUOffloadPolicy`): each group is copied to the device for its computation and the
optimizer steps on the CPU. `model.gradient_checkpointing` recomputes each block in backward; diffusers'
non-reentrant checkpoint calls the block module again, so the recomputation all-gathers its FSDP group as the forward
did.

Mixed precision (`train.mixed_precision=bf16`): the trainable net's groups get FSDP2's
`MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32, cast_forward_inputs=False)`, as accelerate's FSDP2
path does on GPUs: the sharded master weights stay fp32 (so do the gradients' reduce-scatter, Adam's state and the
export), and each group is all-gathered in bf16, half the bytes of an fp32 gather. accelerate's autocast stays on
around the forward, as under DDP: autocast casts each conv/linear input to bf16 (the weights already are: the same
rounding of the same fp32 values autocast would do), and the net's inputs are left as the trainer gives them
(`cast_forward_inputs=False`) so that a flow model's float timesteps reach their fp32 sinusoidal embedding unrounded,
as under DDP. `output_dtype` is left unset: the residuals come out of the zero convolutions in bf16 under autocast,
the dtype of the locked base they are added into, as DDP's do. The locked base is already in the compute dtype, so a
sharded base (`train.fsdp_shard_base`) gets no policy: it is gathered and computed in bf16 as it is stored.
`train.mixed_precision=fp16` is refused under fsdp: it needs a loss scaler over sharded gradients, which is untested
here (and fp16 needs a GPU, like DDP's fp16).

Checkpoints (`checkpoints/step-N/`): `sharded/` is torch.distributed.checkpoint's folder of every rank's shards of the
weights and optimizer state; rank 0 writes `scheduler.pt` and `state.json` beside it, as a DDP checkpoint does. The
folder is written under a `.partial-` name and renamed into place when complete. The export gathers the full weights on
rank 0 (on the CPU) and writes the same files as a DDP run.
"""

from __future__ import annotations

import copy
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

SHARDED_DIR = "sharded"  # torch.distributed.checkpoint's folder inside a checkpoint folder
MODEL_KEY, OPTIM_KEY = "model", "optim"  # the weights' and the optimizer state's entries in SHARDED_DIR
SCHEDULER_FILE = "scheduler.pt"


def check_fsdp_locked(config: TrainConfig) -> None:
    """`model.sd_locked=false` under `train.distributed=fsdp`: one ValueError line, before the base's files are read."""
    if config.train.distributed == "fsdp" and not config.model.sd_locked:
        raise ValueError(
            "train.distributed=fsdp with model.sd_locked=false: sharding is for bases too large to replicate, and "
            "a trained decoder would need its gradients and Adam state (3x its weights) whole on every rank; keep "
            "model.sd_locked=true (the paper's default: the ControlNet alone is trained and sharded), or use "
            "train.distributed=ddp where the base and its decoder's optimizer state fit on one device"
        )


def check_fsdp(config: TrainConfig, arch: str) -> None:
    """One ValueError line for what `train.distributed=fsdp` does not support yet (before any weights load)."""
    c, name = config, "train.distributed=fsdp"
    if c.train.distributed != "fsdp":
        return
    check_fsdp_locked(c)
    if c.model.architecture != "controlnet":
        raise ValueError(
            f"{name} with model.architecture={c.model.architecture!r}: only the paper's ControlNet "
            "(model.architecture=controlnet) is sharded yet"
        )
    refused = {
        "train.reward": c.train.reward,
        "optim.use_8bit_adam": c.optim.use_8bit_adam,
        # fp16 needs a loss scaler over the sharded gradients, untested here (and fp16 needs a GPU); bf16 needs none
        "train.mixed_precision=fp16 (use bf16)": c.train.mixed_precision == "fp16",
    }
    for option, on in refused.items():
        if on:
            raise ValueError(f"{name}: {option} is not supported with sharding yet; turn it off or use ddp")


def check_world(num_processes: int, distributed: str = "fsdp") -> None:
    if num_processes < 2:
        raise ValueError(
            f"train.distributed={distributed}: needs `accelerate launch --multi_gpu --num_processes N` with N >= 2 "
            f"(got {num_processes} process)"
        )


def shard_controlnet(
    net: nn.Module, device: torch.device, cpu_offload: bool = False, compute_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Shard `net` (fp32) in place across all processes (FSDP2); returns a meta-device skeleton of `net` (same classes
    and configs, no storage) that `full_net` fills with the gathered weights for the export. `compute_dtype` (the
    trainer's weight dtype): bfloat16 gathers the fp32 shards in bf16 (`mixed_precision_policy`)."""
    skeleton = meta_skeleton(net)
    shard_blocks(net, device, cpu_offload, mixed_precision_policy(compute_dtype))
    return skeleton


def mixed_precision_policy(compute_dtype: torch.dtype):
    """FSDP2's policy for the trainable fp32 net at `compute_dtype`: bf16 gathers and compute, fp32 gradient reduction
    (module docstring: how it composes with autocast); fp32: None (gathered as stored)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype == torch.float32:
        return None
    assert compute_dtype == torch.bfloat16, compute_dtype  # fp16 is refused by check_fsdp
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_blocks(module: nn.Module, device: torch.device, cpu_offload: bool = False, mp_policy=None) -> None:
    """FSDP2 in place: each of `module`'s blocks (`fsdp_blocks`) its own group, then the root group (what no block
    holds); with `cpu_offload` the shards (and so their gradients and optimizer state) live on the CPU. `mp_policy`: a
    `MixedPrecisionPolicy` for every group (None: gathered and computed in the dtype the parameters are stored in)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # pinned host memory speeds the copies to a GPU; on the CPU there is nothing to pin
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    policy = mp_policy or MixedPrecisionPolicy()
    for block in fsdp_blocks(module):
        fully_shard(block, mesh=mesh, offload_policy=offload, mp_policy=policy)
    fully_shard(module, mesh=mesh, offload_policy=offload, mp_policy=policy)


def fsdp_blocks(module: nn.Module) -> list[nn.Module]:
    """The FSDP groups below the root: an SD3/Flux transformer's (or its ControlNet's) joint/double blocks and Flux's
    single blocks, one each; a UNet's down, middle and up blocks; a UNet ControlNet's hint encoder, down blocks and
    middle block."""
    if hasattr(module, "transformer_blocks"):
        return [*module.transformer_blocks, *getattr(module, "single_transformer_blocks", ())]
    if hasattr(module, "up_blocks"):
        return [*module.down_blocks, module.mid_block, *module.up_blocks]
    return [module.controlnet_cond_embedding, *module.down_blocks, module.mid_block]


def meta_skeleton(net: nn.Module) -> nn.Module:
    """A copy of `net` (same classes and configs) whose parameters are on the meta device: it costs no memory
    (buffers are copied); an export loads the gathered full weights into it."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in net.parameters()}
    return copy.deepcopy(net, memo)


def local_bytes(params) -> int:
    """Bytes of `params` held by this process (a DTensor's local shard, a ZeRO-3 parameter's partition only)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in params:
        t = p.to_local() if isinstance(p, DTensor) else getattr(p, "ds_tensor", p)  # ds_tensor: DeepSpeed ZeRO-3
        total += t.numel() * t.element_size()
    return total


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full (replicated) value; any other tensor as it is. Every rank calls it."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def total_grad_norm(params) -> torch.Tensor:
    """The 2-norm of all gradients of sharded `params`, the same on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    return full_value(torch.nn.utils.get_total_norm(grads))


def full_net(net: nn.Module, skeleton: nn.Module) -> nn.Module | None:
    """Every rank: gather `net`'s full weights; rank 0 gets `skeleton` holding them (on the CPU), others None."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    skeleton.load_state_dict(full, assign=True)
    return skeleton


def save_sharded(
    run_dir: Path, step: int, net: nn.Module, optimizer, scheduler, state: dict, keep: int, extra=None
) -> Path:
    """Every rank: write checkpoint `step` (weights and optimizer state sharded, through torch.distributed.checkpoint)
    atomically, then prune to the newest `keep`. Returns its folder. `extra`: more entries (the EMA's shards:
    train/sharded_validation.py) written with them."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    main = dist.get_rank() == 0
    folder = Path(run_dir) / ckpt.CHECKPOINT_DIR
    final = folder / ckpt.checkpoint_name(step)
    tmp = folder / f"{ckpt.PARTIAL_PREFIX}{final.name}-sharded"  # one name every rank knows
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(net, optimizer)
    # FileSystemWriter fsyncs its files (sync_files=True)
    dcp.save(
        {MODEL_KEY: model_state, OPTIM_KEY: optim_state, **(extra or {})}, checkpoint_id=str(tmp / SHARDED_DIR)
    )
    dist.barrier()
    if main:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        (tmp / ckpt.STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        for name in (SCHEDULER_FILE, ckpt.STATE_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # re-saving a step (the final save after a periodic one): the old one goes aside first
            ckpt._remove(final)
        os.rename(tmp, final)
        for old in ckpt.list_checkpoints(run_dir)[:-keep]:
            ckpt._remove(old)
        logger.info("saved sharded checkpoint %s", final)
    dist.barrier()
    return final


def load_sharded(folder: Path, net: nn.Module, optimizer, scheduler, extra: dict | None = None) -> dict:
    """Every rank: read checkpoint `folder` into the sharded `net`, its `optimizer` and `scheduler` (and `extra`'s
    tensors, in place: entries `save_sharded` wrote); its state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    folder = Path(folder)
    if not (folder / SHARDED_DIR).is_dir():
        raise ValueError(
            f"checkpoint.resume={str(folder)!r}: a checkpoint of a train.distributed=ddp run (full weights); "
            "resume it with --train.distributed ddp"
        )
    model_state, optim_state = get_state_dict(net, optimizer)
    # get_state_dict gives every parameter Adam state; one that never had a gradient (the last copied SD3 block's
    # text-stream layers: their output feeds nothing) had none in the run that saved, and has none after the resume
    saved = dcp.FileSystemReader(str(folder / SHARDED_DIR)).read_metadata().state_dict_metadata
    optim_state["state"] = {
        fqn: state
        for fqn, state in optim_state["state"].items()
        if all(f"{OPTIM_KEY}.state.{fqn}.{key}" in saved for key in state)
    }
    states = {MODEL_KEY: model_state, OPTIM_KEY: optim_state, **(extra or {})}
    dcp.load(states, checkpoint_id=str(folder / SHARDED_DIR))
    # strict=False lets those parameters go without state; every other key was read above (dcp.load raises on one
    # missing from the checkpoint)
    set_state_dict(
        net,
        optimizer,
        model_state_dict=states[MODEL_KEY],
        optim_state_dict=states[OPTIM_KEY],
        options=StateDictOptions(strict=False),
    )
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
    return json.loads((folder / ckpt.STATE_FILE).read_text())

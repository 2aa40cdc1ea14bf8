"""ControlNet training (paper Sec. 3.3 and Sec. 4), as a script that reads top to bottom.

    L = E_{z_0, t, c_t, c_f, eps} || eps - eps_theta(z_t, t, c_t, c_f) ||^2                       (paper Eq. 5)

On an SD3/Flux transformer base the objective is the base's rectified flow instead (velocity of x_s = (1 - s) x_0 +
s eps; train/flow_matching.py), its data, model and loss in train/transformer_step.py; every other step is shared.

1. set up: accelerate (DDP, mixed precision), run folder, resolved config
2. base model (locked), data (scanned, held-out split, buckets), caches of latents and text embeddings
3. ControlNet (fresh copy of the UNet encoder, or an existing one), optimizer, LR schedule, EMA
4. resume from the newest checkpoint (weights, optimizer, schedule, EMA, RNG, data position)
5. loop: micro-batches -> noise -> loss -> backward; non-finite check; clip; step; log; validate; checkpoint
6. export (diffusers + original formats) and report

The step's inputs (data, caches, the per-micro-step random draws that make resume and multi-process runs exact)
come from `batches.TrainingBatches`; the validations of a run from `run_validation`; checkpoint files from
`checkpoint`.

`Trainer.run()` is the whole script. Steps 1-3 and one optimizer step of 5 are public on their own, for callers that
drive the steps themselves (benchmarks, tests): `trainer.setup()`, `trainer.build_model()`, `trainer.step(n)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from controlnet.allocator import reuse_freed_memory
from controlnet.generate.base import BaseComponents, Progress, load_base
from controlnet.io.safe_load import release_file_pages
from controlnet.model.controlled_unet import ControlledUNet
from controlnet.progress import phase
from controlnet.train import checkpoint as ckpt
from controlnet.train import validation as val
from controlnet.train.batches import TrainingBatches
from controlnet.train.config import TrainConfig, base_options
from controlnet.train.locked_conv import lock_convolutions
from controlnet.train.loop import (
    StopOnSignal,
    any_process,
    append_jsonl,
    broadcast_history,
    build_optimizer,
    lr_lambda,
    numpy_state,
    rank_digests,
    truncate_metrics,
)
from controlnet.train.model import decoder_parameters, decoder_state
from controlnet.train.preflight import (
    CONFIG_FILE,
    DECODER_FILE,
    FINAL_DIR,
    check_run,
    export_formats,
    export_path,
    finished_state,
)
from controlnet.train.run_validation import RunValidation
from controlnet.train.transformer_step import (
    ControlledTransformer,
    TransformerBatches,
    build_transformer_controlnet,
    export_layout,
    micro_loss,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOGS_DIR = "logs"  # accelerate trackers (train.log_with) write here, e.g. TensorBoard event files


class NonFiniteLossError(RuntimeError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""


class StepResult(NamedTuple):
    """What one optimizer step (`Trainer.step`) returns."""

    loss: float  # the mean loss (paper Eq. 5) over the step's micro-batches and all processes
    skipped: bool  # the loss or gradient was not finite: no update was made


@dataclass
class StepInfo:
    """What the progress callback receives after every optimizer step."""

    step: int
    max_steps: int
    loss: float
    samples_per_s: float
    lr: float
    skipped: bool = False
    fidelity: float | None = None
    step_seconds: float = 0.0  # wall time of this optimizer step alone (no validation, checkpoint or logging)
    fidelity_by_type: dict[str, float] | None = None  # a union net's: each type's (`fidelity` is their mean)


@dataclass
class RunSummary:
    """The outcome of `train`."""

    run_dir: Path
    status: str  # "finished", "interrupted", "early_stop", "time_limit"
    step: int
    final_dir: Path | None = None
    validation: list[tuple[int, float]] = field(default_factory=list)
    convergence_step: int | None = None
    floor: float | None = None
    ceiling: float | None = None


class Trainer:
    """One training run. `Trainer(config, base).run()`; `base` defaults to loading `config.model.base`.

    `on_load(component, k, n)` reports the base's loading; `on_message(line)` gets one-line news (a resume).
    Driving the steps by hand: `setup()`, then `build_model()`, then `step(0)`, `step(1)`, ... (no checkpoints,
    validation, logging or export: those belong to `run()`).
    """

    def __init__(
        self,
        config: TrainConfig,
        base: BaseComponents | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        on_load: Progress | None = None,
        on_message: Callable[[str], None] | None = None,
    ):
        self.config, self.callback = config, callback
        self.sharded = config.train.distributed == "fsdp"  # FSDP2: the trainable net sharded (train/sharding.py)
        self.zero = config.train.distributed == "deepspeed"  # DeepSpeed ZeRO engine (train/deepspeed_engine.py)
        self._base = base
        self.on_load, self.on_message = on_load, on_message or (lambda line: None)

    # ------------------------------------------------------------------------------------------------------
    # 1-2. set-up, base, data, caches
    def setup(self) -> None:
        """Steps 1-2: accelerate, the run folder and its config.json, the locked base on the device, the data and
        the caches of latents and text embeddings (`self.data`)."""
        from accelerate import Accelerator

        c = self.config
        # ControlNet++'s consistency reward (train/reward.py): its detector is known before anything loads
        if c.train.reward:
            from controlnet.train.reward import resolve_detector

            resolve_detector(c)
        # every option that needs no weights first (train/preflight.py): nothing is written or loaded before they
        # are known to be right
        if self.sharded:  # before the base's files: a transformer base refuses the option in its own words
            from controlnet.train.sharding import check_fsdp_locked

            check_fsdp_locked(c)
        source = check_run(c, self._base)
        if self.sharded:
            from controlnet.train.sharding import check_fsdp

            check_fsdp(c, source.arch if source is not None else getattr(self._base, "arch", "unet"))
        if self.zero:
            from controlnet.train.deepspeed_engine import check_deepspeed

            check_deepspeed(c, source.arch if source is not None else getattr(self._base, "arch", "unet"))
        # without CUDA, `accelerate launch --multi_gpu --num_processes N` gives N gloo CPU processes only when the
        # Accelerator is told cpu=True (otherwise every process believes it is alone)
        if c.train.threads:
            torch.set_num_threads(c.train.threads)
        cpu = c.train.cpu or not torch.cuda.is_available()
        if cpu and c.train.reuse_freed_memory:
            reuse_freed_memory()
        self.run_dir = Path(c.train.output_dir)
        trackers = list(c.train.log_with) or None
        zero = {}
        if self.zero:  # the DeepSpeed plugin (and gloo without CUDA: cpu=True would turn DeepSpeed off)
            from controlnet.train.deepspeed_engine import accelerator_kwargs

            zero, cpu = accelerator_kwargs(c, cpu), False
        elif (source.arch if source is not None else getattr(self._base, "arch", "unet")) == "sd3":
            from accelerate.utils import DistributedDataParallelKwargs

            # DDP: the last copied SD3 block's text-stream output feeds nothing (the net returns image tokens), so its
            # to_add_out and ff_context get no gradient, and DDP must be told to expect that
            zero = {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]}
        self.acc = Accelerator(
            mixed_precision=c.train.mixed_precision,
            cpu=cpu,
            log_with=trackers,
            project_dir=str(self.run_dir / LOGS_DIR),
            **zero,
        )
        if self.zero:  # the locked base loads whole, not partitioned by ZeRO-3 (train/deepspeed_engine.py)
            from controlnet.train.deepspeed_engine import keep_base_whole

            keep_base_whole()
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        # sharded weights (FSDP, DeepSpeed ZeRO): our checkpoints and exports are written from full ones
        if self.acc.distributed_type.name in ("FSDP", "DEEPSPEED") and not self.zero:
            raise ValueError(
                f"accelerate launch with {self.acc.distributed_type.name}: training supports DDP "
                "(`accelerate launch --multi_gpu`), whose checkpoints and exports hold every weight; for sharding "
                "use `accelerate launch --multi_gpu` with --train.distributed fsdp or deepspeed"
            )
        if self.sharded:
            from controlnet.train.sharding import check_world

            check_world(self.world)
        base = self._base or load_base(source, ema=c.model.ema, progress=self.on_load, **base_options(c.model))
        self.base = base
        self.device = self.acc.device
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            c.train.mixed_precision, torch.float32
        )
        if self.acc.is_main_process:
            from controlnet.precision import precision_warning

            warning = precision_warning(
                self.weight_dtype, self.device, f"train.mixed_precision={c.train.mixed_precision}"
            )
            if warning:
                self.on_message(warning)
        for module in (base.unet, base.vae, *base.text_modules()):
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)
        self.flow = getattr(base, "arch", "unet") != "unet"  # a transformer base: the rectified-flow objective
        kind = None if self.flow else base.unet.config.get("addition_embed_type")
        if kind not in (None, "text_time"):
            raise ValueError(
                f"model.base: UNet addition_embed_type={kind!r}; training supports SD1.x/2.x and SDXL"
            )
        cache_dir = Path(c.data.cache_dir) if c.data.cache_dir else self.run_dir / "cache"
        # data: every file scanned before training; the last samples are held out for validation
        batches = TransformerBatches if self.flow else TrainingBatches
        self.data = batches(c, base, self.acc, cache_dir, self.weight_dtype)
        # the run folder's config.json once the data has passed its checks too (a run that fails on an option
        # leaves no run folder behind)
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(c.to_dict(), indent=2) + "\n")
            ckpt.remove_partial(self.run_dir)
        self.acc.wait_for_everyone()
        if self._base is None and not c.train.reward and self.data.encoders_done(validation=_validates(c)):
            _release_encoders(base)

    # ------------------------------------------------------------------------------------------------------
    # 3. the trainable model
    def build_model(self) -> None:
        """Step 3 (after `setup`): the trainable ControlNet (`self.controlnet`), the locked UNet in the compute dtype,
        the optimizer (`self.optimizer`), the LR schedule and the EMA."""
        with phase("building the trainable ControlNet"):  # a copy of the UNet's encoder: seconds at SD size
            before = _tensors(self.base.modules())
            self._build_model()
            self.reward = None
            if self.config.train.reward:  # the VAE decoder and detector of the consistency term (train/reward.py)
                from controlnet.train.reward import Reward

                self.reward = Reward(self.config, self.base, getattr(self.data, "noise_scheduler", None))
            # the locked modules' tensors replaced by a cast or a channels_last copy: a base memory-mapped from its
            # file (generate/base.py) kept their pages resident beside the copies, 2.3 GB at SD1.5 size
            held = {t.data_ptr() for t in _tensors(self.base.modules())}
            release_file_pages(t for t in before if t.data_ptr() not in held)

    def _build_model(self) -> None:
        if self.flow:
            return self._build_transformer_model()
        c, base = self.config, self.base
        from controlnet.model.controlnet import ControlNet
        from controlnet.model.lite import ControlNetLite
        from controlnet.model.union_controlnet import UnionControlNet

        if c.model.controlnet:
            from controlnet.generate.base import controlnet_path
            from controlnet.io.api import load_controlnet

            net = load_controlnet(controlnet_path(c.model.controlnet), unet=base.unet.float())
        else:
            kwargs = {"hint_block_channels": c.model.hint_channels} if c.model.hint_channels else {}
            torch.manual_seed(c.train.seed)  # the new hint encoder's init: the same in every process and run
            # the paper's trainable copy, or the ablation's one conv per block (same interface, model/lite.py), or
            # the copy with a union front end for several condition types (train/union.py)
            architecture = {"lite": ControlNetLite, "union": UnionControlNet}.get(c.model.architecture, ControlNet)
            if c.model.architecture == "union":
                from controlnet.train.union import type_ids

                kwargs["num_control_type"] = type_ids(self.data.union_names)[1]
            net = architecture.from_unet(
                base.unet.float(),
                cond_channels=c.model.cond_channels,
                hint_downscale_factor=self.data.vae_factor,
                **kwargs,
            )
            if c.model.connection_init == "gaussian":
                from controlnet.model.ablations import gaussian_connections

                gaussian_connections(net, seed=c.train.seed)
        net = net.float().to(self.device).requires_grad_(True).train()
        self.controlnet = net
        params = [{"params": list(net.parameters()), "lr": c.optim.lr}]
        if not c.model.sd_locked:
            dec = decoder_parameters(base.unet)
            for p in dec:
                p.requires_grad_(True)
            params.append({"params": dec, "lr": c.optim.decoder_lr or c.optim.lr})
            base.unet.train()
        else:
            # locked weights need no fp32 master copy: keep them in the compute dtype (as diffusers does)
            base.unet.to(self.weight_dtype)
        if base.vae is not None:
            base.vae.to(self.weight_dtype)
        for module in base.text_modules():
            module.to(self.weight_dtype)
        # the locked convolutions keep no input for backward (their weights get no gradient; locked_conv.py)
        lock_convolutions(base.unet)
        if c.model.channels_last:
            # NHWC: oneDNN's convolutions (forward and backward) are ~2x faster for the hint encoder's narrow,
            # full-resolution convs on CPU, and tensor cores want it on GPU. Values are unchanged, only strides.
            if not (self.sharded or self.zero):  # FSDP2 and ZeRO shard contiguous parameters only
                net.to(memory_format=torch.channels_last)
            if not c.train.fsdp_shard_base:  # a sharded base's too
                base.unet.to(memory_format=torch.channels_last)
        if c.model.gradient_checkpointing:
            net.enable_gradient_checkpointing()
            base.unet.enable_gradient_checkpointing()
        # FSDP2: shard the trainable net, then build the optimizer over its shards (sd_locked only)
        if self.sharded:
            from controlnet.train.sharding import shard_controlnet

            self.skeleton = shard_controlnet(net, self.device, c.train.fsdp_cpu_offload, self.weight_dtype)
            params = [{"params": list(net.parameters()), "lr": c.optim.lr}]
            if c.train.fsdp_shard_base:  # the locked UNet's blocks too: each rank holds 1/N of it
                from controlnet.train.sharding import shard_blocks

                shard_blocks(base.unet, self.device, c.train.fsdp_cpu_offload)
        self.trainable = [p for group in params for p in group["params"]]
        self.optimizer = build_optimizer(c.optim, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(c.optim.lr_schedule, c.optim.warmup_steps, c.train.max_steps)
        )
        if c.model.architecture == "union":
            from controlnet.train.union import UnionControlledUNet, type_ids

            ids = type_ids(self.data.union_names)[0]
            model = UnionControlledUNet(net, base.unet, ids, c.model.only_mid_control, c.model.channels_last)
        else:
            model = ControlledUNet(net, base.unet, c.model.only_mid_control)
        # the LR scheduler is stepped by hand: accelerate's wrapper would step it once per process
        if self.sharded:  # no DDP wrapper: the sharded net reduce-scatters its own gradients, the base has none
            self.model = model
        elif self.zero:  # the engine holds the trainable net and its optimizer; the locked base stays outside
            from controlnet.train.deepspeed_engine import prepare

            self.engine, self.optimizer, self.skeleton = prepare(self.acc, net, self.optimizer)
            model.controlnet = self.engine
            self.model = model
        else:
            self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.ema = [p.detach().clone().float() for p in self.trainable] if c.optim.ema_decay else None

    def _build_transformer_model(self) -> None:
        """Step 3 on a transformer base: the copy of its first blocks (or model.controlnet), the rest locked in the
        compute dtype; the same optimizer, schedule and EMA as the UNet's."""
        c, base = self.config, self.base
        torch.manual_seed(c.train.seed)  # parts of a fresh net that are neither copied nor zero (none today)
        net = build_transformer_controlnet(c, base)
        if c.model.connection_init == "gaussian":  # the paper's ablation (model/ablations.py), as on a UNet base
            from controlnet.model.ablations import gaussian_connections

            gaussian_connections(net, seed=c.train.seed)
        net = net.float().to(self.device).requires_grad_(True).train()
        self.controlnet = net
        self.data.use_net(net)
        for module in base.modules():
            if module is not None:
                module.to(self.weight_dtype)
        if c.model.gradient_checkpointing:
            net.enable_gradient_checkpointing()
            base.transformer.enable_gradient_checkpointing()
        # FSDP2 (train/sharding.py): each transformer block of the net its own group plus the root, the base's too
        # with train.fsdp_shard_base; the optimizer is built after sharding, over the shards
        if self.sharded:
            from controlnet.train.sharding import shard_blocks, shard_controlnet

            self.skeleton = shard_controlnet(net, self.device, c.train.fsdp_cpu_offload, self.weight_dtype)
            if c.train.fsdp_shard_base:
                shard_blocks(base.transformer, self.device, c.train.fsdp_cpu_offload)
        self.trainable = list(net.parameters())
        self.optimizer = build_optimizer(c.optim, [{"params": self.trainable, "lr": c.optim.lr}])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(c.optim.lr_schedule, c.optim.warmup_steps, c.train.max_steps)
        )
        model = ControlledTransformer(net, base.transformer, base.arch, c.flow.guidance)
        if self.sharded:  # no DDP wrapper: the sharded net reduce-scatters its own gradients, the base has none
            self.model = model
        else:
            self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.ema = [p.detach().clone().float() for p in self.trainable] if c.optim.ema_decay else None

    # ------------------------------------------------------------------------------------------------------
    # 4. checkpoints
    def _weights(self) -> dict[str, dict[str, torch.Tensor]]:
        weights = {"controlnet": {k: v.float() for k, v in self.controlnet.state_dict().items()}}
        if not self.config.model.sd_locked:
            weights["decoder"] = decoder_state(self.base.unet)
        if self.ema is not None:
            weights["ema"] = {str(k): v for k, v in enumerate(self.ema)}
        return weights

    def _save(self, state: dict) -> None:
        if self.zero:  # every rank writes its partition through the engine (train/deepspeed_engine.py)
            from controlnet.train.deepspeed_engine import save

            with phase(f"saving the deepspeed checkpoint of step {state['step']}"):
                main, keep = self.acc.is_main_process, self.config.checkpoint.keep
                save(self.run_dir, state["step"], self.engine, self.scheduler, state, keep, main)
            return
        if self.sharded:  # every rank writes its shards (train/sharding.py)
            from controlnet.train.sharding import save_sharded

            with phase(f"saving the sharded checkpoint of step {state['step']}"):
                from controlnet.train.sharded_validation import ema_state

                net, keep = self.controlnet, self.config.checkpoint.keep
                extra = ema_state(self.ema) if self.ema is not None else None  # its shards, beside the weights'
                save_sharded(self.run_dir, state["step"], net, self.optimizer, self.scheduler, state, keep, extra)
            return
        if self.acc.is_main_process:
            data = ckpt.CheckpointData(
                self._weights(), self.optimizer.state_dict(), self.scheduler.state_dict(), state
            )
            with phase(f"saving the checkpoint of step {state['step']}"):
                ckpt.save_checkpoint(self.run_dir, state["step"], data, self.config.checkpoint.keep)
        self.acc.wait_for_everyone()

    def _resume(self) -> dict | None:
        folder = ckpt.find_resume(self.run_dir, self.config.checkpoint.resume)
        if folder is None:
            return None
        if self.zero:
            from controlnet.train.deepspeed_engine import load

            with phase(f"reading the deepspeed checkpoint {folder.name}"):
                state = load(folder, self.engine, self.scheduler, self.world)
        elif self.sharded:
            from controlnet.train.sharded_validation import ema_state, saved_ema
            from controlnet.train.sharding import load_sharded

            with phase(f"reading the sharded checkpoint {folder.name}"):
                # the EMA's shards are read in place (a checkpoint without one leaves it as built, as DDP's does)
                keep_ema = self.ema is not None and saved_ema(folder / "sharded")
                extra = ema_state(self.ema) if keep_ema else None
                state = load_sharded(folder, self.controlnet, self.optimizer, self.scheduler, extra)
        else:
            with phase(f"reading the checkpoint {folder.name}"):
                data = ckpt.load_checkpoint(folder)
            self.controlnet.load_state_dict(data.weights["controlnet"])
            if "decoder" in data.weights:
                self.base.unet.load_state_dict(data.weights["decoder"], strict=False)
            if self.ema is not None and "ema" in data.weights:
                self.ema = [data.weights["ema"][str(k)].to(self.device) for k in range(len(self.ema))]
            self.optimizer.load_state_dict(data.optimizer)
            self.scheduler.load_state_dict(data.scheduler)
            state = data.state
        if state.get("world_size", self.world) != self.world:
            logger.warning(
                "checkpoint %s was written by %d processes, resuming with %d: the global batch and data "
                "order change from here on",
                folder,
                state["world_size"],
                self.world,
            )
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        np.random.set_state(
            tuple(state["numpy_rng"][:1])
            + (np.array(state["numpy_rng"][1], np.uint32),)
            + tuple(state["numpy_rng"][2:])
        )
        logger.info("resumed from %s at step %d", folder, state["step"])
        if self.acc.is_main_process:
            self.on_message(f"resuming from checkpoint step {state['step']} ({folder})")
        return state

    # ------------------------------------------------------------------------------------------------------
    # 5. one optimizer step
    def step(self, step: int) -> StepResult:
        """Optimizer step number `step` (from 0; after `setup` and `build_model`): its grad_accum micro-batches
        (paper Eq. 5), backward, the non-finite check, clipping, the update, the LR schedule and the EMA."""
        c = self.config
        accum = c.optim.grad_accum
        total = torch.zeros((), device=self.device)
        amp = self.acc.autocast
        if self.zero:  # accelerate's autocast is off under DeepSpeed (train/deepspeed_engine.py)
            from controlnet.train.deepspeed_engine import autocast

            amp = autocast(self.device, self.weight_dtype)
        for k in range(accum):
            batch = self.data.micro_batch(step * accum + k)
            sync = k == accum - 1
            with self.acc.no_sync(self.model) if not sync else contextlib.nullcontext(), amp():
                if self.flow:  # x_s, s, text, condition -> w(s) || v - (eps - x_0) ||^2 (transformer_step.py)
                    loss = micro_loss(self.model, batch, self.weight_dtype, c.flow.weighting_scheme, self.reward)
                else:
                    loss = self._unet_loss(batch)
                if self.zero:  # the engine's backward and micro-step (train/deepspeed_engine.py)
                    from controlnet.train.deepspeed_engine import backward

                    backward(self.engine, loss, accum, last=sync)
                else:
                    self.acc.backward(loss / accum)
            total += loss.detach() / accum
        mean_loss = self.acc.reduce(total, reduction="mean")
        grad_norm = torch.zeros((), device=self.device)
        if self.zero:  # DeepSpeed clips and updates, or skips a non-finite step; the LR schedule is ours
            from controlnet.train.deepspeed_engine import update

            finite = not update(self.engine) and bool(torch.isfinite(mean_loss))
            if finite:
                self.scheduler.step()
            return StepResult(float(mean_loss), not finite)
        if c.optim.max_grad_norm:
            grad_norm = self.acc.clip_grad_norm_(self.trainable, c.optim.max_grad_norm)
            if self.sharded:  # a DTensor: its value on every rank
                from controlnet.train.sharding import full_value

                grad_norm = full_value(grad_norm)
        elif self.sharded:
            from controlnet.train.sharding import total_grad_norm

            grad_norm = total_grad_norm(self.trainable)
        else:
            grads = [p.grad for p in self.trainable if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        finite = bool(torch.isfinite(mean_loss)) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                with torch.no_grad():
                    for e, p in zip(self.ema, self.trainable, strict=True):
                        e.lerp_(p.detach().float(), 1 - c.optim.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(float(mean_loss), not finite)

    def _unet_loss(self, batch) -> torch.Tensor:
        """|| eps - eps_theta(z_t, t, c_t, c_f) ||^2 of one micro-batch (paper Eq. 5)."""
        noisy, cond = batch.noisy, batch.cond
        if self.config.model.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
            if batch.keep is None:  # a union net's (b, K, C, H, W) conditions: per condition (train/union.py)
                cond = cond.contiguous(memory_format=torch.channels_last)
        added = batch.added_cond and {k: v.to(self.weight_dtype) for k, v in batch.added_cond.items()}
        union = {} if batch.keep is None else {"keep": batch.keep}  # the conditions each row uses this step
        pred = self.model(noisy, batch.timesteps, batch.context.to(self.weight_dtype), cond, added, **union)
        loss = F.mse_loss(pred.float(), batch.target.float(), reduction="mean")  # paper Eq. 5
        if self.reward is not None:  # + lambda * ControlNet++'s consistency term (train/reward.py)
            loss = loss + self.reward.unet_term(pred, batch.noisy, batch.timesteps, batch.cond)
        return loss

    # ------------------------------------------------------------------------------------------------------
    # logging: metrics.jsonl (always) and the accelerate trackers of train.log_with (TensorBoard, ...)
    def _start_logging(self, start: int) -> None:
        if self.acc.is_main_process:
            truncate_metrics(self.run_dir / METRICS_FILE, start)
        if self.config.train.log_with:
            flat = {
                f"{section}.{k}": v if isinstance(v, int | float | str | bool) else str(v)
                for section, fields in self.config.to_dict().items()
                for k, v in fields.items()
            }
            self.acc.init_trackers(self.run_dir.name or "controlnet", config=flat)

    def log(self, record: dict) -> None:
        """Main process: one metrics.jsonl line (with elapsed_s); numbers also go to the trackers."""
        record = {**record, "elapsed_s": time.time() - self.started}
        append_jsonl(self.run_dir / METRICS_FILE, record)
        if self.config.train.log_with:
            prefix = "validation/" if record.get("event") else "train/"
            # a union net's {type: value} fields as one number each: validation/fidelity_by_type/canny
            flat = {
                f"{k}/{t}" if isinstance(v, dict) else k: x
                for k, v in record.items()
                for t, x in (v.items() if isinstance(v, dict) else [(None, v)])
            }
            numbers = {
                prefix + k: v
                for k, v in flat.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
            }
            self.acc.log(numbers, step=record["step"])

    # ------------------------------------------------------------------------------------------------------
    # the run
    def run(self) -> RunSummary:
        run_started = time.time()
        done = finished_state(self.config)  # a rerun with nothing to do says so before loading anything
        if done is not None:
            return self._nothing_to_do(done)
        self.setup()
        self.build_model()
        c = self.config
        state = self._resume() or {}
        start, step = state.get("step", 0), state.get("step", 0)
        history = [tuple(h) for h in state.get("validation", [])]
        streak = state.get("nonfinite_streak", 0)
        floor_ceiling = state.get("floor_ceiling")
        status = "finished"
        # a run that stopped early, or used up its time, stays stopped: running it again only exports and reports
        if state.get("status") == "early_stop":
            status = "early_stop"
        self.started = run_started - state.get("elapsed_s", 0.0)  # max_minutes counts set-up too
        do_val = _validates(c)
        validation = RunValidation(self) if do_val else None  # train/run_validation.py
        self._start_logging(start)
        if self.world > 1:  # each process's bytes of trainable weights (1/world of the net's under sharding)
            from accelerate.utils import gather_object

            from controlnet.train.sharding import local_bytes

            locked = self.base.transformer if self.flow else self.base.unet
            per_rank = list(gather_object([(local_bytes(self.trainable), local_bytes(locked.parameters()))]))
            if self.acc.is_main_process:
                self.log(
                    {
                        "step": start,
                        "event": "memory",
                        "trainable_param_bytes": [t for t, _ in per_rank],
                        "base_param_bytes": [b for _, b in per_rank],  # the locked UNet or transformer
                    }
                )
        # sharded: every process generates its share of the floor's images (a sharded base needs them all)
        if (self.acc.is_main_process or self.sharded) and do_val and floor_ceiling is None:
            floor_ceiling = validation.floor_and_ceiling(start)
        global_batch = c.train.batch_size * self.world * c.optim.grad_accum
        window_t, window_steps = time.time(), 0
        with StopOnSignal() as stop:
            if state.get("status") == "time_limit" and self._out_of_time():
                status = "time_limit"
            while step < c.train.max_steps and status == "finished":
                step_started = time.perf_counter()
                loss, skipped = self.step(step)
                step_seconds = time.perf_counter() - step_started
                step += 1
                window_steps += 1
                # Adam's state exists from the first step on (DeepSpeed's is inside its engine)
                if step == start + 1 and self.world > 1 and not self.zero:
                    self._log_optimizer_bytes(step)
                streak = streak + 1 if skipped else 0
                if streak >= c.train.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{streak} optimizer steps in a row had a non-finite loss or gradient (last at step "
                        f"{step}); lower optim.lr, enable optim.max_grad_norm, or check the data; the last "
                        "checkpoint holds the last finite weights"
                    )
                fidelity = by_type = None
                if do_val and step % c.validation.every == 0:
                    fidelity, by_type = validation.record(step, history)
                    history = broadcast_history(self.acc, history)
                elapsed = time.time() - window_t
                rate = window_steps * global_batch / elapsed if elapsed > 0 else 0.0
                lr = self.scheduler.get_last_lr()[0]
                if self.acc.is_main_process and (
                    step % c.train.log_every == 0 or skipped or step == c.train.max_steps
                ):
                    self.log({"step": step, "loss": loss, "lr": lr, "samples_per_s": rate, "skipped": skipped})
                if self.callback:
                    self.callback(
                        StepInfo(step, c.train.max_steps, loss, rate, lr, skipped, fidelity, step_seconds, by_type)
                    )
                stop_now = any_process(self.acc, stop.requested)
                if c.validation.early_stop and val.should_stop_early(
                    history, c.validation.threshold, c.validation.patience
                ):
                    status = "early_stop"
                if status == "finished" and self._out_of_time():
                    status = "time_limit"
                state_now = {
                    "step": step,
                    "micro_step": step * c.optim.grad_accum,
                    "status": status,
                    "nonfinite_streak": streak,
                    "validation": history,
                    "floor_ceiling": floor_ceiling,
                    "elapsed_s": time.time() - self.started,
                    "torch_rng": torch.get_rng_state().tolist(),
                    "numpy_rng": numpy_state(),
                    "world_size": self.world,
                }
                periodic = c.checkpoint.every and step % c.checkpoint.every == 0
                due = stop_now or periodic or status != "finished" or step == c.train.max_steps
                if due and streak == 0:  # never checkpoint right after a skipped (non-finite) step
                    self._save(state_now)
                if stop_now:
                    status = "interrupted"
        return self._finish(status, step, history, floor_ceiling, validation)

    def _log_optimizer_bytes(self, step: int) -> None:
        """Every process: its bytes of optimizer state (Adam's moments: 1/world of DDP's under FSDP) as an
        `optimizer_memory` event of metrics.jsonl."""
        from accelerate.utils import gather_object

        from controlnet.train.sharding import local_bytes

        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        per_rank = list(gather_object([local_bytes(state)]))
        if self.acc.is_main_process:
            self.log({"step": step, "event": "optimizer_memory", "optimizer_state_bytes": per_rank})

    def _nothing_to_do(self, state: dict) -> RunSummary:
        """The summary of a finished run from its newest checkpoint's state (`preflight.finished_state`)."""
        c = self.config
        run_dir, step = Path(c.train.output_dir), int(state["step"])
        status = "finished" if step >= c.train.max_steps else state["status"]
        history = [tuple(h) for h in state.get("validation", [])]
        summary = RunSummary(run_dir, status, step, final_dir=run_dir / FINAL_DIR, validation=history)
        if state.get("floor_ceiling"):
            summary.floor, summary.ceiling = state["floor_ceiling"]["floor"], state["floor_ceiling"]["ceiling"]
        summary.convergence_step = val.convergence_step(history, c.validation.threshold)
        self.on_message(
            f"nothing to do: {run_dir} is already {status.replace('_', ' ')} at step {step} "
            f"(train.max_steps={c.train.max_steps}) with its export and report; raise train.max_steps to train on"
        )
        return summary

    def _out_of_time(self) -> bool:
        """train.max_minutes is used up (on any process: all of them stop together)."""
        minutes = self.config.train.max_minutes
        return bool(minutes) and any_process(self.acc, (time.time() - self.started) / 60 >= minutes)

    def _finish(
        self, status: str, step: int, history: list, floor_ceiling: dict | None, validation: RunValidation | None
    ) -> RunSummary:
        """Final validation, rank check, export, report."""
        c = self.config
        if validation and status != "interrupted" and (not history or history[-1][0] != step):
            # the exported weights get a score of their own: the report's final number is theirs
            validation.record(step, history)
            history = broadcast_history(self.acc, history)
        # sharded: every rank holds other weights by design (the export gathers them)
        sharded = self.sharded or self.zero
        digests = [] if sharded else rank_digests(self.acc, self.trainable)
        if self.acc.is_main_process and self.world > 1 and not sharded:
            self.log({"step": step, "event": "ranks", "weight_sha256": digests})
            if len(set(digests)) != 1:
                raise RuntimeError(f"processes hold different weights after step {step}: {digests}")
        summary = RunSummary(self.run_dir, status, step, validation=history)
        if floor_ceiling:
            summary.floor, summary.ceiling = floor_ceiling["floor"], floor_ceiling["ceiling"]
        summary.convergence_step = val.convergence_step(history, c.validation.threshold)
        if status != "interrupted":
            with phase(f"exporting the trained ControlNet to {self.run_dir / FINAL_DIR}"):
                summary.final_dir = self._export()
        if self.acc.is_main_process:
            from controlnet.train.report import write_report

            write_report(self.run_dir, c, summary)
        if c.train.log_with:
            self.acc.end_training()
        self.acc.wait_for_everyone()
        return summary

    # ------------------------------------------------------------------------------------------------------
    # 6. export
    def _export(self) -> Path | None:
        net = self.controlnet
        if self.ema is not None:  # the EMA weights are exported (every rank: a sharded net is gathered next)
            from controlnet.train.sharded_validation import copy_into

            copy_into(self.trainable, self.ema)
        if self.sharded:  # every rank sends its shards; rank 0 holds the full weights, on the CPU
            from controlnet.train.sharding import full_net

            net = full_net(net, self.skeleton)
        elif self.zero:  # ZeRO-3: every rank sends its partitions; rank 0 holds the full weights, on the CPU
            from controlnet.train.deepspeed_engine import full_net

            net = full_net(self.engine, self.skeleton, self.acc.is_main_process)
        if not self.acc.is_main_process:
            return None
        from controlnet.io.api import save_controlnet

        final = self.run_dir / FINAL_DIR
        if self.flow:  # a diffusers folder, and the publisher's one file (transformer_step.export_layout)
            from controlnet.io.transformer_layouts import save_transformer_controlnet

            for fmt in self.config.checkpoint.export_formats:
                save_transformer_controlnet(net, export_path(final, fmt), export_layout(net, fmt))
            return final
        if self.config.model.architecture == "lite":  # no diffusers or original format exists for it
            from controlnet.io.lite import save_lite

            save_lite(net, final / "controlnet")
            return final
        for fmt in export_formats(self.config):
            save_controlnet(net, export_path(final, fmt), format=fmt)
        if not self.config.model.sd_locked:
            from controlnet.io.safe_load import write_state_dict

            write_state_dict(decoder_state(self.base.unet), final / DECODER_FILE)
        return final


def _tensors(modules) -> list[torch.Tensor]:
    """The tensors behind `modules`' parameters and buffers now (detached aliases: a conversion that swaps a
    parameter's data, as `Module.to` does, leaves them on the old memory)."""
    return [t.detach() for m in modules if m is not None for t in (*m.parameters(), *m.buffers())]


def _validates(c: TrainConfig) -> bool:
    return c.validation.every > 0 and c.validation.metric != "none"


def _release_encoders(base: BaseComponents) -> None:
    """Free the VAE's and text encoders' weights once every latent and text embedding is cached (0.8 GB at SD1.5
    size): their modules stay, on the meta device, for their configs (the latents' scaling factor)."""
    modules = [base.vae, *base.text_modules()]
    tensors = _tensors(modules)
    for module in modules:
        if module is not None:
            module.to("meta")
    release_file_pages(tensors)  # a memory-mapped base: the mapping outlives these tensors (the UNet's remain)
    logger.info("VAE and text encoders released: every latent and text embedding is cached")


def train(
    config: TrainConfig,
    base: BaseComponents | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    on_load: Progress | None = None,
    on_message: Callable[[str], None] | None = None,
) -> RunSummary:
    """Train a ControlNet as `config` says; see the module docstring for the steps and `Trainer` for the hooks."""
    return Trainer(config, base, callback, on_load, on_message).run()


__all__ = ["NonFiniteLossError", "RunSummary", "StepInfo", "StepResult", "Trainer", "train"]

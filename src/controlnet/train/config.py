"""Typed training configuration: one dataclass per concern, loaded from YAML/JSON plus `--section.field` flags.

Every field has a default and a docstring; the docstrings are the CLI help (`controlnet train --help`), so the
config file, the flags and the code cannot drift apart (docs/style.md#typed-dataclass-configs). Values are
validated in `__post_init__`
with errors that name the field, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path

from controlnet.settings_cli import parse_value

logger = logging.getLogger(__name__)

DATA_FORMATS = ("auto", "original", "imagefolder", "hf", "webdataset")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")  # accelerate's names
MIXED_PRECISION = ("no", "bf16", "fp16")
DISTRIBUTED = ("ddp", "fsdp", "deepspeed")  # train.distributed: replicated (DDP) or sharded (FSDP2, ZeRO)
ZERO_STAGES = (2, 3)  # train.zero_stage: DeepSpeed ZeRO-2 (gradients + optimizer state) or ZeRO-3 (+ weights)
LR_SCHEDULES = ("constant", "cosine", "linear")
EXPORT_FORMATS = ("diffusers", "original")
METRICS = ("auto", "fill_iou", "edge_f1", "none")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# diffusers' SD3/Flux trainers' --weighting_scheme (training_utils: sampling density and loss weighting)
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "uniform", "none")
# The parts of an SD3 / Flux checkpoint file given beside it: generate/options.py `BaseParts`' fields, repeated in
# `ModelConfig` with BaseParts' docstrings (generate/options.py imports torch, which `controlnet --help` must not;
# tests/train/test_transformer_single_file_training.py checks that both agree).
BASE_PARTS = ("vae", "clip_l", "clip_g", "t5")
# How the base options are spelled on `controlnet train`'s command line, for the loader's error messages.
BASE_FLAGS = {
    "base": "--model.base",
    "tokenizer": "--model.tokenizer",
    "tokenizer_2": "--model.tokenizer_2",
    "base_config": "--model.base_config",
    "ema": "--model.ema true",
    "no_ema": "--model.ema false",
    **{name: f"--model.{name}" for name in BASE_PARTS},
}
# Paper Sec. 3.3 / Sec. 4: "we randomly replace 50% text prompts c_t with empty strings".
PAPER_EMPTY_PROMPT_PROB = 0.5
# The reference training script (tutorial_train.py) uses AdamW with learning rate 1e-5.
PAPER_LEARNING_RATE = 1e-5
# A union net's default chance of keeping each of a sample's conditions (train/union.py): half of the time, so that
# every subset of the types is trained, at least one kept per sample.
UNION_KEEP_PROB = 0.5
# The conditions the consistency reward has a differentiable detector for (train/detectors.py).
REWARD_DETECTORS = ("canny", "fill", "seg", "pose", "hed", "pidinet", "lineart_standard")


def check_reward_detector(name: str, field: str = "train.reward_detector") -> None:
    """Refuse, in one line, a condition that has no differentiable detector (train/detectors.py)."""
    if name not in REWARD_DETECTORS:
        raise ValueError(
            f"{field}={name!r}: no differentiable detector for the {name!r} condition; the reward has detectors "
            f"for {', '.join(REWARD_DETECTORS)}"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")


def _choice_tuple(name: str, value, choices: tuple[str, ...]) -> tuple[str, ...]:
    """A tuple-of-choices field: a list, or one string from a config file ("a" or "a,b"), each value checked."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    value = tuple(str(v) for v in value)
    for v in value:
        _check_choice(name, v, choices)
    return value


def _check_positive(owner: object, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(owner, name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"{name}={value!r}: expected {'>= 0' if allow_zero else '> 0'}")


@dataclass
class DataConfig:
    """Where the paired (target, condition, prompt) data comes from and how it is transformed."""

    path: str = ""
    """dataset: a folder (original prompt.json layout, imagefolder metadata.jsonl, HF save_to_disk), a .parquet file, or a folder/glob of .tar shards"""
    format: str = "auto"
    """auto | original | imagefolder | hf | webdataset"""
    resolution: int = 512
    """training side in pixels (with bucketing: the bucket area is resolution**2)"""
    center_crop: bool = True
    """crop the centre after resizing (False: a random crop, which disables the latent cache)"""
    random_flip: bool = False
    """flip target and condition together horizontally at random (disables the latent cache)"""
    bucketing: bool = False
    """aspect-ratio bucketing: group images into buckets of about resolution**2 pixels with their aspect ratio"""
    skip_bad: bool = False
    """skip missing or corrupt samples (reported by path) instead of refusing to start"""
    empty_prompt_prob: float = PAPER_EMPTY_PROMPT_PROB
    """probability of replacing a prompt by "" (paper Sec. 3.3: 50%; diffusers' script: 0)"""
    image_column: str = "image"
    """column (imagefolder / HF) or tar extension key (webdataset) of the target image"""
    conditioning_column: str = "conditioning_image"
    """column or tar key of the condition image"""
    caption_column: str = "text"
    """column or tar key of the prompt"""
    union_columns: tuple[str, ...] = ()
    """a union net (model.architecture=union) on imagefolder or hf data: one condition column per type, TYPE=COLUMN,... (e.g. canny=canny_image,depth=depth_image; types as model.union_types); an empty cell (null, "") is a type the row lacks, every row holds one"""
    cache: bool = True
    """precompute VAE latents and text embeddings once and keep them on disk"""
    cache_dir: str = ""
    """where the caches live ("" = OUTPUT_DIR/cache)"""

    def __post_init__(self) -> None:
        _check_choice("data.format", self.format, DATA_FORMATS)
        _check_positive(self, "resolution")
        if not 0.0 <= self.empty_prompt_prob <= 1.0:
            raise ValueError(f"data.empty_prompt_prob={self.empty_prompt_prob}: expected a probability in [0, 1]")
        items = self.union_columns  # a config file may give a mapping {type: column}
        if isinstance(items, dict):
            items = [f"{name}={column}" for name, column in items.items()]
        items = [str(item).strip() for item in (items.split(",") if isinstance(items, str) else items)]
        pairs = [item.partition("=") for item in items if item]
        for name, eq, column in pairs:
            if not (name.strip() and eq and column.strip()):
                raise ValueError(
                    f"data.union_columns: {name + eq + column!r} is not TYPE=COLUMN (e.g. canny=canny_image)"
                )
        self.union_columns = tuple(f"{name.strip()}={column.strip()}" for name, _, column in pairs)
        if len(self.union_column_map) < len(self.union_columns):
            raise ValueError(f"data.union_columns={','.join(self.union_columns)}: a type is named twice")

    @property
    def union_column_map(self) -> dict[str, str]:
        """data.union_columns as {type: column}."""
        return dict(item.split("=", 1) for item in self.union_columns)

    @property
    def random_augmentation(self) -> bool:
        """True when pixels differ between epochs, so cached latents would be wrong."""
        return self.random_flip or not self.center_crop


@dataclass
class ModelConfig:
    """The locked base model and the trainable ControlNet (paper Sec. 3.2)."""

    base: str = "builtin"
    """base text-to-image model: "builtin", a diffusers model folder, a folder written by `controlnet world export-base`, one SD1.x/SD2.x/SDXL checkpoint file (.safetensors/.ckpt; needs model.tokenizer), or one SD3/SD3.5 checkpoint or Flux transformer file (with model.vae, model.clip_l, model.clip_g, model.t5 for the parts it lacks)"""
    tokenizer: str = ""
    """tokenizer folder (CLIP's vocab.json + merges.txt, e.g. a diffusers SD model's tokenizer/): required for a checkpoint file, which holds none; for a folder it replaces the folder's own"""
    tokenizer_2: str = ""
    """SDXL's second tokenizer folder ("" = model.tokenizer)"""
    prediction_type: str = ""
    """what the base UNet predicts: epsilon | v_prediction ("" = the base's own; a checkpoint file: epsilon)"""
    ema: bool = False
    """a checkpoint file holding EMA weights too (model_ema.*, e.g. v1-5-pruned): train on those instead of the non-EMA ones (the weights fine-tuning continues from)"""
    base_config: str = ""
    """a checkpoint file of a non-standard architecture: JSON file with "family" (sd15, sd21, sdxl) and the diffusers configs of unet, vae and text_encoder"""
    # BASE_PARTS: generate/options.py BaseParts' fields and docstrings ("" = none given)
    vae: str = ""
    """An SD3/Flux checkpoint file's VAE: a file (Flux's ae.safetensors) or a diffusers vae/ folder; needed when the
    file holds none (Flux), else it replaces the file's own."""
    clip_l: str = ""
    """An SD3/Flux checkpoint file's CLIP-L text encoder folder (config.json + weights, its tokenizer there or in
    the sibling tokenizer folder: text_encoder/ of a diffusers SD3/Flux model); needed when the file holds none."""
    clip_g: str = ""
    """An SD3 checkpoint file's CLIP-G text encoder folder (text_encoder_2/ of a diffusers SD3 model); needed when
    the file holds none."""
    t5: str = ""
    """T5-XXL text encoder folder (text_encoder_3/ of SD3, text_encoder_2/ of Flux), or its tokenizer folder alone
    when the file holds T5's weights; needed for Flux; for SD3 optional (without it long prompts follow less well)."""
    controlnet: str = ""
    """start from this ControlNet (original or diffusers format, or builtin:NAME) instead of a fresh copy of the UNet
    encoder; a union net (xinsir's Union/ProMax layout) with model.architecture=union, on union data"""
    connection_init: str = "zero"
    """initialisation of a fresh ControlNet's connection layers: zero (the paper's zero convolutions) | gaussian
    (the paper's ablation: N(0, 1/fan_in) weights, model/ablations.py)"""
    architecture: str = "controlnet"
    """a fresh net's architecture: controlnet (the paper's trainable copy of the encoder) | lite (the ablation's
    ControlNet-lite, paper Fig. 8c: one conv layer per encoder block, model/lite.py; exported as its own folder) |
    union (one net for several condition types, xinsir's Union/ProMax, model/union_controlnet.py; its data names a
    condition per type: data/sources.py `union_source`; exported as diffusers' ControlNetUnionModel)"""
    union_types: tuple[str, ...] = ()
    """a union net's condition types by name (e.g. canny,depth; xinsir's/ComfyUI's names, ids as theirs, 8 types):
    every type the data holds must be one of them (empty = the types the data names)"""
    cond_channels: int = 3
    """channels of the condition image"""
    hint_channels: tuple[int, ...] = ()
    """hint-encoder stage widths for a fresh ControlNet (empty = the reference 16,32,96,256)"""
    sd_locked: bool = True
    """lock the whole base UNet (False: its decoder is trained too, with optim.decoder_lr)"""
    only_mid_control: bool = False
    """feed only the middle-block residual to the UNet (reference code's only_mid_control)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward (less memory, ~30% more time)"""
    # no torch.compile option: torch 2.13's inductor returns zero gradients for the decoder's control residuals on
    # CPU with NHWC tensors, and with NCHW it was slower than eager NHWC here (0.060 vs 0.054 s per tiny step)
    channels_last: bool = True
    """keep conv weights and activations NHWC (oneDNN on CPU and tensor cores on GPU prefer it; see benchmarks)"""
    transformer_layers: int = 0
    """an SD3/Flux base: its joint (SD3) / double-stream (Flux) blocks that a fresh ControlNet copies (0 = the
    family's default as diffusers' trainers: SD3 12, Flux 4, each at most what the base has; SD3 at most n - 1)"""
    transformer_single_layers: int = -1
    """a Flux base: its single-stream blocks that a fresh ControlNet copies (-1 = 10, as diffusers' Flux trainer, at
    most what the base has; 0 = none)"""

    def __post_init__(self) -> None:
        if self.prediction_type:
            _check_choice("model.prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_positive(self, "cond_channels")
        _check_choice("model.connection_init", self.connection_init, ("zero", "gaussian"))
        if self.connection_init != "zero" and self.controlnet:
            raise ValueError(
                f"model.connection_init={self.connection_init}: only for a fresh ControlNet; "
                f"model.controlnet={self.controlnet} keeps its trained weights"
            )
        _check_choice("model.architecture", self.architecture, ("controlnet", "lite", "union"))
        self.union_types = tuple(
            str(t).strip()
            for t in (self.union_types.split(",") if isinstance(self.union_types, str) else self.union_types)
        )
        if self.union_types and self.architecture != "union":
            raise ValueError(
                f"model.union_types={','.join(self.union_types)}: only for model.architecture=union "
                f"(got {self.architecture})"
            )
        if self.architecture == "lite" and self.controlnet:  # union: continues a union net (train/union.py)
            raise ValueError(
                f"model.architecture={self.architecture}: only for a fresh net; "
                f"model.controlnet={self.controlnet} brings its own"
            )
        self.hint_channels = tuple(int(c) for c in self.hint_channels)
        if any(c < 1 for c in self.hint_channels):
            raise ValueError(f"model.hint_channels={self.hint_channels}: expected positive widths")
        _check_positive(self, "transformer_layers", allow_zero=True)
        if self.transformer_single_layers < -1:
            raise ValueError(
                f"model.transformer_single_layers={self.transformer_single_layers}: expected -1 (default), 0 or more"
            )


@dataclass
class FlowConfig:
    """The rectified-flow objective of an SD3/Flux base (SD3 paper, Esser et al. 2024, Sec. 2-3; train/flow_matching.py)."""

    weighting_scheme: str = "logit_normal"
    """timestep sampling and loss weighting as diffusers' SD3/Flux trainers' --weighting_scheme: logit_normal | mode
    (sampled so, unweighted) | sigma_sqrt | cosmap (sampled uniformly, weighted so) | uniform | none (both plain)"""
    logit_mean: float = 0.0
    """logit_normal: mean m of u ~ N(m, s), sigma = sigmoid(u) (SD3 paper Eq. 19; diffusers' default 0)"""
    logit_std: float = 1.0
    """logit_normal: standard deviation s (SD3 paper Eq. 19; diffusers' default 1)"""
    mode_scale: float = 1.29
    """mode: the scale of mode sampling with heavy tails (SD3 paper Eq. 20; diffusers' default 1.29)"""
    shift: float = 0.0
    """timestep shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma) (SD3 paper Sec. 5.3.2); 0 = the base
    scheduler's own (SD3's 3.0; a base with dynamic shifting, Flux dev, the resolution's exp(mu) as its pipeline)"""
    guidance: float = 3.5
    """a guidance-distilled Flux base (dev): the guidance value embedded at training (diffusers' Flux trainer: 3.5)"""
    max_sequence_length: int | None = None
    """T5 tokens per training prompt (for an SD3 base without T5, the zero tokens in their place; 0 = none); default:
    the base's own (its sampling.json: builtin-dit's 0), else 77 (diffusers' SD3/Flux ControlNet trainers)"""

    def __post_init__(self) -> None:
        _check_choice("flow.weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        _check_positive(self, "logit_std")
        _check_positive(self, "shift", "guidance", allow_zero=True)
        if self.max_sequence_length is not None:
            _check_positive(self, "max_sequence_length", allow_zero=True)


@dataclass
class OptimConfig:
    """Optimiser, schedule and step arithmetic."""

    lr: float = PAPER_LEARNING_RATE
    """AdamW learning rate of the ControlNet (reference: 1e-5)"""
    decoder_lr: float = 0.0
    """learning rate of the UNet decoder when model.sd_locked is False (0 = same as lr)"""
    weight_decay: float = 1e-2
    """AdamW weight decay"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    use_8bit_adam: bool = False
    """bitsandbytes AdamW8bit (needs bitsandbytes and a GPU)"""
    grad_accum: int = 1
    """micro-batches accumulated per optimizer step"""
    max_grad_norm: float = 1.0
    """clip the gradient norm to this (0 = no clipping)"""
    lr_schedule: str = "constant"
    """constant | cosine | linear (after warm-up)"""
    warmup_steps: int = 0
    """linear warm-up steps"""
    ema_decay: float = 0.0
    """exponential moving average of the trained weights (0 = off, e.g. 0.999)"""

    def __post_init__(self) -> None:
        _check_positive(self, "lr", "grad_accum", "adam_eps")
        _check_positive(self, "decoder_lr", "weight_decay", "max_grad_norm", "warmup_steps", allow_zero=True)
        _check_choice("optim.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay={self.ema_decay}: expected 0 (off) or a decay in (0, 1)")


@dataclass
class LoopConfig:
    """The training loop: length, batch, precision, device, logging."""

    output_dir: str = "runs/controlnet"
    """run folder: config.json, metrics.jsonl, checkpoints/, final/, report.html"""
    max_steps: int = 1000
    """optimizer steps to train"""
    max_minutes: float = 0.0
    """stop (and export) after this much wall-clock time, set-up and validation included (0 = no limit)"""
    batch_size: int = 4
    """samples per process per micro-batch (global batch = batch_size * processes * grad_accum)"""
    seed: int = 0
    """seed of data order, noise, timesteps and prompt dropout"""
    mixed_precision: str = "no"
    """no | bf16 | fp16 (fp16 needs a GPU)"""
    cpu: bool = False
    """train on the CPU even when a GPU exists"""
    distributed: str = "ddp"
    """under `accelerate launch --multi_gpu`: ddp (every process holds the whole trainable net) | fsdp (FSDP2: the
    trainable ControlNet sharded across processes, the locked base replicated; train/sharding.py) | deepspeed
    (DeepSpeed ZeRO through accelerate, stage train.zero_stage, the locked base replicated; train/deepspeed_engine.py)"""
    zero_stage: int = 2
    """train.distributed=deepspeed: ZeRO stage 2 (gradients and optimizer state partitioned) or 3 (weights too)"""
    fsdp_shard_base: bool = False
    """train.distributed=fsdp: shard the locked base's UNet or transformer too (one FSDP group per block), so each
    process holds 1/N of it and gathers one block at a time; false: every process holds it whole"""
    fsdp_cpu_offload: bool = False
    """train.distributed=fsdp: keep the sharded parameters, their gradients and Adam's state on the CPU (FSDP2's
    CPUOffloadPolicy), copied to the device block by block; the optimizer steps on the CPU (slower, less memory)"""
    threads: int = 0
    """torch intra-op CPU threads (0 = torch's default; 1 is much faster for tiny models on a busy machine)"""
    reuse_freed_memory: bool = True
    """on the CPU, reuse freed activation memory instead of faulting it back in every step (glibc; allocator.py)"""
    max_nonfinite: int = 5
    """stop with an error after this many optimizer steps in a row with a non-finite loss or gradient"""
    log_every: int = 10
    """write a metrics.jsonl line every this many steps"""
    log_with: tuple[str, ...] = ()
    """also log to these accelerate trackers, e.g. tensorboard (event files in the run folder's logs/) or wandb"""
    reward: bool = False
    """add ControlNet++'s consistency reward to the diffusion loss (Li et al. 2024; train/reward.py): one-step x0,
    VAE decode, a frozen differentiable detector, its loss against the condition (needs the VAE in memory)"""
    reward_weight: float = 0.5
    """the reward's weight lambda against the diffusion loss"""
    reward_max_timestep: int = 200
    """the reward applies to samples with t <= this of the base's training timesteps (ControlNet++: 200 of 1000;
    a flow base: sigma <= this / 1000)"""
    reward_detector: str = "auto"
    """the condition's differentiable detector: auto (a world dataset's task) | canny | fill | seg | pose | hed |
    pidinet | lineart_standard (train/detectors.py, train/network_detectors.py)"""
    reward_detector_weights: str = ""
    """train.reward_detector=hed or pidinet: the network's weights (ControlNetHED.pth, table5_pidinet.pth; a file or
    the folder holding it); empty: $CONTROLNET_ANNOTATORS, as `controlnet annotate` reads them"""
    union_keep_prob: float = UNION_KEEP_PROB
    """a union net (model.architecture=union): each sample keeps each of its conditions with this probability, at
    least one (drawn uniformly when none was kept), so every subset of the types is trained; 1 = always all"""

    def __post_init__(self) -> None:
        if self.reward_detector != "auto":
            check_reward_detector(self.reward_detector)
        _check_positive(self, "reward_weight", "reward_max_timestep", allow_zero=True)
        if not 0.0 < self.union_keep_prob <= 1.0:
            raise ValueError(f"train.union_keep_prob={self.union_keep_prob}: expected a probability in (0, 1]")
        _check_positive(self, "max_steps", "batch_size", "max_nonfinite", "log_every")
        _check_positive(self, "max_minutes", "threads", allow_zero=True)
        _check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("train.distributed", self.distributed, DISTRIBUTED)
        for option in ("fsdp_shard_base", "fsdp_cpu_offload"):
            if getattr(self, option) and self.distributed != "fsdp":
                raise ValueError(
                    f"train.{option}=true: an FSDP2 option, this run has train.distributed={self.distributed} "
                    "(expected fsdp)"
                )
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(
                f"train.zero_stage={self.zero_stage!r}: expected one of {', '.join(map(str, ZERO_STAGES))}"
            )
        self.log_with = _choice_tuple("train.log_with", self.log_with, TRACKERS)


@dataclass
class CheckpointConfig:
    """Crash-safe checkpoints and the final export."""

    every: int = 500
    """save a resumable checkpoint every this many steps (0 = only at the end and on SIGINT/SIGTERM)"""
    keep: int = 3
    """keep the last this many checkpoints (older ones are pruned only after the new one is complete); each holds
    what an exact resume needs: the ControlNet's float32 weights and AdamW's two moments, 3x the weights, i.e.
    4.3 GB at SD1.5 size (13 GB at keep=3), more with optim.ema_decay or model.sd_locked=False"""
    resume: str = "auto"
    """auto (latest checkpoint in output_dir, if any) | none | a checkpoint folder"""
    reshard: bool = False
    """resume a checkpoint written by another number of processes (DDP, FSDP2: torch.distributed.checkpoint
    reshards on load); the global batch and the data order change from there on. Without it such a resume is refused
    before loading. DeepSpeed's per-rank checkpoints need their own number of processes either way"""
    export_formats: tuple[str, ...] = EXPORT_FORMATS
    """final export formats of the trained ControlNet: diffusers and/or original"""

    def __post_init__(self) -> None:
        _check_positive(self, "every", allow_zero=True)
        _check_positive(self, "keep")
        self.export_formats = _choice_tuple("checkpoint.export_formats", self.export_formats, EXPORT_FORMATS)


@dataclass
class ValidationConfig:
    """Held-out generation, fidelity and the sudden-convergence step (paper Sec. 4, Fig. 4)."""

    every: int = 0
    """validate every this many steps (0 = off)"""
    num_samples: int = 8
    """held-out samples (the last ones of the dataset, never trained on)"""
    steps: int = 20
    """sampler steps per validation image"""
    guidance_scale: float = 1.0
    """classifier-free guidance scale at validation (1 = off); on a Flux base, whose guidance is embedded, not CFG:
    flow.guidance where the base has a guidance embedding (dev), none where it has not (schnell)"""
    metric: str = "auto"
    """auto (a world dataset's task metric, else edge_f1; a union net on a world union dataset: each type's task
    metric, train/validation.py) | fill_iou | edge_f1 | task:NAME (a world task's metric) | none"""
    threshold: float = 0.8
    """fidelity above which the model counts as following the condition (convergence)"""
    early_stop: bool = False
    """stop once fidelity stayed above the threshold for `patience` validations"""
    patience: int = 3
    """validations in a row above the threshold before an early stop"""
    grid_samples: int = 8
    """validation images kept per step in the report's sample grid"""

    def __post_init__(self) -> None:
        _check_positive(self, "every", allow_zero=True)
        _check_positive(self, "num_samples", "steps", "patience", "grid_samples")
        if not self.metric.startswith("task:"):
            _check_choice("validation.metric", self.metric, METRICS)


@dataclass
class TrainConfig:
    """A whole training run; sections mirror the config file's top-level keys."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                setattr(self, f.name, build_section(SECTIONS[f.name], value, f.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": LoopConfig,
    "checkpoint": CheckpointConfig,
    "validation": ValidationConfig,
    "flow": FlowConfig,
}


# Fields that once existed and do nothing now: a saved run config (run/config.json) that holds one still loads
# (the key is dropped with a warning), while a new flag or an unknown key is refused.
RETIRED_FIELDS: dict[str, dict[str, str]] = {
    "data": {"num_workers": "samples are read in the training process; the field was never used"},
}


def build_section(cls: type, values: dict, section: str):
    """`cls(**values)` with unknown keys refused by name (retired fields are dropped with a warning)."""
    retired = RETIRED_FIELDS.get(section, {})
    for name in sorted(set(values) & set(retired)):
        logger.warning("config section %r: ignoring the retired key %r (%s)", section, name, retired[name])
    values = {k: v for k, v in values.items() if k not in retired}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config section {section!r}: unknown keys {unknown}; expected some of {sorted(names)}")
    return cls(**values)


def section_types(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def load_config_file(path: str | Path) -> dict:
    """The nested dict of a YAML or JSON config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        values = json.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"config file {path}: expected a .yaml, .yml or .json file")
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: expected a mapping of sections at the top level")
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(f"config file {path}: unknown sections {unknown}; expected some of {list(SECTIONS)}")
    return values


def resolve_config(path: str | Path | None = None, overrides: dict[str, object] | None = None) -> TrainConfig:
    """Defaults <- config file <- overrides ("section.field" -> a value: a string, as a flag's text, is read as the
    field's type by settings_cli.parse_value; anything else is taken as it is)."""
    values: dict[str, dict] = {name: {} for name in SECTIONS}
    if path:
        for section, entries in load_config_file(path).items():
            values[section].update(entries or {})
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ValueError(f"override {key!r}: expected SECTION.FIELD with SECTION one of {list(SECTIONS)}")
        types = section_types(SECTIONS[section])
        if name not in types:
            raise ValueError(f"override {key!r}: section {section!r} has no field {name!r}")
        if isinstance(value, str):
            value = parse_value(value, types[name], f"override --{key}")
        values[section][name] = value
    return TrainConfig(**{section: build_section(SECTIONS[section], v, section) for section, v in values.items()})


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from `to_dict()` output (e.g. a run folder's config.json)."""
    return TrainConfig(**{s: build_section(SECTIONS[s], values.get(s, {}), s) for s in SECTIONS})


def base_options(model: ModelConfig) -> dict:
    """`generate.base.check_base` / `load_base` keyword arguments of the model section (CLI spellings in messages)."""
    return {
        "tokenizer": model.tokenizer or None,
        "tokenizer_2": model.tokenizer_2 or None,
        "prediction_type": model.prediction_type or None,
        "configs": model.base_config or None,
        "flags": BASE_FLAGS,
        **{name: getattr(model, name) or None for name in BASE_PARTS},  # an SD3 / Flux file's other parts
    }

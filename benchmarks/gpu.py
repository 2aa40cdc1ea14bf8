"""One prepared GPU benchmark: generation, training, memory, 8-bit Adam in under 8 minutes; DDP vs FSDP2 on 2+ GPUs.

    python benchmarks/gpu.py [--out results.json]   # CUDA: SD1.5 sizes (random weights), fp16 generation, bf16 training
    python benchmarks/gpu.py --dry                  # tiny sizes, float32, 2 steps: seconds (CI runs it on the CPU)
                                                    # (the fsdp section's 2 launches: minutes on a CPU)
    bash benchmarks/gpu_device.sh fetch             # then, on a lent GPU machine: bash benchmarks/gpu_device.sh
                                                    # (carries diffusers and bitsandbytes there: see that script)

Without CUDA it always runs the dry mode; `--dry` on a GPU runs the tiny sizes there (seconds: a check of the CUDA
paths before the full run). `--sections a,b` runs a subset, `--train-batch N` sets the training batch (default by
GPU memory), `--peak-tflops X` the peak for a GPU not in PEAK_BF16_TFLOPS. Sections run in order, each under a
time budget (a soft one that trims repetitions and a hard one, SIGALRM, that stops a section that runs away); a
failing section prints one line and the others still run; the exit status is 1 if any section failed.

1. generation: our ControlNetPipeline vs diffusers' StableDiffusionControlNetPipeline on the very same UNet, text
   encoder and ControlNet tensors (as benchmarks/generation.py), SD1.5-sized UNet + ControlNet, SD VAE, CLIP-L-sized
   text encoder, 512 px, 20 DDIM steps, CFG 7.5, batch 1 and 4, fp16, SDPA attention (diffusers' default
   processor), channels_last. images/s (whole call, wall time with torch.cuda.synchronize) and ms per denoising step
   (CUDA events recorded after every sampler step, first step excluded), median over interleaved calls after one
   warm-up call each. Each pipeline gets the VAE dtype its users get from `.to("cuda", torch.float16)`: ours decodes
   in float32 (ControlNetPipeline.to keeps the VAE in float32 for fp16), diffusers' in fp16 (its own fp16 copy).
   Output parity is asserted on every call's images in [0, 1]: max |ours - diffusers| <= PARITY_TOL_FP16 in fp16
   (fp16 rounding over 20 steps plus the fp16-vs-fp32 VAE decode), <= generation.PARITY_TOL in float32.
2. generation_compile: the same with torch.compile on the UNet and ControlNet (ours via `optimize(compile=True)`,
   diffusers' as its docs do: `pipe.unet = torch.compile(pipe.unet)`). Each pipeline is compiled and timed on its
   own, ours first, so a compilation that fails or runs past the budget costs only its own numbers (one line with
   the reason); the first call (compilation) is printed apart; parity between the two compiled outputs of one seed;
   batch 4 only if the budget still allows after batch 1.
3. training: one optimizer step of our trainer (controlnet.train.trainer.Trainer.step: cached latents
   and text, accelerate bf16 autocast, fp32 ControlNet with fused AdamW, locked bf16 UNet, channels_last) at 512 px:
   samples/s, and MFU = FLOPs of one step (torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions and
   attention, forward and backward, as executed) / step time / the GPU's dense bf16 peak (PEAK_BF16_TFLOPS by
   device name, or --peak-tflops); peak memory of a step (torch.cuda.max_memory_allocated, with the optimizer state).
4. finetune: plain fine-tuning of the same (fresh) UNet on the same cached inputs, batch and resolution (fp32
   master weights, the trainer's AdamW, bf16 autocast, channels_last): peak memory and time of a step, the ratios
   ControlNet / fine-tune beside the paper's (Sec. 3.2: 1.23x memory, 1.34x time).
5. adam8bit: optimizer-state memory of bitsandbytes' AdamW8bit vs torch's AdamW for the ControlNet's trainable
   parameters, both built as the trainer builds them (controlnet.train.loop.build_optimizer, optim.use_8bit_adam);
   bytes of the state tensors after one step, and on CUDA the growth of torch.cuda.memory_allocated over that step.

6. fsdp: with N >= 2 GPUs visible, two real `accelerate launch --multi_gpu --num_processes N` runs of our trainer
   (`Trainer.run`, as `controlnet train` runs it) on the same random SD1.5-sized base, one under `train.distributed
   ddp` and one under `fsdp` (FSDP2; the locked base replicated), WARMUP_STEPS + the timed steps each, batch
   --train-batch per GPU: each rank's peak memory (torch.cuda.max_memory_allocated from the first steady step on),
   its median seconds per step (the trainer's own step time), its trainable and Adam-state bytes (the run's
   metrics.jsonl), and the ratios FSDP2 / DDP of the same machine and run. With fewer than 2 GPUs it prints one line
   and is skipped, not failed. Each rank is `gpu.py fsdp-worker SPEC`.

In the dry mode the same code runs on the tests' tiny configs (controlnet.testing.tiny_models) at
64 px in float32 with 2 steps; torch.compile uses the "eager" backend there (dynamo only: inductor needs minutes
and a C++ compiler on a CPU); memory on a CPU is the peak of torch's tensor bytes from the profiler
(benchmarks/training.py's PeakTensorMemory) plus the weights and optimizer state held at the step's start.
The fsdp section's dry mode launches 2 gloo processes on the CPU (its peak is then each process's peak resident set,
libraries included: a check of the code path, not a measure of sharding).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # the sibling scripts (generation, training) when loaded by file
    sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched on torch's device name:
# (pattern the name must match, pattern it must not match, TFLOP/s, what the number is). Variants with other
# clocks or power (H100 PCIe/NVL, H200 NVL, laptop parts) match nothing: MFU is then printed as unknown.
PEAK_BF16_TFLOPS = (
    (r"\bH200\b", r"NVL", 989.0, "H200 SXM (the H100 SXM's tensor cores and clocks)"),
    (r"\bH100\b", r"PCIE|NVL", 989.0, "H100 SXM"),
    (r"\bA100\b", None, 312.0, "A100"),
    (r"\bL4\b", None, 121.0, "L4"),
    (r"\bRTX 4090\b", r"LAPTOP", 165.0, "GeForce RTX 4090"),
)
PAPER_MEMORY_RATIO = 1.23  # paper Sec. 3.2: ControlNet training vs fine-tuning SD, GPU memory
PAPER_TIME_RATIO = 1.34  # paper Sec. 3.2: the same, time per step
PARITY_TOL_FP16 = 2e-2  # max |ours - diffusers| on fp16 images in [0, 1] (~5 of 255 levels), see the docstring
CFG_SCALE = 7.5  # both pipelines' default guidance scale, passed explicitly
CLIP_VOCAB = 49408  # CLIP-L's vocabulary: the text encoder's embedding table has its real size
GiB = 2**30


@dataclass(frozen=True)
class Sizes:
    """What one run measures (the full GPU run or the dry run)."""

    model: str  # "sd15" (SD1.5-sized modules, random weights) or "tiny" (the tests' configs)
    resolution: int  # pixels
    steps: int  # sampler steps per image
    batches: tuple[int, ...]  # generation batch sizes
    compile_batches: tuple[int, ...]  # the same with torch.compile (each batch size compiles again)
    repeats: int  # timed calls per pipeline and batch (after one warm-up call)
    gen_dtype: str  # generation weights
    train_precision: str  # the trainer's train.mixed_precision ("bf16" or "no")
    train_batch: int
    train_steps: int  # timed optimizer steps (after WARMUP_STEPS)
    compile_backend: str
    budgets: dict = field(default_factory=dict)  # section -> seconds


HARD_LIMIT_FACTOR, HARD_LIMIT_GRACE_S = 1.1, 5.0  # a section is stopped at 1.1x its budget + 5 s
WARMUP_STEPS = 2  # the first step creates the optimizer state; the second is the first steady one
GPU_BUDGETS = {
    "generation": 60,
    "generation_compile": 150,
    "training": 75,
    "finetune": 60,
    "adam8bit": 30,
    "fsdp": 240,
}
DRY_BUDGETS = {
    "generation": 40,
    "generation_compile": 45,
    "training": 40,
    "finetune": 30,
    "adam8bit": 20,
    "fsdp": 400,
}


def gpu_sizes(train_batch: int | None) -> Sizes:
    if train_batch is None:  # one batch for both steps that fits 80 GB+ parts, smaller ones get less
        total = torch.cuda.get_device_properties(0).total_memory / GiB
        train_batch = 8 if total >= 70 else 4 if total >= 35 else 1
    return Sizes(
        model="sd15",
        resolution=512,
        steps=20,
        batches=(1, 4),
        compile_batches=(1, 4),
        repeats=3,
        gen_dtype="float16",
        train_precision="bf16",
        train_batch=train_batch,
        train_steps=10,
        compile_backend="inductor",
        budgets=GPU_BUDGETS,
    )


def dry_sizes(train_batch: int | None) -> Sizes:
    return Sizes(
        model="tiny",
        resolution=64,
        steps=2,
        batches=(1, 2),
        compile_batches=(1,),
        repeats=1,
        gen_dtype="float32",
        train_precision="no",
        train_batch=train_batch or 2,
        train_steps=2,
        compile_backend="eager",
        budgets=DRY_BUDGETS,
    )


def precision_label(sizes: Sizes) -> str:
    return {"bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(sizes.train_precision, "float32")


# ---------------------------------------------------------------------------------------------------------------
# time limits and clocks
class TimeLimit(Exception):
    """A section (or a part of one) ran past its budget."""


_deadlines: list[tuple[float, str]] = []


def _arm() -> None:
    if not _deadlines:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    signal.setitimer(signal.ITIMER_REAL, max(min(d for d, _ in _deadlines) - time.monotonic(), 1e-3))


def _on_alarm(signum, frame) -> None:
    now = time.monotonic()
    due = [what for d, what in _deadlines if d <= now + 1e-3]
    raise TimeLimit(f"{due[0] if due else 'a part'} ran past its budget")


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Raise TimeLimit in the main thread once `seconds` have passed (nested limits: the earliest one fires)."""
    entry = (time.monotonic() + seconds, what)
    _deadlines.append(entry)
    _arm()
    try:
        yield
    finally:
        _deadlines.remove(entry)
        _arm()


class Budget:
    """A soft budget: loops ask `left()` before starting more work."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Clock:
    """Elapsed seconds of a block: CUDA events around it plus torch.cuda.synchronize on a GPU, perf_counter else."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        """A point in time: a recorded CUDA event on a GPU (read after a synchronize), a float on a CPU."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def between(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> tuple[float, object]:
        self.sync()
        t0 = time.perf_counter()
        start = self.mark()
        out = fn()
        end = self.mark()
        self.sync()
        return (self.between(start, end) if self.cuda else time.perf_counter() - t0), out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    limit = re.search(r"TimeLimit: (.*? ran past its budget)", text)  # raised inside torch.compile, which wraps it
    if limit and not isinstance(err, TimeLimit):
        return f"TimeLimit: {limit.group(1)} (inside {type(err).__name__})"
    return f"{type(err).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------------------------
# components (random weights)
def make_base(model: str, device: torch.device, tmp: Path, seed: int = 0):
    """A random base (BaseComponents), built on `device` in float32: SD1.5-sized UNet, SD VAE and a CLIP-L-sized text
    encoder, or the tests' tiny stand-ins; a real CLIPTokenizer over a small vocabulary (controlnet.testing)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from training import CLIP_L, SD_VAE
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from controlnet.generate.base import BaseComponents
    from controlnet.io.formats import builtin_unet_config
    from controlnet.testing.tiny_models import (
        TINY_UNET_CONFIGS,
        make_scheduler,
        make_text_encoder,
        make_tokenizer,
        make_vae,
        write_clip_vocab,
    )

    torch.manual_seed(seed)
    with torch.device(device):  # initialised where they run: seconds for 1.1B parameters on a GPU
        if model == "sd15":
            config = {k: v for k, v in builtin_unet_config("sd15").items() if not k.startswith("_")}
            unet = UNet2DConditionModel(**config)
            vae = AutoencoderKL(**SD_VAE)
            tokenizer = CLIPTokenizer.from_pretrained(
                str(write_clip_vocab(tmp / "tokenizer")), model_max_length=CLIP_L["max_position_embeddings"]
            )
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=CLIP_VOCAB,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    **CLIP_L,
                )
            )
        else:
            unet = UNet2DConditionModel(**TINY_UNET_CONFIGS["sd15"])
            vae = make_vae()
            tokenizer = make_tokenizer(tmp / "tokenizer")
            text_encoder = make_text_encoder(tokenizer, TINY_UNET_CONFIGS["sd15"]["cross_attention_dim"], seed=4)
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return BaseComponents(unet, vae, text_encoder, tokenizer, make_scheduler())


def make_controlnet(unet):
    """Our ControlNet copied from `unet`, its hint encoder and zero convolutions given small random values (at their
    zero init the nets would add nothing and parity would not see them), as benchmarks/generation.py does."""
    from generation import fill_random

    from controlnet.model.controlnet import ControlNet

    net = ControlNet.from_unet(unet)
    fill_random(net.controlnet_cond_embedding, seed=1)
    for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
        fill_random(conv, seed=2, std=0.01)
    return net.eval().requires_grad_(False)


def diffusers_controlnet(net):
    """diffusers' ControlNetModel holding our ControlNet's very tensors (the names are equal; no second copy)."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        model = ControlNetModel(**net.diffusers_config())
    model.load_state_dict(net.state_dict(), strict=True, assign=True)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not meta, f"diffusers ControlNetModel kept meta tensors: {meta[:3]}"
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# the run's shared state
@dataclass
class Run:
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    tmp: Path
    clock: Clock
    results: dict = field(default_factory=dict)  # section -> its JSON
    partial: dict = field(default_factory=dict)  # what the running section measured so far (kept if it fails)
    pipelines: dict | None = None  # built by generation, reused by generation_compile
    data_dir: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def gen_pipelines(self) -> dict:
        if self.pipelines is None:
            self.pipelines = build_pipelines(self)
        return self.pipelines

    def drop_pipelines(self) -> None:
        self.pipelines = None
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        free_memory()


def build_pipelines(run: Run) -> dict:
    from diffusers import StableDiffusionControlNetPipeline

    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.testing.tiny_models import condition_image

    dtype = getattr(torch, run.sizes.gen_dtype)
    base = make_base(run.sizes.model, run.device, run.tmp / "generation")
    net = make_controlnet(base.unet)
    ours = ControlNetPipeline.from_components(base, [net]).to(run.device, dtype)
    ours.optimize(channels_last=True)
    # diffusers' users call pipe.to("cuda", torch.float16), which casts the VAE too: their own copy, so ours keeps its
    # float32 VAE
    vae = base.vae if base.vae.dtype == dtype else copy.deepcopy(base.vae).to(dtype)
    theirs = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=ours.text_encoder,
        tokenizer=base.tokenizer,
        unet=ours.unet,
        controlnet=diffusers_controlnet(net),
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    processors = sorted({type(p).__name__ for p in ours.unet.attn_processors.values()})
    n_unet = sum(p.numel() for p in ours.unet.parameters()) / 1e6
    n_net = sum(p.numel() for p in net.parameters()) / 1e6
    return dict(
        ours=ours,
        theirs=theirs,
        cond=condition_image(1, run.sizes.resolution),
        dtype=dtype,
        processors=processors,
        unet_m=n_unet,
        controlnet_m=n_net,
    )


# ---------------------------------------------------------------------------------------------------------------
# 1-2. generation
def initial_noise(pipe, batch: int, seed: int, resolution: int) -> torch.Tensor:
    """The latents our pipeline starts from (image k: torch.Generator().manual_seed(seed + k)), for diffusers too."""
    channels, side = pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor
    noise = [
        torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(seed + k))
        for k in range(batch)
    ]
    return torch.cat(noise).to(pipe.device, pipe.dtype)  # (B, C, h, w)


def generate(run: Run, p: dict, which: str, batch: int, seed: int) -> tuple[float, float, object]:
    """One call of one pipeline: (wall seconds, seconds per step after the first, images (B, H, W, 3))."""
    from generation import PROMPT

    clock, s = run.clock, run.sizes
    marks = []
    if which == "ours":

        def call():
            return p["ours"](
                PROMPT,
                [p["cond"]],
                steps=s.steps,
                seed=seed,
                batch_size=batch,
                guidance_scale=CFG_SCALE,
                width=s.resolution,
                height=s.resolution,
                output_type="np",
                progress=lambda i, n: marks.append(clock.mark()),
            ).array
    else:
        latents = initial_noise(p["ours"], batch, seed, s.resolution)

        def on_step(pipe, i, t, kwargs):
            marks.append(clock.mark())
            return kwargs

        def call():
            return p["theirs"](
                PROMPT,
                image=p["cond"],
                num_inference_steps=s.steps,
                guidance_scale=CFG_SCALE,
                width=s.resolution,
                height=s.resolution,
                num_images_per_prompt=batch,
                latents=latents,
                output_type="np",
                callback_on_step_end=on_step,
            ).images

    wall, images = clock.time(call)
    assert len(marks) == s.steps, f"{which}: {len(marks)} step callbacks for {s.steps} steps"
    per_step = clock.between(marks[0], marks[-1]) / (len(marks) - 1)
    return wall, per_step, images


def compare_pipelines(run: Run, p: dict, batches, budget: Budget, label: str) -> dict:
    """Interleaved calls of ours and diffusers' per batch; parity of every pair; medians. One line a batch, printed
    before parity is asserted (so a failed parity still shows the times and the difference)."""
    from generation import PARITY_TOL

    tol = PARITY_TOL_FP16 if p["dtype"] == torch.float16 else PARITY_TOL
    out, failures = {}, []
    for batch in batches:
        first = {}
        times = {"ours": [], "diffusers": []}
        steps = {"ours": [], "diffusers": []}
        worst, spread = 0.0, math.inf
        for rep in range(run.sizes.repeats + 1):  # the first pair warms up (compiles) and is not counted
            if rep > 1 and budget.left() < 3 * (times["ours"][-1] + times["diffusers"][-1]):
                break
            images = {}
            for which in ("ours", "diffusers"):
                wall, per_step, images[which] = generate(run, p, which, batch, seed=rep)
                if rep == 0:
                    first[which] = wall
                else:
                    times[which].append(wall)
                    steps[which].append(per_step)
            diff = float(abs(images["ours"] - images["diffusers"]).max())
            worst = diff if not math.isfinite(diff) else max(worst, diff)
            spread = min(spread, float(images["ours"].std()))
        row = {
            "parity_max_abs_diff": worst,
            "parity_tol": tol,
            "output_std": spread,
            "timed_calls": len(times["ours"]),
        }
        for which in ("ours", "diffusers"):
            wall = statistics.median(times[which])
            row[which] = {
                "images_per_s": batch / wall,
                "s_per_call": wall,
                "ms_per_step": 1e3 * statistics.median(steps[which]),
                "first_call_s": first[which],
            }
        row["speedup_images_per_s"] = row["ours"]["images_per_s"] / row["diffusers"]["images_per_s"]
        row["speedup_ms_per_step"] = row["diffusers"]["ms_per_step"] / row["ours"]["ms_per_step"]
        o, d = row["ours"], row["diffusers"]
        ok = math.isfinite(worst) and worst <= tol
        print(
            f"[{label}] batch {batch}: ours {o['images_per_s']:.3f} img/s, {o['ms_per_step']:.1f} ms/step | diffusers "
            f"{d['images_per_s']:.3f} img/s, {d['ms_per_step']:.1f} ms/step | ours/diffusers {row['speedup_images_per_s']:.3f}x "
            f"img/s, {row['speedup_ms_per_step']:.3f}x per step | first call {o['first_call_s']:.1f} / "
            f"{d['first_call_s']:.1f} s | parity max |diff| {worst:.1e} {'<=' if ok else 'EXCEEDS'} {tol:g} over "
            f"{len(times['ours']) + 1} pairs (output std {spread:.3f})",
            flush=True,
        )
        if not ok:
            failures.append(f"batch {batch}: outputs differ by {worst:.2e} > {tol:g}")
        if spread <= 1e-3:
            failures.append(f"batch {batch}: degenerate (constant) output, parity would prove nothing")
        out[f"batch_{batch}"] = run.partial[f"batch_{batch}"] = row
    assert not failures, f"{label} parity: " + "; ".join(failures)
    return out


def section_generation(run: Run, budget: Budget) -> dict:
    p = run.gen_pipelines()
    print(
        f"[generation] {run.sizes.model}: UNet {p['unet_m']:.1f}M + ControlNet {p['controlnet_m']:.1f}M params, "
        f"{run.sizes.resolution} px, {run.sizes.steps} DDIM steps, CFG {CFG_SCALE}, {run.sizes.gen_dtype}, "
        f"channels_last, attention {'/'.join(p['processors'])}; VAE: ours {p['ours'].vae.dtype}, diffusers "
        f"{p['theirs'].vae.dtype}",
        flush=True,
    )
    rows = compare_pipelines(run, p, run.sizes.batches, budget, "generation")
    return {
        "model": run.sizes.model,
        "resolution": run.sizes.resolution,
        "steps": run.sizes.steps,
        "dtype": run.sizes.gen_dtype,
        "attention": p["processors"],
        **rows,
    }


def measure_compiled(run: Run, p: dict, which: str, batch: int, budget: Budget) -> dict:
    """One compiled pipeline alone: its first call (compilation), then timed calls while the budget allows."""
    with time_limit(max(budget.left() - 5, 1.0), f"{which}'s compilation and calls, batch {batch}"):
        first, _, images = generate(run, p, which, batch, seed=0)  # the seed of the eager section's warm-up
        print(f"[generation_compile] batch {batch}: {which} compiled + first call {first:.1f} s", flush=True)
        walls, steps = [], []
        for _ in range(run.sizes.repeats):
            if walls and budget.left() < 3 * max(walls) + 10:
                break
            wall, per_step, _ = generate(run, p, which, batch, seed=1)
            walls.append(wall)
            steps.append(per_step)
    wall = statistics.median(walls)
    return {
        "images_per_s": batch / wall,
        "s_per_call": wall,
        "ms_per_step": 1e3 * statistics.median(steps),
        "compile_and_first_call_s": first,
        "timed_calls": len(walls),
        "images": images,
    }


def section_generation_compile(run: Run, budget: Budget) -> dict:
    """Each pipeline compiled and timed on its own (a compilation that runs past the budget costs only its own
    numbers), ours first; parity between the two compiled outputs of the same seed."""
    from generation import PARITY_TOL

    p = run.gen_pipelines()
    ours, theirs = p["ours"], p["theirs"]
    eager = {"ours": (ours.unet, list(ours.controlnets)), "theirs": (theirs.unet, theirs.controlnet)}
    backend = run.sizes.compile_backend
    tol = PARITY_TOL_FP16 if p["dtype"] == torch.float16 else PARITY_TOL
    out, failures, measured = {"backend": backend}, [], 0
    try:
        # ours: its own option (torch.compile of the UNet and every ControlNet); diffusers': as its docs do it
        if backend == "inductor":  # torch.compile's default backend: exactly what optimize() does
            ours.optimize(compile=True)
        else:
            ours.unet = torch.compile(eager["ours"][0], backend=backend)
            ours.controlnets = [torch.compile(n, backend=backend) for n in eager["ours"][1]]
        theirs.unet = torch.compile(eager["theirs"][0], backend=backend)
        theirs.controlnet = torch.compile(eager["theirs"][1], backend=backend)
        print(
            f"[generation_compile] torch.compile(backend={backend!r}) on the UNet and ControlNet of both",
            flush=True,
        )
        spent = 0.0
        for batch in run.sizes.compile_batches:
            if measured and budget.left() < 1.2 * spent:
                print(f"[generation_compile] batch {batch}: skipped (its compilation would not fit the budget)")
                out[f"batch_{batch}"] = {"skipped": "budget"}
                continue
            started, row = time.monotonic(), {}
            for which in ("ours", "diffusers"):
                try:
                    row[which] = measure_compiled(run, p, which, batch, budget)
                    measured += 1
                except Exception as err:  # a compile error or a runaway compilation: one line, then go on
                    print(f"[generation_compile] batch {batch}: {which} FAILED {one_line(err)}", flush=True)
                    row[which] = {"error": one_line(err)}
                    failures.append(f"batch {batch} {which}: {one_line(err)}")
            spent = time.monotonic() - started
            line = f"[generation_compile] batch {batch}: " + " | ".join(
                f"{w} {r['images_per_s']:.3f} img/s, {r['ms_per_step']:.1f} ms/step"
                if "error" not in r
                else f"{w} failed"
                for w, r in row.items()
            )
            if all("error" not in r for r in row.values()):
                o, d = row["ours"], row["diffusers"]
                diff = float(abs(o.pop("images") - d.pop("images")).max())
                row.update(
                    parity_max_abs_diff=diff,
                    parity_tol=tol,
                    speedup_images_per_s=o["images_per_s"] / d["images_per_s"],
                    speedup_ms_per_step=d["ms_per_step"] / o["ms_per_step"],
                )
                ok = math.isfinite(diff) and diff <= tol
                line += (
                    f" | ours/diffusers {row['speedup_images_per_s']:.3f}x img/s, {row['speedup_ms_per_step']:.3f}x "
                    f"per step | parity max |diff| {diff:.1e} {'<=' if ok else 'EXCEEDS'} {tol:g}"
                )
                if not ok:
                    failures.append(f"batch {batch}: compiled outputs differ by {diff:.2e} > {tol:g}")
            for r in row.values():
                if isinstance(r, dict):
                    r.pop("images", None)
            print(line, flush=True)
            out[f"batch_{batch}"] = run.partial[f"batch_{batch}"] = row
    finally:
        ours.unet, ours.controlnets = eager["ours"]
        theirs.unet, theirs.controlnet = eager["theirs"]
    out["errors"] = failures
    if not measured:
        raise RuntimeError("; ".join(failures) or "nothing compiled and ran within the budget")
    parity = [f for f in failures if "differ" in f]
    assert not parity, "generation_compile parity: " + "; ".join(parity)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 3-4. training
def dataset(run: Run) -> Path:
    """The fill task's samples at the run's resolution, written once (both training sections read them)."""
    from controlnet.world.dataset import write_dataset

    if run.data_dir is None:
        n = run.sizes.train_batch * 4  # micro-batches cycle over epochs: four distinct batches are plenty
        run.data_dir = write_dataset("fill", n, run.sizes.resolution, run.tmp / "data", workers=1)
    return run.data_dir


def train_config(run: Run, name: str, **overrides: str):
    """The run's TrainConfig (a run folder `run-<name>`) with `overrides` ("section.field": text)."""
    from controlnet.train.config import resolve_config

    return resolve_config(
        None,
        {
            "data.path": str(dataset(run)),
            "data.resolution": str(run.sizes.resolution),
            "data.cache_dir": str(run.tmp / "cache"),
            "train.output_dir": str(run.tmp / f"run-{name}"),
            "train.batch_size": str(run.sizes.train_batch),
            "train.max_steps": "1000",
            "train.mixed_precision": run.sizes.train_precision,
            "checkpoint.every": "0",
            **overrides,
        },
    )


def make_trainer(run: Run, base, name: str, **overrides: str):
    from controlnet.train.trainer import Trainer

    return Trainer(train_config(run, name, **overrides), base)


def tensor_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each counted once (views and shared tensors, e.g. AdamW8bit's quantile
    maps, are one storage)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def resident_bytes(modules, optimizer) -> int:
    """Bytes of the weights, buffers and optimizer state held now."""
    return tensor_bytes(
        [*(t for m in modules for t in (*m.parameters(), *m.buffers())), *optimizer_tensors(optimizer)]
    )


def step_peak_memory(run: Run, step: Callable[[], None], modules, optimizer) -> tuple[float, str]:
    """Peak memory (GiB) while `step()` runs, and how it was measured."""
    if run.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / GiB, "torch.cuda.max_memory_allocated"
    from training import PeakTensorMemory

    held = resident_bytes(modules, optimizer)
    with PeakTensorMemory(run.tmp / "trace.json") as peak:
        step()
    return (held + peak.peak) / GiB, "CPU: profiler's tensor peak + weights and optimizer state held"


def measure_steps(run: Run, step: Callable[[], None], budget: Budget) -> list[float]:
    times = []
    for _ in range(run.sizes.train_steps):
        if times and budget.left() < 3 * max(times):
            break
        times.append(run.clock.time(step)[0])
    return times


def peak_tflops(run: Run) -> tuple[float | None, str]:
    if run.args.peak_tflops:
        return run.args.peak_tflops, "--peak-tflops"
    if not run.cuda:
        return None, "no bf16 peak is known for a CPU"
    return peak_for_name(torch.cuda.get_device_name(run.device))


def peak_for_name(name: str) -> tuple[float | None, str]:
    """The dense bf16 peak (TFLOP/s) of the GPU called `name` (torch.cuda.get_device_name), and what it is."""
    for need, avoid, tflops, what in PEAK_BF16_TFLOPS:
        if re.search(need, name, re.IGNORECASE) and not (avoid and re.search(avoid, name, re.IGNORECASE)):
            return tflops, f"{what}, dense bf16 {tflops:g} TFLOP/s"
    return None, f"no dense bf16 peak known for {name!r} (pass --peak-tflops)"


def section_training(run: Run, budget: Budget) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    run.drop_pipelines()
    base = make_base(run.sizes.model, run.device, run.tmp / "train-base")
    trainer = make_trainer(run, base, "controlnet")
    trainer.setup()
    trainer.build_model()
    counter = iter(range(10**9))

    def step() -> None:  # our trainer's own optimizer step (the one `controlnet train` runs)
        loss, skipped = trainer.step(next(counter))
        assert not skipped and math.isfinite(loss), f"non-finite loss {loss}"

    for _ in range(WARMUP_STEPS):
        step()
    with FlopCounterMode(display=False) as flops:
        step()
    flop = flops.get_total_flops()
    modules = [*base.modules(), trainer.controlnet]
    peak_gb, how = step_peak_memory(run, step, modules, trainer.optimizer)
    times = measure_steps(run, step, budget)
    step_s = statistics.median(times)
    batch = run.sizes.train_batch
    achieved = flop / step_s / 1e12
    peak, peak_note = peak_tflops(run)
    mfu = achieved / peak if peak else None
    out = {
        "batch": batch,
        "resolution": run.sizes.resolution,
        "mixed_precision": run.sizes.train_precision,
        "timed_steps": len(times),
        "step_ms": 1e3 * step_s,
        "samples_per_s": batch / step_s,
        "gflop_per_step": flop / 1e9,
        "gflop_per_sample": flop / 1e9 / batch,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_source": peak_note,
        "mfu": mfu,
        "peak_memory_gb": peak_gb,
        "memory_measure": how,
        "controlnet_m": sum(p.numel() for p in trainer.controlnet.parameters()) / 1e6,
    }
    print(
        f"[training] ControlNet step (our trainer, {precision_label(run.sizes)}), batch {batch} at {run.sizes.resolution} px: "
        f"{out['samples_per_s']:.2f} samples/s, {out['step_ms']:.1f} ms/step (median of {len(times)}); "
        f"{out['gflop_per_sample']:.1f} GFLOP/sample counted; {achieved:.2f} TFLOP/s achieved; "
        + (f"MFU {100 * mfu:.1f}% of {peak_note}" if mfu is not None else f"MFU unknown ({peak_note})")
        + f"; peak memory {peak_gb:.3f} GB ({how})",
        flush=True,
    )
    return out


def section_finetune(run: Run, budget: Budget) -> dict:
    import torch.nn.functional as F

    from controlnet.train.loop import build_optimizer

    base = make_base(
        run.sizes.model, run.device, run.tmp / "finetune-base"
    )  # fresh (the trainer locked the other)
    trainer = make_trainer(run, base, "finetune")
    trainer.setup()  # the same data and cached latents/text (a cache hit: same seeded VAE and text encoder)
    config, dtype, unet = trainer.config, trainer.weight_dtype, base.unet
    for module in (base.vae, *base.text_modules()):
        module.to(dtype)  # as the trainer holds them
    unet.float().requires_grad_(True).train()  # fp32 master weights, as any mixed-precision fine-tune
    if config.model.channels_last:
        unet.to(memory_format=torch.channels_last)
    params = list(unet.parameters())
    optimizer = build_optimizer(config.optim, [{"params": params, "lr": config.optim.lr}])  # the trainer's AdamW
    counter = iter(range(10**9))
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format

    def step() -> None:  # paper Eq. 5 with the UNet itself trained
        b = trainer.data.micro_batch(next(counter))
        with torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(
                b.noisy.contiguous(memory_format=memory_format),
                b.timesteps,
                encoder_hidden_states=b.context.to(dtype),
            ).sample
            loss = F.mse_loss(pred.float(), b.target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert math.isfinite(float(loss.detach())), "non-finite loss"  # read every step, as the trainer does

    for _ in range(WARMUP_STEPS):
        step()
    peak_gb, how = step_peak_memory(run, step, base.modules(), optimizer)
    times = measure_steps(run, step, budget)
    step_s, batch = statistics.median(times), run.sizes.train_batch
    out = {
        "batch": batch,
        "timed_steps": len(times),
        "step_ms": 1e3 * step_s,
        "samples_per_s": batch / step_s,
        "peak_memory_gb": peak_gb,
        "memory_measure": how,
        "paper_memory_ratio": PAPER_MEMORY_RATIO,
        "paper_time_ratio": PAPER_TIME_RATIO,
    }
    line = (
        f"[finetune] UNet fine-tune step, batch {batch}: {out['samples_per_s']:.2f} samples/s, "
        f"{out['step_ms']:.1f} ms/step, peak memory {peak_gb:.3f} GB"
    )
    ours = run.results.get("training", {})
    if ours.get("ok"):
        out["memory_ratio"] = ours["peak_memory_gb"] / peak_gb
        out["time_ratio"] = ours["step_ms"] / out["step_ms"]
        line += (
            f" | ControlNet / fine-tune: memory {out['memory_ratio']:.2f}x (paper {PAPER_MEMORY_RATIO}x), "
            f"time {out['time_ratio']:.2f}x (paper {PAPER_TIME_RATIO}x)"
        )
    else:
        line += " | ratios unavailable: the training section failed"
    print(line, flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 5. optimizer state
def optimizer_state(run: Run, params, use_8bit: bool) -> dict:
    """State bytes of the trainer's optimizer (one step taken) and, on CUDA, the growth of allocated memory."""
    from controlnet.train.loop import build_optimizer

    config = train_config(run, "adam", **{"optim.use_8bit_adam": str(use_8bit)})
    optimizer = build_optimizer(config.optim, [{"params": params, "lr": config.optim.lr}])
    run.clock.sync()
    before = torch.cuda.memory_allocated() if run.cuda else 0
    optimizer.step()
    run.clock.sync()
    grown = (torch.cuda.memory_allocated() - before) / GiB if run.cuda else None
    state = tensor_bytes(optimizer_tensors(optimizer))
    del optimizer
    free_memory()
    return {
        "optimizer": "AdamW8bit" if use_8bit else "AdamW",
        "state_gb": state / GiB,
        "allocated_growth_gb": grown,
    }


def section_adam8bit(run: Run, budget: Budget) -> dict:
    import importlib.util

    base = make_base(run.sizes.model, run.device, run.tmp / "adam-base")
    net = make_controlnet(base.unet).float().requires_grad_(True).train()
    del base
    free_memory()
    params = list(net.parameters())
    generator = torch.Generator(run.device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, device=run.device) * 1e-3
    n = sum(p.numel() for p in params)
    out = {"params_m": n / 1e6, "adamw": optimizer_state(run, params, use_8bit=False)}
    line = f"[adam8bit] ControlNet trainable params {n / 1e6:.1f}M: torch AdamW state {out['adamw']['state_gb']:.3f} GB"
    if run.cuda:
        line += f" (allocated +{out['adamw']['allocated_growth_gb']:.3f} GB)"
    if importlib.util.find_spec("bitsandbytes") is None:
        out["adamw8bit"] = None
        out["bitsandbytes"] = "not installed"
        line += "; bitsandbytes AdamW8bit: not installed (pip install bitsandbytes)"
    elif not run.cuda:
        out["adamw8bit"] = None
        out["bitsandbytes"] = "installed; AdamW8bit needs CUDA (optim.use_8bit_adam)"
        line += "; bitsandbytes AdamW8bit: not measured (it needs CUDA)"
    else:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
        eight = out["adamw8bit"] = optimizer_state(run, params, use_8bit=True)
        out["ratio_8bit_to_adamw"] = eight["state_gb"] / out["adamw"]["state_gb"]
        line += (
            f"; bitsandbytes {bitsandbytes.__version__} AdamW8bit state {eight['state_gb']:.3f} GB (allocated "
            f"+{eight['allocated_growth_gb']:.3f} GB) -> {out['ratio_8bit_to_adamw']:.3f}x of AdamW"
        )
    print(line, flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 6. fsdp: real multi-process launches, DDP against FSDP2 (docs/scale-out.md)
FSDP_MIN_GPUS = 2  # sharding needs two or more processes, one per GPU
DRY_FSDP_PROCESSES = 2  # the dry mode's gloo processes on the CPU


def fsdp_overrides(run: Run, data: Path, engine: str, steps: int) -> dict:
    """`controlnet train`'s settings ("section.field": text) for one launch of `engine` (ddp or fsdp)."""
    return {
        "data.path": str(data),
        "data.resolution": str(run.sizes.resolution),
        "data.cache_dir": str(run.tmp / "fsdp-cache"),  # the first launch caches, the second reads the cache
        "train.output_dir": str(run.tmp / f"fsdp-run-{engine}"),
        "train.batch_size": str(run.sizes.train_batch),  # per process
        "train.max_steps": str(steps),
        "train.log_every": "1",
        "train.mixed_precision": run.sizes.train_precision,
        "train.distributed": engine,
        "checkpoint.every": "0",
        "checkpoint.export_formats": "diffusers",
    }


def fsdp_worker(spec_json: str) -> int:
    """One process of a launch (`gpu.py fsdp-worker SPEC` under `accelerate launch`): builds the random base as
    make_base does (same seed on every rank), runs our Trainer, and writes this rank's peak memory after the warm-up
    steps and its step times to SPEC's folder as rank-R.json."""
    from controlnet.train.config import resolve_config
    from controlnet.train.trainer import Trainer

    spec = json.loads(spec_json)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = spec["cuda"]
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    base = make_base(spec["model"], device, Path(spec["tmp"]) / f"base-rank{rank}")
    times: list[float] = []

    def on_step(info) -> None:  # the peak counts from the first steady step on (caching and loading excluded)
        if info.step == WARMUP_STEPS and cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        elif info.step > WARMUP_STEPS:
            times.append(info.step_seconds)

    Trainer(resolve_config(None, spec["overrides"]), base, callback=on_step).run()
    if cuda:
        peak, how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated after the warm-up"
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        how = "CPU: the process's peak resident set (ru_maxrss: libraries and start-up included)"
    result = {"rank": rank, "peak_bytes": peak, "peak_how": how, "step_seconds": times}
    (Path(spec["out"]) / f"rank-{rank}.json").write_text(json.dumps(result))
    return 0


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker by id: torch's launcher gives each worker its own session, so the
    launcher's process group alone would leave them running."""
    import psutil  # accelerate's dependency

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    proc.kill()
    proc.wait()


def launch_training(run: Run, processes: int, engine: str, data: Path, timeout: float) -> dict:
    """One `accelerate launch --multi_gpu --num_processes N` of our trainer under `engine`; each rank's numbers."""
    from controlnet.testing.live_server import free_port

    out = run.tmp / f"fsdp-{engine}"
    out.mkdir()
    steps = WARMUP_STEPS + run.sizes.train_steps
    spec = {
        "model": run.sizes.model,
        "cuda": run.cuda,
        "tmp": str(out),
        "out": str(out),
        "overrides": fsdp_overrides(run, data, engine, steps),
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(Path(__file__).resolve()), "fsdp-worker", json.dumps(spec),
    ]  # fmt: skip
    env = dict(os.environ)
    if not run.cuda:  # gloo processes on the CPU, one thread each
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    started = time.perf_counter()
    with open(out / "launch.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except BaseException:  # the budget's TimeLimit or the timeout: no worker may outlive the section
            kill_launch(proc)
            raise
    wall = time.perf_counter() - started
    if rc != 0:
        lines = [x for x in (out / "launch.log").read_text().splitlines() if x.strip()]
        raise RuntimeError(f"{engine} launch exited {rc}: {lines[-1] if lines else 'no output'}")
    ranks = sorted((json.loads(f.read_text()) for f in out.glob("rank-*.json")), key=lambda r: r["rank"])
    assert len(ranks) == processes, f"{len(ranks)} of {processes} ranks wrote their numbers"
    events = [json.loads(x) for x in (run.tmp / f"fsdp-run-{engine}" / "metrics.jsonl").read_text().splitlines()]
    memory = next(e for e in events if e.get("event") == "memory")
    adam = next(e for e in events if e.get("event") == "optimizer_memory")  # after step 1, on 2+ processes
    return {
        "processes": processes,
        "steps": steps,
        "wall_s": wall,
        "peak_gb_per_rank": [r["peak_bytes"] / GiB for r in ranks],
        "peak_how": ranks[0]["peak_how"],
        "step_s_per_rank": [statistics.median(r["step_seconds"]) for r in ranks],
        "trainable_param_bytes": memory["trainable_param_bytes"],
        "base_param_bytes": memory["base_param_bytes"],
        "optimizer_state_bytes": adam["optimizer_state_bytes"],
        "losses": [e["loss"] for e in events if "loss" in e],
    }


def section_fsdp(run: Run, budget: Budget) -> dict:
    """DDP and FSDP2 (`train.distributed`) launched in turn on every visible GPU (the dry mode on a CPU: 2 gloo
    processes): each rank's peak memory and seconds per step, and the ratios FSDP2 / DDP of the same run."""
    from controlnet.world.dataset import write_dataset

    processes = torch.cuda.device_count() if run.cuda else DRY_FSDP_PROCESSES
    if processes < FSDP_MIN_GPUS:
        print(f"[fsdp] skipped: needs {FSDP_MIN_GPUS} or more GPUs, {processes} visible", flush=True)
        return {"skipped": f"needs {FSDP_MIN_GPUS} or more GPUs ({processes} visible)", "processes": processes}
    # every rank gets distinct samples each step: two global batches, cycled over epochs
    n = 2 * processes * run.sizes.train_batch
    data = write_dataset("fill", n, run.sizes.resolution, run.tmp / "fsdp-data", workers=1)
    out: dict = {"processes": processes, "batch_per_process": run.sizes.train_batch}
    for engine in ("ddp", "fsdp"):
        # the first launch may take half of what is left; the second all of it
        share = budget.left() / 2 if engine == "ddp" else budget.left()
        out[engine] = run.partial[engine] = launch_training(run, processes, engine, data, share)
    ddp, fsdp = out["ddp"], out["fsdp"]
    out["ratio_peak_fsdp_to_ddp"] = max(fsdp["peak_gb_per_rank"]) / max(ddp["peak_gb_per_rank"])
    out["ratio_step_s_fsdp_to_ddp"] = statistics.median(fsdp["step_s_per_rank"]) / statistics.median(
        ddp["step_s_per_rank"]
    )
    for what in ("trainable_param_bytes", "optimizer_state_bytes"):
        out[f"ratio_{what}_fsdp_to_ddp"] = max(fsdp[what]) / max(ddp[what])
    where = f"{processes} GPUs" if run.cuda else f"{processes} gloo processes (CPU dry mode)"
    print(
        f"[fsdp] {where}, batch {run.sizes.train_batch} per process, {precision_label(run.sizes)}: peak per rank "
        f"ddp {max(ddp['peak_gb_per_rank']):.3f} GB, fsdp {max(fsdp['peak_gb_per_rank']):.3f} GB "
        f"(fsdp/ddp {out['ratio_peak_fsdp_to_ddp']:.3f}; {ddp['peak_how']}) | s/step "
        f"ddp {statistics.median(ddp['step_s_per_rank']):.3f}, fsdp {statistics.median(fsdp['step_s_per_rank']):.3f} "
        f"(fsdp/ddp {out['ratio_step_s_fsdp_to_ddp']:.3f}) | trainable bytes per rank ddp "
        f"{max(ddp['trainable_param_bytes'])}, fsdp {max(fsdp['trainable_param_bytes'])} "
        f"(fsdp/ddp {out['ratio_trainable_param_bytes_fsdp_to_ddp']:.3f}) | Adam state bytes per rank ddp "
        f"{max(ddp['optimizer_state_bytes'])}, fsdp {max(fsdp['optimizer_state_bytes'])} "
        f"(fsdp/ddp {out['ratio_optimizer_state_bytes_fsdp_to_ddp']:.3f})",
        flush=True,
    )
    return out


SECTIONS = {
    "generation": section_generation,
    "generation_compile": section_generation_compile,
    "training": section_training,
    "finetune": section_finetune,
    "adam8bit": section_adam8bit,
    "fsdp": section_fsdp,
}


# ---------------------------------------------------------------------------------------------------------------
def environment(run: Run) -> dict:
    import diffusers

    env = {
        "device": str(run.device),
        "mode": "dry" if run.sizes.model == "tiny" else "full",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "generation_dtype": run.sizes.gen_dtype,
        "training_precision": run.sizes.train_precision,
        "sizes": asdict(run.sizes),
    }
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        env.update(
            gpu=props.name,
            gpu_memory_gb=props.total_memory / GiB,
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny sizes, float32, 2 steps (always without CUDA)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}"
    )
    parser.add_argument("--train-batch", type=int, help="training batch (default: by GPU memory, 8 on 80 GB+)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in PEAK_BF16_TFLOPS")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1 on a CPU, where tiny ops only wait on each other)",
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; expected some of {list(SECTIONS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    sizes = dry_sizes(args.train_batch) if args.dry or device.type != "cuda" else gpu_sizes(args.train_batch)
    if args.threads or device.type == "cpu":
        # tiny ops split over a shared machine's cores mostly wait on each other: 1 thread was ~10x faster here
        torch.set_num_threads(args.threads or 1)
    signal.signal(signal.SIGALRM, _on_alarm)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        run = Run(args, sizes, device, Path(tmp), Clock(device))
        env = environment(run)
        print(
            f"GPU: {env['gpu'] or 'none (CPU: dry mode)'} | torch {env['torch']} | diffusers {env['diffusers']} | "
            f"CUDA {env['cuda']} | mode {env['mode']} ({sizes.model}, {sizes.resolution} px) | generation "
            f"{sizes.gen_dtype}, training {precision_label(sizes)}",
            flush=True,
        )
        for name in sections:
            budget_s = sizes.budgets[name] * args.budget_scale
            hard_s = HARD_LIMIT_FACTOR * budget_s + HARD_LIMIT_GRACE_S  # the soft budget trims repeats first
            t0 = time.perf_counter()
            run.partial = {}
            try:
                with time_limit(hard_s, f"section {name} ({hard_s:.0f} s)"):
                    result = {"ok": True, **SECTIONS[name](run, Budget(budget_s))}
            except Exception as err:  # one line per failed section; the others still run
                print(f"[{name}] FAILED: {one_line(err)}", flush=True)
                result = {"ok": False, "error": one_line(err), **run.partial}
            result["seconds"] = time.perf_counter() - t0
            run.results[name] = result
            free_memory()  # the section's models went with its frame
        run.drop_pipelines()
    total = time.perf_counter() - started
    failed = [name for name, r in run.results.items() if not r["ok"]]
    print(f"total wall time {total:.1f} s; sections failed: {', '.join(failed) or 'none'}", flush=True)
    if args.out:
        report = {"environment": env, "sections": run.results, "total_s": total, "failed": failed}
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["fsdp-worker"]:  # one process of section_fsdp's launches
        sys.exit(fsdp_worker(sys.argv[2]))
    sys.exit(main())

"""Time to the first image from single files, and peak memory: ours vs diffusers' `from_single_file`, same files.

The files are an SD1.x base checkpoint (UNet + VAE + CLIP text encoder, original LDM keys) and an original-format
ControlNet (`control_model.*`), random weights, float32, written once into --cache (controlnet.testing.ldm_files):
at --size sd15 the real SD1.5 shapes (4.3 GB + 1.4 GB), at --size tiny the test configs (runs in seconds).

Each run is a fresh process that loads both files and makes one image (256 px, 2 steps, guidance 7.5, the
family's DPM-Solver++ scheduler, the same seed), then reads its own peak RSS (VmHWM in /proc/self/status: anonymous
and file-backed pages together, i.e. what the process held at most) and saves the image. Runs alternate (ours,
theirs, ours, theirs, ...), the first pair is reported too. Time is the whole process, interpreter start to exit
(what a user waits for); the load and the generation inside it are shown apart.

- ours: what `controlnet generate --base FILE --controlnet FILE --tokenizer DIR` calls: `check_base`, then
  `ControlNetPipeline.from_pretrained(source, controlnets=[file], dtype=float32, ema=None, ...)`, `optimize` with
  the CLI's defaults (freed memory kept in the heap: controlnet/allocator.py), then the pipeline.
- theirs: `StableDiffusionControlNetPipeline.from_single_file(base, controlnet=ControlNetModel.from_single_file(
  control, config=DIR, local_files_only=True), config=DIR, local_files_only=True)`, offline: the config folders
  (diffusers layout, tokenizer included) are written here from our shipped configs.

Peak RSS counts the weights' file-backed pages (memory-mapped files: page cache the kernel can drop and re-read)
with anonymous memory (copies, casts, activations: only swap can free it); the peak of the anonymous part alone is
sampled every 20 ms and shown beside it. `--file-dtype fp16` writes the files in float16 (as most downloads), still
computed in float32 by both sides: then every weight is a cast copy.

Ratios: theirs/ours for time (> 1: we are faster), ours/theirs for peak RSS (< 1: we hold less). The two images
are compared (max |difference| on [0, 1] pixels; both use the same weights, seed and sampler).

    flock /tmp/sd15.lock python benchmarks/loading.py --size sd15 --repeats 2 --threads 2
    flock /tmp/sd15.lock python benchmarks/loading.py --size sd15 --repeats 2 --threads 2 --file-dtype fp16
    python benchmarks/loading.py --size tiny --repeats 1

Measured on an idle 2-core AMD EPYC (AVX-512), torch 2.13.0 CPU, diffusers 0.42.1, medians of 3, --threads 2:
    with optimize(reuse_freed_memory=True), the CLI's default: ours 17.0 s (load 3.9 s, generate ~10 s), peak RSS
    6240 MB (anonymous 936 MB); diffusers 18.8 s (load 4.5 s, generate ~12 s), 6053 MB (748 MB): time 1.108x
    (we are faster), peak RSS 1.031 (anonymous 1.251: the heap keeps freed activations), same image. Before it
    our 2-step generation took 1.7-1.9M minor page faults vs diffusers' 0.35-0.59M, i.e. ~5 GB of zero-filled
    pages faulted in again (resource.getrusage around each call), and lost by 0.884x (23.3 vs 20.6 s). Populating
    the mapped weights at load (madvise MADV_POPULATE_READ) was tried and measured: 16.8 vs 17.0 s, no gain, and
    more file pages resident (the VAE encoder's, which text-to-image never reads), so it is not done.
Again at 8bfff6d (medians of 3, a slower day for fresh memory: this VM first-touched 2 GiB at 0.36-5.3 GB/s):
    fp32 files: ours 20.2 s (load 5.2 s), 6229 MB (anonymous 925 MB); diffusers 23.7 s (load 5.7 s), 6063 MB
                (761 MB): time 1.174x, peak RSS 1.027 (anonymous 1.215); same image (max |diff| 0.0).
    fp16 files: ours 33.0 s (load 17.5 s), 6586 MB (anonymous 6366 MB); diffusers 33.4 s (load 10.0 s), 7932 MB
                (6307 MB): time 1.012x (our load is slower, our generation faster), peak RSS 0.830; same image.
Earlier, after load_controlnet maps its file too (medians of 3): fp32 files: ours 23.9 s (load 4.8 s), peak RSS 6046 MB (anonymous 744 MB); diffusers
21.1 s (load 4.3 s), 6096 MB (795 MB): time 0.884x (ours slower, in the 2-step generation, not the load), peak
RSS 0.992, anonymous 0.936; same image.
Earlier, on 2 shared CPU cores, 256 px, 2 steps, --threads 2 (medians):
    fp32 files, 2 pairs: ours 20.0 s, peak RSS 6116 MB (anonymous 2194 MB); diffusers 20.2 s, 6068 MB (766 MB):
                         time 1.012x, peak RSS 1.008 (anonymous 2.86: our ControlNet loader still copies the
                         net, 1.4 GB); images identical (max |diff| 0.0)
    fp16 files, 1 pair:  ours 27.8 s, 6585 MB (6260 MB); diffusers 31.7 s, 7932 MB (6353 MB): time 1.138x, peak RSS
                         0.830; images identical
    before the meta/assign loading (e7119d2, fp32, 1 pair, a busier machine): ours 53.7 s, load 23.5 s, peak RSS
                         10780 MB (anonymous 10647 MB); diffusers 40.3 s, 6218 MB
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red cat on the blue circle"
SEED = 0
PARITY_TOL = 1e-3  # max |difference| of [0, 1] pixels between the two images (float32 both; see the docstring)
DEFAULT_CACHE = Path.home() / ".cache" / "controlnet" / "bench"
SIDES = ("ours", "theirs")
FILE_DTYPES = {"fp32": "float32", "fp16": "float16"}  # the files' dtype; both sides compute in float32
SAMPLE_EVERY_S = 0.02  # how often a run samples its anonymous memory (RssAnon; VmHWM has no such split)


# ------------------------------------------------------------------------------------------------------------
# the files, written once per size
def files_folder(cache: Path, size: str, file_dtype: str) -> Path:
    return cache / (size if file_dtype == "fp32" else f"{size}-{file_dtype}")


def prepare(size: str, cache: Path, file_dtype: str = "fp32") -> Path:
    """The folder of `size`'s files: base.safetensors, control.safetensors, tokenizer/, configs for both sides."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from controlnet.io.single_file import family_config
    from controlnet.model.controlnet import ControlNet
    from controlnet.testing.ldm_files import sd15_parts_config, write_controlnet_file, write_sd_file
    from controlnet.testing.tiny_models import write_clip_vocab

    folder = files_folder(cache, size, file_dtype)
    configs = sd15_parts_config(size)
    dtype = getattr(torch, FILE_DTYPES[file_dtype])
    if not (folder / "base.safetensors").is_file():
        write_sd_file(folder / "base.safetensors", configs, seed=0, dtype=dtype)
    if not (folder / "control.safetensors").is_file():
        write_controlnet_file(folder / "control.safetensors", configs["unet"], seed=3, dtype=dtype)
    max_length = configs["text_encoder"]["max_position_embeddings"]
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_vocab(folder / "vocab")), model_max_length=max_length)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "base_config.json").write_text(json.dumps({"family": "sd15", **configs}, indent=1))  # ours, tiny

    # diffusers' layout: model_index.json + one config per component (from_single_file reads only these)
    theirs = folder / "diffusers_config"
    scheduler = family_config("sd15")["scheduler"]
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    files = {
        "model_index.json": index,
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **configs["unet"]},
        "vae/config.json": {"_class_name": "AutoencoderKL", **configs["vae"]},
        "text_encoder/config.json": {
            **CLIPTextConfig(**configs["text_encoder"]).to_dict(),
            "architectures": ["CLIPTextModel"],
        },
        "scheduler/scheduler_config.json": scheduler,
    }
    with torch.device("meta"):
        net = ControlNet.from_unet(UNet2DConditionModel(**configs["unet"]))
    files["../controlnet_config/config.json"] = {"_class_name": "ControlNetModel", **net.diffusers_config()}
    for name, values in files.items():
        path = theirs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=1))
    tokenizer.save_pretrained(str(theirs / "tokenizer"))
    return folder


# ------------------------------------------------------------------------------------------------------------
# one side in this (fresh) process
class AnonPeak:
    """The highest RssAnon (anonymous memory: what the kernel cannot drop without swap) seen by a sampling thread;
    file-backed pages of memory-mapped weights are page cache that the kernel can reclaim and re-read."""

    def __init__(self):
        import threading

        self.peak_kb, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY_S):
            self.sample()

    def sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def done_mb(self) -> float:
        self.stop.set()
        self.thread.join()
        self.sample()
        return self.peak_kb / 1024


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: anonymous + file-backed pages), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_side(side: str, folder: Path, size: str, resolution: int, steps: int, out: Path) -> dict:
    import numpy as np
    import torch

    from controlnet.testing.tiny_models import condition_image

    cond = condition_image(1, resolution)
    anon = AnonPeak()
    t0 = time.perf_counter()
    if side == "ours":
        from controlnet.generate.base import check_base
        from controlnet.generate.pipeline import ControlNetPipeline

        base_options = {
            "tokenizer": str(folder / "tokenizer"),
            "prediction_type": None,
            "configs": str(folder / "base_config.json") if size == "tiny" else None,
        }
        source = check_base(folder / "base.safetensors", **base_options)
        pipe = ControlNetPipeline.from_pretrained(
            source, controlnets=[folder / "control.safetensors"], dtype=torch.float32, ema=None, **base_options
        )
        pipe.to("cpu")
        pipe.optimize(reuse_freed_memory=True)  # the CLI's defaults (pack_cpu_weights: only from 8 steps on)
        t1 = time.perf_counter()
        image = pipe(
            PROMPT,
            [cond],
            steps=steps,
            seed=SEED,
            width=resolution,
            height=resolution,
            guidance_scale=7.5,
            output_type="np",
        ).array
    else:
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        net = ControlNetModel.from_single_file(
            str(folder / "control.safetensors"),
            torch_dtype=torch.float32,
            config=str(folder / "controlnet_config"),
            local_files_only=True,
        )
        pipe = StableDiffusionControlNetPipeline.from_single_file(
            str(folder / "base.safetensors"),
            controlnet=net,
            config=str(folder / "diffusers_config"),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
            torch_dtype=torch.float32,
        )
        pipe.set_progress_bar_config(disable=True)
        t1 = time.perf_counter()
        image = pipe(
            PROMPT,
            image=cond,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(SEED),
            width=resolution,
            height=resolution,
            guidance_scale=7.5,
            output_type="np",
        ).images
    t2 = time.perf_counter()
    np.save(out, np.asarray(image, dtype=np.float32))
    cpu = time.process_time()  # this process's CPU time, all threads (steadier than wall time on a shared machine)
    return {
        "side": side,
        "load_s": t1 - t0,
        "generate_s": t2 - t1,
        "cpu_s": cpu,
        "peak_rss_mb": peak_rss_mb(),
        "peak_anon_mb": anon.done_mb(),
    }


def spawn(side: str, args, folder: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        side,
        "--size",
        args.size,
        "--cache",
        str(args.cache),
        "--file-dtype",
        args.file_dtype,
        "--resolution",
        str(args.resolution),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--image",
        str(out),
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{side} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument(
        "--file-dtype",
        choices=list(FILE_DTYPES),
        default="fp32",
        help="dtype of the files (fp16: as most downloads; both sides still compute in float32)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: 256 sd15, 64 tiny)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved (ours, theirs) pairs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0 = torch's default)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the files are written and reused")
    parser.add_argument("--child", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (256 if args.size == "sd15" else 64)
    folder = files_folder(args.cache, args.size, args.file_dtype)

    if args.child:  # one side, in a fresh process: print its numbers as the last line
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(run_side(args.child, folder, args.size, args.resolution, args.steps, args.image)))
        return 0

    import numpy as np
    import torch

    prepare(args.size, args.cache, args.file_dtype)
    sizes = {n: (folder / f"{n}.safetensors").stat().st_size / 1e9 for n in ("base", "control")}
    print(
        f"size={args.size} files: base {sizes['base']:.2f} GB + control {sizes['control']:.2f} GB "
        f"({FILE_DTYPES[args.file_dtype]}; computed in float32) resolution={args.resolution} steps={args.steps} "
        f"threads={args.threads or 'default'} torch={torch.__version__}"
    )
    runs = {side: [] for side in SIDES}
    diffs, spread = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            images = {}
            for side in SIDES:
                out = Path(tmp) / f"{side}{rep}.npy"
                run = spawn(side, args, folder, out)
                runs[side].append(run)
                images[side] = np.load(out)
                print(
                    f"  run {rep + 1} {side:6s}: first image {run['wall_s']:6.1f} s (load {run['load_s']:5.1f} s, "
                    f"generate {run['generate_s']:5.1f} s; CPU {run['cpu_s']:6.1f} s), peak RSS "
                    f"{run['peak_rss_mb']:6.0f} MB (anonymous {run['peak_anon_mb']:6.0f} MB)",
                    flush=True,
                )
            diffs.append(float(np.abs(images["ours"] - images["theirs"]).max()))
            spread = float(images["ours"].std())
    keys = ("wall_s", "load_s", "cpu_s", "peak_rss_mb", "peak_anon_mb")
    med = {side: {k: statistics.median(r[k] for r in runs[side]) for k in keys} for side in SIDES}
    for side in SIDES:
        m = med[side]
        print(
            f"{side}: time to first image {m['wall_s']:.1f} s (load {m['load_s']:.1f} s, CPU {m['cpu_s']:.1f} s), "
            f"peak RSS {m['peak_rss_mb']:.0f} MB (anonymous {m['peak_anon_mb']:.0f} MB)  "
            f"(medians of {args.repeats})"
        )
    ours, theirs = med["ours"], med["theirs"]
    print(
        f"time ratio theirs/ours: {theirs['wall_s'] / ours['wall_s']:.3f}x (load {theirs['load_s'] / ours['load_s']:.3f}x, "
        f"CPU time {theirs['cpu_s'] / ours['cpu_s']:.3f}x); peak RSS ratio ours/theirs: "
        f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.3f} (anonymous {ours['peak_anon_mb'] / theirs['peak_anon_mb']:.3f})"
    )
    verdict = "same image" if max(diffs) <= PARITY_TOL else "IMAGES DIFFER"
    print(
        f"image parity: max |ours - theirs| = {max(diffs):.2e} (tolerance {PARITY_TOL:g}; image std {spread:.3f}): "
        f"{verdict}"
    )
    return 0 if max(diffs) <= PARITY_TOL else 1


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of the checkpoint tools at real sizes: `controlnet convert | init | transfer | inspect` (streamed,
one tensor at a time) vs the in-memory path (the library's load_* / init / transfer / save_controlnet, what the
commands ran before they streamed), measured in the same run.

    flock /tmp/sd15.lock python benchmarks/convert.py                 # SD1.5 size, float32 files
    flock /tmp/sd15.lock python benchmarks/convert.py --size sdxl     # SDXL-size transfer, float16, streamed only
    ... --before e7119d2    # also the CLI as it was at a git revision (its src/ exported beside the cache)

Every command runs in a fresh subprocess; its peak RSS is that process's own VmHWM, read at its exit (file pages it
touched included). Inputs are random weights in the real key layout (original LDM / cldm names), made once
and cached under ~/.cache/controlnet/bench (outside the repo): base and community UNets (original single files,
UNet only), a ControlNet (.safetensors and zip .pth) and a v1.0 combined file (ControlNet + the base UNet; no VAE
or text encoder, so it is smaller than a released one). Outputs are compared byte for byte (sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

CACHE = Path(os.environ.get("CONTROLNET_BENCH_CACHE", Path.home() / ".cache/controlnet/bench"))
FAMILY_DTYPES = {"sd15": torch.float32, "sdxl": torch.float16}
GiB = 1024**3


# -- inputs ---------------------------------------------------------------------------------------------------


def ldm_unet_names(config: dict) -> dict[str, str]:
    """diffusers UNet name -> original (LDM) name, checked: diffusers' converter maps every one back."""
    import re

    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from controlnet.io import original_keys
    from controlnet.io.api import build_unet

    unet = build_unet(config, device="meta")
    stride = config["layers_per_block"] + 1
    names = {}
    for name in unet.state_dict():
        if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            ldm = f"output_blocks.{int(m[1]) * stride + int(m[2])}.0.{original_keys._resnet_inner(m[3])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
            ldm = f"output_blocks.{int(m[1]) * stride + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
            block = unet.up_blocks[int(m[1])]
            ldm = f"output_blocks.{int(m[1]) * stride + stride - 1}.{2 if hasattr(block, 'attentions') else 1}.conv.{m[2]}"
        elif name.startswith("conv_norm_out."):
            ldm = name.replace("conv_norm_out.", "out.0.")
        elif name.startswith("conv_out."):
            ldm = name.replace("conv_out.", "out.2.")
        else:
            ldm = original_keys.to_original(name, config["layers_per_block"], 0)
        names[name] = ldm
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + v: k for k, v in names.items()}, config)
    assert back == {k: k for k in names}, "LDM names do not convert back"
    return names


def _random(name: str, shape, dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1000003 * seed)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def make_inputs(family: str, folder: Path) -> dict[str, Path]:
    """The benchmark's input files (made once, written one tensor at a time, then reused)."""
    from controlnet.io.api import build_unet, controlnet_state_to_original
    from controlnet.io.formats import builtin_unet_config
    from controlnet.io.safe_load import write_safetensors_streamed, write_state_dict
    from controlnet.model.controlnet import ControlNet

    files = {
        n: folder / n
        for n in (
            "base.safetensors",
            "community.safetensors",
            "control.safetensors",
            "combined.safetensors",
            "control.pth",
        )
    }
    if (folder / ".done").exists():
        return files
    folder.mkdir(parents=True, exist_ok=True)
    dtype = FAMILY_DTYPES[family]
    config = builtin_unet_config(family)
    unet = build_unet(config, device="meta")
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    unet_keys = {"model.diffusion_model." + v: k for k, v in ldm_unet_names(config).items()}
    control_state = ControlNet.from_unet(unet).state_dict()
    # original (cldm) name -> our name: the renamed dict's values are our names
    control_keys = controlnet_state_to_original(dict(zip(control_state, control_state, strict=True)), 2)

    def spec(keys, table):
        shape = lambda x: x if isinstance(x, torch.Size) else x.shape  # noqa: E731 - sizes or meta tensors
        return {k: torch.empty(shape(table[v]), dtype=dtype, device="meta") for k, v in keys.items()}

    def base(key):
        return _random(unet_keys[key], shapes[unet_keys[key]], dtype, seed=0)

    def community(key):  # a "fine-tune" of the base
        return (base(key).float() + _random(unet_keys[key], shapes[unet_keys[key]], torch.float32, 1) * 0.05).to(
            dtype
        )

    def control(key):
        return _random(control_keys[key], control_state[control_keys[key]].shape, dtype, seed=2)

    started = time.perf_counter()
    write_safetensors_streamed(spec(unet_keys, shapes), base, files["base.safetensors"])
    write_safetensors_streamed(spec(unet_keys, shapes), community, files["community.safetensors"])
    write_safetensors_streamed(spec(control_keys, control_state), control, files["control.safetensors"])
    both = {**spec(control_keys, control_state), **spec(unet_keys, shapes)}
    write_safetensors_streamed(
        both, lambda k: control(k) if k in control_keys else base(k), files["combined.safetensors"]
    )
    write_state_dict({k: control(k) for k in control_keys}, files["control.pth"])
    (folder / ".done").write_text("")
    print(f"made {family} inputs in {time.perf_counter() - started:.0f} s under {folder}", flush=True)
    return files


# -- measuring ------------------------------------------------------------------------------------------------


# ru_maxrss of a child counts the parent's resident set at fork (Linux keeps the high-water mark across exec), so
# every child would show at least this script's own peak; each child reports its own VmHWM at exit instead.
REPORT_HWM = """import atexit, os, re

def _report():
    with open("/proc/self/status") as f:
        kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
    with open(os.environ["CONTROLNET_BENCH_HWM"], "w") as f:
        f.write(str(kb))

atexit.register(_report)
"""


def peak_rss(argv: list[str], env: dict) -> tuple[float, float]:
    """(peak RSS in GiB: the child's own VmHWM, wall seconds) of one Python command in a fresh process."""
    with tempfile.TemporaryDirectory() as hook:
        (Path(hook) / "sitecustomize.py").write_text(REPORT_HWM)
        report = Path(hook) / "hwm"
        env = {
            **env,
            "CONTROLNET_BENCH_HWM": str(report),
            "PYTHONPATH": os.pathsep.join(filter(None, [hook, env.get("PYTHONPATH", "")])),
        }
        started = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.decode()[-2000:]}")
        return int(report.read_text()) * 1024 / GiB, seconds


# The in-memory path, as run_convert / run_init / run_transfer / run_inspect ran it before streaming.
IN_MEMORY = {
    "convert": "from controlnet.io.api import load_controlnet, save_controlnet\n"
    "save_controlnet(load_controlnet(A[0]), A[1], format=A[2])",
    "init": "import torch; from controlnet.io.api import load_unet, save_controlnet; torch.manual_seed(0)\n"
    "from controlnet.io.transfer import init_controlnet\n"
    "save_controlnet(init_controlnet(load_unet(A[0])), A[1], format=A[2])",
    "transfer": "from controlnet.io.api import load_controlnet, load_unet, save_controlnet\n"
    "from controlnet.io.transfer import transfer_controlnet\n"
    "b = load_unet(A[1]); c = load_unet(A[2]); n = load_controlnet(A[0], unet=b)\n"
    "save_controlnet(transfer_controlnet(n, b, c), A[3], format=A[4])",
    "inspect": "from controlnet.io.formats import inspect_state_dict; from controlnet.io.safe_load import "
    "read_state_dict\ninspect_state_dict(read_state_dict(A[0]))",
}


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:12]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(FAMILY_DTYPES), default="sd15")
    parser.add_argument("--skip-in-memory", action="store_true", help="streamed commands only")
    parser.add_argument("--before", help="also run the CLI of this git revision (exported from this repo)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    files = make_inputs(args.size, CACHE / f"convert-{args.size}")  # other benchmarks share CACHE
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    paths = {"streamed": env}
    if args.before:
        old = CACHE / f"src-{args.before}"
        if not old.exists():
            tar = subprocess.run(
                ["git", "-C", str(src.parent), "archive", args.before, "src"], capture_output=True, check=True
            )
            old.mkdir(parents=True)
            subprocess.run(["tar", "-x", "-C", str(old)], input=tar.stdout, check=True)
        paths[f"CLI at {args.before}"] = {**os.environ, "PYTHONPATH": str(old / "src")}
    f = {k.split(".")[0] + ("_pth" if k.endswith(".pth") else ""): str(v) for k, v in files.items()}
    cases = [  # name, CLI args, in-memory args, output
        (
            "convert original -> diffusers",
            ["convert", f["control"], "{out}", "--to", "diffusers"],
            ("convert", [f["control"], "{out}", "diffusers"]),
            "d",
        ),
        (
            "convert diffusers -> original",
            ["convert", "{prev}", "{out}.safetensors", "--to", "original"],
            ("convert", ["{prev}", "{out}.safetensors", "original"]),
            "o",
        ),
        (
            "init (original SD file)",
            ["init", f["base"], "{out}"],
            ("init", [f["base"], "{out}", "diffusers"]),
            "d",
        ),
        (
            "transfer (plain control file)",
            ["transfer", f["control"], f["base"], f["community"], "{out}"],
            ("transfer", [f["control"], f["base"], f["community"], "{out}", "diffusers"]),
            "d",
        ),
        (
            "transfer (v1.0 combined file)",
            ["transfer", f["combined"], f["base"], f["community"], "{out}"],
            ("transfer", [f["combined"], f["base"], f["community"], "{out}", "diffusers"]),
            "d",
        ),
        ("inspect (zip .pth)", ["inspect", f["control_pth"]], ("inspect", [f["control_pth"]]), None),
    ]
    if args.size == "sdxl":
        cases = [c for c in cases if c[0].startswith("transfer (plain")]
        args.skip_in_memory = True  # three SDXL models in float32 do not fit a 24 GB machine
    if not args.skip_in_memory:
        paths["in memory"] = env
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=CACHE))
    print(
        f"{args.size}: peak RSS (GiB) and wall time per command, each in a fresh process; inputs: "
        + ", ".join(f"{p.name} {p.stat().st_size / GiB:.2f} GiB" for p in files.values()),
        flush=True,
    )
    try:
        results: dict[str, dict[str, tuple]] = {}
        for name, cli, (kind, lib), out in cases:
            for way, way_env in paths.items():
                dst = work / f"{way.replace(' ', '_')}_{len(results)}"
                prev = results.get("convert original -> diffusers", {}).get(way, (None,) * 3)[2]

                def fill(a, dst=dst, prev=prev):
                    return a.replace("{out}", str(dst)).replace("{prev}", str(prev))

                if way == "in memory":
                    argv = [
                        sys.executable,
                        "-c",
                        f"import sys; A = sys.argv[1:]\n{IN_MEMORY[kind]}",
                        *map(fill, lib),
                    ]
                else:
                    argv = [sys.executable, "-m", "controlnet.cli", *map(fill, cli)]
                rss, seconds = peak_rss(argv, way_env)
                written = None
                if out:
                    written = Path(fill("{out}.safetensors" if out == "o" else "{out}"))
                results.setdefault(name, {})[way] = (rss, seconds, written)
                print(f"  {name:32s} {way:22s} peak RSS {rss:6.2f} GiB  {seconds:6.1f} s", flush=True)
            row = results[name]
            digests = {w: digest(r[2]) for w, r in row.items() if r[2] is not None}
            if len(digests) > 1:
                print(
                    f"  {'':32s} outputs identical: {'yes' if len(set(digests.values())) == 1 else 'NO'} "
                    f"({', '.join(f'{w}: {d}' for w, d in digests.items())})",
                    flush=True,
                )
            others = [w for w in row if w != "streamed"]
            for w in others:
                print(f"  {'':32s} {w} / streamed peak RSS: {row[w][0] / row['streamed'][0]:.1f}x", flush=True)
            for _, _, written in row.values():  # keep disk use down: one output per case at a time
                if written is not None and name != "convert original -> diffusers":
                    shutil.rmtree(written) if written.is_dir() else written.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

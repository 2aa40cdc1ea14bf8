"""Memory of one union ControlNet serving several condition types vs one single-condition ControlNet per type.

Why a union net (issue 31; xinsir's Union/ProMax): "load one model only once". This measures it at SD1.5 size:
`ControlNetPipeline.from_pretrained(base, controlnets=[...])` with N units, in a fresh process each, its peak
resident set (VmHWM, benchmarks/convert.py's `peak_rss`):

- union: N units naming the same union ControlNet file (the pipeline loads a file once: generate/pipeline.py);
- singles: N units naming N different plain ControlNet files (one per condition type, as before union nets).

Inputs are random weights (the SD1.5-sized single-file base of benchmarks/loading.py, cached outside the repo; the
ControlNets built from its UNet and written here as diffusers folders, float32). Nothing is generated; the nets'
weights (memory-mapped by the loader) are each read once, as the first sampling step reads them, so the numbers are
what the loaded nets hold, the part a union net changes (the base's pages are left unread in both).

    python benchmarks/union_memory.py [--types 2,4] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

LOAD = """import sys
from controlnet.generate.pipeline import ControlNetPipeline
pipe = ControlNetPipeline.from_pretrained(sys.argv[1], controlnets=sys.argv[3:], tokenizer=sys.argv[2])
# the nets' weights are memory-mapped: read every one once, as the first sampling step does
nets = {id(n): n for n in pipe.controlnets}.values()
print(sum(float(p.float().sum()) for net in nets for p in net.parameters()))
"""


def write_nets(files: Path, work: Path, n: int) -> tuple[Path, list[Path]]:
    """(a union net folder, n plain ControlNet folders) for the base's UNet, random float32 weights."""
    import torch

    from controlnet.io.api import load_unet, save_controlnet
    from controlnet.model.controlnet import ControlNet
    from controlnet.model.union_controlnet import UnionControlNet

    unet = load_unet(files / "base.safetensors")
    torch.manual_seed(0)
    union = work / "union"
    save_controlnet(UnionControlNet.from_unet(unet, num_control_type=8), union)
    singles = []
    for k in range(n):
        path = work / f"single-{k}"
        save_controlnet(ControlNet.from_unet(unet), path)
        singles.append(path)
    return union, singles


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="2,4", help="numbers of condition types (units) to measure")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "controlnet-bench-files")
    args = parser.parse_args(argv)

    import loading
    from convert import peak_rss

    counts = [int(n) for n in args.types.split(",")]
    files = loading.prepare("sd15", args.cache)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="union-memory-") as tmp:
        union, singles = write_nets(files, Path(tmp), max(counts))
        base, tokenizer = str(files / "base.safetensors"), str(files / "tokenizer")
        for n in counts:
            union_gib, union_s = peak_rss([sys.executable, "-c", LOAD, base, tokenizer, *[str(union)] * n], env)
            single_gib, single_s = peak_rss(
                [sys.executable, "-c", LOAD, base, tokenizer, *map(str, singles[:n])], env
            )
            rows.append((n, union_gib, union_s, single_gib, single_s))
    print("SD1.5 size, float32, ControlNetPipeline.from_pretrained (no generation); peak resident GiB:")
    for n, union_gib, union_s, single_gib, single_s in rows:
        print(
            f"  {n} types: one union net {union_gib:.2f} ({union_s:.0f} s), {n} single nets {single_gib:.2f} "
            f"({single_s:.0f} s) -> {union_gib / single_gib:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

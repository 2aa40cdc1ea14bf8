"""Batch generation from a JSONL manifest: one output per line, resumable, sharded across processes.

Manifest format, one JSON object per line (blank lines and lines starting with # are skipped):

    {"prompt": "a red circle", "cond": "edges/0001.png"}
    {"id": "cat-2", "prompt": "a cat", "cond": ["pose.png", "depth.png"], "seed": 7, "control_scale": [1, 0.5]}

`cond` holds one condition image per ControlNet (paths relative to the manifest's folder); any other key is a
`GenerationOptions` field (generate/options.py) overriding the command line for that line (a per-net one, e.g.
`control_scale`, as one value or one per net). Each line becomes a `GenerationJob` run by `run_job`, as a single
command line is, so a line's outputs and sidecar equal those of the same settings given on the command line. A line's outputs are named by its `id`
(default: `line-<number>`); its seed defaults to the command line's seed + the line number, so results do not
depend on how lines are split across processes.

Resuming: a line is done when its sidecar `<id>.json` exists (written last and atomically), so a crashed run
restarted with the same arguments does only the missing lines. Sharding: process r of w takes lines r, r + w, ...
(under `accelerate launch` r and w come from accelerate's process state).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from controlnet.generate.jobs import run_job
from controlnet.generate.options import UNIT_LISTS, ControlUnit, GenerationJob, GenerationOptions
from controlnet.generate.outputs import is_done, save_generation
from controlnet.io.images import open_image

logger = logging.getLogger(__name__)

_OPTION_FIELDS = {f.name for f in fields(GenerationOptions)} - {"output_type"}
_LINE_KEYS = {"id", "prompt", "cond", "annotator"}
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class ManifestLine:
    """One job of a manifest."""

    number: int
    """0-based line number among the jobs (comments and blank lines not counted)."""
    stem: str
    """Output name: `<stem>.png`, `<stem>.json`, `<stem>-grid.png`."""
    prompt: str
    conditions: list[Path]
    annotators: list[str | None] | None
    overrides: dict


def read_manifest(path: str | os.PathLike, n_nets: int) -> list[ManifestLine]:
    """Parse and check a JSONL manifest; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    jobs, stems = [], set()
    for line_no, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path.name} line {line_no}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'{where}: expected an object with a "prompt" string')
        unknown = sorted(set(record) - _LINE_KEYS - _OPTION_FIELDS)
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(unknown)}; expected prompt, cond, id, annotator or "
                "generation options"
            )
        cond = record.get("cond", [])
        cond = [cond] if isinstance(cond, str) else list(cond)
        if len(cond) != n_nets:
            raise ValueError(
                f"{where}: {len(cond)} condition images for {n_nets} ControlNets; expected one per net"
            )
        stem = str(record.get("id", f"line-{len(jobs):06d}"))
        if not _SAFE_ID.match(stem) or stem in stems:
            raise ValueError(f"{where}: id {stem!r} must be unique and use only letters, digits, '.', '_', '-'")
        stems.add(stem)
        annot = record.get("annotator")
        annot = [annot] * n_nets if isinstance(annot, str) or annot is None else list(annot)
        overrides = {k: v for k, v in record.items() if k in _OPTION_FIELDS}
        for key in ("image", "mask"):
            if isinstance(overrides.get(key), str):
                overrides[key] = str(path.parent / overrides[key])
        jobs.append(
            ManifestLine(len(jobs), stem, record["prompt"], [path.parent / c for c in cond], annot, overrides)
        )
    return jobs


def shard(jobs: list[ManifestLine], rank: int, world: int) -> list[ManifestLine]:
    """Lines rank, rank + world, rank + 2 * world, ... (disjoint across ranks, together all lines)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} world={world}: expected 0 <= rank < world")
    return jobs[rank::world]


def pending_lines(jobs: list[ManifestLine], out_dir: str | os.PathLike) -> list[ManifestLine]:
    """The lines whose sidecar is not written yet (a rerun has only these to do; none: nothing to load)."""
    return [line for line in jobs if not is_done(out_dir, line.stem)]


def line_job(line: ManifestLine, options: GenerationOptions, units: list[ControlUnit], base: str) -> GenerationJob:
    """A manifest line as a job: the command line's units with this line's conditions (decoded here, so that a
    missing, truncated or too-large file is refused by name) and annotators, its overrides applied."""
    overrides = dict(line.overrides)
    for key in ("image", "mask"):
        if isinstance(overrides.get(key), str):
            overrides[key] = open_image(overrides[key], f"line {line.number}: {key}")
    per_net = {k: overrides.pop(k) for k in list(overrides) if k in UNIT_LISTS}
    try:  # one value for every net or one per net, read as the pipeline's Python API reads them
        nets = GenerationOptions(**per_net).per_net(len(units)) if per_net else None
    except ValueError as err:
        raise ValueError(f"line {line.number}: {err}") from None
    line_units = []
    for k, (unit, path) in enumerate(zip(units, line.conditions, strict=True)):
        image = "inpaint" if path.name == "inpaint" and not path.is_file() else open_image(path, "condition image")
        changes = {"image": image}
        if line.annotators and any(line.annotators):
            changes["annotator"] = line.annotators[k]
        for key in per_net:
            value = getattr(nets[k], UNIT_LISTS[key])  # NetOptions names its fields as ControlUnit does
            changes[UNIT_LISTS[key]] = value.name if key == "control_mode" else value
        line_units.append(replace(unit, **changes))
    return GenerationJob(prompt=line.prompt, base=base, units=line_units, options=replace(options, **overrides))


def run_manifest(
    pipe,
    jobs: list[ManifestLine],
    out_dir: str | os.PathLike,
    options: GenerationOptions,
    units: list[ControlUnit],
    controlnet_names: list[str] | None = None,
    base: str = "builtin",
    on_step: Callable[[int, int], None] | None = None,
    on_line: Callable[[ManifestLine, bool], None] | None = None,
    grid: bool = True,
    extra: dict | None = None,
) -> tuple[int, int]:
    """Generate every line not done yet by `run_job`; returns (generated, skipped).

    `options` and `units` are the command line's; a line's seed defaults to options.seed + its line number."""
    generated = skipped = 0
    for line in jobs:
        if is_done(out_dir, line.stem):
            skipped += 1
            if on_line:
                on_line(line, False)
            continue
        line_options = replace(options, seed=options.seed + line.number, output_type="pil")
        job = line_job(line, line_options, units, base)
        result = run_job(pipe, job, progress=on_step)
        save_generation(
            result, out_dir, line.stem, controlnet_names, grid=grid, extra={"line": line.number, **(extra or {})}
        )
        generated += 1
        if on_line:
            on_line(line, True)
    return generated, skipped

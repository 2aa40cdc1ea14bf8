"""Write world datasets in the original ControlNet training layout (the fill50k tutorial's):

    DIR/prompt.json   one JSON object per line: {"source": "source/0.png", "target": "target/0.png", "prompt": "..."}
    DIR/source/i.png  the condition image (fill: the outline; scenes: the named condition map)
    DIR/target/i.png  the image to generate
    DIR/world.json    how it was made (task, n, size, seed), so the folder describes itself

The union task (`--task union --types canny,seg,...`, for a union ControlNet: data/sources.py `union_source`)
writes one scene per sample with one map per type, DIR/TYPE/i.png, and prompt.json lines {"target", "prompt",
"sources": {TYPE: "TYPE/i.png", ...}}. Its scenes are drawn as the single-condition tasks draw theirs (a person only
when the scene has one), so a sample holds a pose map only when it shows a person.

The folder is written into a temporary sibling and renamed into place when complete: an interrupted or
failed run leaves nothing behind under DIR.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from controlnet.atomic import atomic_path
from controlnet.world.conditions import CONDITIONS

logger = logging.getLogger(__name__)

# fill: fill50k's upright circles, 1 px lines; shapes: every shape, rotated, stretched, 1-3 px, half hand-drawn
TASKS: tuple[str, ...] = ("fill", "shapes", *CONDITIONS)
UNION = "union"  # several condition maps of one scene per sample (`types`)
# a union dataset names its types as the union nets do (model/union_controlnet.py UNION_TYPES): the world's names are
# aliases there, except Hough lines, M-LSD's kind of map; canny and mlsd share one type id, so one net takes one
UNION_TYPE_NAMES = {"lines": "mlsd"}
SAME_UNION_ID = ("canny", "lines")
MIN_SIZE = {"fill": 16, "shapes": 16}  # px; scenes need at least 32
MIN_SCENE_SIZE = 32
CHUNK = 250  # samples per worker job: large enough to amortise inter-process overhead
MAX_DEFAULT_WORKERS = 8
PNG_COMPRESSION = 1  # fast zlib level; the files are tiny either way


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a dataset made with `seed`: distinct streams for distinct (seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_pair(task: str, seed: int, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(source (H, W, 3) uint8, target (H, W, 3) uint8, prompt) of one sample of `task`."""
    if task == "fill":
        from controlnet.world.fill import fill_sample

        sample = fill_sample(seed, size)
        return sample.conditions["fill"], sample.image, sample.prompt
    if task == "shapes":
        from controlnet.world.fill import varied_fill_sample

        sample = varied_fill_sample(seed, size)
        return sample.conditions["fill"], sample.image, sample.prompt
    # the same maps as scene_sample(seed, size, ...).conditions[task], skipping the truth raster when
    # the condition does not need it (tests/world/test_dataset.py checks they agree)
    from controlnet.world.conditions import canny_map, condition_maps
    from controlnet.world.pose import draw_openpose
    from controlnet.world.render import draw_scene, render_image, scene_keypoints
    from controlnet.world.scene import caption, sample_scene

    scene = sample_scene(seed, size, require_person=task == "pose")
    image = render_image(scene)  # (H, W, 3) uint8
    if task == "canny":
        source = canny_map(image)
    elif task == "pose":
        source = draw_openpose(list(scene_keypoints(scene)), size)
    else:
        buf, geometry = draw_scene(scene, 1)
        source = condition_maps((task,), scene, image, buf, geometry, seed)[task]
    return source, image, caption(scene)


def union_sample(types: tuple[str, ...], seed: int, size: int) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """({union type name: (H, W, 3) uint8 map}, target (H, W, 3) uint8, prompt) of one scene; "pose" is left out of a
    scene without a person (an all-black map would teach the net that black means "no one here")."""
    from controlnet.world.scene_sample import scene_sample

    sample = scene_sample(seed, size, conditions=types)
    maps = {
        UNION_TYPE_NAMES.get(name, name): sample.conditions[name]
        for name in types
        if name != "pose" or len(sample.truth["keypoints"])
    }
    return maps, sample.image, sample.prompt


def check_union_types(types: tuple[str, ...]) -> None:
    """A union dataset's types: scene conditions (not fill/shapes), each once, not two of one union type id."""
    if not types:
        raise ValueError(
            f"types: none given; task {UNION!r} needs some of {', '.join(CONDITIONS)} (e.g. canny,seg)"
        )
    unknown = [t for t in types if t not in CONDITIONS]
    if unknown:
        raise ValueError(
            f"types: {unknown[0]!r} is not a scene condition; expected some of {', '.join(CONDITIONS)}"
        )
    if len(set(types)) != len(types):
        raise ValueError(f"types: {','.join(types)} names a type twice; expected each once")
    if all(t in types for t in SAME_UNION_ID):
        raise ValueError(
            "types: canny and lines are one union type (id 3, canny/mlsd), so one union net cannot tell them "
            "apart; expected one of them"
        )


def check_arguments(task: str, n: int, size: int, workers: int, types: tuple[str, ...] = ()) -> None:
    if task == UNION:
        check_union_types(types)
    elif types:
        raise ValueError(f"types: only for task {UNION!r} (got task {task!r})")
    elif task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)} or {UNION}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: expected a positive number of samples")
    min_size = MIN_SIZE.get(task, MIN_SCENE_SIZE)
    if not isinstance(size, int) or size < min_size:
        raise ValueError(f"size={size!r}: expected an integer >= {min_size} px for task {task!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: expected a positive number of processes")


def check_out(out: str | Path) -> Path:
    """The dataset folder to create: must not exist, its parent must."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"out={str(out)!r}: already exists; expected a path for a new dataset folder")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"out={str(out)!r}: the parent folder {str(out.parent)!r} does not exist")
    return out


def _write_chunk(job: tuple[str, tuple[str, ...], int, int, int, int, str]) -> list[dict]:
    """Render and write samples [start, stop) into `root`; return their prompt.json lines in order."""
    task, types, seed, size, start, stop, root = job
    lines = []
    params = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    for index in range(start, stop):
        if task == UNION:
            maps, target, prompt = union_sample(types, sample_seed(seed, index), size)
            sources = {name: f"{name}/{index}.png" for name in maps}
            line = {"target": f"target/{index}.png", "prompt": prompt, "sources": sources}
        else:
            source, target, prompt = make_pair(task, sample_seed(seed, index), size)
            maps = {"source": source}
            line = {"source": f"source/{index}.png", "target": f"target/{index}.png", "prompt": prompt}
        for name, image in maps.items():
            cv2.imwrite(os.path.join(root, name, f"{index}.png"), image[:, :, ::-1], params)
        cv2.imwrite(os.path.join(root, "target", f"{index}.png"), target[:, :, ::-1], params)
        lines.append(line)
    return lines


def default_workers() -> int:
    """The CPUs this process may use, at most MAX_DEFAULT_WORKERS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


def write_dataset(
    task: str,
    n: int,
    size: int,
    out: str | Path,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    types: tuple[str, ...] = (),
) -> Path:
    """Write `n` samples of `task` at `size` px into the new folder `out`; return its path. Task "union" writes the
    maps named by `types` (scene conditions) of each scene (the module docstring's union layout).

    `progress(k)` is called as each batch of k samples is written. Sample i is made from
    `sample_seed(seed, i)`, so a dataset is reproducible and its first samples do not depend on `n`.
    """
    workers = default_workers() if workers is None else workers
    types = tuple(types)
    check_arguments(task, n, size, workers, types)
    out = check_out(out)
    folders = [UNION_TYPE_NAMES.get(t, t) for t in types] if task == UNION else ["source"]
    # a dataset folder is complete or absent: a killed `world make` leaves only a hidden leftover
    with atomic_path(out, exists="error") as tmp:
        tmp.mkdir()
        for folder in (*folders, "target"):
            (tmp / folder).mkdir()
        jobs = [(task, types, seed, size, start, min(start + CHUNK, n), str(tmp)) for start in range(0, n, CHUNK)]
        lines: list[dict] = []
        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                lines += _write_chunk(job)
                if progress:
                    progress(job[5] - job[4])
        else:
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            with context.Pool(min(workers, len(jobs))) as pool:
                for job, chunk_lines in zip(jobs, pool.imap(_write_chunk, jobs), strict=True):
                    lines += chunk_lines
                    if progress:
                        progress(job[5] - job[4])
        with open(tmp / "prompt.json", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        meta = {"task": task, "n": n, "size": size, "seed": seed, "generator": "controlnet.world"}
        if task == UNION:
            meta["types"] = list(types)
        (tmp / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("wrote %d %s samples at %d px to %s", n, task, size, out)
    return out


def read_prompt_lines(root: str | Path) -> list[dict[str, str]]:
    """The entries of a dataset's prompt.json (one JSON object per line)."""
    with open(Path(root) / "prompt.json") as f:
        return [json.loads(line) for line in f if line.strip()]

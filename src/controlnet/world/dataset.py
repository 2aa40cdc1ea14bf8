"""Write world datasets in the original ControlNet training layout (the fill50k tutorial's):

    DIR/prompt.json   one JSON object per line: {"source": "source/0.png", "target": "target/0.png", "prompt": "..."}
    DIR/source/i.png  the condition image (fill: the outline; scenes: the named condition map)
    DIR/target/i.png  the image to generate
    DIR/world.json    how it was made (task, n, size, seed), so the folder describes itself

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


def check_arguments(task: str, n: int, size: int, workers: int) -> None:
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
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


def _write_chunk(job: tuple[str, int, int, int, int, str]) -> list[str]:
    """Render and write samples [start, stop) into `root`; return their prompts in order."""
    task, seed, size, start, stop, root = job
    prompts = []
    params = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    for index in range(start, stop):
        source, target, prompt = make_pair(task, sample_seed(seed, index), size)
        cv2.imwrite(os.path.join(root, "source", f"{index}.png"), source[:, :, ::-1], params)
        cv2.imwrite(os.path.join(root, "target", f"{index}.png"), target[:, :, ::-1], params)
        prompts.append(prompt)
    return prompts


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
) -> Path:
    """Write `n` samples of `task` at `size` px into the new folder `out`; return its path.

    `progress(k)` is called as each batch of k samples is written. Sample i is made from
    `sample_seed(seed, i)`, so a dataset is reproducible and its first samples do not depend on `n`.
    """
    workers = default_workers() if workers is None else workers
    check_arguments(task, n, size, workers)
    out = check_out(out)
    # a dataset folder is complete or absent: a killed `world make` leaves only a hidden leftover
    with atomic_path(out, exists="error") as tmp:
        tmp.mkdir()
        (tmp / "source").mkdir()
        (tmp / "target").mkdir()
        jobs = [(task, seed, size, start, min(start + CHUNK, n), str(tmp)) for start in range(0, n, CHUNK)]
        prompts: list[str] = []
        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                prompts += _write_chunk(job)
                if progress:
                    progress(job[4] - job[3])
        else:
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            with context.Pool(min(workers, len(jobs))) as pool:
                for job, chunk_prompts in zip(jobs, pool.imap(_write_chunk, jobs), strict=True):
                    prompts += chunk_prompts
                    if progress:
                        progress(job[4] - job[3])
        with open(tmp / "prompt.json", "w") as f:
            for index, prompt in enumerate(prompts):
                line = {"source": f"source/{index}.png", "target": f"target/{index}.png", "prompt": prompt}
                f.write(json.dumps(line) + "\n")
        meta = {"task": task, "n": n, "size": size, "seed": seed, "generator": "controlnet.world"}
        (tmp / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("wrote %d %s samples at %d px to %s", n, task, size, out)
    return out


def read_prompt_lines(root: str | Path) -> list[dict[str, str]]:
    """The entries of a dataset's prompt.json (one JSON object per line)."""
    with open(Path(root) / "prompt.json") as f:
        return [json.loads(line) for line in f if line.strip()]

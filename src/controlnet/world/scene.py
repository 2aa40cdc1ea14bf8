"""Procedural scenes: a few objects on a floor in front of a wall, sampled from a seed, with a caption.

A scene is a small description (kinds, colours, sizes, positions, poses); `controlnet.world.render` turns
it into an image, every condition map and the geometric truth. The camera looks at a wall across a floor:
objects stand on the floor, farther objects are higher in the image, smaller, and occluded by nearer ones,
so depth ordering, occlusion and shading are all meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controlnet.world.fill import COLOURS, FILL_VOCABULARY
from controlnet.world.pose import HEAD_RADIUS, TORSO_RADIUS, PoseAngles

KINDS: tuple[str, ...] = ("ball", "box", "pyramid", "person")
SIZE_WORDS: dict[str, float] = {"small": 0.12, "big": 0.19}  # object half-width / image side, at the nearest row
PERSON_HEIGHT = 0.75  # a person's height / image side, at the nearest row (people carry no size word)
OBJECT_COUNT_WEIGHTS = (0.25, 0.45, 0.30)  # probability of 1, 2, 3 objects

# Camera geometry, in fractions of the image side (rows measured from the top).
WALL_LINE = 0.40  # the floor meets the wall here
VANISHING_ROW = 0.20  # the floor plane's horizon (hidden behind the wall)
FAR_DEPTH = 8.0  # depth of the wall (world units); the floor's nearest row is at FAR_DEPTH / 4
GROUND_RANGE = (0.62, 0.97)  # rows where objects may stand
X_RANGE = (0.12, 0.88)
ASPECT_RANGE = (0.7, 1.4)  # box / pyramid height over width
PERSON_REACH = 0.45  # half the widest arm span / height
DEPTH_GAP = 0.05  # world units kept between objects that share image columns
PLACEMENT_TRIES = 30  # an object that finds no free place in this many tries is left out

# The words a caption can contain, plus the fill task's words: the base model's tokenizer vocabulary.
CAPTION_WORDS: tuple[str, ...] = ("a", "and", "on", "in", "background", *SIZE_WORDS, *KINDS)
WORLD_VOCABULARY: tuple[str, ...] = tuple(sorted({*CAPTION_WORDS, *COLOURS, *FILL_VOCABULARY}))


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is, its colour and size word, where it stands, and (people) its pose."""

    kind: str
    colour: str
    size: str  # a SIZE_WORDS key ("big" for people, who are not captioned with a size)
    x: float  # px, horizontal centre
    ground: float  # px, row where it touches the floor
    aspect: float = 1.0  # height / width for boxes and pyramids
    pose: PoseAngles | None = None  # people only


@dataclass(frozen=True)
class Scene:
    size: int  # px, square image side
    background: str  # named colour of the wall (the floor is a darker shade of it)
    objects: tuple[SceneObject, ...]


def floor_depth(row: float | np.ndarray, size: int) -> float | np.ndarray:
    """Depth of the floor at image row `row` (px): a plane seen in perspective, FAR_DEPTH at the wall line."""
    if isinstance(row, (int, float)):
        return FAR_DEPTH * (WALL_LINE - VANISHING_ROW) / max(row / size - VANISHING_ROW, 1e-3)
    u = np.asarray(row, np.float32) / size
    return FAR_DEPTH * (WALL_LINE - VANISHING_ROW) / np.maximum(u - VANISHING_ROW, 1e-3)


def perspective_scale(obj: SceneObject, size: int) -> float:
    """Image-size factor of an object standing at its ground row: 1 at the bottom row, 1/depth beyond."""
    return float(floor_depth(size, size) / floor_depth(obj.ground, size))


def half_width(obj: SceneObject, size: int) -> float:
    """Half the object's image width in px."""
    return SIZE_WORDS[obj.size] * size * perspective_scale(obj, size)


def person_height(obj: SceneObject, size: int) -> float:
    return PERSON_HEIGHT * size * perspective_scale(obj, size)


def x_extent(obj: SceneObject, size: int) -> tuple[float, float]:
    """Generous horizontal extent (px) of the object's silhouette (a box's side face, a person's arms)."""
    if obj.kind == "person":
        reach = PERSON_REACH * person_height(obj, size)
    else:
        reach = (2.0 if obj.kind == "box" else 1.0) * half_width(obj, size)
    return obj.x - reach, obj.x + reach


def depth_extent(obj: SceneObject, size: int) -> tuple[float, float]:
    """(nearest, farthest) depth the object occupies, as the renderer builds it (focal length = image side).

    A ball is centred on its contact depth; a box's or pyramid's footprint is as deep as it is wide and
    starts at the contact depth; a person is a flat body whose limbs lie one torso radius in front.
    """
    z = float(floor_depth(obj.ground, size))
    per_px = z / size  # world units per pixel at that depth
    if obj.kind == "ball":
        radius = half_width(obj, size) * per_px
        return z - radius, z + radius
    if obj.kind == "person":
        height = person_height(obj, size) * per_px
        return z - (TORSO_RADIUS + HEAD_RADIUS) * height, z + TORSO_RADIUS * height
    return z, z + 2.0 * half_width(obj, size) * per_px


def _collides(obj: SceneObject, others: list[SceneObject], size: int) -> bool:
    """True if obj overlaps another object both in image columns and in depth (it would intersect it)."""
    x0, x1 = x_extent(obj, size)
    z0, z1 = depth_extent(obj, size)
    for other in others:
        ox0, ox1 = x_extent(other, size)
        oz0, oz1 = depth_extent(other, size)
        if x0 < ox1 and ox0 < x1 and z0 < oz1 + DEPTH_GAP and oz0 < z1 + DEPTH_GAP:
            return True
    return False


def sample_scene(seed: int, size: int = 64, require_person: bool = False) -> Scene:
    """A random scene, deterministic by `seed`. `require_person` makes the first object a person (pose task).

    Objects never intersect: two objects that share image columns are separated in depth, so whatever
    occludes is nearer, as in a photograph.
    """
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size={size!r}: expected an integer >= 32")
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    object_colours = [c for c in names if c != background]
    count = 1 + int(rng.choice(len(OBJECT_COUNT_WEIGHTS), p=OBJECT_COUNT_WEIGHTS))
    objects: list[SceneObject] = []
    for i in range(count):
        kind = "person" if (require_person and i == 0) else KINDS[rng.integers(len(KINDS))]
        colour = object_colours[rng.integers(len(object_colours))]
        size_word = "big" if kind == "person" else list(SIZE_WORDS)[rng.integers(len(SIZE_WORDS))]
        aspect = float(rng.uniform(*ASPECT_RANGE))
        pose = PoseAngles.random(rng) if kind == "person" else None
        for _ in range(PLACEMENT_TRIES):
            if objects and rng.random() < 0.5:  # stand near an earlier object: occlusion is common
                x = objects[-1].x + rng.uniform(-0.15, 0.15) * size
            else:
                x = rng.uniform(*X_RANGE) * size
            x = float(np.clip(x, X_RANGE[0] * size, X_RANGE[1] * size))
            ground = float(rng.uniform(*GROUND_RANGE) * size)
            candidate = SceneObject(kind, colour, size_word, x, ground, aspect, pose)
            if not _collides(candidate, objects, size):
                objects.append(candidate)
                break
    return Scene(size=size, background=background, objects=tuple(objects))


def _phrase(obj: SceneObject) -> str:
    if obj.kind == "person":
        return f"a person in {obj.colour}"
    return f"a {obj.size} {obj.colour} {obj.kind}"


def caption(scene: Scene) -> str:
    """Objects from left to right, e.g. "a big red ball and a person in blue on a green background".

    Only WORLD_VOCABULARY words, separated by single spaces (no punctuation).
    """
    phrases = [_phrase(obj) for obj in sorted(scene.objects, key=lambda o: o.x)]
    return f"{' and '.join(phrases)} on a {scene.background} background"

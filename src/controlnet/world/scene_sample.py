"""`scene_sample(seed)`: a procedural scene as a WorldSample with its caption, every condition and its truth."""

from __future__ import annotations

from collections.abc import Iterable

from controlnet.world.conditions import CONDITIONS, condition_maps, seg_classes
from controlnet.world.render import draw_scene, render_image
from controlnet.world.sample import WorldSample
from controlnet.world.scene import Scene, caption, sample_scene


def scene_sample(
    seed: int, size: int = 64, require_person: bool = False, conditions: Iterable[str] | None = None
) -> WorldSample:
    """The scene of `seed` with every condition map (or only those named in `conditions`).

    truth: "ids" (H, W) int16 object ids (0 wall, 1 floor, 2+i object i), "classes" (H, W) int16 ADE20K
    class index, "depth" (H, W) float32 (larger = farther), "normal" (H, W, 3) float32 unit normals in
    the camera frame (x right, y up, z toward the viewer), "keypoints" (P, 18, 2) float32 OpenPose
    keypoints (x, y) px, "object_depths" (K,) float32. info["scene"]: the Scene description.
    """
    return render_scene(sample_scene(seed, size, require_person=require_person), seed, conditions)


def render_scene(scene: Scene, seed: int = 0, conditions: Iterable[str] | None = None) -> WorldSample:
    """A given Scene as a WorldSample (`seed` drives only the scribble's wobble); see `scene_sample`."""
    names = tuple(CONDITIONS) if conditions is None else tuple(conditions)
    unknown = [name for name in names if name not in CONDITIONS]
    if unknown:
        raise ValueError(f"conditions={unknown!r}: expected names from {', '.join(CONDITIONS)}")
    image = render_image(scene)  # (H, W, 3) uint8, anti-aliased
    buf, geometry = draw_scene(scene, 1)  # one sample at each pixel centre: the truth
    maps = condition_maps(names, scene, image, buf, geometry, seed)
    truth = {
        "ids": buf.ids.copy(),
        "classes": seg_classes(scene, buf.ids),
        "depth": buf.depth.copy(),
        "normal": buf.normal.copy(),
        "keypoints": geometry.keypoints,
        "object_depths": geometry.object_depths,
    }
    return WorldSample(image=image, prompt=caption(scene), conditions=maps, truth=truth, info={"scene": scene})

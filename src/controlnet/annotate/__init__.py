"""Annotators: condition maps from photos, offline, with the conventions the released ControlNets expect.

Each annotator is a callable `(H, W, C) uint8 -> (H, W, 3) uint8` looked up by name:

    from controlnet.annotate import annotate, get_annotator, list_annotators
    edges = annotate(image, "canny", low_threshold=100, high_threshold=200)
    depth = get_annotator("depth", weights="/models/dpt-hybrid-midas")(image)

Inputs follow the reference HWC3 conventions (grayscale repeated, alpha composited on white, 16-bit
scaled down); the image is resized so its short side is `detect_resolution` (multiples of 64) and the
map is resized back to the input size.

Weight-free: canny, lines, scribble, softedge, lineart_standard, normal (from a depth image), shuffle,
tile, inpaint, invert, openpose_json (renders an OpenPose keypoints JSON, not an image).
Local weights only (`weights=` or $CONTROLNET_ANNOTATORS; nothing is downloaded): hed
(ControlNetHED.pth), pidinet (table5_pidinet.pth), openpose (body_pose_model.pth), depth and seg
(transformers model folders).
"""

from controlnet.annotate.registry import annotate, cached_annotator, get_annotator, list_annotators

__all__ = ["annotate", "cached_annotator", "get_annotator", "list_annotators"]

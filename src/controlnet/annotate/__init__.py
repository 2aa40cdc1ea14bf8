"""Annotators: condition maps (edges, lines, scribbles, pose, depth, normals, segmentation...) from photos.

Each annotator is a callable `(H, W, 3) uint8 -> (H, W, C) uint8`; look them up by name.
"""

from controlnet.annotate.registry import annotate, get_annotator, list_annotators

__all__ = ["annotate", "get_annotator", "list_annotators"]

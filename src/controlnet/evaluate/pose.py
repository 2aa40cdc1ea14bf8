"""Pose: does a body stand on the stick figure?

No keypoint detector runs offline here, so the generated image's foreground (what differs from the row's
background) is compared with the OpenPose map's sticks: recall = stick pixels covered by a body, precision =
foreground pixels near a stick, within the stick figure's box, scored as F1 ("stick-figure overlap").
"""

from __future__ import annotations

import numpy as np

from controlnet.evaluate.common import check_pair, foreground_mask, tolerance_px, tolerant_f1

POSE_TOLERANCE_AT_64 = 1.5  # px: limbs are ~3 px thick at 64 px, sticks 3 px wide
BOX_MARGIN_AT_64 = 3  # px around the stick figure where the body is looked for


def pose_overlap(generated: np.ndarray, condition: np.ndarray) -> float:
    """Stick-figure overlap F1 (1 = a body exactly on the sticks); 1.0 when the map has no person and the
    image no foreground, 0.0 when only one of them is empty."""
    check_pair(generated, condition)
    sticks = condition.max(axis=2) > 0
    body = foreground_mask(generated)
    if not sticks.any():
        return 1.0 if not body.any() else 0.0
    size = generated.shape[0]
    margin = int(round(tolerance_px(size, BOX_MARGIN_AT_64)))
    ys, xs = np.nonzero(sticks)
    box = np.zeros_like(sticks)
    box[max(0, ys.min() - margin) : ys.max() + margin + 1, max(0, xs.min() - margin) : xs.max() + margin + 1] = (
        True
    )
    return tolerant_f1(body & box, sticks, tolerance_px(size, POSE_TOLERANCE_AT_64))

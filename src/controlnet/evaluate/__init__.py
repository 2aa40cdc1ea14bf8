"""Fidelity metrics: does a generated image follow its condition?
(docs/architecture.md#fidelity-is-measured-not-eyeballed)

Each metric re-detects the condition in the generated image with a fixed, model-free detector and compares
it with the input condition, as the paper re-segments ControlNet outputs and scores IoU against the input
segmentation (Sec. 4.3, Table 2). `report.evaluate_images` scores a model beside its floor (the base model
on the same prompts, no control) and ceiling (the ground-truth images through the same metric).
Import submodules directly; nothing runs at import time.
"""

"""Paired transforms keep target and condition aligned; buckets and batch plans are deterministic."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from controlnet.data.dataset import BatchPlan, assign_buckets
from controlnet.data.transforms import Bucket, PairedTransform, make_buckets, nearest_bucket


def test_same_random_crop_and_flip_for_target_and_condition():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    transform = PairedTransform(24, 24, center_crop=False, random_flip=True)
    flips = set()
    for seed in range(12):
        target, cond = transform(image, image, np.random.default_rng(seed))
        assert target.shape == (3, 24, 24) and cond.shape == (3, 24, 24) and cond.dtype == torch.uint8
        torch.testing.assert_close(target, cond.float() / 127.5 - 1.0)  # same pixels: same geometry
        flips.add(transform.geometry(image.size, np.random.default_rng(seed))[2])
    assert flips == {True, False}


def test_center_crop_is_centred_and_deterministic():
    image = Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(30, 20, 3) % 251)
    t = PairedTransform(10, 10)
    resized, box, flip = t.geometry(image.size, np.random.default_rng(0))
    assert resized == (10, 15) and box == (0, 2, 10, 12) and not flip
    a = t(image, image, np.random.default_rng(1))[0]
    b = t(image, image, np.random.default_rng(2))[0]
    assert torch.equal(a, b)


def test_buckets_keep_area_and_pick_nearest_aspect():
    buckets = make_buckets(512)
    assert Bucket(512, 512) in buckets
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 0.7 * 512 * 512 <= b.width * b.height <= 512 * 512 * 1.01
    wide = nearest_bucket(1600, 900, buckets)
    assert wide.width > wide.height and abs(wide.aspect - 16 / 9) < 0.25
    assert nearest_bucket(900, 900, buckets) == Bucket(512, 512)


def test_batch_plan_epochs_buckets_and_rank_split():
    sizes = [(64, 64)] * 10 + [(128, 64)] * 7
    buckets = assign_buckets(sizes, 64, bucketing=True, multiple=8)
    plan = BatchPlan(buckets, micro_batch=4, seed=5)
    assert plan.batches_per_epoch == 2 + 1
    epoch0 = plan.epoch(0)
    for batch in epoch0:
        assert len(batch) == 4 and len({buckets[p] for p in batch}) == 1  # one bucket per batch
    assert BatchPlan(buckets, 4, 5).epoch(0) == epoch0  # a pure function of (seed, epoch)
    assert plan.epoch(1) != epoch0
    assert plan.batch(3) == (1, plan.epoch(1)[0])

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lets test modules import train_tiny / train_helpers

from train_tiny import make_fill_dataset, save_tiny_base  # noqa: E402

# Tiny models on a shared 2-core machine: one intra-op thread is ~100x faster than two contended ones.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fill_data(tmp_path_factory):
    """24 fill-task samples at 16 px in the original layout."""
    return make_fill_dataset(tmp_path_factory.mktemp("data") / "fill", n=24)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """The tiny random base saved as a diffusers folder (for CLI and subprocess tests)."""
    return save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-base")


@pytest.fixture(scope="session")
def transformer_world(tmp_path_factory):
    """8 fill samples at 16 px and tiny random SD3 and Flux diffusers folders (VAE factor 1), built once per session
    for the transformer-base training tests (they read them, never write them)."""
    from controlnet.testing.tiny_transformer_bases import write_flux_base, write_sd3_base

    root = tmp_path_factory.mktemp("transformer-world")
    return {
        "data": make_fill_dataset(root / "fill", n=8),
        "sd3": write_sd3_base(root / "sd3" / "base"),
        "flux": write_flux_base(root / "flux" / "base"),
    }

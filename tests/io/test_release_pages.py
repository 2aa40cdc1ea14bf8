"""`release_file_pages`: the resident pages of memory-mapped tensors nothing uses any more go back to the kernel
(what `controlnet train` does for the base's tensors it replaced by channels_last or cast copies)."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from safetensors.torch import save_file

from controlnet.io.safe_load import map_state_dict, release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux only")


def _file_resident_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssFile:\s+(\d+) kB", f.read())[1]) / 1024


def test_mapped_pages_are_released_and_anonymous_memory_is_left_alone(tmp_path):
    torch.manual_seed(0)
    big = torch.randn(32, 1024, 1024)  # 128 MB
    save_file({"big": big, "small": torch.arange(10.0)}, str(tmp_path / "w.safetensors"))
    state = map_state_dict(tmp_path / "w.safetensors")
    total = float(state["big"].sum())  # every page of the tensor read: resident
    touched = _file_resident_mb()
    anonymous = torch.ones(256, 1024)  # not a file: never dropped (madvise would zero it)
    assert release_file_pages([state["big"], anonymous]) == big.numel() * 4
    assert _file_resident_mb() < touched - 100, (touched, _file_resident_mb())
    assert float(anonymous.sum()) == 256 * 1024
    # dropped pages are read from the file again if touched: the values are the file's
    assert float(state["big"].sum()) == total and torch.equal(state["small"], torch.arange(10.0))

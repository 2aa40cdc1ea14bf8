"""Unsafe, truncated, foreign and mismatched files each give one clear error; nothing runs, nothing is written."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from controlnet import ControlNet, load_controlnet, load_unet
from controlnet.errors import CheckpointError
from controlnet.io.api import controlnet_state_to_original
from controlnet.io.safe_load import read_state_dict
from controlnet.testing.tiny_models import make_tiny_unet


class _RunsCodeWhenUnpickled:
    """Pickles to a call of os.system: what a booby-trapped .pth does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "control_evil.pth"
    torch.save({"input_hint_block.0.weight": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_controlnet(path, unet=make_tiny_unet("sd15"))
    assert not marker.exists()
    # The file really is malicious: an unrestricted unpickler runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file_is_one_clear_error(tmp_path, suffix):
    state = controlnet_state_to_original(ControlNet.from_unet(make_tiny_unet("sd15")).state_dict(), 2)
    full = tmp_path / f"full{suffix}"
    save_file(state, full) if suffix == ".safetensors" else torch.save(state, full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        read_state_dict(cut)
    assert "\n" not in str(err.value) and "cut" in str(err.value)


def test_non_checkpoint_files_are_rejected(tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    (tmp_path / "image.safetensors").write_bytes(png.getvalue())
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_state_dict(tmp_path / "image.safetensors")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_state_dict(tmp_path / "notes.pth")
    with pytest.raises(CheckpointError, match="unsupported file type '.txt'"):
        read_state_dict(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_controlnet(tmp_path / "missing.safetensors")
    tensors_only = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2)}, tensors_only)
    with pytest.raises(CheckpointError, match="holds no known model"):
        load_controlnet(tensors_only)


def test_wrong_architecture_is_named(tmp_path):
    state = controlnet_state_to_original(ControlNet.from_unet(make_tiny_unet("sd15")).state_dict(), 2)
    path = tmp_path / "control.safetensors"
    save_file(state, path)
    # another family (here: another context width) is one line naming both, before any key is compared
    with pytest.raises(
        CheckpointError,
        match=r"control.safetensors is a ControlNet for a custom SD1.x/2.x-style model \(cross-attention width 32\), "
        r"but the UNet given is a custom SD1.x/2.x-style model \(cross-attention width 24\)",
    ):
        load_controlnet(path, unet=make_tiny_unet("sd21"))
    # the same family with other widths: the key-by-key comparison names the mismatches
    from diffusers import UNet2DConditionModel

    from controlnet.testing.tiny_models import TINY_UNET_CONFIGS

    narrower = UNet2DConditionModel(**dict(TINY_UNET_CONFIGS["sd15"], block_out_channels=[16, 32]))
    with pytest.raises(CheckpointError, match="does not match the expected architecture: .*shape mismatches"):
        load_controlnet(path, unet=narrower)
    with pytest.raises(CheckpointError, match="cannot tell the architecture"):
        load_controlnet(path)  # tiny cross-attention width: no known family, no config given
    with pytest.raises(CheckpointError, match="not a UNet"):
        load_unet(path)

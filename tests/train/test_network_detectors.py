"""The reward's soft-edge and line-art detectors (train/network_detectors.py) against the annotators they run in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from controlnet.annotate.hed import Hed
from controlnet.annotate.lineart import LineartStandard
from controlnet.annotate.pidinet import PiDiNetEdges
from controlnet.train.config import resolve_config
from controlnet.train.detectors import detector
from controlnet.world.dataset import make_pair


def _random_weights(tmp_path, network, name: str) -> str:
    """A file of random weights of `network` (no released weights can be downloaded here): its initial weights
    doubled, so that its map varies over the image without saturating its sigmoid."""
    with torch.no_grad():
        for p in network.parameters():
            p.mul_(2.0)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return str(path)


def _world_images(n: int = 2, size: int = 64) -> np.ndarray:
    return np.stack([make_pair("canny", seed, size)[1] for seed in range(n)])  # (n, H, W, 3) uint8


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("name", ["hed", "pidinet", "lineart_standard"])
def test_the_detector_is_the_annotators_map_with_a_gradient(tmp_path, name):
    images = _world_images()
    if name == "hed":
        from controlnet.annotate.hed_net import HedNetwork

        torch.manual_seed(0)
        weights = _random_weights(tmp_path, HedNetwork(), "ControlNetHED.safetensors")
        annotator = Hed(weights=weights)
    elif name == "pidinet":
        from controlnet.annotate.pidinet_net import PiDiNet

        torch.manual_seed(0)
        weights = _random_weights(tmp_path, PiDiNet(), "table5_pidinet.safetensors")
        annotator = PiDiNetEdges(weights=weights)
    else:
        weights, annotator = None, LineartStandard()
    expected = np.stack([annotator.detect(im) for im in images]).astype(np.float32) / 255  # (n, H, W) after uint8
    loss = detector(name, weights)
    x = _unit(images).requires_grad_(True)
    edges = loss.edges(x)[:, 0]  # (n, H, W)
    got = edges.detach().numpy()
    assert np.abs(got - expected).max() <= 2 / 255 + 1e-6, np.abs(got - expected).max()  # uint8 rounding
    assert expected.std() > 0.01  # the map is not flat: the comparison can fail
    # MSE to the annotator's own map as condition: ~0; to another image's map: larger
    conditions = torch.from_numpy(expected)[:, None].expand(-1, 3, -1, -1)
    per_sample = loss(x, conditions).detach()
    wrong = loss(x, conditions.flip(0))
    assert per_sample.max() < 1e-4 and (wrong > 10 * per_sample).all()
    wrong.sum().backward()
    assert x.grad.abs().sum() > 0
    if name != "lineart_standard":
        assert not any(p.requires_grad for p in loss.parameters())  # frozen


def test_a_network_detector_without_weights_is_refused_in_one_line(tmp_path, monkeypatch):
    from controlnet.train.reward import resolve_detector

    monkeypatch.delenv("CONTROLNET_ANNOTATORS", raising=False)
    config = resolve_config(None, {"train.reward": "true", "train.reward_detector": "hed"})
    with pytest.raises(
        FileNotFoundError,
        match=r"train.reward_detector=hed: no weights.*ControlNetHED.*--train.reward_detector_weights",
    ) as info:
        resolve_detector(config)
    assert "\n" not in str(info.value)
    config = resolve_config(
        None,
        {
            "train.reward": "true",
            "train.reward_detector": "pidinet",
            "train.reward_detector_weights": str(tmp_path),
        },
    )
    with pytest.raises(FileNotFoundError, match=r"weights file not found: expected .*table5_pidinet.pth"):
        resolve_detector(config)

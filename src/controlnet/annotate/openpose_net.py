"""The OpenPose body network (Cao et al., "Realtime Multi-Person 2D Pose Estimation using Part Affinity
Fields", CVPR 2017), in the layout of the released body_pose_model.pth the ControlNet annotators use.

A VGG-19 trunk (conv1_1 .. conv4_2) plus two CPM convs gives 128-channel features F; stage 1 predicts
38 part-affinity-field channels (L1: 19 limbs x (x, y)) and 19 part heatmaps (L2: 18 parts +
background) from F; stages 2-6 refine both from [PAF, heatmaps, F] (185 channels) with 7x7 convs.
Module names are the file's names under `model0`, `model1_1` ... `model6_2`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

NUM_PAF_CHANNELS = 38  # 19 limbs x (x, y)
NUM_HEATMAPS = 19  # 18 COCO parts + background
FEATURE_CHANNELS = 128
NUM_STAGES = 6
REFINE_CHANNELS = NUM_PAF_CHANNELS + NUM_HEATMAPS + FEATURE_CHANNELS  # 185
# Trunk: (name, in, out, kernel) for convs, ("pool...", ) for 2x2 max-pools.
TRUNK = (
    ("conv1_1", 3, 64, 3),
    ("conv1_2", 64, 64, 3),
    ("pool1_stage1",),
    ("conv2_1", 64, 128, 3),
    ("conv2_2", 128, 128, 3),
    ("pool2_stage1",),
    ("conv3_1", 128, 256, 3),
    ("conv3_2", 256, 256, 3),
    ("conv3_3", 256, 256, 3),
    ("conv3_4", 256, 256, 3),
    ("pool3_stage1",),
    ("conv4_1", 256, 512, 3),
    ("conv4_2", 512, 512, 3),
    ("conv4_3_CPM", 512, 256, 3),
    ("conv4_4_CPM", 256, 128, 3),
)
# The released model applies ReLU after the final heatmap conv of stage 6 (its no-ReLU list names the
# stage-6 PAF conv twice and omits the heatmap conv); kept so maps match the reference.
RELU_ON_FINAL_HEATMAPS = True


def conv_stack(layers: list[tuple[str, int, int, int]], relu_on_last: bool) -> nn.Sequential:
    """Named convs ('same' padding) each followed by ReLU, except the last unless `relu_on_last`."""
    modules: list[tuple[str, nn.Module]] = []
    for index, (name, c_in, c_out, kernel) in enumerate(layers):
        modules.append((name, nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)))
        if index < len(layers) - 1 or relu_on_last:
            modules.append((f"relu_{name}", nn.ReLU()))
    return nn.Sequential(OrderedDict(modules))


def stage_layers(stage: int, branch: int, out_channels: int) -> list[tuple[str, int, int, int]]:
    """Layers of stage `stage` (1-6), branch 1 (PAF) or 2 (heatmaps)."""
    if stage == 1:
        names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
        shapes = [(FEATURE_CHANNELS, 128, 3), (128, 128, 3), (128, 128, 3), (128, 512, 1), (512, out_channels, 1)]
    else:
        names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
        shapes = [(REFINE_CHANNELS, 128, 7)] + [(128, 128, 7)] * 4 + [(128, 128, 1), (128, out_channels, 1)]
    return [(name, *shape) for name, shape in zip(names, shapes, strict=True)]


class BodyPoseNetwork(nn.Module):
    """(B, 3, H, W) BGR / 256 - 0.5 -> PAFs (B, 38, H/8, W/8) and heatmaps (B, 19, H/8, W/8)."""

    def __init__(self):
        super().__init__()
        trunk: list[tuple[str, nn.Module]] = []
        for layer in TRUNK:
            if len(layer) == 1:
                trunk.append((layer[0], nn.MaxPool2d(kernel_size=2, stride=2)))
            else:
                name, c_in, c_out, kernel = layer
                trunk += [(name, nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)), (f"relu_{name}", nn.ReLU())]
        self.model0 = nn.Sequential(OrderedDict(trunk))
        for stage in range(1, NUM_STAGES + 1):
            final = stage == NUM_STAGES
            self.add_module(f"model{stage}_1", conv_stack(stage_layers(stage, 1, NUM_PAF_CHANNELS), False))
            heat_relu = final and RELU_ON_FINAL_HEATMAPS
            self.add_module(f"model{stage}_2", conv_stack(stage_layers(stage, 2, NUM_HEATMAPS), heat_relu))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model0(x)  # (B, 128, H/8, W/8)
        h = features
        for stage in range(1, NUM_STAGES + 1):
            pafs = getattr(self, f"model{stage}_1")(h)
            heatmaps = getattr(self, f"model{stage}_2")(h)
            h = torch.cat([pafs, heatmaps, features], dim=1)  # (B, 185, H/8, W/8)
        return pafs, heatmaps


def from_released_keys(network: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released file names parameters without the `modelX.` prefix ('conv1_1.weight'); add it back."""
    if all(key in state for key in network.state_dict()):
        return state
    renamed = {}
    for key in network.state_dict():
        short = key.split(".", 1)[1]
        if short in state:
            renamed[key] = state[short]
    return renamed

"""Functions that `torch.multiprocessing.spawn` runs in its processes: they must be importable by module name there,
which a test module collected in pytest's importlib mode is not (it is named tests.train.test_...)."""

from __future__ import annotations

import torch


def net_called_first_in_validation(rank: int, port: int) -> None:
    """One of 2 gloo processes: a sharded tiny ControlNet whose first call is the pipeline's (the hint encoder's
    group first), as in a validation right after a resume."""
    import os

    import torch.distributed as dist
    from diffusers import UNet2DConditionModel
    from train_tiny import TINY_UNET

    from controlnet.model.controlnet import ControlNet
    from controlnet.train.sharded_validation import reshard
    from controlnet.train.sharding import shard_controlnet

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**TINY_UNET)
        net = ControlNet.from_unet(unet, hint_block_channels=(8, 16), hint_downscale_factor=1)
        shard_controlnet(net, torch.device("cpu"))
        reshard(net)  # what the trainer's validation does before generating
        with torch.no_grad():
            hint = net.embed_condition(torch.rand(1, 3, 16, 16))  # (1, C_0, 16, 16)
            out = net(torch.randn(1, 3, 16, 16), 5, torch.randn(1, 8, 16), hint=hint)
        assert out.mid.shape[0] == 1
    finally:
        dist.destroy_process_group()

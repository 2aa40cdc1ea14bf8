"""Training a union ControlNet (model.architecture=union; train/union.py) on a tiny base and a tiny dataset with
two condition types per image: the loss falls, resume is exact, the export loads here and in diffusers, type dropout
draws reproducible non-empty subsets, bad data and settings are refused in one line before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_helpers import checkpoint_weights, final_weights, tiny_config
from train_tiny import make_tiny_base, make_tiny_sdxl_base

from controlnet.io.api import load_controlnet
from controlnet.model.compose import unet_residual_kwargs
from controlnet.model.union_controlnet import UnionControlNet
from controlnet.train.checkpoint import list_checkpoints
from controlnet.train.loop import step_generator
from controlnet.train.trainer import Trainer, train
from controlnet.train.union import UnionControlledUNet, draw_subsets


def make_union_dataset(fill_data: Path, folder: Path, n: int = 12) -> Path:
    """The fill samples with two conditions each: "canny" (the fill task's outline) and "depth" (the target in grey);
    every third sample holds its outline only."""
    folder.mkdir(parents=True)
    (folder / "canny").mkdir()
    (folder / "depth").mkdir()
    lines = [json.loads(x) for x in (fill_data / "prompt.json").read_text().splitlines()][:n]
    out = []
    for k, line in enumerate(lines):
        target = Image.open(fill_data / line["target"]).convert("RGB")
        target.save(folder / f"target-{k}.png")
        Image.open(fill_data / line["source"]).convert("RGB").save(folder / "canny" / f"{k}.png")
        sources = {"canny": f"canny/{k}.png"}
        if k % 3:
            target.convert("L").convert("RGB").save(folder / "depth" / f"{k}.png")
            sources["depth"] = f"depth/{k}.png"
        out.append({"target": f"target-{k}.png", "prompt": line["prompt"], "sources": sources})
    (folder / "prompt.json").write_text("".join(json.dumps(x) + "\n" for x in out))
    return folder


@pytest.fixture(scope="module")
def union_data(fill_data, tmp_path_factory):
    return make_union_dataset(fill_data, tmp_path_factory.mktemp("union") / "data")


def _config(data, out, **overrides):
    return tiny_config(data, out, model__architecture="union", **overrides)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_union_net_trains_and_its_export_loads_here_and_in_diffusers(union_data, tmp_path):
    from diffusers import ControlNetUnionModel

    base = make_tiny_base()
    losses = []
    # no weight decay: the task embeddings of the types never trained keep their initial values
    config = _config(
        union_data,
        tmp_path / "run",
        train__max_steps=16,
        optim__lr="3e-3",
        train__batch_size=4,
        optim__weight_decay=0,
    )
    summary = train(config, base, callback=lambda info: losses.append(info.loss))
    assert summary.status == "finished" and summary.step == 16
    assert sum(losses[-4:]) < sum(losses[:4])  # the loss falls
    final = tmp_path / "run" / "final"
    assert (final / "controlnet").is_dir() and not (final / "controlnet.safetensors").exists()  # diffusers only
    weights = final_weights(tmp_path / "run")
    net = load_controlnet(final / "controlnet", unet=make_tiny_base().unet)
    assert isinstance(net, UnionControlNet) and net.union_config.num_control_type == 8
    assert _equal(net.state_dict(), weights)
    assert weights["controlnet_mid_block.weight"].abs().sum() > 0  # trained away from zero
    assert weights["spatial_ch_projs.weight"].abs().sum() > 0  # the fusion's projection too
    # canny (id 3) and depth (id 1) were trained, other types' task embeddings were not (fresh init kept)
    unet = make_tiny_base().unet
    torch.manual_seed(config.train.seed)  # the fresh net's init, as the trainer draws it
    init = UnionControlNet.from_unet(
        unet, num_control_type=8, hint_block_channels=(8, 16), hint_downscale_factor=1
    ).state_dict()["task_embedding"]
    moved = (weights["task_embedding"] - init).abs().sum(dim=1) > 0
    assert moved.tolist() == [False, True, False, True, False, False, False, False]
    theirs = ControlNetUnionModel.from_pretrained(final / "controlnet")
    assert json.loads((final / "controlnet" / "config.json").read_text())["_class_name"] == "ControlNetUnionModel"
    assert _equal({k: v for k, v in theirs.state_dict().items()}, weights)


def test_resumed_union_run_ends_bitwise_equal_to_an_uninterrupted_one(union_data, tmp_path):
    extra = dict(optim__grad_accum=2, optim__ema_decay=0.9, checkpoint__every=2, train__max_steps=4)
    train(_config(union_data, tmp_path / "full", **extra), make_tiny_base())
    trainer = Trainer(
        _config(union_data, tmp_path / "resumed", **extra), make_tiny_base(), callback=lambda i: _stop_at(i, 2)
    )
    assert trainer.run().status == "interrupted"
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0000002"]
    assert train(_config(union_data, tmp_path / "resumed", **extra), make_tiny_base()).step == 4
    assert _equal(final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed"))
    last = "checkpoints/step-0000004"
    assert _equal(checkpoint_weights(tmp_path / "full" / last), checkpoint_weights(tmp_path / "resumed" / last))


def _stop_at(info, step: int) -> None:
    """Act like SIGTERM arriving during `step`: the loop saves and exits after it."""
    if info.step == step:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)


def test_type_dropout_draws_reproducible_non_empty_subsets_of_what_each_sample_holds():
    available = torch.tensor([[True, True, True], [True, False, True], [False, True, False]] * 100)  # (300, 3)
    draws = [draw_subsets(available, 0.5, step_generator(0, s), 0, 300) for s in range(4)]
    again = draw_subsets(available, 0.5, step_generator(0, 2), 0, 300)
    assert torch.equal(draws[2], again)  # a function of (seed, micro-step)
    assert not torch.equal(draws[0], draws[1])
    for keep in draws:
        assert keep.any(dim=1).all() and not (keep & ~available).any()  # non-empty, of the held types only
    full_rows = torch.stack(draws)[:, ::3]  # rows holding all three types: every non-empty subset appears
    assert len({tuple(r) for r in full_rows.reshape(-1, 3).tolist()}) == 7
    assert draws[0][2::3].sum(dim=1).eq(1).all()  # a sample of one type always keeps it
    # a process's rows lo:hi equal the same rows of the whole global batch's draw
    assert torch.equal(draw_subsets(available, 0.5, step_generator(0, 1), 4, 9), draws[1][4:9])
    assert draw_subsets(available, 1.0, step_generator(0, 0), 0, 300).eq(available).all()  # keep 1: all


def test_each_row_gets_the_net_on_its_kept_pairs_with_one_encoder_pass_for_the_batch():
    base = make_tiny_base()
    torch.manual_seed(0)
    net = UnionControlNet.from_unet(
        base.unet, num_control_type=8, hint_block_channels=(8, 16), hint_downscale_factor=1
    )
    with torch.no_grad():  # away from the zero init, whose residuals are zero whatever the conditions
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = UnionControlledUNet(net, base.unet, ids=[1, 3])  # depth, canny
    encoder_batches, unet_batches = [], []
    net.down_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: encoder_batches.append(len(kw["hidden_states"])), with_kwargs=True
    )
    base.unet.register_forward_pre_hook(lambda m, a, kw: unet_batches.append(len(a[0])), with_kwargs=True)
    x, ctx = torch.randn(4, 3, 16, 16), torch.randn(4, 8, 16)
    t, cond = torch.tensor([10, 200, 500, 900]), torch.rand(4, 2, 3, 16, 16)  # (B, K, C, H, W)
    keep = torch.tensor([[True, False], [True, True], [False, True], [True, False]])
    with torch.no_grad():
        pred = model(x, t, ctx, cond, keep=keep)
        assert encoder_batches == [4] and unet_batches == [4]  # three subsets, one pass each for the batch
        encoder_batches.clear()
        # each subset's rows as the net's own call on their kept (condition, type) pairs: as a group, because the
        # fusion transformer's attention runs over the batch axis (diffusers' ResidualAttentionBlock is
        # sequence-first and gets (B, K + 1, C)), so rows that share a subset see each other, as in xinsir's net
        for rows, types in (([0, 3], [1]), ([1], [1, 3]), ([2], [3])):
            r = torch.tensor(rows)
            used = [k for k in range(2) if keep[rows[0], k]]
            out = net(x[r], t[r], ctx[r], conds=[cond[r, k] for k in used], types=types)
            alone = base.unet(x[r], t[r], ctx[r], **unet_residual_kwargs(out)).sample
            torch.testing.assert_close(pred[r], alone, rtol=1e-5, atol=1e-5)  # batch size changes summation order
        other = model(x, t, ctx, cond, keep=torch.ones(4, 2, dtype=torch.bool))
    assert not torch.allclose(pred[0], other[0])  # the kept subset matters


def test_cached_and_uncached_union_training_agree(union_data, tmp_path):
    for cache in ("true", "false"):
        train(_config(union_data, tmp_path / cache, train__max_steps=2, data__cache=cache), make_tiny_base())
    assert _equal(final_weights(tmp_path / "true"), final_weights(tmp_path / "false"))


def test_sdxl_style_base_trains_a_union_net_through_its_micro_conditioning(union_data, tmp_path):
    base = make_tiny_sdxl_base()
    summary = train(_config(union_data, tmp_path / "run", train__max_steps=2), base)
    assert summary.step == 2
    net = load_controlnet(tmp_path / "run" / "final" / "controlnet", unet=make_tiny_sdxl_base().unet)
    assert isinstance(net, UnionControlNet) and net.unet_config.get("addition_embed_type") == "text_time"
    assert net.controlnet_mid_block.weight.abs().sum() > 0


@pytest.mark.slow
def test_cli_trains_a_union_net_and_a_rerun_has_nothing_to_do(union_data, base_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "controlnet.cli", "train", "--model.base", str(base_dir), "--data.path",
           str(union_data), "--data.resolution", "16", "--model.hint_channels", "8,16", "--model.architecture",
           "union", "--model.union_types", "depth,canny", "--train.max_steps", "2", "--train.batch_size", "2",
           "--train.output_dir", str(out)]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert isinstance(load_controlnet(out / "final" / "controlnet", unet=make_tiny_base().unet), UnionControlNet)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr


def _refusal(config) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        Trainer(config).setup()  # model.base builtin: nothing loads before the checks
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_union_data_and_settings_are_refused_in_one_line_before_loading(union_data, fill_data, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(union_data, broken)
    (broken / "depth" / "4.png").unlink()
    assert _refusal(_config(broken, tmp_path / "a")).endswith(
        f"line 5: the 'depth' condition file {broken / 'depth' / '4.png'} is missing"
    )
    message = _refusal(_config(union_data, tmp_path / "b", model__union_types="canny"))
    assert "line 2: condition type 'depth' is not one of model.union_types=canny" in message
    message = _refusal(_config(union_data, tmp_path / "c", model__union_types="canny,depth,openpose"))
    assert "no sample" in message and "'openpose'" in message
    assert "unknown type 'sketch'" in _refusal(_config(union_data, tmp_path / "d", model__union_types="sketch"))
    assert "'sources'" in _refusal(_config(fill_data, tmp_path / "e"))  # a single-condition dataset
    message = _refusal(_config(union_data, tmp_path / "f", checkpoint__export_formats="original"))
    assert "diffusers layout only" in message
    assert "validation.every=5" in _refusal(_config(union_data, tmp_path / "g", validation__every=5))
    with pytest.raises(ValueError, match="only for model.architecture=union"):
        tiny_config(union_data, tmp_path / "h", model__union_types="canny")
    with pytest.raises(ValueError, match="train.union_keep_prob=0.0"):
        _config(union_data, tmp_path / "i", train__union_keep_prob=0)
    assert not any((tmp_path / name).exists() for name in "abcdefg")  # no run folder left behind


def test_a_union_net_continues_from_a_union_file_and_mismatches_are_one_line(
    union_data, fill_data, base_dir, tmp_path
):
    """model.controlnet + model.architecture=union continues a union net (as from xinsir's ProMax): the run starts
    from the file's weights (a step at lr 1e-12 leaves them as they were); a plain net with architecture union, a
    union net without it, or data with a type the net lacks: one line from the headers, before loading."""
    train(_config(union_data, tmp_path / "first", train__max_steps=2, optim__weight_decay=0), make_tiny_base())
    exported = tmp_path / "first" / "final" / "controlnet"
    config = _config(union_data, tmp_path / "again", train__max_steps=1, optim__lr="1e-12", optim__weight_decay=0,
                     model__controlnet=str(exported))  # fmt: skip
    assert train(config, make_tiny_base()).step == 1
    before, after = final_weights(tmp_path / "first"), final_weights(tmp_path / "again")
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-9)
    assert before["spatial_ch_projs.weight"].abs().sum() > 0  # a trained union net, not a fresh one
    # a union net of 3 types (ids 0-2) lacks canny (id 3)
    small = UnionControlNet.from_unet(make_tiny_base().unet, num_control_type=3, hint_block_channels=(8, 16),
                                      hint_downscale_factor=1)  # fmt: skip
    from controlnet import ControlNet, save_controlnet

    save_controlnet(small, tmp_path / "three-types", format="diffusers")
    message = _refusal(
        _config(
            union_data, tmp_path / "a", model__controlnet=str(tmp_path / "three-types"), model__base=str(base_dir)
        )
    )
    assert "the data's type 'canny' is not one of the net's 3 types" in message
    plain = tmp_path / "plain"
    fresh = ControlNet.from_unet(make_tiny_base().unet, hint_block_channels=(8, 16), hint_downscale_factor=1)
    save_controlnet(fresh, plain, format="diffusers")
    assert "not a union ControlNet" in _refusal(
        _config(union_data, tmp_path / "b", model__controlnet=str(plain), model__base=str(base_dir))
    )
    message = _refusal(
        tiny_config(fill_data, tmp_path / "c", model__controlnet=str(exported), model__base=str(base_dir))
    )
    assert "a union ControlNet (8 condition types)" in message and "model.architecture=union" in message
    assert not any((tmp_path / name).exists() for name in "abc")

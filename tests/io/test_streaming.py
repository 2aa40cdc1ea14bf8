"""convert / init / transfer one tensor at a time write the files the in-memory path writes, byte for byte.
The in-memory path is the library as Python users call it: load_unet, load_controlnet,
init_controlnet, transfer_controlnet, save_controlnet."""

import json
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from controlnet import ControlNet, load_controlnet, load_unet, save_controlnet
from controlnet.errors import CheckpointError
from controlnet.io.api import controlnet_state_to_original
from controlnet.io.inspect import inspect_path
from controlnet.io.safe_load import SAFETENSORS_DTYPES, LazyWeights, write_safetensors_streamed
from controlnet.io.streaming import convert_controlnet_file, fresh_layers, open_unet
from controlnet.io.transfer import (
    init_controlnet,
    init_controlnet_file,
    transfer_controlnet,
    transfer_controlnet_file,
)
from controlnet.testing.tiny_models import make_tiny_unet, randomize


def assert_same_output(a, b):
    """Two written outputs (file or folder) hold the same bytes."""
    if a.is_dir():
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for p in a.iterdir():
            assert_same_output(p, b / p.name)
    elif a.suffix == ".pth":  # torch.save names the archive's folder after the file: compare its records
        assert _records(a) == _records(b), a.name
    else:
        assert a.read_bytes() == b.read_bytes(), a.name


def _records(path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}


# -- the writer ------------------------------------------------------------------------------------------------


def test_streamed_writer_writes_save_files_bytes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}.{name}": (torch.randn(3, 2, generator=gen) * 4).to(dtype)
        for i, (name, dtype) in enumerate(SAFETENSORS_DTYPES.items())
    }
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["a_view"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"format": "pt"}
    )
    specs = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    produced = []

    def produce(name):
        produced.append(name)
        return tensors[name]

    write_safetensors_streamed(specs, produce, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert_same_output(tmp_path / "ref.safetensors", tmp_path / "ours.safetensors")
    assert sorted(produced) == sorted(tensors)  # each once
    # several metadata entries: save_file orders them at random (a Rust HashMap); the parsed headers agree
    meta = {"format": "original-controlnet", "hint_downscale_factor": "4"}
    save_file({"x": torch.ones(2)}, tmp_path / "ref2.safetensors", metadata=meta)
    write_safetensors_streamed(
        {"x": torch.empty(2, device="meta")}, lambda _: torch.ones(2), tmp_path / "o2.safetensors", meta
    )
    assert _header(tmp_path / "ref2.safetensors") == _header(tmp_path / "o2.safetensors")


def _header(path):
    data = path.read_bytes()
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])


def test_streamed_writer_refuses_a_wrong_tensor_and_leaves_nothing(tmp_path):
    specs = {"a": torch.empty(2, device="meta"), "b": torch.empty(3, device="meta")}
    with pytest.raises(ValueError, match="b: produced torch.float32 \\(2,\\), expected torch.float32 \\(3,\\)"):
        write_safetensors_streamed(specs, lambda name: torch.zeros(2), tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- the reader ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "zip pth", "legacy pth"])
def test_lazy_weights_read_what_read_state_dict_reads(tmp_path, kind):
    state = {"a": torch.randn(4, 3), "b": torch.arange(5), "c": torch.randn(2).half(), "big": torch.randn(3, 5000)}
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth")
    if kind == "safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=kind == "zip pth")
    with LazyWeights(path) as weights:
        assert weights.kind == {"safetensors": "safetensors", "zip pth": "mapped pickle"}.get(kind, "in memory")
        assert set(weights.meta) == set(state) and all(v.is_meta for v in weights.meta.values())
        for key, value in state.items():
            meta = weights.meta[key]
            assert (meta.shape, meta.dtype) == (value.shape, value.dtype)
            renamed = {"new." + key: meta}  # a renamed entry still finds its data
            assert torch.equal(weights.read(renamed["new." + key]), value)
            assert torch.equal(weights.read(key), value)  # again: mapped pages dropped after a read come back


def test_lazy_weights_errors_are_read_state_dicts(tmp_path):
    save_file({"a": torch.randn(100)}, tmp_path / "full.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:60])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file \\(truncated"):
        LazyWeights(tmp_path / "cut.safetensors")
    torch.save({"a": torch.randn(100)}, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.pth: not a readable PyTorch checkpoint \\(truncated"):
        LazyWeights(tmp_path / "cut.pth")
    with (tmp_path / "evil.pth").open("wb") as handle:
        pickle.dump({"a": print}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        LazyWeights(tmp_path / "evil.pth")


# -- the commands vs the in-memory path -----------------------------------------------------------------------


def old_convert(src, dst, to, config=None, dtype=None, prefix="control_model."):
    save_controlnet(load_controlnet(src, config=config), dst, format=to, dtype=dtype, prefix=prefix)


@pytest.fixture
def tiny_a(combined, tmp_path):
    """tiny_a's reference files: v1.0 combined, its ControlNet alone (.safetensors, unprefixed .pth), config."""
    weights, config = combined
    full = load_file(weights)
    control = {k: v for k, v in full.items() if k.startswith("control_model.")}
    save_file(control, tmp_path / "control.safetensors")
    torch.save({k.removeprefix("control_model."): v for k, v in control.items()}, tmp_path / "control.pth")
    return {"combined": weights, "config": config, "full": full}


@pytest.mark.parametrize("source", ["combined", "control.safetensors", "control.pth"])
@pytest.mark.parametrize("to", ["original.safetensors", "original.pth", "diffusers"])
def test_convert_from_original_files(tiny_a, tmp_path, source, to):
    src = tiny_a["combined"] if source == "combined" else tmp_path / source
    fmt = to.split(".")[0]
    old_convert(src, tmp_path / f"old_{to}", fmt, tiny_a["config"])
    net = convert_controlnet_file(src, tmp_path / f"new_{to}", fmt, tiny_a["config"])
    assert_same_output(tmp_path / f"old_{to}", tmp_path / f"new_{to}")
    assert net.device.type == "meta" and net.num_control_outputs == 5


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_convert_from_diffusers_fp16_and_unprefixed(tmp_path, family):
    net = randomize(ControlNet.from_unet(make_tiny_unet(family)), seed=5)
    save_controlnet(net, tmp_path / "src", format="diffusers", dtype=torch.float16)
    for to, dtype, prefix in [("original.safetensors", torch.float16, ""), ("diffusers", None, "control_model.")]:
        fmt = to.split(".")[0]
        old_convert(tmp_path / "src", tmp_path / f"old_{to}", fmt, dtype=dtype, prefix=prefix)
        convert_controlnet_file(tmp_path / "src", tmp_path / f"new_{to}", fmt, dtype=dtype, prefix=prefix)
        assert_same_output(tmp_path / f"old_{to}", tmp_path / f"new_{to}")


def test_convert_keeps_a_pixel_space_hint_stride(tmp_path):
    net = randomize(ControlNet.from_unet(make_tiny_unet("sd15"), hint_downscale_factor=4), seed=2)
    save_controlnet(net, tmp_path / "src", format="diffusers")
    old_convert(tmp_path / "src", tmp_path / "old.safetensors", "original")
    convert_controlnet_file(tmp_path / "src", tmp_path / "new.safetensors", "original")
    assert _header(tmp_path / "old.safetensors") == _header(tmp_path / "new.safetensors")
    assert load_file(tmp_path / "old.safetensors").keys() == load_file(tmp_path / "new.safetensors").keys()
    assert (
        load_controlnet(tmp_path / "new.safetensors", unet=make_tiny_unet("sd15")).hint_config.downscale_factor
        == 4
    )


def test_fresh_layers_are_from_unets(tmp_path):
    unet = make_tiny_unet("sd21")
    torch.manual_seed(123)
    net = ControlNet.from_unet(unet, cond_channels=4).state_dict()
    template = ControlNet.from_unet(unet.to("meta"), cond_channels=4)
    torch.manual_seed(123)
    fresh = fresh_layers(template)
    assert len(fresh) == 2 * (1 + 6 + 1) + 2 * len(template.controlnet_down_blocks) + 2
    assert all(torch.equal(v, net[k]) for k, v in fresh.items())
    assert torch.count_nonzero(fresh["controlnet_cond_embedding.blocks.0.weight"]) > 0


def _old_init(base, dst, to, config=None, seed=0, **hint):
    unet = load_unet(base, config=config)
    torch.manual_seed(seed)
    save_controlnet(init_controlnet(unet, **hint), dst, format=to)


@pytest.mark.parametrize("base", ["combined", "sd.pth", "diffusers"])
def test_init_writes_what_init_controlnet_writes(tiny_a, tmp_path, base):
    config = json.loads(tiny_a["config"].read_text())
    if base == "sd.pth":
        torch.save(tiny_a["full"], tmp_path / "sd.pth")
    elif base == "diffusers":
        load_unet(tiny_a["combined"], config=config).save_pretrained(tmp_path / "diffusers")
    src = tiny_a["combined"] if base == "combined" else tmp_path / base
    for to in ("diffusers", "original.safetensors"):
        _old_init(src, tmp_path / f"old_{to}", to.split(".")[0], config, cond_channels=1)
        torch.manual_seed(0)
        init_controlnet_file(src, tmp_path / f"new_{to}", to.split(".")[0], config, cond_channels=1)
        assert_same_output(tmp_path / f"old_{to}", tmp_path / f"new_{to}")


def _perturbed(state: dict, prefix: str) -> dict:
    gen = torch.Generator().manual_seed(9)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=gen) if k.startswith(prefix) else v for k, v in state.items()
    }


def _old_transfer(control, base, community, dst, to, config=None, dtype=None):
    b = load_unet(base, config=config)
    c = load_unet(community, config=config)
    moved = transfer_controlnet(load_controlnet(control, unet=b), b, c)
    save_controlnet(moved, dst, format=to, dtype=dtype)


@pytest.mark.parametrize("control", ["combined", "control.safetensors", "control.pth"])
def test_transfer_from_original_files(tiny_a, tmp_path, control):
    community = tmp_path / "community.safetensors"
    save_file(_perturbed(tiny_a["full"], "model.diffusion_model.input_blocks."), community)
    src = tiny_a["combined"] if control == "combined" else tmp_path / control
    args = (src, tiny_a["combined"], community)
    for to in ("diffusers", "original.safetensors"):
        _old_transfer(*args, tmp_path / f"old_{to}", to.split(".")[0], tiny_a["config"])
        transfer_controlnet_file(*args, tmp_path / f"new_{to}", to.split(".")[0], tiny_a["config"])
        assert_same_output(tmp_path / f"old_{to}", tmp_path / f"new_{to}")
    moved = load_file(tmp_path / "new_original.safetensors")
    key = "control_model.input_blocks.1.0.in_layers.2.weight"
    assert not torch.equal(moved[key], tiny_a["full"][key])  # the delta did arrive


def test_transfer_between_diffusers_folders_in_fp16(tmp_path):
    base = make_tiny_unet("sdxl", seed=0)
    community = make_tiny_unet("sdxl", seed=0)
    community.load_state_dict(_perturbed(base.state_dict(), "down_blocks."))
    base.save_pretrained(tmp_path / "base")
    community.save_pretrained(tmp_path / "community")
    save_controlnet(randomize(ControlNet.from_unet(base), seed=3), tmp_path / "control", dtype=torch.float16)
    args = (tmp_path / "control", tmp_path / "base", tmp_path / "community")
    _old_transfer(*args, tmp_path / "old", "diffusers", dtype=torch.float16)
    transfer_controlnet_file(*args, tmp_path / "new", "diffusers", dtype=torch.float16)
    assert_same_output(tmp_path / "old", tmp_path / "new")


def test_transfer_refuses_other_architectures_and_writes_nothing(tiny_a, tmp_path):
    other = make_tiny_unet("sd21")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="differ in architecture"):
        transfer_controlnet_file(
            tiny_a["combined"], tiny_a["combined"], tmp_path / "other", tmp_path / "out", config=tiny_a["config"]
        )
    assert not (tmp_path / "out").exists()


# -- load_controlnet and inspect --------------------------------------------------------------------------------


def test_load_controlnet_assigns_file_tensors_in_the_unets_dtype(tmp_path):
    net = randomize(ControlNet.from_unet(make_tiny_unet("sd15")), seed=4)
    save_file(controlnet_state_to_original(net.half().state_dict(), 2), tmp_path / "c.safetensors")
    loaded = load_controlnet(tmp_path / "c.safetensors", unet=make_tiny_unet("sd15"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in loaded.parameters())
    assert all(torch.equal(v, net.state_dict()[k].float()) for k, v in loaded.state_dict().items())
    half = load_controlnet(tmp_path / "c.safetensors", unet=make_tiny_unet("sd15").half())
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_inspect_of_a_zip_pth_reads_no_tensor_data(tiny_a, tmp_path):
    """The tensor records of the archive are overwritten with garbage: inspect still reports the file."""
    path = tmp_path / "combined.pth"
    torch.save(tiny_a["full"], path)
    data = bytearray(path.read_bytes())
    first = tiny_a["full"]["control_model.input_blocks.0.0.weight"]
    raw = first.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at > 0
    data[at : at + len(raw)] = b"\xff" * len(raw)
    path.write_bytes(bytes(data))
    report = inspect_path(path)
    assert (report.format, report.num_parameters, report.num_control_outputs) == ("original-combined", 893_488, 5)


def test_open_unet_checks_names_and_shapes_from_the_header(tiny_a, tmp_path):
    with open_unet(tiny_a["combined"], tiny_a["config"]) as unet:
        assert all(v.is_meta for v in unet.state.values()) and "down_blocks.0.resnets.0.conv1.weight" in unet.state
    with pytest.raises(CheckpointError, match="UNet in combined.safetensors does not match .*shape mismatches"):
        open_unet(tiny_a["combined"], {**json.loads(tiny_a["config"].read_text()), "cross_attention_dim": 8})

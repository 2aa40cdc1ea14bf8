"""Learned annotators: architecture and weight-format loading with random weights, local files only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlnet.annotate import get_annotator
from controlnet.annotate.weights import ANNOTATORS_DIR_ENV
from controlnet.errors import CheckpointError

# ControlNetHED.pth layout of the released file: (key, shape), written from ControlNetHED_Apache2.
HED_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512), (512, 512),
             (512, 512), (512, 512), (512, 512), (512, 512)]  # fmt: skip
HED_BLOCK_SIZES = [2, 2, 3, 3, 3]


def hed_state(generator: torch.Generator, zero: bool = False) -> dict[str, torch.Tensor]:
    state = {"norm": torch.zeros(1, 3, 1, 1)}
    conv = iter(HED_CONVS)
    for block, size in enumerate(HED_BLOCK_SIZES, start=1):
        for index in range(size):
            c_in, c_out = next(conv)
            weight = torch.randn(c_out, c_in, 3, 3, generator=generator) * (2.0 / (9 * c_in)) ** 0.5
            state[f"block{block}.convs.{index}.weight"] = torch.zeros_like(weight) if zero else weight
            state[f"block{block}.convs.{index}.bias"] = torch.zeros(c_out)
        state[f"block{block}.projection.weight"] = (
            torch.zeros(1, c_out, 1, 1) if zero else torch.randn(1, c_out, 1, 1, generator=generator) * 0.01
        )
        state[f"block{block}.projection.bias"] = torch.full((1,), float(block))
    return state


@pytest.fixture(autouse=True)
def no_annotator_dir(monkeypatch):
    monkeypatch.delenv(ANNOTATORS_DIR_ENV, raising=False)


@pytest.mark.parametrize("name", ["hed", "pidinet", "openpose", "depth", "seg"])
def test_missing_weights_name_the_expected_file(name, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        get_annotator(name)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        get_annotator(name, weights=str(tmp_path))


def test_hed_loads_the_released_layout_and_fuses_side_outputs(tmp_path):
    # All convs zero: every side output equals its projection bias 1..5, so the map is
    # sigmoid(mean(1, 2, 3, 4, 5)) = sigmoid(3) = 0.9526 -> 242 everywhere.
    torch.save(hed_state(torch.Generator().manual_seed(0), zero=True), tmp_path / "ControlNetHED.pth")
    hed = get_annotator("hed", weights=str(tmp_path), detect_resolution=64)
    out = hed(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    assert out.shape == (80, 100, 3)
    assert (out == 242).all()


def test_hed_random_weights_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file(hed_state(torch.Generator().manual_seed(0)), str(tmp_path / "hed.safetensors"))
    out = get_annotator("hed", weights=str(tmp_path / "hed.safetensors"), detect_resolution=64)(
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    )
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3) and len(np.unique(out)) > 10


def test_hed_rejects_wrong_layout_and_pickled_code(tmp_path):
    state = hed_state(torch.Generator().manual_seed(0), zero=True)
    del state["block5.projection.bias"]
    torch.save(state, tmp_path / "ControlNetHED.pth")
    with pytest.raises(CheckpointError, match="missing"):
        get_annotator("hed", weights=str(tmp_path))
    torch.save({"weights": {"a": object()}}, tmp_path / "evil.pth")  # needs unpickling of arbitrary objects
    with pytest.raises(CheckpointError, match="weights_only"):
        get_annotator("hed", weights=str(tmp_path / "evil.pth"))


# ---- transformers depth / segmentation from a local folder (tiny random models built here) ----


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("dpt")
    torch.manual_seed(0)
    config = transformers.DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=[16, 16, 16, 16],
        fusion_hidden_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        reassemble_factors=[4, 2, 1, 0.5],
        head_in_index=-1,
    )
    transformers.DPTForDepthEstimation(config).save_pretrained(folder)
    transformers.DPTImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_segformer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folders = {}
    for num_labels in (150, 19):
        folder = tmp_path_factory.mktemp(f"segformer{num_labels}")
        torch.manual_seed(0)
        config = transformers.SegformerConfig(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            num_attention_heads=[1, 2],
            decoder_hidden_size=16,
            num_labels=num_labels,
        )
        transformers.SegformerForSemanticSegmentation(config).save_pretrained(folder)
        transformers.SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
        folders[num_labels] = folder
    return folders


def test_depth_is_the_min_max_normalised_model_output(tiny_dpt):
    import transformers
    from torch.nn import functional as F

    image = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    depth = get_annotator("depth", weights=str(tiny_dpt), detect_resolution=128)(image)
    assert depth.shape == (128, 128, 3) and depth.dtype == np.uint8
    assert depth.min() == 0 and depth.max() == 255
    # Independent computation with transformers' own API.
    model = transformers.DPTForDepthEstimation.from_pretrained(tiny_dpt).eval()
    processor = transformers.DPTImageProcessorPil.from_pretrained(tiny_dpt)
    with torch.no_grad():
        predicted = model(**processor(images=image, return_tensors="pt")).predicted_depth
    predicted = F.interpolate(predicted[:, None], size=(128, 128), mode="bicubic", align_corners=False)[
        0, 0
    ].numpy()
    expected = ((predicted - predicted.min()) / (predicted.max() - predicted.min()) * 255).astype(np.uint8)
    assert np.abs(depth[:, :, 0].astype(int) - expected).max() <= 1


def test_segmentation_paints_ade20k_palette_colours(tiny_segformer):
    from .reference import load_aux_module

    palette = {tuple(c) for c in load_aux_module("util.py").ade_palette()}  # the reference palette
    image = np.random.default_rng(2).integers(0, 255, (96, 160, 3), dtype=np.uint8)
    seg = get_annotator("seg", weights=str(tiny_segformer[150]), detect_resolution=64)(image)
    assert seg.shape == (96, 160, 3)
    colours = {tuple(c) for c in seg.reshape(-1, 3)}
    assert colours <= palette and len(colours) >= 2


def test_segmentation_rejects_models_without_the_ade20k_classes(tiny_segformer):
    with pytest.raises(ValueError, match="150"):
        get_annotator("seg", weights=str(tiny_segformer[19]))


def test_ade20k_palette_equals_the_reference():
    from controlnet.annotate.ade20k import ADE20K_PALETTE, colorize

    from .reference import load_aux_module

    reference = load_aux_module("util.py").ade_palette()
    assert [list(c) for c in ADE20K_PALETTE] == reference
    assert colorize(np.array([[0, 2]])).tolist() == [[[120, 120, 120], [6, 230, 230]]]  # wall, sky


# ---- PiDiNet: pixel-difference convolutions, released layout, parity with the reference network ----


def impulse_response(kind: str, weight: torch.Tensor) -> torch.Tensor:
    from controlnet.annotate.pidinet_net import PixelDifferenceConv

    conv = PixelDifferenceConv(kind, 1, 1)
    conv.weight.data = weight.reshape(1, 1, 3, 3).float()
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    return conv(x)[0, 0]


def test_pixel_difference_convolutions_by_hand():
    ones = torch.ones(9)
    # cd: sum_i w_i (x_i - x_centre); with w = 1 an impulse gives -8 at the centre and 1 at the 8 neighbours.
    cd = impulse_response("cd", ones)
    assert cd[4, 4] == -8 and cd[3, 3] == 1 and cd[5, 4] == 1 and cd[2, 2] == 0
    # rd with w = 0..8: taps w[1:] = 1..8 on the 5x5 outer ring, -(1..8) on the inner ring, 0 at the centre.
    # Cross-correlation puts kernel tap (i, j) at output offset (2 - i, 2 - j) from the impulse.
    rd = impulse_response("rd", torch.arange(9.0))
    assert rd[4, 4] == 0
    assert rd[2, 2] == 8 and rd[6, 6] == 1  # kernel (4, 4) = outer tap 8; kernel (0, 0) = outer tap 1
    assert rd[3, 3] == -8 and rd[5, 5] == -1  # kernel (3, 3) = inner tap -8; kernel (1, 1) = inner tap -1
    # Every difference kernel ignores constant regions; the vanilla conv does not.
    flat = torch.ones(1, 1, 9, 9)
    for kind in ("cd", "ad", "rd"):
        from controlnet.annotate.pidinet_net import PixelDifferenceConv

        conv = PixelDifferenceConv(kind, 1, 1)
        assert conv(flat)[0, 0, 3:6, 3:6].abs().max() < 1e-6
    assert impulse_response("cv", ones).sum() == 9


def random_pidinet_state(seed: int) -> dict[str, torch.Tensor]:
    from controlnet.annotate.pidinet_net import PiDiNet

    torch.manual_seed(seed)
    return PiDiNet().state_dict()


def test_pidinet_matches_the_reference_network_and_file_layout(tmp_path):
    from .reference import load_aux_module

    reference_model = load_aux_module("pidi/model.py")
    reference = reference_model.pidinet().eval()
    state = {key: torch.randn(value.shape) * 0.1 for key, value in reference.state_dict().items()}
    reference.load_state_dict(state)
    # The released file: {"state_dict": {"module.<key>": tensor}}.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "table5_pidinet.pth")
    annotator = get_annotator("pidinet", weights=str(tmp_path), detect_resolution=64)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(annotator.network(x), reference(x)[-1], rtol=1e-4, atol=1e-5)
    out = annotator(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8


def test_pidinet_fused_output_is_the_classifier_sigmoid(tmp_path):
    state = {key: torch.zeros_like(value) for key, value in random_pidinet_state(0).items()}
    state["classifier.bias"] = torch.tensor([2.0])  # every branch 0 -> sigmoid(2) = 0.8808 -> 224
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "table5_pidinet.safetensors"))
    out = get_annotator("pidinet", weights=str(tmp_path), detect_resolution=64)(np.zeros((64, 64, 3), np.uint8))
    assert (out == 224).all()
    filtered = get_annotator("pidinet", weights=str(tmp_path), detect_resolution=64, apply_filter=True)
    assert (filtered(np.zeros((64, 64, 3), np.uint8)) == 255).all()


def test_corrupt_weight_files_are_checkpoint_errors(tmp_path):
    (tmp_path / "ControlNetHED.pth").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="ControlNetHED.pth"):
        get_annotator("hed", weights=str(tmp_path))
    (tmp_path / "hed.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        get_annotator("hed", weights=str(tmp_path / "hed.safetensors"))
    (tmp_path / "hed.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        get_annotator("hed", weights=str(tmp_path / "hed.onnx"))


# ---- end-to-end parity with controlnet_aux's detectors (same random weights, real photographs) ----


@pytest.mark.parametrize("safe", [False, True])
def test_hed_detector_equals_controlnet_aux(tmp_path, safe):
    import skimage.data

    from .reference import load_aux_module

    load_aux_module("util.py")
    reference_module = load_aux_module("hed/__init__.py")
    state = hed_state(torch.Generator().manual_seed(1))
    state["norm"] = torch.tensor([120.0, 110.0, 100.0]).reshape(1, 3, 1, 1)
    network = reference_module.ControlNetHED_Apache2().float().eval()
    network.load_state_dict(state)
    torch.save(state, tmp_path / "ControlNetHED.pth")
    image = skimage.data.chelsea()
    expected = reference_module.HEDdetector(network)(
        image, detect_resolution=64, image_resolution=64, safe=safe, output_type="np"
    )
    ours = get_annotator("hed", weights=str(tmp_path), detect_resolution=64, safe=safe).detect_map(image)
    assert ours.shape == expected.shape
    # Same operations up to float rounding (e.g. a pixel-difference conv folded into one kernel): a few
    # pixels sit on a rounding boundary of the uint8 cast.
    assert np.abs(ours.astype(int) - expected).max() <= 1
    assert (ours != expected).mean() < 0.001
    assert len(np.unique(ours)) > (2 if safe else 20)


@pytest.mark.parametrize(("safe", "apply_filter"), [(False, False), (True, False), (False, True)])
def test_pidinet_detector_equals_controlnet_aux(tmp_path, safe, apply_filter):
    import skimage.data

    from .reference import load_aux_module

    load_aux_module("util.py")
    reference_module = load_aux_module("pidi/__init__.py")
    network = load_aux_module("pidi/model.py").pidinet().eval()
    torch.manual_seed(3)
    state = {key: torch.randn(value.shape) * 0.2 for key, value in network.state_dict().items()}
    network.load_state_dict(state)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "table5_pidinet.pth")
    image = skimage.data.astronaut()
    expected = reference_module.PidiNetDetector(network)(
        image, detect_resolution=64, image_resolution=64, safe=safe, apply_filter=apply_filter, output_type="np"
    )
    annotator = get_annotator(
        "pidinet", weights=str(tmp_path), detect_resolution=64, safe=safe, apply_filter=apply_filter
    )
    ours = annotator.detect_map(image)
    assert ours.shape == expected.shape
    # Same operations up to float rounding (e.g. a pixel-difference conv folded into one kernel): a few
    # pixels sit on a rounding boundary of the uint8 cast.
    assert np.abs(ours.astype(int) - expected).max() <= 1
    assert (ours != expected).mean() < 0.001
    assert len(np.unique(ours)) >= 2


def test_bad_device_is_a_clear_error(tmp_path):
    torch.save(hed_state(torch.Generator().manual_seed(0), zero=True), tmp_path / "ControlNetHED.pth")
    with pytest.raises(ValueError, match="device"):
        get_annotator("hed", weights=str(tmp_path), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            get_annotator("hed", weights=str(tmp_path), device="cuda")


def test_depth_anything_folder_loads_through_the_same_annotator(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    backbone = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=56,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        patch_size=14,
        neck_hidden_sizes=[16, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=16,
    )
    transformers.DepthAnythingForDepthEstimation(config).save_pretrained(tmp_path)
    transformers.DPTImageProcessorPil(
        size={"height": 56, "width": 56}, ensure_multiple_of=14, keep_aspect_ratio=False
    ).save_pretrained(tmp_path)
    annotator = get_annotator("depth", weights=str(tmp_path), detect_resolution=64)
    assert type(annotator.model).__name__ == "DepthAnythingForDepthEstimation"
    depth = annotator(np.random.default_rng(0).integers(0, 255, (64, 128, 3), dtype=np.uint8))  # = detect size
    assert depth.shape == (64, 128, 3) and depth.min() == 0 and depth.max() == 255
    assert (depth[:, :, 0] == depth[:, :, 2]).all()  # grey

"""The shipped built-in base model: loads offline, tokenizes world captions exactly, knows word order, samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlnet.builtin.base import BuiltinBase, load_builtin_base, sample
from controlnet.generate.builtin_format import builtin_folder
from controlnet.world.fill import fill_sample
from controlnet.world.scene import caption, sample_scene

# the shipped model stays small enough to live in git and the package (docs/style.md#tooling): no file over 10 MB
MAX_PACKAGE_FILE_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread, and far faster than on two when the CPU is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def base() -> BuiltinBase:
    return load_builtin_base()


def world_captions() -> list[str]:
    fills = [
        fill_sample(seed, size=32, shape=shape).prompt for seed in range(20) for shape in ("circle", "triangle")
    ]
    return fills + [caption(sample_scene(seed, 64)) for seed in range(40)]


def test_shipped_model_loads_offline(base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded = load_builtin_base()
    assert type(reloaded.unet).__name__ == "UNet2DConditionModel"
    assert type(reloaded.text_encoder).__name__ == "CLIPTextModel"
    assert type(reloaded.vae).__name__ == "AutoencoderKL"
    assert reloaded.unet.config.cross_attention_dim == reloaded.text_encoder.config.hidden_size
    assert not any(p.requires_grad for p in reloaded.unet.parameters())
    assert "UNet2DConditionModel" in reloaded.describe()
    first = next(iter(base.unet.state_dict().values()))
    torch.testing.assert_close(next(iter(reloaded.unet.state_dict().values())), first)


def test_tokenizer_round_trips_world_captions(base):
    tokenizer = base.tokenizer
    for text in world_captions():
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids, text
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) <= tokenizer.model_max_length, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id in tokenizer("a red zeppelin").input_ids


def test_swapping_colours_changes_the_text_embedding(base):
    prompts = [
        "red circle with blue background",
        "blue circle with red background",
        "red circle with blue background",
    ]
    with torch.no_grad():
        context = base.encode_prompts(prompts)  # (3, L, D)
    assert context.shape == (3, base.tokenizer.model_max_length, base.unet.config.cross_attention_dim)
    torch.testing.assert_close(context[0], context[2])
    # A bag-of-words encoder maps the swap to a permutation of the same token vectors: the same mean, and every
    # vector of one prompt has an exact match in the other. Ours must tell them apart.
    mean_gap = float((context[0].mean(0) - context[1].mean(0)).abs().max())
    nearest_gap = torch.cdist(context[1], context[0]).amin(
        dim=1
    )  # (L,) distance to the closest token of the other
    assert mean_gap > 0.01
    assert float(nearest_gap.max()) > 0.1


def test_text_encoder_has_trained_positional_embeddings(base):
    model = getattr(base.text_encoder, "text_model", base.text_encoder)  # transformers 4 nests it, 5 does not
    positions = model.embeddings.position_embedding.weight  # (L, D)
    assert positions.shape == (base.tokenizer.model_max_length, base.text_encoder.config.hidden_size)
    assert float(positions.std(dim=0).mean()) > 1e-3  # positions differ from each other


def test_few_step_sample_shape_dtype_and_seed(base):
    prompts = ["red circle with blue background", "a big yellow ball on a white background"]
    first = sample(base, prompts, steps=2, seed=3)
    again = sample(base, prompts, steps=2, seed=3)
    other = sample(base, prompts, steps=2, seed=4)
    assert len(first) == 2
    assert all(image.shape == (base.image_size, base.image_size, 3) and image.dtype == np.uint8 for image in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_sample_rejects_a_bare_string(base):
    with pytest.raises(ValueError, match="prompts"):
        sample(base, "red circle with blue background", steps=1)


def test_no_package_file_over_10_mb():
    files = [p for p in builtin_folder().rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert all(p.stat().st_size < MAX_PACKAGE_FILE_BYTES for p in files), [(p, p.stat().st_size) for p in files]

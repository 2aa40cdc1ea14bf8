"""Local annotator weights: where to find them and how to read them without unpickling.

Nothing is downloaded. A learned annotator takes `weights=` (a file, or a folder holding the expected
file); without it, the folder named by $CONTROLNET_ANNOTATORS is searched. A missing file is a
FileNotFoundError naming the path and the expected file name (the names of lllyasviel/Annotators on the
Hugging Face hub, where users get them). `.pth/.pt/.ckpt/.bin` files go through
`torch.load(weights_only=True)`, `.safetensors` through safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

from controlnet.errors import CheckpointError

ANNOTATORS_DIR_ENV = "CONTROLNET_ANNOTATORS"
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")  # training scripts nest the weights under these
DATA_PARALLEL_PREFIX = "module."  # added by torch.nn.DataParallel when the weights were saved


def torch_device(device: str):
    """`device` as a torch.device, or a ValueError when it is malformed or not available here."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: got {device!r}; expected a torch device such as 'cpu' or 'cuda:0'") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: got {device!r} but CUDA is not available in this torch build; use 'cpu'")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: got {device!r} but MPS is not available here; use 'cpu'")
    return parsed


def resolve_weights(weights: str | Path | None, filename: str, annotator: str) -> Path:
    """The weights file for `annotator`: `weights` itself, `weights/filename`, or $CONTROLNET_ANNOTATORS/filename."""
    if weights is None:
        folder = os.environ.get(ANNOTATORS_DIR_ENV)
        if not folder:
            raise FileNotFoundError(
                f"{annotator}: no weights given; expected a local {filename} (from lllyasviel/Annotators): pass "
                f"weights=PATH (CLI: --weights PATH) or set ${ANNOTATORS_DIR_ENV} to its folder; nothing is downloaded"
            )
        weights = folder
    path = Path(weights).expanduser()
    if path.is_dir():
        candidates = [path / filename] + [path / (Path(filename).stem + SAFETENSORS_SUFFIX)]
        found = next((candidate for candidate in candidates if candidate.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{annotator}: weights file not found: expected {path / filename}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"{annotator}: weights file not found: {path} (expected {filename})")
    return path


def load_state_dict(path: str | Path) -> dict:
    """Read a state dict from .safetensors or a torch file (weights_only), unwrapped and without `module.`."""
    import torch

    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"weights: cannot read {path} as safetensors ({err})") from None
    elif path.suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for pickled code, RuntimeError for truncated files
            raise CheckpointError(
                f"weights: cannot read {path} safely with torch.load(weights_only=True) ({type(err).__name__}); "
                "expected a plain state dict of tensors"
            ) from None
    else:
        raise CheckpointError(
            f"weights: unsupported file type {path.suffix!r} for {path}; expected {SAFETENSORS_SUFFIX} or "
            f"{', '.join(TORCH_SUFFIXES)}"
        )
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"weights: {path} does not hold a state dict of tensors")
    return {key.removeprefix(DATA_PARALLEL_PREFIX): value for key, value in state.items()}


def load_into(module, state: dict, path: str | Path, annotator: str) -> None:
    """Load `state` strictly into `module`, turning key/shape mismatches into one CheckpointError."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or wrong_shape:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise CheckpointError(f"{annotator}: {path} does not match the network: {', '.join(details)}")
    module.load_state_dict(state)

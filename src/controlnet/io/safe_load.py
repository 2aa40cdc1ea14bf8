"""Reading and writing weight files safely (DESIGN decision 4: nothing is downloaded, nothing is unpickled).

`.safetensors` is preferred. `.pth/.ckpt/.bin/.pt` are read only through `torch.load(weights_only=True)`, which
refuses any pickle that would construct arbitrary Python objects (and so run code). `.xz`-compressed files
(as the reference fixtures ship) are decompressed in memory. Every failure becomes one `CheckpointError` line
naming the file and what was expected. Writes go to a temporary path beside the target and are renamed into
place, so a failed write never leaves a half-written file. `load_strict` is the one way weights enter a module:
names and shapes must match exactly (nothing silently left at its random initialisation); `load_into_empty` goes
through it to fill a meta-device module with the (memory-mapped) tensors themselves.
"""

from __future__ import annotations

import io
import lzma
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load_bytes
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save_file as safetensors_save_file

from controlnet.atomic import atomic_path
from controlnet.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".ckpt", ".pt", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# Lightning / original-repo checkpoints wrap the weights in a dict under one of these keys.
WRAPPER_KEYS = ("state_dict", "model", "module")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6 writes a zip archive
PICKLE_PROTOCOL_OPCODE = b"\x80"  # legacy torch.save: a pickle stream starting with PROTO


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a plain `.safetensors` file ({} for other files or when there is none)."""
    path = Path(path)
    if _suffix(path) not in SAFETENSORS_SUFFIXES or path.name.lower().endswith(".xz"):
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError):
        return {}  # read_state_dict reports unreadable files


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".xz"):
        name = name[: -len(".xz")]
    return Path(name).suffix


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a flat `{name: tensor}` dict (on CPU) from a single weights file, refusing anything unsafe."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a weights file ({', '.join(WEIGHT_SUFFIXES)})")
    suffix = _suffix(path)
    if suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    data = None
    if path.name.lower().endswith(".xz"):
        try:
            data = lzma.decompress(path.read_bytes())
        except lzma.LZMAError as err:
            raise CheckpointError(f"{path}: not a valid .xz file ({err})") from None
    state = _read_safetensors(path, data) if suffix in SAFETENSORS_SUFFIXES else _read_pickle(path, data)
    return _unwrap(path, state)


def _read_safetensors(path: Path, data: bytes | None) -> dict:
    try:
        return safetensors_load_bytes(data) if data is not None else safetensors_load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {_first_line(err)}"
        ) from None


def map_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`read_state_dict`, with the tensors memory-mapped from the file where its format allows (no copy in RAM).

    `.safetensors` files are always mapped (safetensors' `load_file`); zip-format `.pth/.ckpt` (torch.save since
    1.6) are mapped by `torch.load(mmap=True)`. A mapped tensor's pages are the file's page cache, read on first
    touch, shared with other processes and given back when the tensor is freed, not anonymous memory; they are
    copy-on-write, so writing to a tensor never changes the file. Legacy pickles and `.xz` files are read as usual.
    """
    path = Path(path)
    if _suffix(path) in PICKLE_SUFFIXES and not path.name.lower().endswith(".xz") and path.is_file():
        with path.open("rb") as handle:
            zipped = handle.read(4).startswith(ZIP_MAGIC)
        if zipped:
            return _unwrap(path, _read_pickle(path, None, mmap=True))
    return read_state_dict(path)


def _read_pickle(path: Path, data: bytes | None, mmap: bool = False) -> dict:
    head = data[:4] if data is not None else path.open("rb").read(4)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTOCOL_OPCODE)):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (expected a zip archive or a pickle stream)")
    source = io.BytesIO(data) if data is not None else str(path)
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise CheckpointError(
                f"{path}: refused to unpickle: the file holds Python objects beyond tensors, and loading them "
                "could run code; convert it to .safetensors with a trusted tool, or use a plain state-dict file"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_first_line(err)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(err)}"
        ) from None


def _unwrap(path: Path, state) -> dict[str, torch.Tensor]:
    for _ in range(2):  # e.g. {"state_dict": {...}} from Lightning
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: holds no tensors; expected a state dict of weights")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors; expected a state dict of weights")
    return tensors


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def write_state_dict(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Write weights atomically: `.safetensors` (preferred) or `.pth` (a plain tensor dict, still safe to load)."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in SAFETENSORS_SUFFIXES + (".pth", ".pt", ".ckpt"):
        raise CheckpointError(f"cannot write {path.name}: expected a .safetensors or .pth file name")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        if suffix in SAFETENSORS_SUFFIXES:
            safetensors_save_file(contiguous, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save(contiguous, tmp)


def load_strict(
    module: torch.nn.Module, state: dict, what: str, optional: tuple[str, ...] = (), assign: bool = False
) -> torch.nn.Module:
    """Fill `module` from `state` only if the names and shapes match exactly; else one `CheckpointError` line.

    `what` names the weights in the message (e.g. "UNet in v1-5.safetensors"). Model keys ending with one of
    `optional` may be absent from `state` (e.g. CLIP's `position_ids`, a buffer the model rebuilds itself).
    The message counts each kind of disagreement and shows one example, shapes included, so that a user can tell
    a wrong family (shape mismatches) from a wrong file type (missing/unexpected keys). Returns `module`.
    `assign`: the module takes `state`'s tensors themselves (no copy; dtypes are the tensors' own) instead of
    copying into its own, as a module built on the meta device needs.
    """
    own = module.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not any(k.endswith(end) for end in optional))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs model "
                f"{tuple(own[k].shape)})"
            )
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(f"{what} does not match the expected architecture: {'; '.join(parts)}")
    module.load_state_dict(state, strict=not optional, assign=assign)  # every non-optional key was checked above
    return module


def load_into_empty(
    module: torch.nn.Module, state: dict, what: str, dtype: torch.dtype, optional: tuple[str, ...] = ()
) -> torch.nn.Module:
    """Fill a meta-device `module` with `state`'s tensors themselves; returns it in eval mode, without gradients.

    The names and shapes are checked first (`load_strict`: the same messages), then the module takes the tensors
    (`load_state_dict(assign=True)`), so nothing is initialised and nothing copied. Floating tensors not in `dtype`
    are cast: one copy of those only, replacing them in `state` (the caller drops the originals). Buffers that
    files do not hold are rebuilt (CLIP's `position_ids`); any other tensor left on the meta device is refused.
    """
    for key, value in state.items():
        if value.is_floating_point() and value.dtype != dtype:
            state[key] = value.to(dtype)
    load_strict(module, state, what, optional=optional, assign=True)
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta and name.endswith("position_ids"):  # (1, max_positions): 0, 1, 2, ...
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape).clone())
    empty = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if empty:
        raise CheckpointError(f"{what}: {len(empty)} tensors have no values in the file (e.g. {empty[0]})")
    return module.eval().requires_grad_(False)

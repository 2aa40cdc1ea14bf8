"""Reading and writing weight files safely: nothing is downloaded, nothing is unpickled
(docs/architecture.md#nothing-downloaded-nothing-unpickled).

`.safetensors` is preferred. `.pth/.ckpt/.bin/.pt` are read only through `torch.load(weights_only=True)`, which
refuses any pickle that would construct arbitrary Python objects (and so run code). `.xz`-compressed files
(as the reference fixtures ship) are decompressed in memory. Every failure becomes one `CheckpointError` line
naming the file and what was expected. Writes go to a temporary path beside the target and are renamed into
place, so a failed write never leaves a half-written file. `load_strict` is the one way weights enter a module:
names and shapes must match exactly (nothing silently left at its random initialisation); `load_into_empty` goes
through it to fill a meta-device module with the (memory-mapped) tensors themselves.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import io
import json
import lzma
import mmap as mmap_module
import os
import pickle
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load_bytes
from safetensors.torch import load_file as safetensors_load_file

from controlnet.atomic import atomic_path
from controlnet.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".ckpt", ".pt", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# Lightning / original-repo checkpoints wrap the weights in a dict under one of these keys.
WRAPPER_KEYS = ("state_dict", "model", "module")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6 writes a zip archive
PICKLE_PROTOCOL_OPCODE = b"\x80"  # legacy torch.save: a pickle stream starting with PROTO
GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file (quantised models; refused by name)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".xz"):
        name = name[: -len(".xz")]
    return Path(name).suffix


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a flat `{name: tensor}` dict (on CPU) from a single weights file, refusing anything unsafe."""
    path = Path(path)
    suffix = _check_weights_path(path)
    data = _decompressed(path)
    state = _read_safetensors(path, data) if suffix in SAFETENSORS_SUFFIXES else _read_pickle(path, data)
    return _unwrap(path, state)


def _check_weights_path(path: Path) -> str:
    """The weights file's suffix (`.xz` looked through), or one error line saying why `path` is not one."""
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a weights file ({', '.join(WEIGHT_SUFFIXES)})")
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic == GGUF_MAGIC or path.name.lower().endswith(".gguf"):  # a renamed one too: 4 bytes, no weights read
        raise CheckpointError(
            f"{path.name}: a GGUF file (quantised weights, as ComfyUI-GGUF and llama.cpp write them), which we do not "
            f"read; expected the .safetensors release of the model ({', '.join(WEIGHT_SUFFIXES)})"
        )
    suffix = _suffix(path)
    if suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    return suffix


def _decompressed(path: Path) -> bytes | None:
    """The decompressed bytes of an `.xz` file (the reference fixtures ship so), None for a plain file."""
    if not path.name.lower().endswith(".xz"):
        return None
    try:
        return lzma.decompress(path.read_bytes())
    except lzma.LZMAError as err:
        raise CheckpointError(f"{path}: not a valid .xz file ({err})") from None


_SAFETENSORS_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def _unreadable_safetensors(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {_first_line(err)}")


def _read_safetensors(path: Path, data: bytes | None) -> dict:
    try:
        return safetensors_load_bytes(data) if data is not None else safetensors_load_file(str(path))
    except _SAFETENSORS_READ_ERRORS as err:
        raise _unreadable_safetensors(path, err) from None


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


def _pickle_head(path: Path, data: bytes | None) -> bytes:
    if data is None:
        with path.open("rb") as handle:
            data_head = handle.read(4)
    head = data[:4] if data is not None else data_head
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTOCOL_OPCODE)):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (expected a zip archive or a pickle stream)")
    return head


def _read_pickle(path: Path, data: bytes | None, mmap: bool = False) -> dict:
    """torch.load(weights_only=True); `mmap`: map a zip-format file instead of reading it (tensors are views)."""
    _pickle_head(path, data)
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
    """Write weights: `.safetensors` (preferred) or `.pth` (a plain tensor dict, still safe to load).

    Every weights file we write goes through here or `write_safetensors_streamed`: written beside `path`, flushed
    to disk, renamed into place (atomic), and created with the user's umask (0644 by default; safetensors' own
    `save_file` creates 0600 files, which a web UI running as another user cannot read).
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in SAFETENSORS_SUFFIXES + (".pth", ".pt", ".ckpt"):
        raise CheckpointError(f"cannot write {path.name}: expected a .safetensors or .pth file name")
    if suffix in SAFETENSORS_SUFFIXES:
        # one tensor at a time, as save_file would write them (same bytes), each made contiguous only when written
        write_safetensors_streamed(state, lambda name: state[name], path, metadata or {})
        return
    contiguous = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path, fsync=True) as tmp:
        torch.save(contiguous, tmp)


# ------------------------------------------------------------------------------------------------------------
# Bounded memory: read one tensor at a time, write one tensor at a time.

# safetensors' dtype names, in the order of its Rust `Dtype` enum: `save_file` writes tensors sorted by dtype, the
# last of this list first, then by name (measured with safetensors 0.8; tests/io/test_streaming.py pins it).
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_SAFETENSORS_RANK = {v: i for i, v in enumerate(SAFETENSORS_DTYPES.values())}
SAFETENSORS_ALIGNMENT = 8  # the JSON header is padded with spaces to a multiple of 8 bytes


class LazyWeights:
    """A weights file's tensors as meta tensors (names, shapes, dtypes: no data), read one at a time on demand.

    `.safetensors`: the header only, then `pread(2)` per tensor (a fresh buffer each time, no mapping that keeps
    touched pages resident). Zip-format `.pth/.ckpt`: `torch.load(mmap=True, weights_only=True)`, so only the
    pickle is read; each tensor is copied out of the mapping when asked for. Legacy pickles and `.xz` files cannot
    be mapped: they are read whole, as `read_state_dict` does. Errors are `read_state_dict`'s, word for word.

    The meta tensors are the handles: renaming a dict of them (e.g. with diffusers' key converters) keeps the
    objects, and `read(meta)` finds the file's tensor behind any renamed entry.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        suffix = _check_weights_path(self.path)
        data = _decompressed(self.path)
        self._handle = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self.metadata: dict[str, str] = {}
        if suffix in SAFETENSORS_SUFFIXES and data is None:
            self.kind = "safetensors"
            shapes = self._open_safetensors()
        else:
            mmap = False
            if suffix in SAFETENSORS_SUFFIXES:
                state = _read_safetensors(self.path, data)
            else:
                mmap = data is None and _pickle_head(self.path, data).startswith(ZIP_MAGIC)
                state = _read_pickle(self.path, data, mmap=mmap)
            self.kind = "mapped pickle" if mmap else "in memory"
            self._tensors = _unwrap(self.path, state)
            shapes = {k: (tuple(v.shape), v.dtype) for k, v in self._tensors.items()}
        self.meta = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in shapes.items()}
        self._names = {id(v): k for k, v in self.meta.items()}

    def _open_safetensors(self) -> dict:
        try:
            self._handle = safe_open(str(self.path), framework="pt", backend="pread")
            self.metadata = dict(self._handle.metadata() or {})
            shapes = {}
            keys = self._handle.keys()
            for key in keys:
                view = self._handle.get_slice(key)
                name = view.get_dtype()
                if name not in SAFETENSORS_DTYPES:
                    raise ValueError(f"tensor {key!r} has dtype {name}, which torch cannot hold")
                shapes[key] = (tuple(view.get_shape()), SAFETENSORS_DTYPES[name])
        except _SAFETENSORS_READ_ERRORS as err:
            raise _unreadable_safetensors(self.path, err) from None
        if not shapes:
            raise CheckpointError(f"{self.path}: holds no tensors; expected a state dict of weights")
        return shapes

    def key_of(self, meta: torch.Tensor) -> str:
        """The file's name of a meta tensor from `self.meta` (under whatever name it is filed now)."""
        return self._names[id(meta)]

    def read(self, meta: torch.Tensor | str) -> torch.Tensor:
        """The tensor behind `meta` (or a file key) on CPU, in its own memory (the caller may keep it)."""
        key = meta if isinstance(meta, str) else self.key_of(meta)
        if self._tensors is not None:
            tensor = self._tensors[key]
            if self.kind != "mapped pickle":
                return tensor
            copy = tensor.clone()
            _drop_mapped_pages(tensor)
            return copy
        try:
            return self._handle.get_tensor(key)
        except _SAFETENSORS_READ_ERRORS as err:
            raise _unreadable_safetensors(self.path, err) from None

    def close(self) -> None:
        self._handle = self._tensors = None

    def __enter__(self) -> LazyWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Let the kernel drop the pages of a memory-mapped file that `tensor` covers, once it has been copied out.

    torch.load(mmap=True) maps the file privately and read-only in use: dropping an unwritten page only unmaps
    it (touching it again reads it from the file again), so the process does not keep every touched page resident
    (without this, reading a whole .pth one tensor at a time still ends with the whole file in RSS). Whole pages
    inside the tensor only; a no-op where madvise is not available.
    """
    libc = _libc()
    if libc is None or tensor.numel() == 0:
        return
    page = mmap_module.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


MADV_DONTNEED = 4  # <sys/mman.h> on Linux


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's memory-mapped files (/proc/self/maps: an inode and a path)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    spans.append((start, end))
    except OSError:
        return []
    return sorted(spans)


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Give back the resident pages of memory-mapped tensors that nothing uses any more; returns the bytes covered.

    A tensor taken from a mapped file (`map_state_dict`: safetensors maps the whole file, privately, and every
    tensor is a view of it) keeps its touched pages resident after its module replaced it with a copy (a dtype
    cast, channels_last): the mapping lives while any tensor of the file does, so the old pages count in the
    process's resident set beside the copies (the SD1.5 UNet's convolutions, 2.3 GB, in `controlnet train`).
    Only tensors inside a file mapping are touched, and only whole pages within them (never a neighbour's);
    reading them again would re-read the file, so call this for tensors no module holds. Linux; elsewhere a no-op.
    """
    spans = _file_mappings() if _libc() is not None else []
    starts = [start for start, _ in spans]
    released = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cpu" or nbytes == 0:
            continue
        k = bisect.bisect_right(starts, tensor.data_ptr()) - 1
        if k >= 0 and tensor.data_ptr() + nbytes <= spans[k][1]:
            _drop_mapped_pages(tensor)
            released += nbytes
    return released


def write_safetensors_streamed(
    layout: dict[str, torch.Tensor],
    produce: Callable[[str], torch.Tensor],
    path: str | os.PathLike,
    metadata: dict | None = None,
) -> None:
    """Write a `.safetensors` file one tensor at a time, atomically (flushed to disk, then renamed into place), with
    the user's umask; the same bytes as `safetensors.save_file`.

    layout: name -> a (meta) tensor with the shape and dtype the file will hold; produce(name): that tensor's
    values (called once per name, in file order; each result is written and dropped before the next call).
    The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}} (and `__metadata__`: str -> str), then the raw little-endian bytes.
    """
    assert sys.byteorder == "little", "safetensors stores little-endian bytes"
    names = sorted(layout, key=lambda k: (-_SAFETENSORS_RANK[layout[k].dtype], k))
    header: dict = {} if metadata is None else {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name in names:
        spec = layout[name]
        nbytes = spec.numel() * spec.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % SAFETENSORS_ALIGNMENT)
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as out:  # open(): the user's umask
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for name in names:
            tensor = produce(name)
            spec = layout[name]
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
                raise ValueError(
                    f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, expected {spec.dtype} {tuple(spec.shape)}"
                )
            if tensor.numel():
                out.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor


def load_strict(
    module: torch.nn.Module, state: dict, what: str, optional: tuple[str, ...] = (), assign: bool = False
) -> torch.nn.Module:
    """Fill `module` from `state` only if the names and shapes match exactly; else one `CheckpointError` line.

    `what` names the weights in the message (e.g. "UNet in v1-5.safetensors"). Model keys ending with one of
    `optional` may be absent from `state` (e.g. CLIP's `position_ids`, a buffer the model rebuilds itself).
    The message counts each kind of disagreement and shows one example, shapes included, so that a user can tell
    a wrong family (shape mismatches) from a wrong file type (missing/unexpected keys). `assign`: the module's
    tensors become `state`'s (a module built on the meta device; `state` already in the module's dtype), as
    `load_state_dict(assign=True)`: parameters keep the module's requires_grad. Returns `module`.
    """
    check_strict(module.state_dict(), state, what, optional)
    module.load_state_dict(state, strict=not optional, assign=assign)  # every non-optional key was checked above
    return module


def check_strict(own: dict, state: dict, what: str, optional: tuple[str, ...] = ()) -> None:
    """`load_strict`'s check alone: `own` and `state` map names to tensors (meta tensors will do: shapes only)."""
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

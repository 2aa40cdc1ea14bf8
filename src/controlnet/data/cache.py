"""On-disk caches of VAE latents and text embeddings: computed once, reused by every step and every run.

diffusers' `train_controlnet.py` re-encodes every image with the VAE and every prompt with the text encoder at
every step (~33% of a step's FLOPs at 512 px). Both models are locked, so their outputs for a sample never change
while the sample's bytes, the transform and the model weights do not: the cache key hashes exactly those three,
so editing an image, changing the resolution or swapping the VAE makes a new cache automatically. We store the
VAE posterior's mean and std (not one sample), so every step still draws a fresh latent z ~ N(mean, std) as
diffusers' `latent_dist.sample()` does. Random pixel augmentation (random crop / flip) bypasses the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from controlnet.atomic import atomic_path, give_umask_modes
from controlnet.progress import phase

logger = logging.getLogger(__name__)

SHARD_SIZE = 1024  # samples per safetensors shard
ENCODE_BATCH = 16
CACHE_VERSION = "1"


def module_fingerprint(*modules: torch.nn.Module | None, extra: str = "") -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes) of `modules`, plus `extra`."""
    h = hashlib.sha256(f"{CACHE_VERSION}|{extra}".encode())
    for module in modules:
        if module is None:
            h.update(b"<none>")
            continue
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.model_max_length]).encode()).hexdigest()


def _key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"|")
    return h.hexdigest()[:24]


def _write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    # exists="keep": when another process finished the same cache first, theirs is equal (same key) and wins
    with atomic_path(folder, exists="keep") as tmp:
        tmp.mkdir()
        write(tmp)
        give_umask_modes(
            tmp
        )  # safetensors writes 0600: a cache shared with another user's process must be readable


class LatentCache:
    """Per-sample latent posterior (mean, std) and condition image, read lazily from safetensors shards; a union
    dataset's samples hold one condition per type (`types`: the names, `cond.{position}.{type}` keys)."""

    def __init__(self, folder: Path, count: int, types: Sequence[str] = ()):
        self.folder, self.count, self.types = folder, count, tuple(types)
        self._handles: dict[int, tuple[object, frozenset[str]]] = {}

    def _shard(self, position: int) -> tuple[object, frozenset[str]]:
        """The open shard holding `position` and its key names (listed once: safe_open.keys() builds a fresh list
        of every key at each call, ~0.15 ms for a 1000-sample shard)."""
        shard = position // SHARD_SIZE
        if shard not in self._handles:
            handle = safe_open(str(self.folder / f"shard-{shard:05d}.safetensors"), "pt")
            self._handles[shard] = handle, frozenset(handle.keys())
        return self._handles[shard]

    def get(
        self, position: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | dict[str, torch.Tensor]]:
        """(mean (C, h, w), std (C, h, w) or None for pixel space, condition (C, H, W) uint8, or a union sample's
        {type: condition} of the types it holds)."""
        shard, keys = self._shard(position)
        std = shard.get_tensor(f"std.{position}") if f"std.{position}" in keys else None
        if self.types:
            names = [t for t in self.types if f"cond.{position}.{t}" in keys]
            cond = {t: shard.get_tensor(f"cond.{position}.{t}") for t in names}
        else:
            cond = shard.get_tensor(f"cond.{position}")
        return shard.get_tensor(f"mean.{position}"), std, cond

    def __getstate__(self):  # file handles do not cross process boundaries
        return {"folder": self.folder, "count": self.count, "types": self.types, "_handles": {}}


def build_latent_cache(
    cache_dir: Path,
    digests: Sequence[bytes],
    transform_desc: str,
    model_fp: str,
    load: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    progress: Callable[[int], None] | None = None,
    types: Sequence[str] = (),
) -> LatentCache:
    """The cache for these samples under this transform and model; built (once) if missing.

    load(position) -> (target (3, H, W) in [-1, 1], condition uint8, or with `types` (a union dataset's names) a
    {type: condition uint8} of the types the sample holds); encode(pixels (B, 3, H, W)) -> (mean, std).
    """
    key = _key("latents", model_fp, transform_desc, *types, *digests)
    folder = Path(cache_dir) / f"latents-{key}"
    if folder.is_dir():
        logger.info("latent cache hit: %s", folder)
        return LatentCache(folder, len(digests), types)

    def write(tmp: Path) -> None:
        for start in range(0, len(digests), SHARD_SIZE):
            tensors: dict[str, torch.Tensor] = {}
            stop = min(start + SHARD_SIZE, len(digests))
            for batch_start in range(start, stop, ENCODE_BATCH):
                positions = list(range(batch_start, min(batch_start + ENCODE_BATCH, stop)))
                loaded = [load(p) for p in positions]
                # group by size: bucketed samples in one encode batch may differ
                by_size: dict[tuple, list[int]] = {}
                for k, (pixels, _) in enumerate(loaded):
                    by_size.setdefault(tuple(pixels.shape), []).append(k)
                for members in by_size.values():
                    pixels = torch.stack([loaded[k][0] for k in members])  # (b, 3, H, W)
                    mean, std = encode(pixels)
                    for j, k in enumerate(members):
                        p = positions[k]
                        tensors[f"mean.{p}"] = mean[j].detach().float().cpu().contiguous()
                        if std is not None:
                            tensors[f"std.{p}"] = std[j].detach().float().cpu().contiguous()
                        cond = loaded[k][1]
                        if isinstance(cond, dict):  # a union sample: one condition per type it holds
                            tensors.update({f"cond.{p}.{t}": c.contiguous() for t, c in cond.items()})
                        else:
                            tensors[f"cond.{p}"] = cond.contiguous()
                if progress:
                    progress(len(positions))
            save_file(tensors, str(tmp / f"shard-{start // SHARD_SIZE:05d}.safetensors"))
        (tmp / "cache.json").write_text(json.dumps({"count": len(digests), "transform": transform_desc}) + "\n")

    logger.info("building latent cache for %d samples in %s", len(digests), folder)
    # the VAE encoder at SD size: ~4 s per 256 px image on 2 cores
    with phase(f"caching the VAE latents of {len(digests)} samples"):
        _write_atomically(folder, write)
    return LatentCache(folder, len(digests), types)


def build_text_cache(
    cache_dir: Path,
    prompts: Sequence[str],
    model_fp: str,
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """{"context": (P, L, D) float32, ...} for `prompts` (unique, "" included by the caller), cached on disk.

    `encode` returns a dict of (B, ...) tensors ("context"; SDXL adds "pooled"); every entry is cached.
    """
    key = _key("text", model_fp, json.dumps(list(prompts)))
    folder = Path(cache_dir) / f"text-{key}"
    if not folder.is_dir():

        def write(tmp: Path) -> None:
            chunks = [encode(list(prompts[k : k + 64])) for k in range(0, len(prompts), 64)]
            tensors = {name: torch.cat([c[name].detach().float().cpu() for c in chunks]) for name in chunks[0]}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "text.safetensors"))

        with phase(f"caching the text embeddings of {len(prompts)} prompts"):
            _write_atomically(folder, write)
    from safetensors.torch import load_file

    return load_file(str(folder / "text.safetensors"))

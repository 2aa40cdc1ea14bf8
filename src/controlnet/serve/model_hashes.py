"""The web UI's model hashes, computed once per file version and kept on disk, in the background.

A1111 names a checkpoint `file.safetensors [sha256[:10]]` and reports each file's full sha256; computing it reads
the whole file (2-7 GB a base). Doing that for every file at every start made the first /sdapi/v1/sd-models take
46 s for three bases (a client with 20 checkpoints times out). Here, as in A1111, a hash is computed lazily and
kept in a cache file keyed by (resolved path, size, mtime): a worker thread hashes the models the server lists
after it starts, the listings answer at once (a hash not known yet is null), and a file that changes is hashed
again. The old short hash (`hash8`, 64 KiB at 1 MiB) is cheap and always computed directly.

Cache file: $CONTROLNET_CACHE_DIR, else $XDG_CACHE_HOME/controlnet, else ~/.cache/controlnet; `model-hashes.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from pathlib import Path

from controlnet.atomic import atomic_path

logger = logging.getLogger(__name__)

CACHE_FILE = "model-hashes.json"
BLOCK = 1 << 20


def cache_folder() -> Path:
    if os.environ.get("CONTROLNET_CACHE_DIR"):
        return Path(os.environ["CONTROLNET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "controlnet"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime in ns): a file hashed under one version is hashed again under another."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


class HashCache:
    """sha256 by file version, read from and written to `folder`/CACHE_FILE (a cache: unreadable = empty)."""

    def __init__(self, folder: Path | None = None):
        self.file = (folder or cache_folder()) / CACHE_FILE
        self._lock = threading.Lock()
        try:
            self._known = json.loads(self.file.read_text())
            if not isinstance(self._known, dict):
                self._known = {}
        except (OSError, ValueError):
            self._known = {}

    def get(self, path: Path) -> str | None:
        """The cached sha256 of `path` as it is now, or None (never hashed, changed since, or gone)."""
        try:
            key, size, mtime = _version(path)
        except OSError:
            return None
        with self._lock:
            known = self._known.get(key)
        if isinstance(known, dict) and known.get("size") == size and known.get("mtime_ns") == mtime:
            return known.get("sha256")
        return None

    def compute(self, path: Path) -> str:
        """Hash `path` now (unless cached), remember and save it."""
        cached = self.get(path)
        if cached is not None:
            return cached
        key, size, mtime = _version(path)
        digest = file_sha256(path)
        with self._lock:
            self._known[key] = {"size": size, "mtime_ns": mtime, "sha256": digest}
            snapshot = json.dumps(self._known, indent=0, sort_keys=True)
        try:
            with atomic_path(self.file) as tmp:
                tmp.write_text(snapshot)
        except OSError as err:  # a read-only home still serves; the hash is kept in memory
            logger.warning("model hashes: cannot write %s (%s)", self.file.name, err.strerror or err)
        return digest


class BackgroundHasher:
    """One daemon thread that hashes the files it is given, in order, into a HashCache."""

    def __init__(self, cache: HashCache):
        self.cache = cache
        self._todo: queue.Queue[Path] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="controlnet-model-hashes", daemon=True)
        self._thread.start()

    def add(self, path: Path) -> None:
        self._todo.put(path)

    def _work(self) -> None:
        while True:
            path = self._todo.get()
            try:
                self.cache.compute(path)
            except OSError as err:  # a file that vanished or cannot be read: listed without a hash
                logger.warning("model hashes: cannot read %s (%s)", path.name, err.strerror or err)

"""The models a server may use: the built-in base and ControlNets plus what a scan of `--models` folders found.

Names never become paths (no client path is ever opened): a client picks a model by a name this registry made, and only files
the scan found can ever be chosen. `../x`, absolute paths and anything else are just unknown names. Symlinks
whose target lies outside every models folder are not listed.

What a file holds is recognised by the same logic as `controlnet inspect` (io/formats.py `detect_format` on key
names; for .safetensors only the header is read, so a scan of many GB costs milliseconds per file):
- bases: diffusers model folders (model_index.json; a UNet base, or an SD3/SD3.5 or Flux transformer base, told
  apart by generate/transformer_base.py `transformer_arch`), exported folders (base_config.json), original SD
  checkpoint files (`model.diffusion_model.*` keys), and SD3/SD3.5 checkpoint and Flux transformer files (family
  "sd3" / "flux": `transformer_file_arch`, from the header's `joint_blocks` / `double_blocks`, never the name: an
  SD3 checkpoint has the `model.diffusion_model.` prefix of an SD file too);
- ControlNets: diffusers ControlNet folders (config.json + diffusion_pytorch_model.safetensors: UNet, SD3 or Flux
  ControlNets) and ControlNet files in any layout `detect_format` reads (.safetensors, .pth, .ckpt; pickles through
  the safe loader only): original or diffusers UNet ControlNets; SD3/Flux ControlNets in diffusers names
  (InstantX, Shakker), XLabs' or Stability's layout. A transformer ControlNet's family is "sd3" or "flux".

Hashes are the web UI's: `sha256` over the whole file (computed in the background and cached on disk by file
version: serve/model_hashes.py; null until known) and the old short hash `hash8` (first 8 hex digits of the sha256
of the 64 KiB at offset 1 MiB: what `control_v11p_sd15_canny [d14c016b]` carries). A client may name a model by
its registry name, `name [hash8]`, A1111's checkpoint title `file.safetensors [sha256[:10]]`, or the file name.

A model whose files disappear after the scan is no longer listed; naming it is a `ModelGone` (HTTP 409 naming it).
A model folder with a file that is a symlink leading out of every models folder is not listed at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from controlnet.generate.base import MODEL_INDEX
from controlnet.generate.builtin_format import (
    BUILTIN,
    BUILTIN_CONTROLNET,
    BUILTIN_DIT,
    BUILTIN_DIT_CONTROLNET,
    CONTROLNETS_FOLDER,
    EXPORTED_CONFIG,
    builtin_base_folder,
)
from controlnet.generate.transformer_base import transformer_arch, transformer_file_arch
from controlnet.io.formats import (
    CONFIG_NAME,
    DIFFUSERS_WEIGHT_NAMES,
    FAMILY_BY_CONTEXT_DIM,
    TRANSFORMER_FORMATS,
    count_control_outputs,
    detect_format,
)
from controlnet.serve.model_hashes import BackgroundHasher, HashCache

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
CONTROLNET_FORMATS = ("original-controlnet", "original-combined", "diffusers-controlnet", *TRANSFORMER_FORMATS)
TRANSFORMER_FAMILIES = ("sd3", "flux")  # a transformer base or ControlNet's family is its network
BASE_FORMATS = ("original-sd",)
MAX_SCAN_DEPTH = 4  # models/ControlNet/sd15/x.safetensors; deeper trees are not model folders
# A1111's old short hash (modules/sd_models.py model_hash): sha256 of 64 KiB read at offset 1 MiB.
OLD_HASH_OFFSET, OLD_HASH_LENGTH = 0x100000, 0x10000
# Condition names guessed from a ControlNet's name (control_v11p_sd15_canny, t2iadapter_depth, ...), longest first.
CONDITIONS = (
    "lineart_anime",
    "softedge",
    "scribble",
    "lineart",
    "openpose",
    "inpaint",
    "shuffle",
    "normal",
    "canny",
    "depth",
    "mlsd",
    "tile",
    "pose",
    "fill",
    "seg",
    "hed",
    "ip2p",
)
_HASH_SUFFIX = re.compile(r"^(?P<stem>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]\s*$")


class ModelGone(LookupError):
    """A listed model whose file is no longer there (deleted or moved since the server scanned its folders)."""

    def __init__(self, name: str, kind: str = "model"):
        self.name, self.kind = name, kind
        super().__init__(
            f"{kind} {name!r}: its file is no longer in the models folder (deleted or moved since the server "
            "started); restart the server to rescan"
        )


class UnknownModel(ValueError):
    """A model name the registry does not know (never a path: names are not looked up on disk)."""

    def __init__(self, name: str, kind: str = "model", choices: list[str] | None = None):
        self.name, self.kind = name, kind
        hint = f"; expected one of {', '.join(choices)}" if choices else ""
        super().__init__(f"unknown {kind} {name!r}{hint}")


@dataclass
class ModelEntry:
    """One model a client may choose. `path` stays on the server: responses never carry it."""

    name: str
    kind: str  # "base" | "controlnet"
    family: str | None
    condition: str | None
    path: Path = field(repr=False)
    hashes: HashCache | None = field(default=None, repr=False, compare=False)
    _hash8: str | None = field(default=None, repr=False)

    @property
    def weights(self) -> Path:
        """The file the hashes are computed over (a folder's weights file); ModelGone once it is not there."""
        try:
            return weights_of(self.path)
        except FileNotFoundError:
            raise ModelGone(self.name, self.kind) from None

    def present(self) -> bool:
        try:
            weights_of(self.path)
        except FileNotFoundError:
            return False
        return True

    @property
    def sha256(self) -> str | None:
        """The full-file sha256 once the background hasher (or a client naming it) has computed it, else None."""
        if self.hashes is None:
            self.hashes = HashCache()
        return self.hashes.get(self.weights)

    def sha256_now(self) -> str:
        """The sha256, computed now if it is not known yet (reads the whole file once; cached on disk)."""
        if self.hashes is None:
            self.hashes = HashCache()
        try:
            return self.hashes.compute(self.weights)
        except FileNotFoundError:
            raise ModelGone(self.name, self.kind) from None

    @property
    def hash8(self) -> str:
        if self._hash8 is None:
            try:
                with open(self.weights, "rb") as fh:
                    fh.seek(OLD_HASH_OFFSET)
                    self._hash8 = hashlib.sha256(fh.read(OLD_HASH_LENGTH)).hexdigest()[:8]
            except FileNotFoundError:
                raise ModelGone(self.name, self.kind) from None
        return self._hash8

    @cached_property
    def num_control_outputs(self) -> int | None:
        """A ControlNet's outputs (skips + the middle block: 13 for SD1.5, 10 for SDXL), counted from its weights'
        key names on first use (a .safetensors header only); None for a base."""
        if self.kind != "controlnet":
            return None
        keys, _ = _header_keys(self.weights)
        return count_control_outputs(keys, detect_format(dict.fromkeys(keys)))

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1].removeprefix(BUILTIN_DIT_CONTROLNET).removeprefix(BUILTIN_CONTROLNET)

    @property
    def file_name(self) -> str:
        """The weights file's own name (A1111 titles checkpoints by it: `v1-5-pruned-emaonly.safetensors`)."""
        return self.path.name

    @property
    def title(self) -> str:
        """The web UI's `name [hash8]`."""
        return f"{self.name} [{self.hash8}]"

    def describe(self) -> dict:
        """What clients see (no path)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "family": self.family,
            "condition": self.condition,
            "sha256": self.sha256,
            "hash8": self.hash8,
        }


def weights_of(path: Path) -> Path:
    """A file itself, or the weights file of a diffusers folder (a base folder: its unet's or transformer's)."""
    if path.is_file():
        return path
    for sub in ("", "controlnet", "unet", "transformer"):
        for name in DIFFUSERS_WEIGHT_NAMES:
            if (path / sub / name).is_file():
                return path / sub / name
    raise FileNotFoundError(f"no weights file in {path.name}")


def guess_condition(name: str) -> str | None:
    """'canny' from control_v11p_sd15_canny, 'depth' from t2iadapter_depth_sd15v2, None if no known word."""
    lowered = name.lower()
    for cond in CONDITIONS:
        if re.search(rf"(^|[^a-z]){cond}([^a-z]|$)", lowered):
            return "openpose" if cond == "pose" else cond
    return None


def _header_keys(file: Path) -> tuple[list[str], int | None]:
    """(key names, cross-attention width) of a weights file; .safetensors reads the header only."""
    if file.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            dim = next((handle.get_slice(k).get_shape()[1] for k in keys if k.endswith("attn2.to_k.weight")), None)
            return keys, dim
    from controlnet.io.formats import context_dim
    from controlnet.io.safe_load import read_state_dict

    state = read_state_dict(file)  # torch.load(weights_only=True): never unpickles objects
    return list(state), context_dim(state)


def classify_file(file: Path, warn: bool = True) -> tuple[str, str | None] | None:
    """("base" | "controlnet", family) of a weights file, or None when it holds neither (`warn`: log why a file
    that cannot be read is skipped)."""
    arch = transformer_file_arch(file)  # an SD3 / Flux base file (by its header's joint_blocks / double_blocks)
    if arch is not None:
        return "base", arch
    try:
        keys, dim = _header_keys(file)
        fmt = detect_format(dict.fromkeys(keys))
    except Exception as err:  # noqa: BLE001 - a file we cannot read is skipped, not fatal to the scan
        if warn:
            logger.warning("models: skipping %s (%s)", file.name, str(err).splitlines()[0] if str(err) else err)
        return None
    if fmt in TRANSFORMER_FORMATS:
        return "controlnet", TRANSFORMER_FORMATS[fmt]
    if fmt in CONTROLNET_FORMATS:
        return "controlnet", FAMILY_BY_CONTEXT_DIM.get(dim)
    if fmt in BASE_FORMATS:
        return "base", FAMILY_BY_CONTEXT_DIM.get(dim)
    return None


# diffusers' classes of a UNet ControlNet folder's config.json: a plain net, a union net (xinsir's Union/ProMax)
UNET_CONTROLNET_CLASSES = ("ControlNetModel", "ControlNetUnionModel")


def classify_folder(folder: Path) -> tuple[str, str | None] | None:
    """("base" | "controlnet", family) of a model folder, or None when it is not one."""
    if (folder / MODEL_INDEX).is_file():
        try:
            arch = transformer_arch(json.loads((folder / MODEL_INDEX).read_text()))
        except (OSError, ValueError, AttributeError):
            arch = None  # an unreadable index: the loader reports it, in its own words
        if arch is not None:
            return "base", arch
    if (folder / MODEL_INDEX).is_file() or (folder / EXPORTED_CONFIG).is_file():
        return "base", _folder_family(folder / "unet" / CONFIG_NAME)
    config = folder / CONFIG_NAME
    weights = next((folder / n for n in DIFFUSERS_WEIGHT_NAMES if (folder / n).is_file()), None)
    if config.is_file() and weights is not None:
        try:
            values = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        if (
            values.get("_class_name", "ControlNetModel") in UNET_CONTROLNET_CLASSES
            and "down_block_types" in values
        ):
            return "controlnet", FAMILY_BY_CONTEXT_DIM.get(values.get("cross_attention_dim"))
        if "down_block_types" not in values:  # an SD3 / Flux ControlNet folder: its weights' key names say
            found = classify_file(weights, warn=False)
            if found is not None and found[1] in TRANSFORMER_FAMILIES:
                return found
    return None


def _folder_family(config: Path) -> str | None:
    try:
        return FAMILY_BY_CONTEXT_DIM.get(json.loads(config.read_text()).get("cross_attention_dim"))
    except (OSError, ValueError):
        return None


def _inside(path: Path, roots: list[Path]) -> bool:
    real = path.resolve()
    return any(real == r or r in real.parents for r in roots)


def _leaves(folder: Path, roots: list[Path]) -> Path | None:
    """A file or folder inside a model folder that is a symlink leading out of every models folder, if any (its
    weights would be read from anywhere on the server)."""
    for path in folder.rglob("*"):
        if path.is_symlink() and not _inside(path, roots):
            return path
    return None


class ModelRegistry:
    """The built-in models plus every base and ControlNet found in `model_dirs` (see the module docstring)."""

    def __init__(self, model_dirs=(), base: str = BUILTIN, hashes: HashCache | None = None, hash_now: bool = True):
        """`hashes`: the sha256 cache (default: the user's cache folder); `hash_now`: start hashing every listed
        file in a background thread (the listings do not wait for it)."""
        self.hashes = hashes or HashCache()
        self.roots = [Path(folder).resolve() for folder in model_dirs]  # to cut from messages: clients see names
        self._entries: dict[str, ModelEntry] = {}
        self._add_builtin()
        for folder in model_dirs:
            folder = Path(folder)
            if not folder.is_dir():
                raise FileNotFoundError(f"--models {folder}: not a folder")
            self._scan(folder)
        self.default_base = self.base(base).name
        if hash_now:
            hasher = BackgroundHasher(self.hashes)
            for entry in self._entries.values():  # the default base first: clients ask for it first
                if entry.name == self.default_base:
                    hasher.add(entry.weights)
            for entry in self._entries.values():
                if entry.name != self.default_base:
                    hasher.add(entry.weights)

    # ---------------------------------------------------------------------------------------------------
    def _add(self, entry: ModelEntry) -> None:
        entry.hashes = self.hashes
        if entry.name in self._entries:
            logger.warning("models: %s found twice; keeping the first", entry.name)
            return
        self._entries[entry.name] = entry

    def _add_builtin(self) -> None:
        """The shipped bases and their ControlNets: builtin (family "builtin") and, when shipped, builtin-dit (a
        diffusers SD3 folder: family "sd3", its nets builtin-dit:NAME)."""
        for base, prefix in ((BUILTIN, BUILTIN_CONTROLNET), (BUILTIN_DIT, BUILTIN_DIT_CONTROLNET)):
            folder = builtin_base_folder(base)
            found = classify_folder(folder) if folder.is_dir() else None
            if found is None or found[0] != "base":
                continue  # not shipped in this installation
            family = BUILTIN if base == BUILTIN else found[1]
            self._add(ModelEntry(base, "base", family, None, folder))
            nets = folder / CONTROLNETS_FOLDER
            for sub in sorted(nets.iterdir()) if nets.is_dir() else []:
                if sub.is_dir() and classify_folder(sub) is not None:
                    self._add(ModelEntry(prefix + sub.name, "controlnet", family, guess_condition(sub.name), sub))

    def _scan(self, root: Path) -> None:
        roots = [root.resolve()]

        def walk(folder: Path, depth: int) -> None:
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or not _inside(path, roots):
                    continue  # hidden, or a symlink leading out of the models folder
                rel = path.relative_to(root).as_posix()
                if path.is_dir():
                    found = classify_folder(path)
                    escaping = _leaves(path, roots) if found is not None else None
                    if escaping is not None:
                        logger.warning(
                            "models: skipping %s: %s is a symlink out of the models folder", rel, escaping.name
                        )
                    elif found is not None:
                        kind, family = found
                        self._add(ModelEntry(rel, kind, family, _condition(kind, path.name), path))
                    elif depth < MAX_SCAN_DEPTH:
                        walk(path, depth + 1)
                elif path.suffix.lower() in WEIGHT_SUFFIXES:
                    found = classify_file(path)
                    if found is not None:
                        kind, family = found
                        name = rel[: -len(path.suffix)]
                        self._add(ModelEntry(name, kind, family, _condition(kind, path.stem), path))

        walk(root, 1)

    # ---------------------------------------------------------------------------------------------------
    def all(self) -> list[ModelEntry]:
        """The models whose files are still there (one stat each)."""
        return [e for e in self._entries.values() if e.present()]

    def bases(self) -> list[ModelEntry]:
        return [e for e in self.all() if e.kind == "base"]

    def controlnets(self) -> list[ModelEntry]:
        return [e for e in self.all() if e.kind == "controlnet"]

    def base(self, name: str | None = None) -> ModelEntry:
        """The base called `name` (None = the server's default base)."""
        return self._resolve(self.default_base if name is None else name, "base")

    def controlnet(self, name: str) -> ModelEntry:
        return self._resolve(name, "controlnet")

    def _resolve(self, name: str, kind: str) -> ModelEntry:
        """Exact name, then `name [hash]` (the hash must match: the old hash8, or a prefix of the sha256 as in
        A1111's `file.safetensors [sha256[:10]]`), then a case-insensitive name, stem or file name.
        ModelGone when the model's file has disappeared since the scan."""
        entry = self._find(name, kind)
        if not entry.present():
            raise ModelGone(entry.name, kind)
        return entry

    def _find(self, name: str, kind: str) -> ModelEntry:
        entries = [e for e in self._entries.values() if e.kind == kind]
        if not isinstance(name, str) or not name.strip():
            raise UnknownModel(str(name), kind, [e.name for e in entries])
        wanted, digest = name.strip(), None
        for e in entries:
            if e.name == wanted:
                return e
        match = _HASH_SUFFIX.match(wanted)
        if match:
            wanted, digest = match.group("stem"), match.group("hash").lower()
        lowered = wanted.lower()
        candidates = (
            [e for e in entries if e.name.lower() == lowered]
            or [e for e in entries if e.stem.lower() == lowered]
            or [e for e in entries if e.file_name.lower() == lowered or e.name.lower() + e.path.suffix == lowered]
        )
        if digest is not None:
            candidates = [e for e in candidates if e.present() and _hash_matches(e, digest)]
        if len(candidates) == 1:
            return candidates[0]
        raise UnknownModel(name, kind, [e.name for e in entries])


def _hash_matches(entry: ModelEntry, digest: str) -> bool:
    """`digest` is the entry's old hash8 or a prefix (10+ digits: A1111's short hash) of its sha256."""
    if len(digest) == 8 and entry.hash8 == digest:
        return True
    return len(digest) >= 8 and entry.sha256_now().startswith(digest)


def _condition(kind: str, name: str) -> str | None:
    return guess_condition(name) if kind == "controlnet" else None

"""Paired training data on disk: (target image, condition image, prompt) triples in the layouts people have.

- original: the reference implementation's / fill50k's layout, `prompt.json` with one
  {"source": ..., "target": ..., "prompt": ...} object per line plus the image folders (paper Sec. 4 data);
- imagefolder: diffusers' `train_controlnet.py` convention, `metadata.jsonl` lines with the image, the
  conditioning image and the text (column names configurable);
- hf: a Hugging Face `datasets` dataset saved with `save_to_disk`, a `.parquet` file or a folder of parquet
  shards (needs `datasets`);
- webdataset: `.tar` shards whose members share a key (`0001.jpg`, `0001.cond.png`, `0001.txt`), read with
  the standard library's `tarfile` (no extra dependency).

- union (several condition types per image, for a union ControlNet, `controlnet train --model.architecture union`):
  the original layout's `prompt.json` whose lines name one condition file per type in a `sources` mapping,
  {"target": "target/0.png", "prompt": "...", "sources": {"canny": "canny/0.png", "depth": "depth/0.png"}}, types
  by the union nets' names (model/union_controlnet.py UNION_TYPES); a line may hold any non-empty subset of the
  types (`union_source`). Or an imagefolder / hf dataset with a column per type (`data.union_columns`
  canny=canny_image,depth=depth_image): an empty cell (None, "") is a type the row lacks.

Every source exposes the same small interface: `len()`, `prompt(i)`, `read(i) -> (target bytes or PIL,
condition bytes or PIL)`, `where(i)` (a path for error messages) and `content_key(i)` (bytes identifying the
sample's content, for the latent cache).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from controlnet.io.images import open_image

logger = logging.getLogger(__name__)

ORIGINAL_INDEX = "prompt.json"
IMAGEFOLDER_INDEX = "metadata.jsonl"
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class FileRecord:
    """One sample whose images are files."""

    target: Path
    condition: Path
    prompt: str


class FileSource:
    """Samples whose images are files on disk (original and imagefolder layouts)."""

    def __init__(self, root: Path, records: list[FileRecord], layout: str):
        self.root, self.records, self.layout = root, records, layout

    def __len__(self) -> int:
        return len(self.records)

    def prompt(self, i: int) -> str:
        return self.records[i].prompt

    def read(self, i: int) -> tuple[bytes, bytes]:
        record = self.records[i]
        return record.target.read_bytes(), record.condition.read_bytes()

    def where(self, i: int) -> str:
        record = self.records[i]
        return f"{record.target} / {record.condition}"

    def content_key(self, i: int) -> bytes:
        target, condition = self.read(i)
        return _digest(target, condition, self.prompt(i).encode())


@dataclass(frozen=True)
class UnionRecord:
    """One sample of a union dataset: its target, one condition file per type name, its prompt."""

    target: Path
    conditions: dict[str, Path]
    prompt: str


class UnionSource:
    """A union dataset whose images are files (the module docstring's union layout, or imagefolder lines with a column
    per type): `read(i)` -> (target bytes, {type: condition bytes}); `index` is the file its lines come from."""

    layout = "union"

    def __init__(self, root: Path, records: list[UnionRecord], index: Path | None = None):
        self.root, self.records, self.index = root, records, index or root / ORIGINAL_INDEX

    def __len__(self) -> int:
        return len(self.records)

    def prompt(self, i: int) -> str:
        return self.records[i].prompt

    def types(self, i: int) -> list[str]:
        """The condition types sample `i` holds, in its line's order."""
        return list(self.records[i].conditions)

    def read(self, i: int) -> tuple[bytes, dict[str, bytes]]:
        record = self.records[i]
        return record.target.read_bytes(), {name: path.read_bytes() for name, path in record.conditions.items()}

    def where(self, i: int) -> str:
        record = self.records[i]
        return " / ".join([str(record.target), *(f"{k}: {v}" for k, v in record.conditions.items())])

    def content_key(self, i: int) -> bytes:
        return _union_key(*self.read(i), self.prompt(i))


class HFUnionSource:
    """A Hugging Face dataset with one image column per condition type (`union_source` with `columns`); a row's
    empty cells (None, no bytes and no path) are the types it lacks. The same interface as UnionSource."""

    layout = "union"

    def __init__(self, path: Path, columns: dict[str, str], image: str, caption: str):
        settings = {
            "data.image_column": image,
            **{f"data.union_columns[{name}]": column for name, column in columns.items()},
            "data.caption_column": caption,
        }
        self.ds, self.base = open_hf_dataset(path, settings, images=(image, *columns.values()))
        self.path, self.image, self.columns = path, image, dict(columns)
        table = self.ds.with_format("arrow")
        held = {name: _filled_cells(table[column]) for name, column in columns.items()}
        self._types = [[name for name in columns if held[name][i]] for i in range(len(self.ds))]
        for i, names in enumerate(self._types):
            if not names:
                raise _no_condition(f"dataset {path}: row {i}", columns)
        self._prompts = list(self.ds[caption])

    def __len__(self) -> int:
        return len(self.ds)

    def prompt(self, i: int) -> str:
        return self._prompts[i]

    def types(self, i: int) -> list[str]:
        """The condition types row `i` holds (its filled cells), in data.union_columns' order."""
        return list(self._types[i])

    def read(self, i: int) -> tuple[bytes, dict[str, bytes]]:
        row = self.ds[i]
        conditions = {name: image_cell_bytes(row[self.columns[name]], self.base) for name in self._types[i]}
        return image_cell_bytes(row[self.image], self.base), conditions

    def where(self, i: int) -> str:
        return f"{self.path}[row {i}]"

    def content_key(self, i: int) -> bytes:
        return _union_key(*self.read(i), self.prompt(i))


def _union_key(target: bytes, conditions: dict[str, bytes], prompt: str) -> bytes:
    parts = [part for name, data in sorted(conditions.items()) for part in (name.encode(), data)]
    return _digest(target, *parts, prompt.encode())


def _filled_cells(column) -> list[bool]:
    """Which cells of an undecoded image column (pyarrow, struct<bytes, path>) hold an image: bytes or a path."""
    import pyarrow.compute as pc

    data, name = pc.struct_field(column, "bytes"), pc.struct_field(column, "path")
    filled = pc.or_kleene(pc.greater(pc.binary_length(data), 0), pc.greater(pc.utf8_length(name), 0))
    return [bool(x) for x in pc.fill_null(filled, False).to_pylist()]


def _no_condition(where: str, columns: dict[str, str]) -> ValueError:
    return ValueError(
        f"{where} holds no condition: its data.union_columns cells ({', '.join(columns.values())}) are all empty; "
        "expected at least one"
    )


def union_source(
    root: Path,
    columns: dict[str, str] | None = None,
    fmt: str = "auto",
    image: str = "image",
    caption: str = "text",
) -> UnionSource | HFUnionSource:
    """A union dataset: without `columns`, root/prompt.json lines {"target", "prompt", "sources": {type: condition
    file}}; with `columns` ({type: column}, data.union_columns), an imagefolder (metadata.jsonl) or hf dataset
    holding one condition column per type, `image` and `caption` as their single-condition forms. Raises a one-line
    ValueError naming the line or row for one without a condition, or the setting for a missing column."""
    if columns:
        fmt = detect_format(root) if fmt == "auto" else fmt
        if fmt == "imagefolder":
            return imagefolder_union_source(root, columns, image, caption)
        if fmt == "hf":
            return HFUnionSource(root, columns, image, caption)
        spec = ",".join(f"{name}={column}" for name, column in columns.items())
        raise ValueError(
            f"data.union_columns={spec}: a column per type is for the imagefolder ({IMAGEFOLDER_INDEX}) and hf "
            f"layouts, data.path={str(root)!r} is {fmt}; the original layout names its condition files in a "
            "'sources' mapping per line instead (leave data.union_columns empty)"
        )
    index = root / ORIGINAL_INDEX
    if not index.is_file():
        raise FileNotFoundError(
            f"data.path={str(root)!r}: a union dataset is a folder with {ORIGINAL_INDEX} whose lines name "
            'their condition files by type, {"target": ..., "prompt": ..., "sources": {"canny": ..., ...}}, '
            "or an imagefolder / hf dataset with a column per type (data.union_columns)"
        )
    records = []
    for n, e in enumerate(_read_jsonl(index), 1):
        sources = _field(e, "sources", index, n)
        if not isinstance(sources, dict) or not sources or not all(isinstance(v, str) for v in sources.values()):
            raise ValueError(
                f"{index}: line {n}: 'sources' is {sources!r}; expected a non-empty mapping of condition types "
                'to files, e.g. {"canny": "canny/0.png"}'
            )
        records.append(
            UnionRecord(
                root / _field(e, "target", index, n),
                {str(name): root / path for name, path in sources.items()},
                _field(e, "prompt", index, n),
            )
        )
    return UnionSource(root, records)


def imagefolder_union_source(root: Path, columns: dict[str, str], image: str, caption: str) -> UnionSource:
    """imagefolder lines with a condition file column per type ({type: column}); a missing key, null or "" is a
    type the line lacks. A column no line holds, or a line without a condition: one ValueError line."""
    index = root / IMAGEFOLDER_INDEX
    entries = _read_jsonl(index)
    present = sorted({key for e in entries for key in e})
    for name, column in columns.items():
        if column not in present:
            raise ValueError(f"{index}: no column for data.union_columns[{name}]={column!r} (columns: {present})")
    records = []
    for n, e in enumerate(entries, 1):
        conditions = {}
        for name, column in columns.items():
            cell = e.get(column)
            if cell in (None, ""):
                continue
            if not isinstance(cell, str):
                raise ValueError(f"{index}: line {n}: {column!r} is {cell!r}; expected a file path or empty")
            conditions[name] = root / cell
        if not conditions:
            raise _no_condition(f"{index}: line {n}", columns)
        records.append(UnionRecord(root / _field(e, image, index, n), conditions, _field(e, caption, index, n)))
    return UnionSource(root, records, index)


def _digest(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def _read_jsonl(path: Path) -> list[dict]:
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
    return entries


def _field(entry: dict, key: str, path: Path, number: int) -> str:
    if key not in entry:
        raise ValueError(f"{path}: line {number} has no {key!r} key (keys: {sorted(entry)})")
    return entry[key]


def original_source(root: Path) -> FileSource:
    """The original layout: root/prompt.json lines {"source", "target", "prompt"} (source = condition)."""
    index = root / ORIGINAL_INDEX
    records = [
        FileRecord(
            root / _field(e, "target", index, n),
            root / _field(e, "source", index, n),
            _field(e, "prompt", index, n),
        )
        for n, e in enumerate(_read_jsonl(index), 1)
    ]
    return FileSource(root, records, "original")


def imagefolder_source(root: Path, image: str, conditioning: str, caption: str) -> FileSource:
    """diffusers' imagefolder convention: root/metadata.jsonl lines with image, conditioning image and text."""
    index = root / IMAGEFOLDER_INDEX
    records = []
    for n, e in enumerate(_read_jsonl(index), 1):
        records.append(
            FileRecord(
                root / _field(e, image, index, n),
                root / _field(e, conditioning, index, n),
                _field(e, caption, index, n),
            )
        )
    return FileSource(root, records, "imagefolder")


class TarSource:
    """webdataset shards: members grouped by key (the name before the first dot), read with `tarfile`."""

    def __init__(self, shards: list[Path], image: str, conditioning: str, caption: str):
        self.shards = shards
        self.layout = "webdataset"
        self.items: list[tuple[int, str, dict[str, tarfile.TarInfo]]] = []  # (shard, key, ext -> member)
        self._open: dict[int, tarfile.TarFile] = {}
        self.keys = (image, conditioning, caption)
        for number, shard in enumerate(shards):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        base = os.path.basename(member.name)
                        key, _, ext = base.partition(".")
                        prefix = os.path.dirname(member.name)
                        groups.setdefault(f"{prefix}/{key}", {})[ext.lower()] = member
            self.items += [(number, key, members) for key, members in groups.items()]
        self._prompts = [None] * len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def _member(self, i: int, wanted: str) -> bytes:
        number, key, members = self.items[i]
        options = wanted.split("|")  # "jpg|png": the first extension present
        candidates = [ext for ext in members for w in options if ext == w or ext.startswith(w + ".")]
        if not candidates:
            raise FileNotFoundError(f"{self.shards[number]}: sample {key!r} has no member '.{wanted}[.ext]'")
        tar = self._open.get(number)
        if tar is None:
            tar = self._open[number] = tarfile.open(self.shards[number])  # noqa: SIM115 (kept open for reuse)
        return tar.extractfile(members[sorted(candidates)[0]]).read()

    def prompt(self, i: int) -> str:
        if self._prompts[i] is None:
            self._prompts[i] = self._member(i, self.keys[2]).decode("utf-8").strip()
        return self._prompts[i]

    def read(self, i: int) -> tuple[bytes, bytes]:
        return self._member(i, self.keys[0]), self._member(i, self.keys[1])

    def where(self, i: int) -> str:
        number, key, _ = self.items[i]
        return f"{self.shards[number]}::{key}"

    def content_key(self, i: int) -> bytes:
        target, condition = self.read(i)
        return _digest(target, condition, self.prompt(i).encode())

    def __getstate__(self):  # open tar handles do not cross process boundaries (DataLoader workers)
        state = dict(self.__dict__)
        state["_open"] = {}
        return state


class HFSource:
    """A Hugging Face `datasets` dataset (save_to_disk folder, parquet file or shards) with image/condition/text columns.

    Image columns may be `datasets.Image` features or plain path / bytes columns; they are read undecoded
    (`Image(decode=False)`), so a corrupt image is reported by `scan` instead of failing inside `datasets`.
    Images stored as relative paths are looked up next to the dataset first, then from the working directory.
    A parquet file is converted once into the `datasets` cache (HF_DATASETS_CACHE) and memory-mapped from there.
    """

    def __init__(self, path: Path, image: str, conditioning: str, caption: str):
        columns = {
            "data.image_column": image,
            "data.conditioning_column": conditioning,
            "data.caption_column": caption,
        }
        self.ds, self.base = open_hf_dataset(path, columns, images=(image, conditioning))
        self.path, self.layout, self.keys = path, "hf", (image, conditioning, caption)
        self._prompts = list(self.ds[caption])

    def __len__(self) -> int:
        return len(self.ds)

    def prompt(self, i: int) -> str:
        return self._prompts[i]

    def read(self, i: int) -> tuple[bytes, bytes]:
        row = self.ds[i]
        return image_cell_bytes(row[self.keys[0]], self.base), image_cell_bytes(row[self.keys[1]], self.base)

    def where(self, i: int) -> str:
        return f"{self.path}[row {i}]"

    def content_key(self, i: int) -> bytes:
        target, condition = self.read(i)
        return _digest(target, condition, self.prompt(i).encode())


def open_hf_dataset(path: Path, columns: dict[str, str], images: Sequence[str]):
    """(the dataset at `path` with only the `columns` {setting: column name}, the image columns `images` cast to
    undecoded images; the folder relative image paths are looked up in). A missing column: one ValueError line
    naming the setting, the column and the columns present."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"data.path={str(path)!r} is a Hugging Face dataset; reading it needs `pip install datasets` "
            "(or `pip install 'controlnet[hf]'`)"
        ) from None
    shards = parquet_shards(path)
    if shards:  # one file or a folder of shards, read in name order as one table
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in shards], split="train")
        base = path if path.is_dir() else path.parent
    else:
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            logger.info("%s: using split %r of %s", path, split, sorted(ds))
            ds = ds[split]
        base = path
    missing = [f"{arg}={name!r}" for arg, name in columns.items() if name not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {path}: no column for {', '.join(missing)} (columns: {ds.column_names})")
    ds = ds.select_columns(list(dict.fromkeys(columns.values())))  # other columns are never read
    for name in dict.fromkeys(images):
        try:
            ds = ds.cast_column(name, datasets.Image(decode=False))
        except (TypeError, ValueError, NotImplementedError) as err:  # pyarrow's cast errors subclass these
            raise ValueError(
                f"dataset {path}: column {name!r} is {ds.features[name]}, expected images "
                f"(datasets.Image, file paths or encoded bytes): {err}"
            ) from None
    return ds, base


def image_cell_bytes(value, base: Path) -> bytes:
    """Encoded image bytes from an undecoded image cell ({"bytes", "path"}, or bare bytes / path); a relative path
    is looked up in `base` first, then from the working directory."""
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
    else:
        data, name = (value, None) if isinstance(value, bytes) else (None, value)
    if data is not None:
        return bytes(data)
    if not name:
        raise ValueError("image cell holds neither bytes nor a path")
    file = Path(name)
    if not file.is_absolute():
        beside = base / file
        if beside.is_file() or not file.is_file():
            file = beside
    if not file.is_file():
        raise FileNotFoundError(f"image file {str(file)!r} not found")
    return file.read_bytes()


def parquet_shards(path: Path) -> list[Path]:
    """The .parquet files of `path`: the file itself, or a folder's shards (also the Hub's `data/` layout)."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    if path.is_dir():
        return sorted(path.glob("*.parquet")) or sorted(path.glob("data/*.parquet"))
    return []


def detect_format(path: Path) -> str:
    """The layout of `path` from what it holds."""
    if path.is_file():
        if path.suffix == ".parquet":
            return "hf"
        if path.suffix == ".tar":
            return "webdataset"
        raise ValueError(f"data.path={str(path)!r}: a file must be .parquet or .tar")
    if not path.is_dir():
        if glob.glob(str(path)):
            return "webdataset"
        raise FileNotFoundError(f"data.path={str(path)!r}: no such folder or file")
    if (path / ORIGINAL_INDEX).is_file():
        return "original"
    if (path / IMAGEFOLDER_INDEX).is_file():
        return "imagefolder"
    if any((path / marker).is_file() for marker in HF_MARKERS) or parquet_shards(path):
        return "hf"
    if sorted(path.glob("*.tar")):
        return "webdataset"
    raise ValueError(
        f"data.path={str(path)!r}: no {ORIGINAL_INDEX} (original layout), {IMAGEFOLDER_INDEX} (imagefolder), "
        "dataset_info.json (HF save_to_disk), .parquet or .tar shards found"
    )


def open_source(
    path: str,
    fmt: str = "auto",
    image: str = "image",
    conditioning: str = "conditioning_image",
    caption: str = "text",
):
    """The source for a dataset path in format `fmt` ("auto" detects it)."""
    if not path:
        raise ValueError("data.path is empty: expected a dataset folder or file")
    root = Path(path)
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == "original":
        return original_source(root)
    if fmt == "imagefolder":
        return imagefolder_source(root, image, conditioning, caption)
    if fmt == "hf":
        return HFSource(root, image, conditioning, caption)
    if fmt == "webdataset":
        if root.is_dir():
            shards = sorted(root.glob("*.tar"))
        elif root.is_file():
            shards = [root]
        else:
            shards = sorted(Path(p) for p in glob.glob(str(root)))
        if not shards:
            raise FileNotFoundError(f"data.path={path!r}: no .tar shards")
        # webdataset keys default to extensions: the image/condition/caption keys name extensions
        image_key = "jpg|jpeg|png|webp" if image == "image" else image
        cond_key = "cond" if conditioning == "conditioning_image" else conditioning
        caption_key = "txt" if caption == "text" else caption
        return TarSource(shards, image_key, cond_key, caption_key)
    raise ValueError(f"data.format={fmt!r}: unknown")


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """RGB PIL image from encoded bytes. Raises ImageError (a ValueError) naming `what` before decoding an image
    too large to be real (over MAX_IMAGE_PIXELS), and on truncated or corrupt data; `scan` reports it by path."""
    return open_image(data, what).convert("RGB")

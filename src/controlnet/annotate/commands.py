"""`controlnet annotate NAME INPUT... -o DIR`: turn photos (or keypoint files) into condition maps.

Thin CLI layer: parse, build the annotator from the registry, run it over every input with a progress
bar, write PNGs atomically. User errors raise ValueError / FileNotFoundError for `cli.main` to print.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from controlnet import settings_cli
from controlnet.annotate.image import IMAGE_SUFFIXES, read_image, write_image
from controlnet.annotate.registry import annotator_class, annotator_options, get_annotator, list_annotators
from controlnet.atomic import atomic_path
from controlnet.io.images import image_size

KEYPOINT_SUFFIXES = (".json",)
NONE_WORDS = ("none", "null")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "annotate",
        help="make condition maps (canny, lines, scribble, pose, depth, ...) from images",
        description="Make ControlNet condition maps from images (or, for openpose_json, from OpenPose keypoint "
        "JSON files). Each INPUT is a file or a folder of files; maps are written to DIR as <input name>.png. "
        "Annotators: " + ", ".join(list_annotators()) + ".",
    )
    parser.add_argument("name", metavar="NAME", choices=list_annotators(), help="annotator name")
    parser.add_argument("inputs", metavar="INPUT", nargs="*", type=Path, help="image files or folders")
    parser.add_argument("-o", "--output", type=Path, metavar="DIR", help="output folder (required)")
    parser.add_argument(
        "-O",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="annotator option, repeatable (e.g. -O low_threshold=50); see --list-options",
    )
    parser.add_argument("--detect-resolution", type=int, help="short side used for detection (default 512)")
    parser.add_argument("--weights", type=Path, help="local weights file or folder (learned annotators)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--save-keypoints", action="store_true", help="openpose: also write NAME.json (OpenPose format) per image"
    )
    parser.add_argument("--list-options", action="store_true", help="print NAME's options and exit")
    parser.set_defaults(func=run)


def parse_value(text: str, field: dataclasses.Field, name: str):
    """A KEY=VALUE option's text as the field's type (settings_cli.parse_value: int, float, bool, str, a comma
    separated tuple; "none"/"null" where the field admits None)."""
    annotation = typing.get_type_hints(annotator_class(name))[field.name]
    try:
        return settings_cli.parse_value(text, annotation, f"--option {field.name}", none_words=NONE_WORDS)
    except ValueError:
        raise ValueError(
            f"--option {field.name}: cannot read {text!r} as {field.type} for annotator {name}"
        ) from None


def build_options(args: argparse.Namespace) -> dict:
    fields = annotator_options(args.name)
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option: got {item!r}; expected KEY=VALUE")
        if key not in fields:
            raise ValueError(f"--option: {args.name} has no option {key!r}; expected one of {', '.join(fields)}")
        options[key] = parse_value(value, fields[key], args.name)
    for key, value in (("detect_resolution", args.detect_resolution), ("weights", args.weights)):
        if value is not None:
            if key not in fields:
                raise ValueError(f"--{key.replace('_', '-')}: annotator {args.name} does not take it")
            options[key] = str(value) if key == "weights" else value
    return options


def collect_inputs(inputs: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files as given plus the matching files of each folder (sorted); missing paths are an error."""
    files = []
    for path in inputs:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        raise ValueError(f"INPUT: no files with suffix {', '.join(suffixes)} in {', '.join(map(str, inputs))}")
    return files


def output_paths(files: list[Path], folder: Path, overwrite: bool) -> list[Path]:
    outputs = [folder / f"{file.stem}.png" for file in files]
    seen: dict[Path, Path] = {}
    for file, output in zip(files, outputs, strict=True):
        if output in seen:
            raise ValueError(f"INPUT: {seen[output]} and {file} would both be written to {output}")
        seen[output] = file
        if output.exists() and output.resolve() in {f.resolve() for f in files}:
            raise ValueError(f"--output: {output} is also an input; choose another output folder")
        if output.exists() and not overwrite:
            raise ValueError(f"--output: {output} exists; pass --overwrite to replace it")
    return outputs


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (controlnet.atomic)."""
    with atomic_path(path) as partial:
        partial.write_text(text)


def print_options(name: str) -> None:
    cls = annotator_class(name)
    print(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
    for field in annotator_options(name).values():
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        print(f"  {field.name} ({field.type}, default {default!r})")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.list_options:
        print_options(args.name)
        return 0
    if not args.inputs or args.output is None:
        raise ValueError("expected at least one INPUT and -o/--output DIR")
    options = build_options(args)
    keypoints = getattr(annotator_class(args.name), "input_kind", "image") == "keypoints"
    files = collect_inputs(args.inputs, KEYPOINT_SUFFIXES if keypoints else IMAGE_SUFFIXES)
    if args.output.exists() and not args.output.is_dir():
        raise NotADirectoryError(f"--output: {args.output} exists and is not a folder")
    outputs = output_paths(files, args.output, args.overwrite)
    if not keypoints:
        for file in files:  # headers only: a non-image or one too large to be real stops us before any work
            image_size(file, "input image")
    annotator = get_annotator(args.name, **options)
    if args.save_keypoints and not hasattr(annotator, "keypoints"):
        raise ValueError(f"--save-keypoints: annotator {args.name} does not detect keypoints (use openpose)")
    bar = None
    for file, output in zip(files, outputs, strict=True):
        source = file if keypoints else read_image(file)  # a truncated file fails here, before anything is written
        detected = annotator(source)
        if bar is None:  # after the first map, so that an error on the first input prints only its own line
            args.output.mkdir(parents=True, exist_ok=True)
            bar = tqdm(total=len(files), desc=f"annotate {args.name}", unit="image")
        write_image(output, detected)
        if args.save_keypoints:
            write_text(output.with_suffix(".json"), json.dumps(annotator.keypoints(source)))
        bar.update(1)
    bar.close()
    print(f"wrote {len(outputs)} map(s) to {args.output}")
    return 0

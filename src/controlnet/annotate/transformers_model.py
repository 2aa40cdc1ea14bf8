"""Loading a transformers vision model + image processor from a local folder only (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

from controlnet.annotate.weights import ANNOTATORS_DIR_ENV, torch_device

CONFIG_FILE = "config.json"


def resolve_folder(folder: str | Path | None, default_name: str, annotator: str) -> Path:
    """A local transformers model folder: `folder`, or $CONTROLNET_ANNOTATORS/default_name."""
    if folder is None:
        root = os.environ.get(ANNOTATORS_DIR_ENV)
        if not root:
            raise FileNotFoundError(
                f"{annotator}: no model folder given; expected a local transformers folder ({CONFIG_FILE}, "
                f"preprocessor_config.json, weights), e.g. {default_name}: pass weights=FOLDER (CLI: --weights) or "
                f"set ${ANNOTATORS_DIR_ENV}; nothing is downloaded"
            )
        folder = Path(root) / default_name
    path = Path(folder).expanduser()
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{annotator}: model folder not found: expected {path / CONFIG_FILE}")
    return path


def load_model_and_processor(auto_model_name: str, folder: Path, device: str):
    """`AutoModelFor...` class name + folder -> (model in eval mode on `device`, image processor)."""
    import transformers

    target = torch_device(device)
    model_class = getattr(transformers, auto_model_name)
    try:
        model = model_class.from_pretrained(folder, local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"weights: cannot load a {auto_model_name} model from {folder} ({err})") from None
    return model.to(target).eval(), processor

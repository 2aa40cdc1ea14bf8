"""The built-in folder format, in one place: the shipped base's `weights/` folder and every `export-base` folder.

Layout (each component as its library's `save_pretrained` writes it):

    unet/ vae/ text_encoder/ tokenizer/ scheduler/    vae/ absent for a pixel-space base
    base_config.json    the built-in model's architecture (builtin/config.py BaseModelConfig); it marks the layout,
                        which has no model_index.json: the components' classes are EXPORTED_CLASSES
    sampling.json       how the base samples when the user sets nothing (SamplingDefaults)
    controlnets/NAME/   the shipped folder only: diffusers ControlNet folders, `builtin:NAME` on any command line

The shipped transformer base `builtin-dit` (`weights_dit/`, builtin/pretrain_dit.py) is a plain diffusers SD3 folder
(model_index.json) with the same sampling.json beside it and its ControlNets in controlnets/NAME/, named
`builtin-dit:NAME` on any command line.

`write_builtin_folder` writes it (builtin/base.py `save_builtin_base` fills in the built-in model's settings); the
base loader (generate/base.py) reads it. It lives in generate/ rather than builtin/ because builtin/ builds on
generate/ (its sampler shares the pipeline's CFG step, it loads through the one base loader): the loader importing
builtin/ would close an import cycle. Standard library only, so that the CLI's size checks (generate/sizes.py) find
the shipped folder without importing torch.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path

from controlnet.atomic import give_umask_modes

BUILTIN = "builtin"  # the base spec that names the shipped base
BUILTIN_CONTROLNET = "builtin:"  # names a shipped ControlNet on any command line: builtin:canny, builtin:fill, ...
BUILTIN_DIT = "builtin-dit"  # the base spec that names the shipped transformer base (an SD3-layout MMDiT)
BUILTIN_DIT_CONTROLNET = "builtin-dit:"  # names a ControlNet shipped for it: builtin-dit:fill, ...
BUILTIN_BASES = (BUILTIN, BUILTIN_DIT)  # the base specs that are names, not paths
# A shipped ControlNet's prefix -> the base it ships with ("builtin-dit:" first: neither prefix contains the other,
# but the longer one is tried first all the same)
BUILTIN_CONTROLNET_PREFIXES = {BUILTIN_DIT_CONTROLNET: BUILTIN_DIT, BUILTIN_CONTROLNET: BUILTIN}
CONTROLNETS_FOLDER = "controlnets"  # the shipped ControlNets, inside the shipped folder
EXPORTED_CONFIG = "base_config.json"  # marks the layout: the BaseModelConfig the folder was built from
SAMPLING_FILE = "sampling.json"  # the base's own sampling defaults (SamplingDefaults), optional
# Classes of the components (the scheduler's class is read from its scheduler_config.json).
EXPORTED_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "PreTrainedTokenizerFast"),
}
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")  # the components with weights (stored in `weights_dtype`)


@dataclass
class SamplingDefaults:
    """How a base samples when the user sets nothing: travels with the base (SAMPLING_FILE in its folder)."""

    guidance_scale: float = 7.5
    """classifier-free guidance scale (7.5: diffusers' and the web UI's default for SD)"""
    steps: int = 20
    """sampler steps"""
    scheduler: str | None = None
    """sampler name (generate/samplers.py); None = the base's own scheduler"""
    max_sequence_length: int | None = None
    """SD3 / Flux: T5 tokens per prompt (or, for an SD3 base without T5, the zero tokens diffusers adds in their place:
    part of what the transformer was trained on); None = the pipeline's default"""

    @classmethod
    def read(cls, folder: Path | None, defaults: SamplingDefaults | None = None) -> SamplingDefaults:
        """The folder's SAMPLING_FILE, its values over `defaults` (None: the generic ones); `defaults` if none."""
        defaults = defaults if defaults is not None else cls()
        file = None if folder is None else Path(folder) / SAMPLING_FILE
        if file is None or not file.is_file():
            return defaults
        values = json.loads(file.read_text())
        known = {k: v for k, v in values.items() if k in {f.name for f in fields(cls)}}
        return replace(defaults, **known)

    def write(self, folder: Path) -> None:
        (Path(folder) / SAMPLING_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def builtin_folder() -> Path:
    """The shipped built-in base's folder (package data of `controlnet.builtin`).

    Found through importlib.resources rather than an import of `controlnet.builtin` (which builds on generate/, see
    above); resources also finds the folder in zipped or relocated installations.
    """
    return Path(str(resources.files("controlnet.builtin") / "weights"))


def builtin_dit_folder() -> Path:
    """The shipped transformer base's folder (package data `controlnet.builtin/weights_dit`, found as above)."""
    return Path(str(resources.files("controlnet.builtin") / "weights_dit"))


def builtin_base_folder(name: str) -> Path:
    """The folder of the shipped base called `name` (one of BUILTIN_BASES)."""
    return {BUILTIN: builtin_folder, BUILTIN_DIT: builtin_dit_folder}[name]()


def builtin_controlnets(base: str = BUILTIN) -> dict[str, Path]:
    """{name: folder} of the ControlNets shipped with the built-in base `base` (diffusers folders in controlnets/)."""
    folder = builtin_base_folder(base) / CONTROLNETS_FOLDER
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "config.json").is_file()}


def folder_classes(folder: Path) -> dict[str, tuple[str, str]]:
    """{component: (library, class)} of the components `folder` holds."""
    classes = {n: cls for n, cls in EXPORTED_CLASSES.items() if (folder / n).is_dir()}
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        classes["scheduler"] = ("diffusers", json.loads(scheduler_file.read_text())["_class_name"])
    return classes


def read_base_config(folder: Path) -> dict:
    """The architecture the folder was built from (base_config.json), as a dict of BaseModelConfig's fields."""
    config_file = Path(folder) / EXPORTED_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"built-in base folder {folder}: no {EXPORTED_CONFIG}")
    return json.loads(config_file.read_text())


def write_builtin_folder(
    folder: str | Path, parts: dict, scheduler, base_config: dict, sampling: SamplingDefaults, weights_dtype=None
) -> Path:
    """Write the layout above into `folder`: `parts` holds unet, vae (or None), text_encoder and tokenizer.

    `scheduler`: a diffusers scheduler (its config is saved); `base_config`: BaseModelConfig's fields;
    `weights_dtype`: the torch dtype the weights are stored in (None: as they are; the modules are not changed).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in WEIGHTED_COMPONENTS:
        module = parts.get(name)
        if module is None:
            continue
        if weights_dtype is not None:
            module = copy.deepcopy(module).to(weights_dtype)  # the caller's module keeps its dtype
        module.save_pretrained(folder / name, safe_serialization=True)
        give_umask_modes(folder / name)  # safetensors creates its files 0600
    parts["tokenizer"].save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    sampling.write(folder)
    (folder / EXPORTED_CONFIG).write_text(json.dumps(base_config, indent=2) + "\n")
    return folder

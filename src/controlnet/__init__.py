"""controlnet: adding conditional control to text-to-image diffusion models (Zhang, Rao, Agrawala, ICCV 2023).

Public names only. They are resolved lazily so that `import controlnet` (and `controlnet --help`) stays fast:
torch and diffusers are imported on first use of a name, not at import time.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "ControlNet": "controlnet.model.controlnet",
    "ControlNetOutput": "controlnet.model.controlnet",
    "MultiControlNet": "controlnet.model.compose",
    "load_unet": "controlnet.io.api",
    "load_controlnet": "controlnet.io.api",
    "save_controlnet": "controlnet.io.api",
    "ControlNetPipeline": "controlnet.generate.pipeline",
    "GenerationOptions": "controlnet.generate.options",
    "GenerationResult": "controlnet.generate.pipeline",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'controlnet' has no attribute {name!r}")

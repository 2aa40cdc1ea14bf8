"""The web UI's preprocessor ("module") names mapped to our annotators, with the sliders clients draw for them.

sd-webui-controlnet calls its annotators "modules" (`canny`, `mlsd`, `softedge_hed`, ...) and every unit carries
three generic numbers for them: `processor_res`, `threshold_a`, `threshold_b`. Each `Module` here says which of
our annotators (annotate/registry.py) a name runs, which of its options the three numbers set, and each slider's
range. Only the names we can honour are listed: a name we do not have is refused (422), never silently run as
something else (upstream falls back to no control). The slider defaults are our annotators' own option defaults
(their dataclass fields), so `/controlnet/module_list` shows what a unit without values really gets.

Learned annotators (HED, PiDiNet, OpenPose, depth, segmentation) need weights files, which the server does not
offer (serve/service.py `served_annotators`): their modules are known, so a request for one gets a 422 that says
so and how to send a ready map instead, but they are not listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NONE_MODULE = "none"
RESOLUTION_OPTION = "detect_resolution"
# The web UI's "Preprocessor Resolution" slider (sd-webui-controlnet: 64..2048, step 8); our annotators take any
# integer >= 64 (they round the short side to multiples of 64, annotate/image.py).
RESOLUTION_MIN, RESOLUTION_MAX, RESOLUTION_STEP = 64, 2048, 8
UNSET = -1  # what clients send for "the module's default"


@dataclass(frozen=True)
class Slider:
    """One of a module's numbers: which option of our annotator it sets and the range a client may use."""

    label: str
    """The web UI's slider label."""
    option: str
    """Our annotator's option (dataclass field) it sets."""
    minimum: float
    maximum: float
    step: float
    integer: bool = False
    """The option takes an int (values are rounded)."""


RESOLUTION = Slider("Resolution", RESOLUTION_OPTION, RESOLUTION_MIN, RESOLUTION_MAX, RESOLUTION_STEP, integer=True)


@dataclass(frozen=True)
class Module:
    """A web-UI preprocessor name and how we run it."""

    name: str
    annotator: str | None
    """Our annotator (annotate/registry.py), or None: the image is the condition map as it is."""
    control_type: str
    """The web UI's control type (its tab), e.g. "Canny"."""
    alias: str = ""
    """The web UI's label for the name (`module_list?alias_names=true`)."""
    fixed: dict = field(default_factory=dict)
    """Options always passed (e.g. safe mode of `softedge_hedsafe`)."""
    resolution: bool = True
    """`processor_res` sets the annotator's detect resolution."""
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    weights: str | None = None
    """Local weights the annotator needs (file or folder name under $CONTROLNET_ANNOTATORS); None: none."""

    @property
    def label(self) -> str:
        return self.alias or self.name

    def sliders(self) -> list[tuple[str, Slider]]:
        """(unit field, slider) for the unit fields this module reads."""
        pairs = [("processor_res", RESOLUTION)] if self.resolution else []
        pairs += [
            (key, s) for key, s in (("threshold_a", self.threshold_a), ("threshold_b", self.threshold_b)) if s
        ]
        return pairs


# Names and labels are the web UI's (sd-webui-controlnet 1.1.455); ranges are the web UI's where our option means
# the same, else our option's valid range (annotate/*.py `__post_init__`).
MODULES: tuple[Module, ...] = (
    Module(NONE_MODULE, None, "All", resolution=False),
    Module(
        "canny",
        "canny",
        "Canny",
        threshold_a=Slider("Low Threshold", "low_threshold", 1, 255, 1, integer=True),
        threshold_b=Slider("High Threshold", "high_threshold", 1, 255, 1, integer=True),
    ),
    # M-LSD's distance threshold is the shortest segment kept (reference `pred_lines(..., dist_thr)`): our
    # min_length. M-LSD's score threshold has no counterpart in OpenCV's LSD, so threshold_a is not read.
    Module(
        "mlsd",
        "lines",
        "MLSD",
        fixed={"method": "lsd"},
        threshold_b=Slider("MLSD Distance Threshold", "min_length", 0.01, 20.0, 0.01),
    ),
    Module(
        "scribble_xdog",
        "scribble",
        "Scribble/Sketch",
        threshold_a=Slider("XDoG Threshold", "threshold", 1, 64, 1, integer=True),
    ),
    Module("softedge_hed", "hed", "SoftEdge", weights="ControlNetHED.pth"),
    Module("softedge_hedsafe", "hed", "SoftEdge", fixed={"safe": True}, weights="ControlNetHED.pth"),
    Module("softedge_pidinet", "pidinet", "SoftEdge", weights="table5_pidinet.pth"),
    Module("softedge_pidisafe", "pidinet", "SoftEdge", fixed={"safe": True}, weights="table5_pidinet.pth"),
    Module(
        "lineart_standard", "lineart_standard", "Lineart", alias="lineart_standard (from white bg & black line)"
    ),
    Module("depth_midas", "depth", "Depth", weights="dpt-hybrid-midas"),
    Module("openpose", "openpose", "OpenPose", weights="body_pose_model.pth"),
    # Both upstream ADE20K segmenters draw the ADE20K palette our UperNet segmenter draws: same map format.
    Module("seg_ofade20k", "seg", "Segmentation", weights="upernet-convnext-small"),
    Module("seg_ufade20k", "seg", "Segmentation", weights="upernet-convnext-small"),
    Module("shuffle", "shuffle", "Shuffle"),
    Module(
        "tile_resample",
        "tile",
        "Tile/Blur",
        resolution=False,
        threshold_a=Slider("Down Sampling Rate", "down_sampling_rate", 1.0, 8.0, 0.01),
    ),
    Module("invert", "invert", "Lineart", alias="invert (from white bg & black line)", resolution=False),
    # The v1.1 inpaint condition (image in [0, 1], masked pixels -1) is built from the img2img image and mask.
    Module("inpaint_only", "inpaint", "Inpaint", resolution=False),
)
# ModelEntry.condition (serve/models.py) -> the web UI's control type.
CONTROL_TYPE_BY_CONDITION = {
    "canny": "Canny", "mlsd": "MLSD", "scribble": "Scribble/Sketch", "softedge": "SoftEdge", "hed": "SoftEdge",
    "lineart": "Lineart", "lineart_anime": "Lineart", "depth": "Depth", "openpose": "OpenPose",
    "seg": "Segmentation", "shuffle": "Shuffle", "tile": "Tile/Blur", "inpaint": "Inpaint", "normal": "NormalMap",
    "ip2p": "InstructP2P",
}  # fmt: skip
_BY_NAME = {m.name: m for m in MODULES}
_BY_LABEL = {m.alias.lower(): m for m in MODULES if m.alias}
# Features of the web UI we do not have: named in the 422 instead of "unknown module".
UNSUPPORTED_PREFIXES = {
    "ip-adapter": "IP-Adapter",
    "ip_adapter": "IP-Adapter",
    "instant_id": "InstantID",
    "reference": "reference-only attention",
    "revision": "Revision (CLIP vision)",
    "t2ia": "T2I-Adapter",
    "clip_vision": "CLIP vision",
    "recolor": "recolor",
    "photomaker": "PhotoMaker",
    "facexlib": "face models",
}


def weights_available(module: Module) -> bool:
    """The server offers the module's annotator: the service serves annotators that need no weights file
    (serve/service.py `served_annotators`: no pretrained weights are shipped and a client never names a path)."""
    if module.annotator is None or module.weights is None:
        return True
    from controlnet.serve.service import served_annotators

    return module.annotator in served_annotators()


def available_modules() -> list[Module]:
    """The modules this server can run, in the web UI's order."""
    return [m for m in MODULES if weights_available(m)]


def control_types(controlnets: list) -> dict:
    """`/controlnet/control_types`: per control type its modules and the ControlNets of its condition
    (ModelEntry.condition, guessed from the name as upstream matches its filter words); "All" lists everything."""
    modules = available_modules()
    names = [m.name for m in modules]
    titles = [e.title for e in controlnets]
    out = {
        "All": {
            "module_list": names,
            "model_list": ["None", *titles],
            "default_option": NONE_MODULE,
            "default_model": "None",
        }
    }
    for module in modules:
        if module.control_type == "All":
            continue
        entry = out.setdefault(module.control_type, {"module_list": [NONE_MODULE], "model_list": ["None"]})
        entry["module_list"].append(module.name)
    for kind, entry in out.items():
        if kind == "All":
            continue
        models = [e.title for e in controlnets if CONTROL_TYPE_BY_CONDITION.get(e.condition or "") == kind]
        entry["model_list"] += models
        entry["default_option"] = entry["module_list"][1]
        entry["default_model"] = models[0] if models else "None"
    return out


def find_module(name) -> Module:
    """The module called `name` (its name or web-UI label, case-insensitive); ValueError naming why not."""
    if not isinstance(name, str):
        raise ValueError(f"expected a module name (string), got {type(name).__name__}")
    key = name.strip().lower()
    module = _BY_NAME.get(key) or _BY_LABEL.get(key)
    if module is None:
        feature = next((label for prefix, label in UNSUPPORTED_PREFIXES.items() if key.startswith(prefix)), None)
        if feature:
            raise ValueError(f"module {name!r} needs {feature}, which this server does not have")
        names = ", ".join(m.name for m in available_modules())
        raise ValueError(f"unknown module {name!r}; expected one of {names}")
    if not weights_available(module):
        raise ValueError(
            f"module {name!r} needs the learned annotator {module.annotator} ({module.weights}), which this server "
            "does not offer (no pretrained weights are shipped); send the detected map with module none"
        )
    return module


def option_default(module: Module, slider: Slider):
    """Our annotator's own default for the option `slider` sets (its dataclass field default)."""
    from controlnet.annotate.registry import annotator_options

    default = annotator_options(module.annotator)[slider.option].default
    return module.fixed.get(slider.option, default)


def module_detail(module: Module) -> dict:
    """`module_detail` entry of `/controlnet/module_list`: model_free and the sliders with our defaults."""
    sliders = []
    for _, slider in module.sliders():
        sliders.append(
            {
                "name": slider.label,
                "value": option_default(module, slider),
                "min": slider.minimum,
                "max": slider.maximum,
                "step": slider.step,
            }
        )
    return {"model_free": False, "sliders": sliders}


def effective_value(module: Module, slider: Slider, value) -> tuple[object, bool]:
    """(value the annotator gets, True if the client's value was used): -1, None, a non-number or a value out of
    the slider's range gives the module's default, as the web UI does (it logs "Invalid value(...), using
    default value ...")."""
    default = option_default(module, slider)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value == UNSET:
        return default, False
    if not slider.minimum <= value <= slider.maximum:
        return default, False
    return (round(value) if slider.integer else float(value)), True

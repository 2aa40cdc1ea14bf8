"""The web page: one gradio Blocks from photo to condition map to controlled image, on serve's service layer.

Layout: base + prompt + sampling on the left, up to MAX_UNITS ControlNet units in tabs (photo -> annotator ->
condition map at once, or a map uploaded or drawn), img2img / inpainting with a mask painted on the image, and on
the right the gallery, a progress bar, cancel, each image's effective settings, "send to form", a PNG settings
reader and "copy as API request".

Every action goes through `Service` (serve/service.py): annotation previews are `AnnotationJob`s, generation is the
`GenerationJob` that ui/form.py builds from the form, on the same queue and worker as the HTTP API. So the page
and POST /v1/generate give the same pixels for the same settings, a full queue is a "Busy" message here as it is a
429 there, and a cancelled job stops at its next sampler step.

Element ids (`elem_id`) name every control the end-to-end tests drive (tests/ui/).
"""

from __future__ import annotations

import json
import threading

import gradio as gr
from PIL import Image

from controlnet.generate.base import sampling_defaults
from controlnet.generate.builtin_format import BUILTIN_BASES
from controlnet.generate.outputs import a1111_parameters
from controlnet.generate.png_settings import read_png_settings
from controlnet.io.images import MAX_IMAGE_PIXELS, check_pixels
from controlnet.serve.limits import MAX_IMAGES, MAX_SIDE, MAX_STEPS
from controlnet.serve.service import (
    DONE,
    AnnotationJob,
    JobCancelled,
    QueueFull,
    Service,
    ServiceClosed,
    served_annotators,
)
from controlnet.ui.annotator_controls import OptionControl, collect_options, option_controls
from controlnet.ui.form import (
    MAX_UNITS,
    NO_ANNOTATOR,
    NO_UNION_TYPE,
    PHOTO_ANNOTATORS,
    FormError,
    api_request,
    build_job,
    form_from_settings,
    form_keys,
    meta,
    mode_choices,
    more_settings,
    random_seed,
    resize_choices,
    sampler_choices,
    setting_docs,
    setting_kind,
    union_type_choices,
    unit_docs,
    unit_key,
)

TITLE = "controlnet"
ANNOTATE_TIMEOUT_S = 120.0
WAIT_S = 0.5  # how often a waiting generation checks its job
BUSY = "Busy: {n} jobs are waiting, the most this server queues (--max-queue); try again in about {s} s."
CSS = "#status {min-height: 1.5em} footer {display: none !important}"
# system fonts only: the default theme asks a font host for its fonts, and the page must work offline
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "SFMono-Regular", "monospace"]
)


class RunningJobs:
    """Which job each browser session is running (for its cancel button); entries leave when the job ends."""

    def __init__(self):
        self._jobs: dict[str, str] = {}
        self._lock = threading.Lock()

    def set(self, session: str, job_id: str | None) -> None:
        with self._lock:
            if job_id is None:
                self._jobs.pop(session, None)
            else:
                self._jobs[session] = job_id

    def get(self, session: str) -> str | None:
        with self._lock:
            return self._jobs.get(session)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _busy(err: QueueFull, service: Service) -> str:
    return BUSY.format(n=service.max_queue, s=err.retry_after_s)


def _with_settings(image: Image.Image, settings: dict, seed: int, names: list[str]) -> Image.Image:
    """The image with its settings as PNG text chunks, which gradio copies into the PNG it serves."""
    image = image.copy()
    image.info["parameters"] = a1111_parameters(settings, seed, names)
    image.info["controlnet"] = json.dumps({**settings, "seed": seed}, default=str)
    return image


def build_page(service: Service) -> gr.Blocks:
    """The page's Blocks around a running service (not yet mounted: ui/mount.py)."""
    registry = service.registry
    bases = [e.name for e in registry.bases()]
    nets = [e.name for e in registry.controlnets()]
    base_entry = registry.base(service.current_base)
    sampling = sampling_defaults(base_entry.name if base_entry.name in BUILTIN_BASES else base_entry.path)
    running = RunningJobs()
    c: dict[str, gr.Component] = {}  # form components by ui/form.py's keys
    unit_controls: list[list[tuple[OptionControl, gr.Component]]] = []
    unit_groups: list[dict[str, gr.Group]] = []
    unit_detect: list[gr.Component] = []

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown("## controlnet\nPhoto → condition map → controlled image (Zhang, Rao & Agrawala, ICCV 2023).")
        with gr.Row():
            with gr.Column(scale=3):
                base = gr.Dropdown(bases, value=base_entry.name, label="Base model", elem_id="base")
                c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative_prompt")
                with gr.Row():
                    c["sampler"] = gr.Dropdown(
                        sampler_choices(),
                        value=sampling.scheduler or sampler_choices()[0][1],
                        label="Sampler",
                        elem_id="sampler",
                    )
                    c["steps"] = gr.Slider(
                        1, MAX_STEPS, value=sampling.steps, step=1, label="Steps", elem_id="steps"
                    )
                    c["guidance_scale"] = gr.Slider(
                        0, 30, value=sampling.guidance_scale, step=0.5, label="CFG scale", elem_id="cfg"
                    )
                with gr.Row():
                    c["seed"] = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed")
                    dice = gr.Button("Random seed", elem_id="random_seed", scale=0)
                    c["batch_size"] = gr.Slider(
                        1, MAX_IMAGES, value=1, step=1, label="Batch size", elem_id="batch_size"
                    )
                with gr.Row():
                    c["width"] = gr.Slider(
                        0, MAX_SIDE, value=0, step=8, label="Width (0 = from the condition)", elem_id="width"
                    )
                    c["height"] = gr.Slider(
                        0, MAX_SIDE, value=0, step=8, label="Height (0 = from the condition)", elem_id="height"
                    )
                with gr.Tabs():
                    for k in range(MAX_UNITS):
                        with gr.Tab(f"ControlNet {k + 1}", elem_id=f"unit{k}_tab"):
                            controls, groups, detect = _unit_panel(k, c, nets, service)
                            unit_controls.append(controls)
                            unit_groups.append(groups)
                            unit_detect.append(detect)
                with gr.Accordion("img2img / inpainting", open=False, elem_id="img2img"):
                    c["init"] = gr.ImageEditor(
                        label="Init image (paint on it to inpaint there)",
                        type="pil",
                        format="png",
                        sources=("upload", "clipboard"),
                        layers=False,
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                        elem_id="init",
                    )
                    c["denoise"] = gr.Slider(
                        0.01, 1.0, value=0.75, step=0.01, label="Denoising strength", elem_id="denoise"
                    )
                with gr.Accordion("More settings", open=False, elem_id="more_settings"):
                    for setting in more_settings():  # every other field of the schema (generate/options.py)
                        c[setting.name] = _setting_component(setting)
            with gr.Column(scale=2):
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Markdown("", elem_id="status")
                gallery = gr.Gallery(
                    label="Images",
                    format="png",
                    columns=2,
                    height="auto",
                    buttons=["download", "fullscreen"],
                    elem_id="gallery",
                )
                results = gr.State([])  # settings of each gallery image (with its own seed)
                selected = gr.State(None)
                settings_view = gr.JSON(label="Settings of the selected image", elem_id="settings")
                with gr.Row():
                    to_form = gr.Button("Send settings to the form", elem_id="send_to_form")
                    to_api = gr.Button("Copy as API request", elem_id="copy_api")
                api_json = gr.Code(label="POST /v1/generate body", language="json", elem_id="api_request")
                png_drop = gr.File(
                    label="Read settings from a PNG", file_types=[".png"], type="binary", elem_id="png_drop"
                )

        all_options = [comp for controls in unit_controls for _, comp in controls]
        # passed as a set: the function gets one {component: value} dict (gradio adds gr.Request only to functions
        # without *args)
        inputs = {base, *(c[key] for key in form_keys()), *unit_detect, *all_options}
        keys = form_keys()
        form_out_keys = [key for key in keys if key != "init" and not key.endswith(("_photo", "_map"))]
        outputs_form = [c[key] for key in form_out_keys]  # what settings can set (images are not in settings)

        def values_of(data: dict) -> dict:
            """The form's values by key, with each unit's annotator options collected into unit{k}_options."""
            values = {key: data[c[key]] for key in keys}
            for k, controls in enumerate(unit_controls):
                own = [data[comp] for _, comp in controls]
                annotator = values.get(unit_key(k, "annotator")) or NO_ANNOTATOR
                if annotator != NO_ANNOTATOR:
                    values[unit_key(k, "options")] = collect_options(
                        annotator, [ctl for ctl, _ in controls], own, data[unit_detect[k]]
                    )
            return values

        def job_from(data: dict):
            try:
                return build_job(values_of(data), data[base], service.max_pixels or MAX_IMAGE_PIXELS)
            except (FormError, ValueError) as err:
                raise gr.Error(str(err).splitlines()[0]) from None

        def run_generation(data: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            job_spec = job_from(data)
            try:
                job = service.submit(job_spec)
            except QueueFull as err:
                return gr.skip(), gr.skip(), _busy(err, service)
            except ServiceClosed:
                return gr.skip(), gr.skip(), "The server is shutting down."
            except ValueError as err:
                raise gr.Error(str(err).splitlines()[0]) from None
            session = _session(request)
            running.set(session, job.id)
            try:
                version = -1
                while not job.done:
                    version = job.wait_change(version, WAIT_S)
                    if job.total:
                        progress((job.step, job.total), desc="sampling", unit="steps")
            finally:
                running.set(session, None)
            if job.state != DONE:
                if job.state == "cancelled" or isinstance(job.error, JobCancelled):
                    return gr.skip(), gr.skip(), "Cancelled."
                raise gr.Error(f"generation failed: {str(job.error).splitlines()[0]}")
            result = job.result
            names = [u.model for u in job.spec.units]
            per_image = [{**result.settings, "seed": seed} for seed in result.seeds]
            images = [
                _with_settings(im, result.settings, seed, names)
                for im, seed in zip(result.images, result.seeds, strict=True)
            ]
            took = (job.finished or 0) - (job.started or 0)
            return images, per_image, f"Done: {len(images)} image(s), seeds {result.seeds}, {took:.1f} s."

        # more gradio workers than the service queues, so a click always reaches the service, which answers "Busy"
        # at once when its queue is full (instead of the click waiting unseen in gradio's own queue)
        generate.click(
            run_generation,
            inputs,
            [gallery, results, status],
            concurrency_limit=service.max_queue + 2,
            api_visibility="private",
        )

        def cancel_job(request: gr.Request):
            job_id = running.get(_session(request))
            if job_id is None:
                return "Nothing is running."
            service.cancel(job_id)
            return "Cancelling (stops at the next sampler step)…"

        cancel.click(
            cancel_job, None, status, api_visibility="private", concurrency_id="cancel", concurrency_limit=None
        )
        dice.click(random_seed, None, c["seed"], queue=False, api_visibility="private")

        def show_selected(per_image, evt: gr.SelectData):
            index = evt.index if isinstance(evt.index, int) else 0
            chosen = per_image[index] if per_image and 0 <= index < len(per_image) else None
            return chosen, chosen

        gallery.select(show_selected, results, [settings_view, selected], api_visibility="private")

        def after_generation(per_image):
            first = per_image[0] if per_image else None
            return first, first

        gallery.change(after_generation, results, [settings_view, selected], api_visibility="private")

        def settings_to_form(settings):
            if not settings:
                raise gr.Error("no settings to send: generate an image, pick one, or drop a PNG")
            values = form_from_settings(settings, nets)
            return [values.get(key, gr.skip()) for key in form_out_keys]

        to_form.click(settings_to_form, selected, outputs_form, api_visibility="private")

        def read_png(data):
            if not data:
                return gr.skip(), gr.skip(), *[gr.skip()] * len(outputs_form)
            try:
                settings = read_png_settings(data, "dropped PNG")
            except ValueError as err:
                raise gr.Error(str(err).splitlines()[0]) from None
            return settings, settings, *settings_to_form(settings)

        png_drop.upload(read_png, png_drop, [settings_view, selected, *outputs_form], api_visibility="private")

        def copy_api(data: dict):
            return json.dumps(api_request(job_from(data)), indent=2)

        copy_js = (
            "(text) => { if (text && navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {}); }"
        )
        to_api.click(copy_api, inputs, api_json, api_visibility="private").then(
            None, api_json, None, js=copy_js, api_visibility="private"
        )

        for k in range(MAX_UNITS):
            _wire_unit(k, c, unit_controls[k], unit_groups[k], unit_detect[k], service)

    # gradio's own queue is bounded too: past it gradio answers with its own "queue is full" error
    page.queue(max_size=4 * service.max_queue + 16, default_concurrency_limit=4)
    return page


def _unit_panel(k: int, c: dict, nets: list[str], service: Service):
    """One unit's controls into `c`; returns its annotator option controls, their groups and its resolution."""
    key = lambda name: unit_key(k, name)  # noqa: E731
    c[key("enabled")] = gr.Checkbox(k == 0, label="Enable", elem_id=key("enabled"))
    c[key("model")] = gr.Dropdown(nets, value=_default_net(nets, k), label="ControlNet", elem_id=key("model"))
    # a union net's condition type (the schema's ControlUnit.control_type): shown for union nets only
    c[key("control_type")] = gr.Dropdown(
        union_type_choices(),
        value=NO_UNION_TYPE,
        label="Union type",
        info=unit_docs().get("control_type", ""),
        visible=_is_union(service, _default_net(nets, k)),
        elem_id=key("control_type"),
    )
    with gr.Row():
        c[key("photo")] = gr.Image(
            label="Photo (annotated into the map)",
            type="pil",
            format="png",
            sources=("upload", "clipboard"),
            elem_id=key("photo"),
        )
        c[key("map")] = gr.Image(
            label="Condition map (or upload one)",
            type="pil",
            format="png",
            sources=("upload", "clipboard"),
            elem_id=key("map"),
        )
    choices = [NO_ANNOTATOR] + [a for a in PHOTO_ANNOTATORS if a in served_annotators()]
    c[key("annotator")] = gr.Dropdown(choices, value=NO_ANNOTATOR, label="Annotator", elem_id=key("annotator"))
    detect = gr.Slider(
        0,
        2048,
        value=512,
        step=64,
        label="Detect resolution (0 = the annotator's default)",
        elem_id=key("detect_resolution"),
    )
    controls, groups = [], {}
    for name in choices[1:]:
        with gr.Group(visible=False) as group:
            for ctl in option_controls(name):
                controls.append((ctl, _option_component(ctl, f"{key('opt')}_{name}_{ctl.name}")))
        groups[name] = group
    with gr.Accordion("Draw a scribble", open=False):
        sketch = gr.Sketchpad(
            label="Draw (black on white; used as white on black)",
            type="pil",
            format="png",
            canvas_size=(512, 512),
            elem_id=key("sketch"),
        )
        use_sketch = gr.Button("Use the drawing as the condition map", elem_id=key("use_sketch"))
    c[key("sketch")], c[key("use_sketch")] = sketch, use_sketch
    with gr.Row():
        c[key("scale")] = gr.Slider(0, 2, value=1.0, step=0.05, label="Control strength", elem_id=key("scale"))
        c[key("start")] = gr.Slider(0, 1, value=0.0, step=0.01, label="Starting step", elem_id=key("start"))
        c[key("end")] = gr.Slider(0, 1, value=1.0, step=0.01, label="Ending step", elem_id=key("end"))
    with gr.Row():
        c[key("mode")] = gr.Radio(mode_choices(), value="balanced", label="Control mode", elem_id=key("mode"))
        c[key("resize")] = gr.Radio(
            resize_choices(), value="just_resize", label="Resize mode", elem_id=key("resize")
        )
    return controls, groups, detect


def _is_union(service: Service, name: str | None) -> bool:
    """Whether the ControlNet `name` is a union net (from its file's header, once per file version)."""
    if not name:
        return False
    try:
        return service.union_types(service.registry.controlnet(name))[0] is not None
    except (LookupError, ValueError, OSError):  # an unknown or vanished net: the job's check names it
        return False


def _default_net(nets: list[str], k: int) -> str | None:
    """Unit 1 starts on a canny net when there is one (the usual first try), others on the first net."""
    canny = [n for n in nets if "canny" in n.lower()]
    if k == 0 and canny:
        return canny[0]
    return nets[0] if nets else None


def _setting_component(setting) -> gr.Component:
    """A control for one schema field: its choices as a dropdown, a bool as a checkbox, a number as a number box
    within its bounds; its docstring as the hint (generate/options.py)."""
    label, info = setting.name.replace("_", " ").capitalize(), setting_docs().get(setting.name, "")
    elem_id, default, kind = f"setting_{setting.name}", setting.default, setting_kind(setting)
    if meta(setting, "choices"):
        return gr.Dropdown(list(meta(setting, "choices")), value=default, label=label, info=info, elem_id=elem_id)
    if kind is bool:
        return gr.Checkbox(bool(default), label=label, info=info, elem_id=elem_id)
    if kind in (int, float):
        low = meta(setting, "ge") if meta(setting, "ge") is not None else meta(setting, "gt")
        return gr.Number(
            default,
            label=label,
            info=info,
            minimum=low,
            maximum=meta(setting, "le"),
            precision=0 if kind is int else None,
            elem_id=elem_id,
        )
    return gr.Textbox("" if default is None else str(default), label=label, info=info, elem_id=elem_id)


def _option_component(ctl: OptionControl, elem_id: str) -> gr.Component:
    if ctl.kind == "slider":
        return gr.Slider(
            ctl.minimum, ctl.maximum, value=ctl.default, step=ctl.step, label=ctl.label, elem_id=elem_id
        )
    if ctl.kind == "number":
        return gr.Number(ctl.default, label=ctl.label, elem_id=elem_id)
    if ctl.kind == "checkbox":
        return gr.Checkbox(ctl.default, label=ctl.label, elem_id=elem_id)
    return gr.Textbox(ctl.default, label=ctl.label, elem_id=elem_id)


def _wire_unit(k, c, controls, groups, detect, service: Service) -> None:
    """A unit's events: the annotator shows its options and re-annotates at once; a direct map or a drawing
    replaces the photo (the condition is the photo's map while a photo is there, ui/form.py)."""
    key = lambda name: unit_key(k, name)  # noqa: E731
    photo, annotator, cond_map = c[key("photo")], c[key("annotator")], c[key("map")]
    names = list(groups)
    option_comps = [comp for _, comp in controls]

    def show_options(name):
        return [gr.update(visible=(n == name)) for n in names]

    annotator.change(show_options, annotator, [groups[n] for n in names], queue=False, api_visibility="private")

    def annotate(image, name, resolution, *raw):
        if image is None or not name or name == NO_ANNOTATOR:
            return gr.skip()
        try:
            # the API's limits (serve/images.py, Service.check): gradio has decoded the upload, but no annotator
            # runs on more pixels than the API would decode (a 144 Mpx photo was annotated where the API said 413)
            check_pixels(*image.size, f"unit {k + 1} photo", service.max_pixels or MAX_IMAGE_PIXELS)
            options = collect_options(name, [ctl for ctl, _ in controls], list(raw), resolution)
            return service.run(AnnotationJob(name, image.convert("RGB"), options), timeout=ANNOTATE_TIMEOUT_S)
        except QueueFull as err:
            raise gr.Error(_busy(err, service)) from None
        except (ValueError, TimeoutError, JobCancelled) as err:
            raise gr.Error(f"unit {k + 1} {name}: {str(err).splitlines()[0]}") from None

    triggers = [photo.upload, annotator.change, detect.release] + [
        comp.release if isinstance(comp, gr.Slider) else comp.change for comp in option_comps
    ]
    # always_last: a change made while an annotation is pending (the photo still uploading when the annotator is
    # picked) runs once that one ends; gradio's default "once" would drop it and leave the map stale
    gr.on(
        triggers,
        annotate,
        [photo, annotator, detect, *option_comps],
        cond_map,
        api_visibility="private",
        concurrency_limit=4,
        concurrency_id="annotate",
        trigger_mode="always_last",
    )
    cond_map.upload(lambda: None, None, photo, queue=False, api_visibility="private")

    def show_union_type(name):
        """The union type selector for a union net; hidden (and back to "none") for a plain one."""
        union = _is_union(service, name)
        return gr.update(visible=union) if union else gr.update(visible=False, value=NO_UNION_TYPE)

    c[key("model")].change(show_union_type, c[key("model")], c[key("control_type")], api_visibility="private")

    def use_drawing(drawing):
        if not drawing or drawing.get("composite") is None:
            raise gr.Error(f"unit {k + 1}: nothing drawn yet")
        strokes = drawing["composite"].convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", strokes.size, "white"), strokes).convert("L")
        return Image.eval(flat, lambda v: 255 - v).convert("RGB"), None  # scribble maps are white on black

    c[key("use_sketch")].click(use_drawing, c[key("sketch")], [cond_map, photo], api_visibility="private")

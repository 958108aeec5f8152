"""The page of ``kandinsky ui``: a Gradio app on one :class:`~kandinsky.ui.handlers.Studio` (one pipeline).

    kandinsky ui --weights tiny                      # http://127.0.0.1:7860, offline, noise images
    kandinsky ui --lora runs/cats:0.8 --port 8000

    kandinsky ui --weights tiny --model 2.2          # Kandinsky 2.2: one more tab, ControlNet

Tabs: Text to image, Image to image, Inpaint (the mask painted on the image: painted = repaint), Mix, with 2.2
weights ControlNet (a hint image, e.g. a depth map; with a start image: ControlNet image to image), History.
Each task tab has its prompt, its settings and a Generate and a Stop button; its images are the PNG files the
pipeline's metadata was written into (:func:`kandinsky.png.save_png`), served as they are, so that a downloaded
image carries its prompt, seed and settings. Every generation goes through Gradio's queue, one at a time.

API (``gradio_client``): ``/text2img`` (``prompt``, ``negative_prompt``, ``seed``, ``steps``, ``guidance``,
``width``, ``height``, ``sampler``, ``prior_steps``, ``prior_guidance``, ``num_images``, ``adapters``) returns
the image files; ``/img2img`` (+ ``image``, ``strength``), ``/inpaint`` (+ ``image``: the editor's
``{"background", "layers"}``; returns the images and the mask used) and ``/mix`` (``prompt1..4``,
``image1..4``, ``weight1..4``) likewise; with 2.2 weights ``/controlnet`` (+ ``hint``, optional ``image`` and
``strength``: with an image it runs ``controlnet_img2img``).

A new task is one more entry of :data:`TABS`: a function that builds its task inputs in the tab and returns them
with its event handler (see :func:`_text2img_inputs`), with its settings and pipeline call in
:mod:`kandinsky.ui.handlers`.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry, no version check

import gradio as gr  # noqa: E402

from kandinsky.ui.handlers import (MAX_IMAGES, MULTIPLE, SAMPLERS, Stopped, Studio, add_to_history,  # noqa: E402
                                   available_tasks, describe, format_adapters, size_note)
from kandinsky.settings import default_guidance  # noqa: E402
from kandinsky.validation import MAX_IMAGE_SIDE  # noqa: E402

log = logging.getLogger("kandinsky.ui")
TITLES = {"text2img": "Text to image", "img2img": "Image to image", "inpaint": "Inpaint", "mix": "Mix",
          "controlnet": "ControlNet"}
MIX_SLOTS = 4
CONCURRENCY = "generate"  # every generating event shares one queue slot: one job at a time


def _guarded(call, skipped: int = 1):
    """Run ``call()``; what goes wrong is a message in the page and the server goes on. A generation ended by
    Stop is a warning, and its ``skipped`` outputs keep what they showed."""
    try:
        return call()
    except gr.Error:
        raise
    except Stopped as stopped:
        gr.Warning(f"Generation {stopped}.", title="Stopped")
        return gr.skip() if skipped == 1 else (gr.skip(),) * skipped
    except ValueError as error:
        raise gr.Error(str(error), title="Invalid input", print_exception=False) from None
    except Exception as error:  # a runtime failure (out of memory, ...): logged, reported, not fatal
        log.exception("generation failed")
        raise gr.Error(f"{type(error).__name__}: {error}", title="Generation failed", print_exception=False) from None


def _gallery(result) -> list[tuple[str, str]]:
    many = len(result.paths) > 1
    return [(str(p), f"seed {result.seed}" + (f" · #{i}" if many else "")) for i, p in enumerate(result.paths)]


class _Page:
    """The page under construction: the studio, the tabs' components that events cross between."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.defaults = {"steps": 100, "prior_steps": 25, "width": 512, "height": 512, **studio.defaults}
        self.tasks = available_tasks(studio.pipe)
        self.targets: dict[str, dict] = {}  # task -> components a "Send to" button fills
        self.senders: list[tuple] = []  # (gallery, selected index, its two "Send to" buttons) of each gallery
        self.tabs = None
        self.history = None
        self.history_gallery = None

    # ---- the shared controls ----------------------------------------------------------------------------

    def controls(self, task: str) -> dict:
        """The settings of a task tab: sampler, steps, guidance, the prior's, size, seed, images, adapters."""
        d = self.defaults
        guidance = default_guidance(task, self.studio.model)  # 2.1's img2img: 7, else 4
        with gr.Row():
            sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler", elem_id=f"{task}-sampler")
            steps = gr.Number(d["steps"], label="Steps", info="decoder steps", elem_id=f"{task}-steps")
            guidance = gr.Number(guidance, label="Guidance", info="decoder guidance scale (<= 1: none)",
                                 elem_id=f"{task}-guidance")
        with gr.Row():
            prior_steps = gr.Number(d["prior_steps"], label="Prior steps", elem_id=f"{task}-prior-steps")
            prior_guidance = gr.Number(4.0, label="Prior guidance", elem_id=f"{task}-prior-guidance")
        with gr.Row():
            width, height = (gr.Slider(MULTIPLE, MAX_IMAGE_SIDE, d[side], step=MULTIPLE, label=side.capitalize(),
                                       elem_id=f"{task}-{side}") for side in ("width", "height"))
        note = gr.Markdown(f"Size: {size_note(d['height'], d['width'])}", elem_id=f"{task}-size-note")
        for side in (width, height):
            side.change(lambda w, h: f"Size: {size_note(h, w)}", [width, height], note, queue=False,
                        api_visibility="private", show_progress="hidden")
        with gr.Row():
            seed = gr.Number(-1, label="Seed", info="-1: a random seed (the one used is shown with the images)",
                             elem_id=f"{task}-seed")
            num_images = gr.Slider(1, MAX_IMAGES, 1, step=1, label="Images", elem_id=f"{task}-num-images")
        adapters = gr.Textbox(format_adapters(self.studio.adapters), label="Adapters", lines=2,
                              placeholder="PATH[:SCALE], one a line (LoRA files of kandinsky train)",
                              info="LoRA adapters and their scales, one PATH[:SCALE] a line; empty: none",
                              interactive=self.studio.adapter_paths or bool(self.studio.adapters),
                              elem_id=f"{task}-adapters")
        return dict(sampler=sampler, steps=steps, guidance=guidance, prior_steps=prior_steps,
                    prior_guidance=prior_guidance, width=width, height=height, seed=seed, num_images=num_images,
                    adapters=adapters)

    def results(self, task: str) -> dict:
        """A task tab's results: the images, the seed used, a summary and the "Send to" buttons."""
        gallery = gr.Gallery(label="Images", columns=2, height=420, object_fit="contain", format="png",
                             buttons=["download", "fullscreen"], interactive=False, elem_id=f"{task}-gallery")
        mask = None
        if task == "inpaint":
            mask = gr.Image(label="Mask used", type="filepath", format="png", interactive=False, height=160,
                            elem_id="inpaint-mask")
        with gr.Row():
            seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id=f"{task}-seed-used")
            reuse = gr.Button("Reuse seed", size="sm")
        info = gr.Markdown(elem_id=f"{task}-info")
        self.send_buttons(gallery, task)
        return dict(gallery=gallery, mask=mask, seed_used=seed_used, reuse=reuse, info=info)

    def send_buttons(self, gallery, name: str) -> None:
        selected = gr.State(0)
        gallery.select(_selected, None, selected, queue=False, api_visibility="private")
        gallery.change(lambda: 0, None, selected, queue=False, api_visibility="private")
        with gr.Row():
            to_img2img = gr.Button("Send to image to image", size="sm", visible="img2img" in self.tasks,
                                   elem_id=f"{name}-to-img2img")
            to_inpaint = gr.Button("Send to inpaint", size="sm", visible="inpaint" in self.tasks,
                                   elem_id=f"{name}-to-inpaint")
        self.senders.append((gallery, selected, to_img2img, to_inpaint))

    # ---- events -----------------------------------------------------------------------------------------

    def wire(self, task: str, button, stop, handler, inputs: dict, controls: dict, results: dict) -> None:
        outputs = [results["gallery"]] + ([results["mask"]] if results["mask"] is not None else [])
        event = button.click(handler, inputs_kwargs={**inputs, **controls}, outputs=outputs, api_name=task,
                             concurrency_limit=1, concurrency_id=CONCURRENCY,
                             show_progress_on=[results["gallery"]])
        event.success(_show, [results["gallery"], self.history],
                      [results["seed_used"], results["info"], self.history, self.history_gallery],
                      queue=False, api_visibility="private")
        stop.click(self._stop, None, None, queue=False, api_visibility="private")
        results["reuse"].click(_reuse, results["seed_used"], controls["seed"], queue=False,
                               api_visibility="private")

    def _stop(self, request: gr.Request):
        if self.studio.stop(_session(request)):
            gr.Info("Stopping at the next step")
        else:
            gr.Info("Nothing to stop")

    def generate(self, task: str, request, progress, *, inputs: dict, controls: dict):
        del progress  # Gradio tracks the samplers' tqdm bars (one step each): the progress bar

        def run():
            result = self.studio.generate(task, session=_session(request), **inputs, **controls)
            gallery = _gallery(result)
            return gallery if result.mask is None else (gallery, str(result.mask))

        return _guarded(run, skipped=2 if task == "inpaint" else 1)

    def connect_senders(self) -> None:
        for gallery, selected, to_img2img, to_inpaint in self.senders:
            for button, task in ((to_img2img, "img2img"), (to_inpaint, "inpaint")):
                if task not in self.targets:
                    continue
                target = self.targets[task]
                button.click(_send(task), [gallery, selected],
                             [target["image"], target["width"], target["height"], self.tabs],
                             queue=False, api_visibility="private", show_progress="hidden")


def _session(request) -> object:
    return getattr(request, "session_hash", None)


def _selected(event: gr.SelectData):
    return event.index


def _reuse(seed_used: str):
    try:
        return int(seed_used)
    except (TypeError, ValueError):
        return gr.skip()


def _show(gallery, history):
    """After a generation: the seed and summary read back from the first image's PNG metadata, the history."""
    paths = [item[0] if isinstance(item, (tuple, list)) else item for item in gallery or []]
    if not paths:
        return "", "", history, history
    seed, summary = describe(paths[0])
    history = add_to_history(history, paths)
    return seed, summary, history, history


def _send(task: str):
    def send(gallery, selected):
        items = gallery or []
        if not items:
            raise gr.Error("No image to send: generate one first", title="Nothing to send", print_exception=False)
        index = selected if isinstance(selected, int) and 0 <= selected < len(items) else 0
        item = items[index]
        path = item[0] if isinstance(item, (tuple, list)) else item
        width, height = _image_size(path)
        return path, width, height, gr.Tabs(selected=task)

    return send


def _image_size(image) -> tuple:
    """An image's (or an editor value's background's) width and height, rounded up to multiples of 64, for the
    size sliders; gr.skip() for nothing."""
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("background")
    if image is None:
        return gr.skip(), gr.skip()
    if isinstance(image, Image.Image):
        width, height = image.size
    else:
        with Image.open(image) as opened:
            width, height = opened.size
    side = lambda v: min(MAX_IMAGE_SIDE, -(-v // MULTIPLE) * MULTIPLE)  # noqa: E731
    return side(width), side(height)


# ---- the task tabs ------------------------------------------------------------------------------------------
# Each builds its task's inputs (in the tab) and returns (inputs: {parameter name: component}, handler); the
# handler's keyword parameters are the API's parameter names.


def _prompts(task: str) -> dict:
    return {"prompt": gr.Textbox(label="Prompt", lines=2, placeholder="what to draw", elem_id=f"{task}-prompt"),
            "negative_prompt": gr.Textbox("", label="Negative prompt", placeholder="what the image should not show",
                                          elem_id=f"{task}-negative-prompt")}


def _text2img_inputs(page: _Page):
    inputs = _prompts("text2img")

    def text2img(request: gr.Request, progress=gr.Progress(track_tqdm=True), *, prompt: str,
                 negative_prompt: str = "", seed=-1, steps=100, guidance=4.0, width=512, height=512,
                 sampler: str = "ddim", prior_steps=25, prior_guidance=4.0, num_images=1, adapters: str = ""):
        return page.generate("text2img", request, progress,
                             inputs=dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed, adapters=adapters),
                             controls=dict(steps=steps, guidance=guidance, width=width, height=height, sampler=sampler,
                                           prior_steps=prior_steps, prior_guidance=prior_guidance,
                                           num_images=num_images))

    return inputs, text2img


def _img2img_inputs(page: _Page):
    image = gr.Image(label="Image", type="pil", image_mode="RGB", sources=["upload", "clipboard"], format="png",
                     height=320, elem_id="img2img-image")
    inputs = {"image": image, **_prompts("img2img"),
              "strength": gr.Slider(0.01, 1.0, 0.3, step=0.01, label="Strength",
                                    info="how much to change: 1 repaints from noise", elem_id="img2img-strength")}

    def img2img(request: gr.Request, progress=gr.Progress(track_tqdm=True), *, image, prompt: str,
                negative_prompt: str = "", strength=0.3, seed=-1, steps=100, guidance=7.0, width=512, height=512,
                sampler: str = "ddim", prior_steps=25, prior_guidance=4.0, num_images=1, adapters: str = ""):
        return page.generate("img2img", request, progress,
                             inputs=dict(image=image, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                         adapters=adapters),
                             controls=dict(strength=strength, steps=steps, guidance=guidance, width=width,
                                           height=height, sampler=sampler, prior_steps=prior_steps,
                                           prior_guidance=prior_guidance, num_images=num_images))

    return inputs, img2img


def _inpaint_inputs(page: _Page):
    editor = gr.ImageMask(label="Image and mask (paint the part to repaint)", type="pil", image_mode="RGBA",
                          sources=["upload", "clipboard"], format="png", layers=False, transforms=(),
                          brush=gr.Brush(colors=[("#ffffff", 0.75)], color_mode="fixed", default_size=24),
                          canvas_size=(512, 512), height=420, elem_id="inpaint-editor")
    inputs = {"image": editor, **_prompts("inpaint")}

    def inpaint(request: gr.Request, progress=gr.Progress(track_tqdm=True), *, image, prompt: str,
                negative_prompt: str = "", seed=-1, steps=100, guidance=4.0, width=512, height=512,
                sampler: str = "ddim", prior_steps=25, prior_guidance=4.0, num_images=1, adapters: str = ""):
        return page.generate("inpaint", request, progress,
                             inputs=dict(editor=image, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                         adapters=adapters),
                             controls=dict(steps=steps, guidance=guidance, width=width, height=height,
                                           sampler=sampler, prior_steps=prior_steps, prior_guidance=prior_guidance,
                                           num_images=num_images))

    return inputs, inpaint


def _mix_inputs(page: _Page):
    from kandinsky.ui.handlers import mix_inputs

    gr.Markdown("Mix prompts and images: each slot with an image mixes the image, else its prompt; empty slots are "
                "left out. Weights are used as given (the references' weights sum to 1).")
    inputs = {}
    for slot in range(1, MIX_SLOTS + 1):
        with gr.Row(equal_height=True):
            inputs[f"prompt{slot}"] = gr.Textbox("", label=f"Prompt {slot}", scale=3, elem_id=f"mix-prompt{slot}")
            inputs[f"image{slot}"] = gr.Image(label=f"Image {slot}", type="pil", image_mode="RGB",
                                              sources=["upload", "clipboard"], format="png", height=120, scale=2,
                                              elem_id=f"mix-image{slot}")
            inputs[f"weight{slot}"] = gr.Number(0.5 if slot <= 2 else 0.0, label=f"Weight {slot}", scale=1,
                                                elem_id=f"mix-weight{slot}")
    inputs["negative_prompt"] = gr.Textbox("", label="Negative prompt", placeholder="what the image should not show",
                                           elem_id="mix-negative-prompt")

    def mix(request: gr.Request, progress=gr.Progress(track_tqdm=True), *, prompt1: str = "", image1=None,
            weight1=0.5, prompt2: str = "", image2=None, weight2=0.5, prompt3: str = "", image3=None, weight3=0.0,
            prompt4: str = "", image4=None, weight4=0.0, negative_prompt: str = "", seed=-1, steps=100,
            guidance=4.0, width=512, height=512, sampler: str = "ddim", prior_steps=25, prior_guidance=4.0,
            num_images=1, adapters: str = ""):
        def run():
            items, weights = mix_inputs([prompt1, prompt2, prompt3, prompt4], [image1, image2, image3, image4],
                                        [weight1, weight2, weight3, weight4])
            return page.generate("mix", request, progress,
                                 inputs=dict(items=items, weights=weights, negative_prompt=negative_prompt, seed=seed,
                                             adapters=adapters),
                                 controls=dict(steps=steps, guidance=guidance, width=width, height=height,
                                               sampler=sampler, prior_steps=prior_steps,
                                               prior_guidance=prior_guidance, num_images=num_images))

        return _guarded(run)

    return inputs, mix


def _controlnet_inputs(page: _Page):
    gr.Markdown("Kandinsky 2.2's ControlNet: an image of the prompt that follows the hint (a depth map: white = "
                "near). With a start image, that image is repainted (ControlNet image to image).")
    with gr.Row():
        hint = gr.Image(label="Hint (depth map)", type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                        format="png", height=240, elem_id="controlnet-hint")
        image = gr.Image(label="Start image (optional)", type="pil", image_mode="RGB",
                         sources=["upload", "clipboard"], format="png", height=240, elem_id="controlnet-image")
    inputs = {"hint": hint, "image": image, **_prompts("controlnet"),
              "strength": gr.Slider(0.01, 1.0, 0.3, step=0.01, label="Strength",
                                    info="with a start image: how much to change", elem_id="controlnet-strength")}

    def controlnet(request: gr.Request, progress=gr.Progress(track_tqdm=True), *, hint, prompt: str, image=None,
                   negative_prompt: str = "", strength=0.3, seed=-1, steps=100, guidance=4.0, width=512, height=512,
                   sampler: str = "ddim", prior_steps=25, prior_guidance=4.0, num_images=1, adapters: str = ""):
        task = "controlnet" if image is None else "controlnet_img2img"
        controls = dict(steps=steps, guidance=guidance, width=width, height=height, sampler=sampler,
                        prior_steps=prior_steps, prior_guidance=prior_guidance, num_images=num_images)
        if image is not None:
            controls["strength"] = strength
        return page.generate(task, request, progress,
                             inputs=dict(hint=hint, image=image, prompt=prompt, negative_prompt=negative_prompt,
                                         seed=seed, adapters=adapters),
                             controls=controls)

    return inputs, controlnet


TABS = {"text2img": _text2img_inputs, "img2img": _img2img_inputs, "inpaint": _inpaint_inputs, "mix": _mix_inputs,
        "controlnet": _controlnet_inputs}


def build_app(studio: Studio) -> gr.Blocks:
    """The page on ``studio``: a tab per task the pipeline runs, and the session's history."""
    page = _Page(studio)
    weights = (studio.pipe.components.source or {}).get("source", "?")
    with gr.Blocks(title=f"Kandinsky {studio.model}", analytics_enabled=False) as demo:
        gr.Markdown(f"## Kandinsky {studio.model} · weights `{weights}`")
        page.history = gr.State([])
        with gr.Tabs() as page.tabs:
            wiring = []
            for task in page.tasks:
                if task not in TABS:
                    continue
                with gr.Tab(TITLES.get(task, task), id=task):
                    with gr.Row():
                        with gr.Column(scale=3):
                            inputs, handler = TABS[task](page)
                            with gr.Row():
                                button = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
                                stop = gr.Button("Stop", variant="stop", elem_id=f"{task}-stop")
                            controls = page.controls(task)
                        with gr.Column(scale=2):
                            results = page.results(task)
                if "image" in inputs:
                    page.targets[task] = {"image": inputs["image"], "width": controls["width"],
                                          "height": controls["height"]}
                    inputs["image"].upload(_image_size, inputs["image"], [controls["width"], controls["height"]],
                                           queue=False, api_visibility="private", show_progress="hidden")
                wiring.append((task, button, stop, handler, inputs, controls, results))
            with gr.Tab("History", id="history"):
                gr.Markdown("This session's images, newest first (they stay in the output folder: "
                            f"`{studio.output_dir}`).")
                page.history_gallery = gr.Gallery(label="History", columns=6, height=480, object_fit="contain",
                                                  format="png", buttons=["download", "fullscreen"],
                                                  interactive=False, fit_columns=False, elem_id="history-gallery")
                page.send_buttons(page.history_gallery, "history")
        for args in wiring:
            page.wire(*args)
        page.connect_senders()
    return demo


def launch(weights: str, *, adapters=(), host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           device: str | None = None, dtype: str = "auto", output_dir: str | None = None,
           model: str | None = None) -> None:
    """Load the pipeline once, then serve the page on ``host:port`` until interrupted (a public gradio.live
    link only with ``share``; a shared page takes only the adapters given here). ``model``: "2.1" or "2.2"
    (default: detected from ``weights``; 2.2 adds the ControlNet tab)."""
    studio = Studio.load(weights, device=device, dtype=dtype, adapters=adapters, output_dir=output_dir,
                         adapter_paths=not share, model=model)
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1)
    print(f"images are written to {studio.output_dir}", flush=True)
    demo.launch(server_name=host, server_port=port, share=share, inbrowser=False, show_error=True,
                allowed_paths=[str(studio.output_dir)], ssr_mode=False, footer_links=["api", "gradio"])

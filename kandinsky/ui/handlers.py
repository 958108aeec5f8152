"""The web UI's work, without gradio: plain functions and one :class:`Studio` that :mod:`kandinsky.ui.app`
wires to the page, and that the unit tests call directly.

* One pipeline per server, loaded once (:meth:`Studio.load`) and shared by every request; one generation at a
  time (a lock, under Gradio's one-job queue).
* A request is validated by the CLI's code: :func:`task_settings` builds the task's settings dataclass of
  :mod:`kandinsky.settings`; a bad value is a ``ValueError`` naming the control as the page labels it
  (``Steps: expected an integer in 1..999 ...``), which the page shows as a message.
* Images are written with :func:`kandinsky.png.save_png` (the pipeline's metadata, the CLI's schema) and served
  as those files, never re-encoded: a downloaded image says how it was made (``kandinsky info``).
* :meth:`Studio.stop` ends a session's generation at its next decoder step (:class:`Stopped`).

Adding a task: a settings class in :data:`SETTINGS` (a Kandinsky 2.2 task: :data:`SETTINGS_22`), a branch in
:meth:`Studio._call` and a tab in :mod:`kandinsky.ui.app` (its ``TABS``); :func:`available_tasks` offers a task
only when the loaded pipeline has its method. With 2.2 weights (``kandinsky ui --model 2.2``) the ControlNet tab
runs ``controlnet`` (a hint image) or, given a start image, ``controlnet_img2img``.
"""

from __future__ import annotations

import itertools
import math
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kandinsky.png import read_png_metadata, save_png
from kandinsky.settings import (DECODER_SAMPLERS, ControlNetImg2ImgSettings, ControlNetSettings, Img2ImgSettings,
                                InpaintSettings, MixSettings, Text2ImgSettings, rounded_size)

# task -> its settings (kandinsky.settings) and the pipeline method that runs it
SETTINGS = {"text2img": Text2ImgSettings, "img2img": Img2ImgSettings, "inpaint": InpaintSettings,
            "mix": MixSettings}
# and those of Kandinsky 2.2 weights: the same tasks, and ControlNet (one tab: a start image makes it img2img)
SETTINGS_22 = {**SETTINGS, "controlnet": ControlNetSettings, "controlnet_img2img": ControlNetImg2ImgSettings}
TASKS = tuple(SETTINGS_22)
SAMPLERS = DECODER_SAMPLERS
# the page's controls (= the API's parameter names) -> the settings' fields
FIELDS = {"steps": "num_inference_steps", "guidance": "guidance_scale", "prior_steps": "prior_num_inference_steps",
          "prior_guidance": "prior_guidance_scale", "width": "width", "height": "height", "sampler": "sampler",
          "num_images": "num_images_per_prompt", "strength": "strength"}
# the settings' fields (and the pipeline's arguments) as the page labels them, for the messages
LABELS = {"num_inference_steps": "Steps", "guidance_scale": "Guidance", "prior_num_inference_steps": "Prior steps",
          "prior_guidance_scale": "Prior guidance", "width": "Width", "height": "Height", "sampler": "Sampler",
          "num_images_per_prompt": "Images", "strength": "Strength", "prompt": "Prompt",
          "negative_prompt": "Negative prompt", "weights": "Weights", "images_and_prompts": "Mix",
          "image": "Image", "mask_image": "Mask", "negative_prior_prompt": "Negative prompt", "hint": "Hint"}
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
RANDOM_SEEDS = 2**31  # a random seed (-1) is drawn below this, as the CLI does
MAX_IMAGES = 16  # images per request: a server's bound, beyond the settings' own checks
MAX_HISTORY = 200  # images kept in a session's history
MULTIPLE = 64  # sizes are rounded up to multiples of 64 px (the MoVQ's factor 8, squared)


class Stopped(Exception):
    """A generation ended by :meth:`Studio.stop` between two sampler steps."""


def labelled(message: str) -> str:
    """A settings or pipeline error (``num_inference_steps: expected ...``) in the page's words (``Steps: ...``)."""
    name, sep, rest = message.partition(": ")
    return f"{LABELS[name]}: {rest}" if sep and name in LABELS else message


def whole(value):
    """A float with an integer value (what a number field or a JSON client may send) as an ``int``."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def task_settings(task: str, *, model: str = "2.1", **values):
    """The settings of ``task`` from the page's controls (``steps``, ``guidance``, ``prior_steps``,
    ``prior_guidance``, ``width``, ``height``, ``sampler``, ``num_images``, ``strength``), validated by
    :mod:`kandinsky.settings` as the CLI's are: a bad value is a ``ValueError`` naming the control. ``model``
    "2.2" also takes the ControlNet tasks, and its img2img guides at 4 when no guidance is given (2.1: 7)."""
    from kandinsky.settings import default_guidance

    tasks = SETTINGS_22 if model == "2.2" else SETTINGS
    if task not in tasks:
        raise ValueError(f"task: expected one of {list(tasks)}, got {task!r}")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"{unknown}: not controls of the page; expected some of {sorted(FIELDS)}")
    fields = {FIELDS[name]: whole(value) for name, value in values.items() if value is not None}
    images = fields.get("num_images_per_prompt")
    if isinstance(images, int) and not isinstance(images, bool) and images > MAX_IMAGES:
        raise ValueError(f"Images: expected an integer in 1..{MAX_IMAGES}, got {images}")
    fields.setdefault("guidance_scale", default_guidance(task, model))
    try:
        return tasks[task](**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(labelled(str(error))) from None


def parse_seed(value) -> int:
    """The seed of a request: -1 (or nothing) draws a random one in [0, 2**31); else an integer in
    [0, 2**64 - 1]."""
    value = whole(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == -1):
        return secrets.randbelow(RANDOM_SEEDS)
    if isinstance(value, str):
        try:
            return parse_seed(int(value.strip()))
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED:
        return value
    raise ValueError(f"Seed: expected -1 (random) or an integer in [0, 2**64 - 1], got {value!r}")


def parse_adapters(text: str | None) -> list[tuple[str, float]]:
    """The adapters field: one ``PATH[:SCALE]`` per line (the CLI's ``--lora``; scale 1 by default), in order."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise ValueError(f"Adapters: expected lines of PATH[:SCALE], got {type(text).__name__}")
    adapters = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        path, _, scale = line.rpartition(":")
        if path and not Path(line).exists():
            try:
                value = float(scale)
            except ValueError:
                raise ValueError(f"Adapters: line {number}: expected PATH or PATH:SCALE with a number SCALE, "
                                 f"got {line!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"Adapters: line {number}: expected a finite SCALE, got {scale!r}")
            adapters.append((path, value))
        else:
            adapters.append((line, 1.0))
    return adapters


def format_adapters(adapters: Sequence[tuple[str, float]]) -> str:
    """The adapters field's text for ``adapters`` (:func:`parse_adapters` reads it back)."""
    return "\n".join(f"{path}:{scale:g}" for path, scale in adapters)


def size_note(height, width) -> str:
    """What the page says of a requested size: the size made (rounded up to multiples of 64 px), or why it
    cannot be made."""
    height, width = whole(height), whole(width)
    try:
        made = rounded_size(height, width)
    except ValueError as error:
        return labelled(str(error))
    if made == (height, width):
        return f"{width} × {height} px (sizes are multiples of {MULTIPLE} px; others are rounded up)"
    return f"{width} × {height} px is made as {made[1]} × {made[0]} px (rounded up to multiples of {MULTIPLE} px)"


def editor_inputs(value) -> tuple:
    """The image and the mask painted on it, from an image editor's value (``{"background", "layers",
    "composite"}`` of PIL images): the background flattened on white (RGB) and the mask, white (255) where any
    layer is painted (alpha >= 128: the pipeline's binarisation at 0.5), black elsewhere ("L")."""
    import numpy as np
    from PIL import Image

    background = value.get("background") if isinstance(value, dict) else None
    if background is None:
        raise ValueError("Image: expected an image to paint the mask on (upload one, or send a result here)")
    background = _pil(background)
    flat = Image.new("RGBA", background.size, "white")
    flat.alpha_composite(background.convert("RGBA"))
    painted = np.zeros(background.size[::-1], dtype=bool)
    for layer in value.get("layers") or []:
        layer = _pil(layer)
        if layer.size != background.size:
            layer = layer.resize(background.size, Image.NEAREST)
        alpha = np.asarray(layer.convert("RGBA"))[..., 3]
        painted |= alpha >= 128
    if not painted.any():
        raise ValueError("Mask: nothing painted: paint over the part of the image to repaint")
    return flat.convert("RGB"), Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")


def mix_inputs(prompts: Sequence[str | None], images: Sequence, weights: Sequence) -> tuple[list, list[float]]:
    """The items of a mix and their weights from the page's slots: a slot with an image mixes the image, else
    a slot with a prompt mixes the prompt, else it is left out."""
    items, chosen = [], []
    for number, (prompt, image, weight) in enumerate(zip(prompts, images, weights), 1):
        if image is not None:
            items.append(_pil(image).convert("RGB"))
        elif isinstance(prompt, str) and prompt.strip():
            items.append(prompt.strip())
        else:
            continue
        weight = whole(weight)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"Weight {number}: expected a number, got {weight!r}")
        chosen.append(float(weight))
    if not items:
        raise ValueError("Mix: expected at least one prompt or image to mix")
    return items, chosen


def _pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            opened.load()
            return opened
    import numpy as np

    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise ValueError(f"Image: expected an image, got {type(image).__name__}")


def available_tasks(pipe) -> list[str]:
    """The tasks the pipeline can run (a task whose method it lacks gets no tab)."""
    return [task for task in TASKS if callable(getattr(pipe, task, None))]


def describe(path: str | Path, *, requested: bool = True) -> tuple[str, str]:
    """The seed (as text) and a one-line summary of how the image at ``path`` was made, read from its PNG
    metadata (what the page shows of a result)."""
    from PIL import Image

    metadata = read_png_metadata(path)
    settings = metadata["settings"]
    with Image.open(path) as image:
        width, height = image.size
    seed = "" if metadata["seed"] is None else str(metadata["seed"])
    parts = [f"seed {seed or 'unknown'}", f"{width} × {height} px"]
    if requested and (settings.get("width"), settings.get("height")) != (width, height):
        parts[-1] += (f" (asked {settings.get('width')} × {settings.get('height')}: rounded up to multiples of "
                      f"{MULTIPLE})")
    parts.append(f"{settings.get('sampler')}, {settings.get('num_inference_steps')} steps, "
                 f"guidance {settings.get('guidance_scale'):g}")
    if "prior_num_inference_steps" in settings:
        parts.append(f"prior {settings['prior_num_inference_steps']} steps, "
                     f"guidance {settings['prior_guidance_scale']:g}")
    if "strength" in settings:
        parts.append(f"strength {settings['strength']:g}")
    adapters = settings.get("adapters") or []
    if adapters:
        parts.append("adapters " + ", ".join(f"{Path(a['path']).name} × {a['scale']:g}" for a in adapters))
    return seed, " · ".join(parts)


def add_to_history(history: list | None, paths: Sequence) -> list:
    """The session's history with ``paths`` (newest first; those it holds already stay where they are), at
    most :data:`MAX_HISTORY` images."""
    history = list(history or [])
    new = [str(p[0] if isinstance(p, (tuple, list)) else p) for p in paths]
    return ([p for p in new if p not in history] + history)[:MAX_HISTORY]


@dataclass
class Result:
    """A finished generation: the PNG files (with the pipeline's metadata), the seed, the images, the mask that
    was used (inpainting, a plain PNG) and the seconds it took."""

    paths: list[Path]
    seed: int
    images: list = field(repr=False)
    mask: Path | None = None
    seconds: float = 0.0


class Studio:
    """The server's one pipeline, its adapters, the output folder and the sessions' Stop flags.

    ``adapters``: ``[(path, scale), ...]`` loaded at once (the CLI's ``--lora``; errors before the page opens).
    ``adapter_paths``: whether a request may name adapter files (else only the scales of these may change:
    what a public ``--share`` link allows)."""

    def __init__(self, pipe, *, output_dir: str | Path | None = None, adapters: Sequence[tuple[str, float]] = (),
                 adapter_paths: bool = True, defaults: dict | None = None):
        self.pipe = pipe
        self.output_dir = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="kandinsky-ui-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.adapter_paths = adapter_paths
        self.default_adapters = [(str(p), float(s)) for p, s in adapters]
        self.defaults = dict(defaults or {})
        source = getattr(getattr(pipe, "components", None), "source", None) or {}
        self.model = "2.2" if source.get("model") == "2.2" else "2.1"  # the Kandinsky version of the weights
        self.lock = threading.Lock()
        self._loaded: list[tuple[str, float]] = []
        self._stops: dict[object, threading.Event] = {}
        self._stops_lock = threading.Lock()
        self._count = itertools.count(_next_number(self.output_dir))
        self.set_adapters(self.default_adapters)

    @classmethod
    def load(cls, weights: str, *, device: str | None = None, dtype: str = "auto",
             adapters: Sequence[tuple[str, float]] = (), output_dir: str | Path | None = None,
             adapter_paths: bool = True, progress: bool = True, model: str | None = None) -> Studio:
        """The pipeline of ``weights`` (a hub repository, a folder, ``"tiny"`` / ``"tiny:SEED"``) on ``device``
        (default cuda if available) in ``dtype`` (``"auto"``: float16 on CUDA, float32 otherwise); ``model``
        "2.1" or "2.2" (default: detected from ``weights``, as the CLI does: tiny is 2.1)."""
        import torch

        from kandinsky.hub import detect_model
        from kandinsky.pipeline import Kandinsky21, Kandinsky22

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "float16" if torch.device(device).type == "cuda" else "float32"
        cls_ = Kandinsky22 if (model or detect_model(weights)) == "2.2" else Kandinsky21
        pipe = cls_.from_pretrained(weights, device=device, dtype=getattr(torch, dtype), progress=progress)
        return cls(pipe, output_dir=output_dir, adapters=adapters, adapter_paths=adapter_paths,
                   defaults=defaults_for(weights))

    # ---- adapters ---------------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[tuple[str, float]]:
        """The adapters loaded now: ``[(path, scale), ...]``."""
        return list(self._loaded)

    def set_adapters(self, adapters: Sequence[tuple[str, float]] | str | None) -> None:
        """Make ``adapters`` (``[(path, scale), ...]`` or the adapters field's text; None: keep) the loaded ones,
        reloading only when they change. A file that cannot be loaded is a ``ValueError`` and the previous
        adapters stay."""
        if adapters is None:
            return
        wanted = parse_adapters(adapters) if isinstance(adapters, str) else [(str(p), float(s)) for p, s in adapters]
        if wanted == self._loaded:
            return
        if not self.adapter_paths:
            allowed = {path for path, _ in self.default_adapters}
            extra = sorted({path for path, _ in wanted} - allowed)
            if extra:
                raise ValueError(f"Adapters: this server only takes the adapters it was started with "
                                 f"({sorted(allowed) or 'none'}), got {extra}")
        previous = self._loaded
        try:
            self._load(wanted)
        except ValueError as error:
            self._load(previous)
            raise ValueError(f"Adapters: {error}") from None

    def _load(self, adapters: list[tuple[str, float]]) -> None:
        self.pipe.unload_lora()
        self._loaded = []
        for path, scale in adapters:
            self.pipe.load_lora(path, scale)
            self._loaded.append((path, scale))

    # ---- Stop -------------------------------------------------------------------------------------------

    def stop(self, session=None) -> bool:
        """End ``session``'s generation at its next decoder step; False when it has none running."""
        with self._stops_lock:
            event = self._stops.get(session)
        if event is None:
            return False
        event.set()
        return True

    def running(self, session=None) -> bool:
        with self._stops_lock:
            return session in self._stops

    # ---- generation -------------------------------------------------------------------------------------

    def generate(self, task: str, *, prompt: str = "", negative_prompt: str | None = None, seed=-1,
                 adapters: Sequence[tuple[str, float]] | str | None = None, image=None, mask=None, editor=None,
                 items: Sequence = (), weights: Sequence[float] = (), hint=None, session=None,
                 on_step: Callable[[int, int], None] | None = None, **controls) -> Result:
        """Run ``task`` with the page's ``controls`` (see :func:`task_settings`) and write its images.

        ``image`` (img2img, inpaint, controlnet_img2img), ``mask`` or ``editor`` (inpaint: an image editor's
        value, image and mask in one), ``items`` and ``weights`` (mix), ``hint`` (controlnet, controlnet_img2img:
        a depth map). ``on_step(step, total)`` after each decoder step. Every input is checked before the pipeline
        runs; a bad one is a ``ValueError`` in the page's words."""
        settings = task_settings(task, model=self.model, **controls)
        seed = parse_seed(seed)
        prompt = _text("Prompt", prompt)
        negative_prompt = _text("Negative prompt", negative_prompt) or None
        if task in ("controlnet", "controlnet_img2img"):
            if hint is None:
                raise ValueError("Hint: expected a hint image (a depth map: white = near)")
            hint = _pil(hint).convert("RGB")
        if task in ("img2img", "inpaint", "controlnet_img2img"):
            if editor is not None:
                image, mask = editor_inputs(editor)
            if image is None:
                raise ValueError("Image: expected an input image (upload one, or send a result here)")
            image = _pil(image).convert("RGB")
            if task == "inpaint":
                if mask is None:
                    raise ValueError("Mask: expected a mask (paint it on the image)")
                mask = _pil(mask).convert("L")
        if task == "mix" and not items:
            raise ValueError("Mix: expected at least one prompt or image to mix")
        stop = threading.Event()
        with self._stops_lock:
            self._stops[session] = stop
        try:
            with self.lock:
                if stop.is_set():
                    raise Stopped("stopped before it started")
                self.set_adapters(adapters)
                return self._run(task, settings, seed, stop, on_step, prompt=prompt, negative_prompt=negative_prompt,
                                 image=image, mask=mask, items=list(items), weights=list(weights), hint=hint)
        finally:
            with self._stops_lock:
                if self._stops.get(session) is stop:
                    del self._stops[session]

    def _run(self, task, settings, seed, stop, on_step, **inputs) -> Result:
        import torch

        total = _decoder_steps(settings)

        def callback(i, t, x, x0):
            if on_step is not None:
                on_step(i + 1, total)
            if stop.is_set():
                raise Stopped(f"stopped after decoder step {i + 1} of {total}")

        kwargs = settings.kwargs()
        kwargs["sampler_options"] = {"callback": callback}
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        try:
            images = self._call(task, kwargs, generator, **inputs)
        except Stopped:
            raise
        except ValueError as error:
            raise ValueError(labelled(str(error))) from None
        number = next(self._count)
        paths = []
        for index, picture in enumerate(images):
            path = self.output_dir / f"{number:05d}-{task}-{seed}-{index}.png"
            save_png(picture, path)  # the pipeline's metadata, as the CLI writes it
            paths.append(path)
        mask_path = None
        if task == "inpaint":
            mask_path = self.output_dir / f"{number:05d}-{task}-{seed}-mask.png"
            save_png(inputs["mask"], mask_path, {})
        return Result(paths, seed, list(images), mask_path, time.perf_counter() - start)

    def _call(self, task, kwargs, generator, *, prompt, negative_prompt, image, mask, items, weights, hint=None):
        pipe = self.pipe
        if task == "text2img":
            return pipe.text2img(prompt, negative_prompt, generator=generator, **kwargs)
        if task == "img2img":
            strength = kwargs.pop("strength")
            return pipe.img2img(prompt, image, strength, negative_prompt, generator=generator, **kwargs)
        if task == "inpaint":
            return pipe.inpaint(prompt, image, mask, negative_prompt, generator=generator, **kwargs)
        if task == "mix":
            return pipe.mix(items, weights, negative_prompt=negative_prompt or "", generator=generator, **kwargs)
        if task == "controlnet":
            return pipe.controlnet(prompt, hint, negative_prompt, generator=generator, **kwargs)
        if task == "controlnet_img2img":
            strength = kwargs.pop("strength")
            return pipe.controlnet_img2img(prompt, image, hint, strength, negative_prompt, generator=generator,
                                           **kwargs)
        raise ValueError(f"task: expected one of {list(TASKS)}, got {task!r}")


def defaults_for(weights: str) -> dict:
    """The page's starting values: the CLI's defaults, smaller for the tiny random weights (noise, by design,
    at any size: small is quick)."""
    from kandinsky.hub import tiny_seed

    if tiny_seed(weights) is not None:
        return {"steps": 20, "prior_steps": 10, "width": 128, "height": 128}
    return {"steps": 100, "prior_steps": 25, "width": 512, "height": 512}


def _decoder_steps(settings) -> int:
    steps = settings.num_inference_steps
    if settings.task in ("img2img", "controlnet_img2img"):
        return min(int(steps * settings.strength), steps)
    return steps


def _text(label: str, value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{label}: expected text, got {type(value).__name__}")
    return value


def _next_number(folder: Path) -> int:
    """The number of the next request's files in ``folder`` (after those already there)."""
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(numbers, default=-1) + 1

"""The PNG files we write: the one metadata schema that says how an image was made, a reader for it, and an
atomic writer. Light on purpose (PIL only, no torch): the CLI and ``batch`` use it before any model loads.

    from kandinsky import save_png
    images = pipe.text2img("a cat", generator=torch.Generator().manual_seed(0))
    save_png(images[0], "cat.png")  # the metadata the pipeline put in images[0].info
    read_png_metadata("cat.png")    # {"prompt": "a cat", "seed": 0, "settings": {...}, ...}

The schema (text chunks; docs/generation.md documents every settings key): ``Software`` (package and version),
``prompt``, ``negative_prompt`` (when there is one), ``seed`` (when the generator's seed reproduces the call),
``image_index`` (the row of the call) and ``settings``, a JSON object: the task and every field of its settings
dataclass (:mod:`kandinsky.settings`), ``dtype``, ``weights`` (source and revision), ``adapters`` (path,
component, scale and SHA-256 of each), ``version`` (of this package) and the task's other inputs that are not
images (mix: ``weights`` of the items is stored as ``mix_weights``, with ``negative_prior_prompt``).
Every path that writes an image (the pipeline's PIL outputs, ``kandinsky generate``, ``batch``, the web UI)
writes exactly these chunks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PNG_TEXT_KEYS = ("Software", "prompt", "negative_prompt", "seed", "image_index", "settings")


def png_text(prompt: str, seed: int | None, index: int, settings: dict,
             negative_prompt: str | None = None) -> dict[str, str]:
    """The text chunks every image of ours carries (``kandinsky generate``, ``batch`` and the PIL images the
    pipeline returns, in their ``info``): software, prompt, negative prompt, seed, image index and the settings
    as JSON. The seed is left out when it is not known (a generator that had drawn before the call)."""
    from kandinsky import __version__

    text = {"Software": f"kandinsky21 {__version__}", "prompt": prompt}
    if negative_prompt:
        text["negative_prompt"] = negative_prompt
    if seed is not None:
        text["seed"] = str(seed)
    text["image_index"] = str(index)
    text["settings"] = json.dumps(settings, sort_keys=True, default=str)
    return text


def recorded_settings(settings: dict, *, dtype, source: dict, adapters: list[dict], **inputs) -> dict:
    """The ``settings`` JSON object of the schema: the task's validated ``settings`` (its ``recorded()``), the
    weight dtype, where the weights came from, the adapters and the task's other inputs (``inputs``)."""
    from kandinsky import __version__

    values = dict(settings)
    values.update(dtype=str(dtype).removeprefix("torch."), weights=dict(source), adapters=list(adapters),
                  version=__version__)
    for name, value in inputs.items():
        if value is not None:
            values["mix_weights" if name == "weights" else name] = value
    return values


def read_png_metadata(path: str | os.PathLike) -> dict:
    """What a PNG of ours says of how it was made: ``{"software", "prompt", "negative_prompt", "seed",
    "image_index", "settings"}`` (``seed`` an int or None, ``settings`` a dict). A file without our chunks is a
    ``ValueError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None
    if "settings" not in text or "prompt" not in text:
        raise ValueError(f"{path}: no kandinsky metadata (prompt and settings text chunks)")
    try:
        settings = json.loads(text["settings"])
        seed = int(text["seed"]) if "seed" in text else None
        index = int(text.get("image_index", 0))
    except ValueError as error:
        raise ValueError(f"{path}: damaged kandinsky metadata ({error})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: damaged kandinsky metadata (settings is not a JSON object)")
    return {"software": text.get("Software"), "prompt": text["prompt"], "negative_prompt": text.get("negative_prompt"),
            "seed": seed, "image_index": index, "settings": settings}


def png_metadata(prompt: str, seed: int | None, index: int, settings: dict, negative_prompt: str | None = None):
    """:func:`png_text` as the ``PngInfo`` that :func:`save_png` writes."""
    return _png_info(png_text(prompt, seed, index, settings, negative_prompt))


def _png_info(text: dict[str, str]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        if key == "settings":
            info.add_itxt(key, value)
        else:
            info.add_text(key, value)  # iTXt when not Latin-1
    return info


def save_png(image, path: str | os.PathLike, info=None) -> None:
    """Write the PIL ``image`` to ``path`` as a PNG, atomically: a hidden partial file beside it, flushed to
    disk, then renamed over ``path`` (an interrupted write leaves the previous file, if any, as it was).

    ``info``: a ``PngInfo`` or a dict of text chunks (another image's ``info``); by default the image's own metadata (``image.info``, where the pipeline puts
    the prompt, seed and settings of each image it returns, as the CLI writes them)::

        images = pipe.text2img("a cat", generator=torch.Generator().manual_seed(0))
        save_png(images[0], "cat.png")
    """
    path = Path(path)
    if info is None or isinstance(info, dict):  # an image's own info, or another's (a grid of results)
        text = image.info if info is None else info
        info = _png_info({key: str(text[key]) for key in PNG_TEXT_KEYS if key in text})
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:  # Ctrl-C included: no partial file stays behind
        partial.unlink(missing_ok=True)
        raise

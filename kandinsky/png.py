"""The PNG files we write: the text chunks that say how an image was made (prompt, seed, settings), and an
atomic writer. Light on purpose (PIL only, no torch): the CLI and ``batch`` use it before any model loads.

    from kandinsky import save_png
    images = pipe.text2img("a cat", generator=torch.Generator().manual_seed(0))
    save_png(images[0], "cat.png")  # the metadata the pipeline put in images[0].info
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

    ``info``: a ``PngInfo``; by default the image's own metadata (``image.info``, where the pipeline puts
    the prompt, seed and settings of each image it returns, as the CLI writes them)::

        images = pipe.text2img("a cat", generator=torch.Generator().manual_seed(0))
        save_png(images[0], "cat.png")
    """
    path = Path(path)
    if info is None:
        info = _png_info({key: str(image.info[key]) for key in PNG_TEXT_KEYS if key in image.info})
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

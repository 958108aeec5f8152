"""The tiny components (:mod:`kandinsky.tiny`) saved in our layout, and tiny image-caption data sets, shared by the
training tests. Training images are 64 px: 8 x 8 latents through the tiny MoVQ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from kandinsky import tiny
from kandinsky.components import Components

RESOLUTION = 64  # px; the tiny MoVQ halves it three times
EMBED_DIM = tiny.PROJECTION  # CLIP image embeddings of the tiny pipeline
EMBED_DIM_22 = tiny.WIDTH_22  # those of the tiny Kandinsky 2.2
CAPTIONS = ("a red cat", "the blue sea", "a green tree", "the cat and the sea")


def write_tiny_base(folder: Path, seed: int = 0) -> Path:
    """The tiny components saved in our layout at ``folder``."""
    Components.from_config("tiny", seed=seed).save_pretrained(folder)
    return folder


def write_tiny_base_22(folder: Path, seed: int = 0) -> Path:
    """The tiny Kandinsky 2.2 components (:func:`kandinsky.tiny.components_22`) saved in our layout at ``folder``
    (those our weight files hold)."""
    from kandinsky.weights import KINDS

    parts = {name: module for name, module in tiny.components_22(seed).items() if name in KINDS}
    Components(**parts).save_pretrained(folder)
    return folder


def write_images(folder: Path, count: int = 4, size: int = 80, seed: int = 0) -> list[Path]:
    """``count`` smooth random RGB images (``size`` x ``size + 16`` px, so the center crop matters)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size + 16, size), Image.BICUBIC)
        path = folder / f"image_{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def write_jsonl_data(folder: Path, count: int = 4) -> Path:
    """A folder with ``metadata.jsonl`` (the imagefolder convention)."""
    paths = write_images(folder, count)
    lines = [json.dumps({"file_name": p.name, "text": CAPTIONS[i % len(CAPTIONS)]}) for i, p in enumerate(paths)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def corrupt_png_stream(path: Path) -> Path:
    """Damage the compressed pixel data of the PNG at ``path`` in place, keeping every chunk's checksum valid:
    PIL's ``verify`` (headers and checksums) passes, decoding fails."""
    import struct
    import zlib

    data = path.read_bytes()
    out, position = bytearray(data[:8]), 8
    while position < len(data):
        length, kind = struct.unpack(">I", data[position:position + 4])[0], data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        if kind == b"IDAT":
            body = bytes(b ^ 0x5A for b in body)
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        position += 12 + length
    path.write_bytes(bytes(out))
    return path

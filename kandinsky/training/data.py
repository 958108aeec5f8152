"""Training data: image-caption records, the frozen encoders' outputs (computed on the fly or cached once in
safetensors shards), conditioning dropout, random inpainting masks, and the per-sample random draws that make
any number of processes train exactly like one.

Data formats (``--data``):

* a folder with ``metadata.jsonl``, one ``{"file_name": "cat.png", "text": "a cat"}`` per line (the Hugging
  Face imagefolder convention; ``file_name`` relative to the folder);
* a folder of images, each with a same-stem ``.txt`` caption beside it (``cat.png`` + ``cat.txt``), searched
  recursively;
* a CSV file with ``image_name`` and ``caption`` columns, as the original trainers read (relative image paths
  are taken from the CSV's folder).

Images are center-cropped to a square and resized (PIL bicubic) to ``resolution`` for the MoVQ, as the
original decoder dataset does; CLIP sees the uncropped image through its own preprocessing (shortest side to
224, center crop).

Random draws: everything random about one training sample (its timestep, its noise, whether its text or image
conditioning is dropped, its inpainting mask) comes from a generator keyed by ``(seed, step, index)``, ``index``
being the sample's position in the global batch; the data order is a permutation per epoch keyed by
``(seed, epoch)``. So the draws do not depend on how the global batch is split across processes, nor on
whether a run was interrupted and resumed.

Loading: :class:`StepBatches` is the micro-batches of one process as a map-style dataset (the cached rows or
the images read and preprocessed, and the draws), read through a :class:`torch.utils.data.DataLoader`
(:func:`step_loader`) whose workers prepare the next micro-batches while the training process computes; whatever
the number of workers, each micro-batch is the same.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kandinsky.images import IMAGE_SUFFIXES, load_image
from kandinsky.schedulers import NUM_TRAIN_TIMESTEPS

if TYPE_CHECKING:
    from kandinsky.components import Components

CACHE_FORMAT = "kandinsky21-train-cache"
CACHE_INDEX = "index.json"
NULL_FILE = "null.safetensors"
# what each task's frozen encoders produce per sample (the cache stores exactly these): Kandinsky 2.1's decoders
# (image and M-CLIP text), 2.2's (image only), the prior (both versions)
FEATURES = {
    "decoder": ("latents", "image_embeds", "text_embeds", "text_hidden_states"),
    "decoder_22": ("latents", "image_embeds"),
    "prior": ("image_embeds", "text_embeds", "text_hidden_states", "text_mask"),
}
# the feature whose per-sample shape the noise takes (the latents of a decoder, the image embedding of the prior)
NOISE_LIKE = {"decoder": "latents", "decoder_22": "latents", "prior": "image_embeds"}
# spawn-key prefixes of the two random streams (different lengths as well, so they never coincide)
_SAMPLE_STREAM, _ORDER_STREAM = 0, 1


# ------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One training example: an image file and its caption."""

    image: Path
    caption: str


def read_records(data: str | os.PathLike, *, allow_outside: bool = False) -> list[Record]:
    """The (image, caption) records of ``data`` (see the module docstring for the three formats), in a
    fixed order: the file's order for ``metadata.jsonl`` and CSV, sorted paths for ``.txt`` captions.

    Every image (and caption) path is resolved, symbolic links included, against the folder it is relative to
    (the data folder, the CSV's folder) and refused if it leaves it, unless ``allow_outside`` (then absolute
    paths, ``..`` and links out of the folder are followed). Errors are one ``ValueError`` naming the file and
    line."""
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ValueError(f"data: expected a folder or a .csv file, got the file {path}")
        records = _read_csv(path, allow_outside)
    elif path.is_dir():
        jsonl = path / "metadata.jsonl"
        records = _read_jsonl(jsonl, allow_outside) if jsonl.is_file() else _read_txt(path, allow_outside)
    else:
        raise ValueError(f"data: no such folder or file {path}")
    if not records:
        raise ValueError(f"data: no images with captions in {path}")
    folders = [str(r.image) for r in records if r.image.is_dir()]
    if folders:
        raise ValueError(f"data: {len(folders)} image path(s) listed in {path} are folders, not image files, "
                         f"e.g. {folders[:3]}")
    missing = [str(r.image) for r in records if not r.image.is_file()]
    if missing:
        raise ValueError(f"data: {len(missing)} image file(s) listed in {path} do not exist, e.g. {missing[:3]}")
    return records


def _text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark, as spreadsheets and some editors write, dropped);
    undecodable bytes are a ValueError naming the file and line."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"data: cannot read {path}: {error.strerror or error}") from None
    lines = raw.splitlines(keepends=True)
    decoded = []
    for number, line in enumerate(lines, 1):
        try:
            decoded.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"data: {path} line {number} is not UTF-8 text ({error.reason} at byte "
                             f"{error.start}); save it as UTF-8") from None
    return decoded


def _read_jsonl(path: Path, allow_outside: bool) -> list[Record]:
    records = []
    for number, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"data: {path} line {number} is not JSON: {error}") from None
        if not (isinstance(row, dict) and isinstance(row.get("file_name"), str) and isinstance(row.get("text"), str)):
            raise ValueError(f"data: {path} line {number}: expected {{\"file_name\": str, \"text\": str}}, "
                             f"got {line.strip()[:200]}")
        image = contained(path.parent, row["file_name"], f"{path} line {number}: file_name", allow_outside)
        records.append(Record(image, row["text"]))
    return records


def _read_txt(folder: Path, allow_outside: bool) -> list[Record]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"data: {folder} has no metadata.jsonl and no images ({', '.join(IMAGE_SUFFIXES)})")
    uncaptioned = [str(p) for p in images if not p.with_suffix(".txt").is_file()]
    if uncaptioned:
        raise ValueError(f"data: {folder} has no metadata.jsonl, and {len(uncaptioned)} image(s) have no same-stem "
                         f".txt caption, e.g. {uncaptioned[:3]}")
    records = []
    for image in images:
        caption = image.with_suffix(".txt")
        for file in (image, caption):
            contained(folder, file.relative_to(folder), str(file), allow_outside)
        records.append(Record(image, "".join(_text_lines(caption)).strip()))
    return records


def _read_csv(path: Path, allow_outside: bool) -> list[Record]:
    reader = csv.DictReader(_text_lines(path))
    columns = reader.fieldnames or []
    if "image_name" not in columns or "caption" not in columns:
        raise ValueError(f"data: {path} needs the columns 'image_name' and 'caption', has {columns}")
    records = []
    for row in reader:
        where = f"{path} line {reader.line_num}"
        name = row["image_name"]
        if not name:
            raise ValueError(f"data: {where}: image_name is empty")
        records.append(Record(contained(path.parent, name, f"{where}: image_name", allow_outside),
                              row["caption"] or ""))
    return records


def contained(folder: Path, name: str | os.PathLike, where: str, allow_outside: bool = False) -> Path:
    """``name`` (a path relative to ``folder``, or absolute) as a path; unless ``allow_outside``, a
    ValueError naming ``where`` if it leaves ``folder`` once resolved (``..``, an absolute path elsewhere, a
    symbolic link pointing out)."""
    given = Path(name).expanduser()
    path = given if given.is_absolute() else folder / given
    if not allow_outside and not path.resolve().is_relative_to(folder.resolve()):
        how = "is an absolute path outside" if given.is_absolute() else "leaves"
        raise ValueError(f"data: {where}: {str(name)!r} {how} the folder {folder} (pass --allow-outside-paths "
                         "to accept paths outside it)")
    return path


def check_images(records: Sequence[Record], rank: int = 0, world_size: int = 1) -> None:
    """Open every ``world_size``-th image of ``records`` from ``rank`` on and check it cheaply (its header and
    size, PIL's ``verify``; no decoding): unreadable files and decompression bombs are a ValueError naming the
    file, before any training step. Some damage (a corrupt compressed stream with intact checksums) shows only
    when an image is decoded; the run then stops at that step."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    for record in records[rank::world_size]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(record.image) as image:
                    image.verify()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise ValueError(f"data: {record.image}: refused as a decompression bomb ({error})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
            raise ValueError(f"data: {record.image}: cannot read image ({error})") from None


def training_pixels(image, resolution: int) -> torch.Tensor:
    """A PIL image -> (3, resolution, resolution) float32 in [-1, 1]: the largest centered square, resized
    with PIL bicubic (as the original decoder dataset)."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.convert("RGB").crop((left, top, left + side, top + side))
    resized = square.resize((resolution, resolution), resample=Image.BICUBIC, reducing_gap=1)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1


# ------------------------------------------------------------------------------------------------- random draws


def _seed(*key: int) -> np.random.SeedSequence:
    seed, *rest = key
    return np.random.SeedSequence(seed, spawn_key=tuple(rest))


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, count: int) -> torch.Tensor:
    """The permutation of ``count`` records used in ``epoch`` (int64, (count,))."""
    generator = torch.Generator().manual_seed(int(_seed(seed, _ORDER_STREAM, epoch).generate_state(1, np.uint64)[0]))
    return torch.randperm(count, generator=generator)


def batch_records(seed: int, step: int, batch_size: int, count: int) -> list[int]:
    """Record indices of the global batch of optimizer step ``step`` (0-based): positions ``step * batch_size``
    ... of the endless sequence of epochs, each epoch a fresh permutation."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        indices.append(int(epoch_order(seed, epoch, count)[offset]))
    return indices


@dataclass
class SampleDraws:
    """The random choices for one sample of the global batch."""

    timestep: int  # 0..999 of the training schedule, uniform
    noise: torch.Tensor  # standard normal, float32, the shape asked for
    text_dropped: bool
    image_dropped: bool
    inpaint_mask: np.ndarray | None  # (h, w) float32, 1 = known latent pixel; inpainting only


def draw_sample(seed: int, step: int, index: int, noise_shape: Sequence[int], *, text_dropout: float,
                image_dropout: float = 0.0, mask_size: tuple[int, int] | None = None) -> SampleDraws:
    """The draws of sample ``index`` of the global batch at ``step``, from generators keyed by
    ``(seed, step, index)`` alone: the same on any process, in any run."""
    key = _seed(seed, _SAMPLE_STREAM, step, index)
    generator = torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0]))
    uniforms = torch.rand(2, generator=generator, dtype=torch.float64)
    timestep = int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=generator))
    noise = torch.randn(tuple(noise_shape), generator=generator)
    mask = None
    if mask_size is not None:
        mask = inpaint_mask(*mask_size, np.random.default_rng(key.spawn(1)[0]))
    return SampleDraws(timestep, noise, bool(uniforms[0] < text_dropout), bool(uniforms[1] < image_dropout), mask)


# ------------------------------------------------------------------------------------------------- inpainting masks


def inpaint_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random inpainting mask of the original trainer, (height, width) float32, drawn at the latent size;
    1 = known latent pixel given to the model, 0 = to generate (the original's ``1 - generate_mask(...)``).

    The recipe of the original ``train_utils/utils.py``:

    * a box: its width uniform in [0.1, 0.62] of the latent width, its height equal to its width (the
      original's ``get_boxes`` uses the x size for both), placed uniformly;
    * with probability 0.1 the known region is that box;
    * otherwise two fair coins decide between a *blob* (a smoothed random 16-gon around the box's center, radii
      about 0.75 of the box size, clipped to [0.1, 0.6] of the shorter side) and a *frame* (the border outside a
      smoothed random square or circle that leaves 5-30 % / 10-25 % margins on each side): blob only (1/4),
      frame only (1/4) or both (1/2). Known = inside the blob, or on the frame's border.

    The closed curves are smoothed with a periodic Catmull-Rom spline (4 points per edge) where the original
    uses scipy's quadratic interpolation, and rasterised at integer pixel coordinates as its ``contains_points``.
    """
    hole = np.zeros((height, width), dtype=bool)  # the original's mask == 0: what the model is given
    box_size = (0.62 - 0.1) * width * rng.random() + 0.1 * width
    x0 = (width - 0.62 * width) * rng.random()
    y0 = (height - 0.62 * height) * rng.random()
    box = (x0, y0, x0 + box_size, y0 + box_size)
    if rng.random() < 0.1:
        left, top, right, bottom = (int(v) for v in box)
        hole[top:bottom, left:right] = True
        return hole.astype(np.float32)
    coins = rng.integers(0, 2, size=2)
    if 0 in coins:
        hole |= _blob(height, width, box, rng)
    if 1 in coins:
        hole |= ~_frame_interior(height, width, rng)
    return hole.astype(np.float32)


def _blob(height: int, width: int, box: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    vertices = 16
    center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    quarter = np.linspace(1.5 * (box[2] - box[0]) / 2, 1.5 * (box[3] - box[1]) / 2, vertices // 4)
    quarter = np.clip(quarter, 0.1 * min(height, width), 0.6 * min(height, width))
    radii = np.concatenate([quarter, quarter[::-1], quarter, quarter[::-1]])
    return _random_polygon(height, width, center, radii, radius_spread=0.15, angle_spread=0.15, rng=rng)


def _frame_interior(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    spread = 0.15 * rng.random()
    vertices = int(rng.choice([16, 32]))
    per_side = vertices // 4
    center = (width // 2, height // 2)
    if rng.random() < 0.5:  # a rounded square: corner radii toward the diagonal, side radii toward the sides
        up, down, left, right = 0.25 * rng.random(4) + 0.05
        diagonal = math.hypot(width, height)

        def side(scale: float, size: float) -> np.ndarray:
            return np.linspace(diagonal * (1 - scale) // 2, size * (1 - scale) // 2, per_side // 2)

        r, d, lft, u = side(right, width), side(down, height), side(left, width), side(up, height)
        radii = np.concatenate([r[::-1], d, d[::-1], lft, lft[::-1], u, u[::-1], r])
    else:  # a rounded circle: constant radius per side
        up, down, left, right = 0.15 * rng.random(4) + 0.1
        r, d = np.full(per_side, width * (1 - right) // 2), np.full(per_side, height * (1 - down) // 2)
        lft, u = np.full(per_side, width * (1 - left) // 2), np.full(per_side, height * (1 - up) // 2)
        radii = np.concatenate([r[per_side // 2:], d, lft, u, r[:per_side // 2]])
    return _random_polygon(height, width, center, radii, radius_spread=spread, angle_spread=0.0, rng=rng)


def _random_polygon(height: int, width: int, center: tuple[float, float], radii: np.ndarray, *,
                    radius_spread: float, angle_spread: float, rng: np.random.Generator) -> np.ndarray:
    """Pixels inside a smoothed star-shaped polygon: vertex angles in random steps around ``center``, radii
    ``radii`` perturbed by a normal of relative spread ``radius_spread`` (clipped to [0, 2 radii])."""
    count = len(radii)
    steps = rng.uniform(1 - angle_spread, 1 + angle_spread, size=count)
    angles = np.cumsum(2 * np.pi * steps / steps.sum())
    noisy = np.clip(rng.normal(radii, radius_spread * radii), 0, 2 * radii)
    x = center[0] + noisy * np.cos(angles)
    y = center[1] + noisy * np.sin(angles)
    x, y = _catmull_rom_closed(x), _catmull_rom_closed(y)
    return _inside(x, y, height, width)


def _catmull_rom_closed(values: np.ndarray, per_edge: int = 4) -> np.ndarray:
    """Points of the closed (periodic) Catmull-Rom curve through ``values``, ``per_edge`` per edge."""
    p0, p1, p2, p3 = (np.roll(values, shift) for shift in (1, 0, -1, -2))
    t = (np.arange(per_edge) / per_edge)[:, None]  # (per_edge, 1)
    points = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                    + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3)  # (per_edge, count)
    return points.T.reshape(-1)


def _inside(x: np.ndarray, y: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width) bool: the integer pixel coordinates inside the closed polygon (x, y) (even-odd rule)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    inside = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in zip(x, y, np.roll(x, -1), np.roll(y, -1)):
        if y1 == y2:
            continue
        crosses = (y1 > rows) != (y2 > rows)
        x_cross = x1 + (rows - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (cols < x_cross)
    return inside


# ------------------------------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class Preprocessing:
    """What the frozen encoders' inputs are made of, on the host (light and picklable: it runs in the data-loader
    workers): the images read (:func:`kandinsky.images.load_image`), the CLIP pixels (``clip_size``), for the
    decoders the cropped MoVQ pixels (``resolution``), the captions of the tasks that read text."""

    task: str
    resolution: int
    clip_size: int

    def read(self, records: Sequence[Record]) -> dict:
        """``{"clip_pixels": (B, 3, S, S)[, "pixels": (B, 3, R, R)][, "captions": [str]]}``, float32."""
        from kandinsky.text_encoders import preprocess_clip_images

        images = [load_image(r.image) for r in records]  # 16-bit scaled, alpha on white; errors name the file
        out: dict = {"clip_pixels": preprocess_clip_images(images, size=self.clip_size)}
        if self.task != "prior":
            out["pixels"] = torch.stack([training_pixels(image, self.resolution) for image in images])
        if self.task != "decoder_22":
            out["captions"] = [r.caption for r in records]
        return out


class Encoders:
    """The frozen encoders of one task, run without gradients on the modules of a
    :class:`~kandinsky.components.Components` (on its device and dtype). Per sample (float32 on the CPU):

    * ``"decoder"`` (Kandinsky 2.1): ``latents`` (4, R/8, R/8) MoVQ encoding of the cropped image,
      ``image_embeds`` (768,) CLIP image embedding, ``text_embeds`` (768,) and ``text_hidden_states`` (77, 1024)
      from M-CLIP;
    * ``"decoder_22"`` (Kandinsky 2.2): ``latents`` and ``image_embeds`` (1280,: CLIP ViT-bigG) only;
    * ``"prior"``: ``image_embeds`` raw CLIP image embedding, ``text_embeds``, ``text_hidden_states`` (77, width)
      and ``text_mask`` (77,) bool from the CLIP text tower.

    The modules are loaded on first use. :meth:`encode` is :meth:`run` of what :attr:`preprocessing` reads.
    """

    def __init__(self, components: Components, task: str, resolution: int):
        if task not in FEATURES:
            raise ValueError(f"task: expected one of {list(FEATURES)}, got {task!r}")
        self.components, self.task, self.resolution = components, task, resolution

    @property
    def preprocessing(self) -> Preprocessing:
        size = self.components.module("clip_vision").config.image_size
        return Preprocessing(self.task, self.resolution, size)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The per-sample shape of the feature the noise is drawn like (:data:`NOISE_LIKE`)."""
        if self.task == "prior":
            return (self.components.module("clip_vision").config.projection_dim,)
        movq = self.components.module("movq").config
        side = self.resolution // movq.downsample_factor
        return (movq.embed_dim, side, side)

    @torch.no_grad()
    def encode(self, records: Sequence[Record]) -> dict[str, torch.Tensor]:
        return {key: _to_cpu(value) for key, value in self.run(self.preprocessing.read(records)).items()}

    @torch.no_grad()
    def run(self, prepared: dict) -> dict[str, torch.Tensor]:
        """The features of :meth:`Preprocessing.read`'s output, on the encoders' device: float32 (the mask bool)."""
        components = self.components
        device, dtype = components.device, components.dtype
        vision = components.module("clip_vision")
        out = {"image_embeds": vision(prepared["clip_pixels"].to(device, dtype, non_blocking=True)).image_embeds}
        if self.task != "prior":
            pixels = prepared["pixels"].to(device, dtype, non_blocking=True)
            out["latents"] = components.module("movq").encode(pixels)
        if self.task != "decoder_22":
            out.update(self._text(list(prepared["captions"])))
        return {key: value if value.dtype == torch.bool else value.float() for key, value in out.items()}

    @torch.no_grad()
    def null(self) -> dict[str, torch.Tensor]:
        """What dropped conditioning becomes, one row each: the empty caption's text features and (decoders) the
        CLIP embedding of the all-zeros normalised image (the original datasets' dropped ``clip_image``, also
        the pipelines' default negative image embedding, 2.1's and 2.2's)."""
        from kandinsky.text_encoders import zero_image_embeds

        out = self._text([""]) if self.task != "decoder_22" else {}
        if self.task != "prior":
            out["image_embeds"] = zero_image_embeds(self.components.module("clip_vision"), 1)
        return {key: _to_cpu(value) for key, value in out.items()}

    def _text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        from kandinsky.text_encoders import encode_clip_text, encode_multilingual

        components = self.components
        if self.task == "decoder":
            embeds, hidden, _ = encode_multilingual(components.tokenizer("mclip_tokenizer"),
                                                    components.module("mclip"), captions)
            return {"text_embeds": embeds, "text_hidden_states": hidden}
        embeds, hidden, mask = encode_clip_text(components.tokenizer("clip_tokenizer"), components.module("clip_text"),
                                                captions)
        return {"text_embeds": embeds, "text_hidden_states": hidden, "text_mask": mask}


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cpu() if tensor.dtype == torch.bool else tensor.float().cpu()


class EncodedFeatures:
    """Features computed by the encoders when a batch asks for them (no cache): the images are read and
    preprocessed by :meth:`reader` (in the data-loader workers), the encoders run in the training process
    (:meth:`complete`, on its device)."""

    def __init__(self, records: Sequence[Record], encoders: Encoders):
        self.records, self.encoders = list(records), encoders
        self.null = encoders.null()
        self.sample_shape = encoders.sample_shape
        self._reader = RecordReader(self.records, encoders.preprocessing)

    def __len__(self) -> int:
        return len(self.records)

    def features(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.encoders.encode([self.records[i] for i in indices])

    def reader(self) -> RecordReader:
        """What the data-loader workers run: record indices -> the encoders' inputs."""
        return self._reader

    def complete(self, host: dict) -> dict[str, torch.Tensor]:
        """The features of what :meth:`reader` read, on the encoders' device."""
        return self.encoders.run(host)


@dataclass(frozen=True)
class RecordReader:
    """Record indices -> :meth:`Preprocessing.read` of those records (picklable, for the workers)."""

    records: Sequence[Record]
    preprocessing: Preprocessing

    def read(self, indices: Sequence[int]) -> dict:
        return self.preprocessing.read([self.records[i] for i in indices])


class CachedFeatures:
    """Features read from a cache folder written by :func:`build_cache` (memory-mapped safetensors shards). Light
    and picklable (each process opens the shards itself): the data-loader workers read the rows."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        index = read_cache_index(self.folder)
        if index is None:
            raise ValueError(f"cache: {self.folder} has no {CACHE_INDEX}: it was not built completely")
        self.count, self.shard_size, self.task = index["count"], index["shard_size"], index["task"]
        self.null = load_file(str(self.folder / NULL_FILE))
        self._files: dict = {}
        self._pid = os.getpid()
        shape = tuple(self._open(0).get_slice(NOISE_LIKE[self.task]).get_shape())
        self.sample_shape = shape[1:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # open files stay with the process that opened them

    def _open(self, shard: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked worker: its own handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            if len(self._files) >= 8:
                self._files.pop(next(iter(self._files)))
            self._files[shard] = safe_open(str(self.folder / _shard_name(shard)), framework="pt")
        return self._files[shard]

    def __len__(self) -> int:
        return self.count

    def features(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {key: [] for key in FEATURES[self.task]}
        for index in indices:
            shard, row = divmod(index, self.shard_size)
            try:
                file = self._open(shard)
                for key in rows:
                    rows[key].append(file.get_slice(key)[row:row + 1])
            except Exception as error:  # safetensors' own error type; a file changed or removed meanwhile
                raise ValueError(f"cache: {self.folder / _shard_name(shard)}: cannot read row {row} "
                                 f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); delete "
                                 f"the cache folder to rebuild it") from None
        return {key: torch.cat(values) for key, values in rows.items()}

    def reader(self) -> CachedFeatures:
        return self

    def read(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.features(indices)

    def complete(self, host: dict) -> dict[str, torch.Tensor]:
        return {key: host[key] for key in FEATURES[self.task]}


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def records_digest(records: Sequence[Record]) -> str:
    """SHA-256 of the records' image paths and captions, in order: a changed data set changes it."""
    listing = json.dumps([[str(r.image.resolve()), r.caption] for r in records]).encode()
    return hashlib.sha256(listing).hexdigest()


def cache_description(task: str, records: Sequence[Record], resolution: int, weights: dict) -> dict:
    """What a cache depends on: a cache is reused only when all of this is equal."""
    return {"format": CACHE_FORMAT, "version": 1, "task": task, "count": len(records),
            "resolution": resolution if task != "prior" else None, "weights": weights,
            "records_sha256": records_digest(records)}


def read_cache_index(folder: str | os.PathLike) -> dict | None:
    """The ``index.json`` of a cache folder (None if there is none yet); an unreadable one is a ValueError
    naming it."""
    path = Path(folder) / CACHE_INDEX
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(index, dict) or not isinstance(index.get("shard_size"), int) or index["shard_size"] < 1:
            raise ValueError("not a cache index")
        return index
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"cache: {path} is damaged ({error}); delete {Path(folder)} to rebuild the cache") from None


def cache_problems(folder: str | os.PathLike, description: dict) -> list[str]:
    """What is wrong with the complete cache in ``folder`` for ``description``: one line per damaged file (a
    shard or ``null.safetensors`` that is missing, truncated, or lacks rows or features), empty if it can be
    used as it is. Cheap: reads each file's header, not its data. Raises ValueError for a cache of other data,
    weights or settings (see :func:`cache_description`); call it only on a folder that has an index."""
    from safetensors import safe_open

    folder = Path(folder)
    index = read_cache_index(folder)
    if {k: index.get(k) for k in description} != description:
        raise ValueError(f"cache: {folder} holds features of other data, weights or settings "
                         f"({index.get('task')}, {index.get('count')} records, resolution "
                         f"{index.get('resolution')}); delete it or pass another --cache folder")
    keys = set(FEATURES[description["task"]])
    count, size = description["count"], index["shard_size"]
    problems, shapes = [], {}
    for shard in range(math.ceil(count / size)):
        name = _shard_name(shard)
        rows = min(size, count - shard * size)
        try:
            with safe_open(str(folder / name), framework="pt") as file:
                found = set(file.keys())
                if found != keys:
                    raise ValueError(f"features {sorted(found)}, expected {sorted(keys)}")
                for key in sorted(keys):
                    shape = tuple(file.get_slice(key).get_shape())
                    if shape[0] != rows or shapes.setdefault(key, shape[1:]) != shape[1:]:
                        raise ValueError(f"{key} of shape {shape}, expected {rows} rows of {shapes[key]}")
        except Exception as error:  # safetensors reports damage as its own error type
            problems.append(f"{name}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    try:
        with safe_open(str(folder / NULL_FILE), framework="pt") as file:
            if not set(file.keys()) <= keys or not file.keys():
                raise ValueError(f"features {sorted(file.keys())}")
    except Exception as error:
        problems.append(f"{NULL_FILE}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    return problems


def remove_damaged(folder: str | os.PathLike, problems: Sequence[str]) -> None:
    """Delete the files that :func:`cache_problems` found damaged and the index, so that :func:`build_cache`
    encodes those again (the other shards are kept)."""
    folder = Path(folder)
    for problem in problems:
        (folder / problem.split(":", 1)[0]).unlink(missing_ok=True)
    (folder / CACHE_INDEX).unlink(missing_ok=True)


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def build_cache(folder: str | os.PathLike, records: Sequence[Record], encoders: Encoders, description: dict, *,
                shard_size: int = 256, batch_size: int = 16, rank: int = 0, world_size: int = 1,
                barrier: Callable[[], None] = lambda: None, progress: bool = True,
                agree: Callable[[BaseException | None], None] = _raise) -> Path:
    """Encode every record once into ``folder`` (``shard-NNNNN.safetensors`` of ``shard_size`` samples each,
    ``null.safetensors``, and ``index.json`` written last); returns the folder.

    Processes share the work (shard ``s`` is written by rank ``s % world_size``); every file is written to a
    temporary name and renamed, so an interrupted build continues where it stopped. An existing complete cache
    is reused if ``description`` (see :func:`cache_description`) matches, else refused; check it with
    :func:`cache_problems` first (a damaged shard is not looked for here). ``agree(error)`` is called by every
    process after its share, with the error it met or None: under several processes it must raise on every
    process if any failed (:func:`kandinsky.training.loop.agreed`), so that none waits for the others forever.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    folder = Path(folder)
    index_path = folder / CACHE_INDEX
    if read_cache_index(folder) is not None:
        cache_problems(folder, description)  # raises for a cache of other data
        return folder
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cache: {folder} is a file, not a folder; pass another --cache folder")
    folder.mkdir(parents=True, exist_ok=True)

    def write(tensors: dict[str, torch.Tensor], name: str) -> None:
        temporary = folder / f".{name}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary))
        os.replace(temporary, folder / name)

    shards = math.ceil(len(records) / shard_size)
    mine = [s for s in range(rank, shards, world_size) if not (folder / _shard_name(s)).is_file()]
    bar = tqdm(total=sum(min(shard_size, len(records) - s * shard_size) for s in mine), desc="caching",
               unit="img", disable=not progress or rank != 0)
    failure = None
    try:
        for shard in mine:
            chunks = []
            for start in range(shard * shard_size, min((shard + 1) * shard_size, len(records)), batch_size):
                chunk = records[start:min(start + batch_size, (shard + 1) * shard_size, len(records))]
                chunks.append(encoders.encode(chunk))
                bar.update(len(chunk))
            write({key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}, _shard_name(shard))
        if rank == 0:
            write(encoders.null(), NULL_FILE)
    except Exception as error:  # every process learns of it (agree) before any waits at the barrier
        failure = error
    finally:
        bar.close()
    agree(failure)
    barrier()
    if rank == 0:
        temporary = folder / f".{CACHE_INDEX}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps({**description, "shard_size": shard_size, "shards": shards}, indent=2) + "\n")
        os.replace(temporary, index_path)
    barrier()
    return folder


# ------------------------------------------------------------------------------------------------- batches


def with_dropout(features: dict[str, torch.Tensor], null: dict[str, torch.Tensor], text_dropped: torch.Tensor,
                 image_dropped: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``features`` (batch-first) with the rows of dropped samples replaced by ``null``'s single row: the text
    features where ``text_dropped`` (B,) is True, ``image_embeds`` where ``image_dropped`` (B,) is True."""
    out = dict(features)
    for key, value in features.items():
        if key in null and key != "image_embeds":
            drop = text_dropped
        elif key == "image_embeds" and image_dropped is not None and key in null:
            drop = image_dropped
        else:
            continue
        drop = drop.to(value.device).view(-1, *([1] * (value.ndim - 1)))
        out[key] = torch.where(drop, null[key].to(value.device, value.dtype), value)
    return out


def describe(error: BaseException) -> str:
    """An error as one line: an OSError as ``FILE: reason`` (never a bare ``[Errno N]``)."""
    if isinstance(error, OSError) and error.filename is not None:
        target = f" -> {error.filename2}" if error.filename2 is not None else ""
        return f"{error.filename}{target}: {error.strerror or error}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True)
class BatchPlan:
    """Which samples this process takes at each optimizer step: the global batch of ``step`` (``batch_size``
    samples, :func:`batch_records`), process ``rank`` of ``world_size`` its contiguous share, split into
    ``grad_accum`` micro-batches."""

    seed: int
    batch_size: int
    grad_accum: int
    count: int  # records
    rank: int = 0
    world_size: int = 1

    @property
    def per_process(self) -> int:
        return self.batch_size // self.world_size

    def micro_batch(self, step: int, index: int) -> tuple[list[int], list[int]]:
        """The positions in the global batch and the record indices of micro-batch ``index`` at ``step``."""
        micro = self.per_process // self.grad_accum
        records = batch_records(self.seed, step, self.batch_size, self.count)
        start = self.rank * self.per_process + index * micro
        positions = list(range(start, start + micro))
        return positions, [records[p] for p in positions]


@dataclass(frozen=True)
class DrawSettings:
    """What :func:`draw_sample` draws for each sample of a run."""

    seed: int
    text_dropout: float
    image_dropout: float = 0.0
    inpainting: bool = False


class StepBatches(torch.utils.data.Dataset):
    """The training data as a map-style dataset of micro-batches: item ``i`` is micro-batch ``i % grad_accum``
    of optimizer step ``i // grad_accum`` for this process (:class:`BatchPlan`), everything the host prepares
    for it: what ``reader`` reads for its records (cached features, or the encoders' inputs), and its random
    draws (timesteps, noise, dropout decisions, inpainting masks; keyed by (seed, step, position), so the same
    in any worker, any process, any run).

    An item is a dict of tensors (and captions); a data error (an image that cannot be decoded, a cache row
    that cannot be read) is returned as ``{"error": one line}`` for the training process to raise, so that every
    process stops together (``kandinsky.training.loop.agreed``)."""

    def __init__(self, reader, plan: BatchPlan, draws: DrawSettings, sample_shape: Sequence[int]):
        self.reader, self.plan, self.draws, self.sample_shape = reader, plan, draws, tuple(sample_shape)

    def __getitem__(self, index: int) -> dict:
        step, micro = divmod(index, self.plan.grad_accum)
        positions, records = self.plan.micro_batch(step, micro)
        try:
            item = dict(self.reader.read(records))
        except (ValueError, OSError) as error:
            return {"error": describe(error), "step": step}
        settings = self.draws
        mask_size = tuple(self.sample_shape[-2:]) if settings.inpainting else None
        draws = [draw_sample(settings.seed, step, p, self.sample_shape, text_dropout=settings.text_dropout,
                             image_dropout=settings.image_dropout, mask_size=mask_size) for p in positions]
        item.update(step=step, timesteps=torch.tensor([d.timestep for d in draws], dtype=torch.int64),
                    noise=torch.stack([d.noise for d in draws]),
                    text_dropped=torch.tensor([d.text_dropped for d in draws]),
                    image_dropped=torch.tensor([d.image_dropped for d in draws]))
        if settings.inpainting:
            item["inpaint_mask"] = torch.from_numpy(np.stack([d.inpaint_mask for d in draws]))[:, None]  # (B,1,h,w)
        return item


@dataclass(frozen=True)
class LoaderSettings:
    """How the micro-batches are prepared: ``workers`` processes (0: in the training process), each
    ``prefetch`` micro-batches ahead, copied into pinned memory with ``pin`` (training on CUDA)."""

    workers: int = 0
    prefetch: int = 2
    pin: bool = False


def step_loader(dataset: StepBatches, first: int, stop: int, settings: LoaderSettings,
                seed: int = 0) -> torch.utils.data.DataLoader:
    """A :class:`torch.utils.data.DataLoader` over the micro-batches ``first`` ... ``stop - 1`` of ``dataset`` in
    order (each item a whole micro-batch: no collation). Its workers live as long as the loader (one pass is a
    whole run), and its base seed comes from ``seed`` (no draw from the global generator: every random number
    of an item is keyed)."""
    workers = settings.workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(first, stop), num_workers=workers,
        prefetch_factor=settings.prefetch if workers else None, persistent_workers=workers > 0,
        pin_memory=settings.pin, generator=torch.Generator().manual_seed(seed))

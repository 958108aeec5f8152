"""Generation at scale: a prompt file -> one PNG per item and ``manifest.jsonl``, batched, resumable and split
across processes (``kandinsky batch``; see docs/generation.md).

    items = read_prompt_file("prompts.jsonl", Settings(steps=50), seed=0)
    run(items, "out", lambda: Kandinsky21.from_pretrained(...), batch_size=8)
    items = read_prompt_file("depth.jsonl", Settings(task="controlnet", model="2.2"))   # rows give a ``hint``
    run(items, "out22", lambda: Kandinsky22.from_pretrained(...), batch_size=8)

Kandinsky 2.1 and 2.2 (``Settings.model``) run the same tasks (text2img, img2img, inpaint) from the same prompt
files; 2.2 adds ControlNet (``controlnet``: rows name a ``hint`` image; ``controlnet_img2img``: an ``image`` and a
``hint``), and its img2img guides at 4 by default (2.1's at 7).

Reproducibility: every item draws all of its noise (the prior's and the decoder's start noise and the
stochastic samplers' per-step noise) from its own ``torch.Generator`` seeded with its seed (the ``seed``
column, else the run's seed + its index; :func:`kandinsky.schedulers.randn` draws row by row from a list of
generators). An image therefore depends on its item and settings only: not on the other prompts of its
batch, nor on how many processes share the work. What remains is float rounding of batched arithmetic:
images agree within about 1e-3 (in [0, 1]) between batch sizes and bit for bit at the same batch size,
because the batches are fixed by the file (consecutive items with the same settings, ``batch_size`` at
most) whatever the number of processes, and batch ``k`` goes to rank ``k % world_size``.

Files: a PNG is written to a hidden ``.NAME.png.partial`` file and renamed, so a killed run leaves no partial
image; a rerun skips the items whose PNG exists, reads back and was made from the same item and settings
(another one is an error, never overwritten). A batch with some of its images missing is generated whole
again so that the images stay bit-identical to an uninterrupted run. Each process appends one record per
image to ``manifest.parts/rank-NNNNN.jsonl`` before the rename; at the end rank 0 merges them, and what an
earlier run left, into ``manifest.jsonl`` (one record per finished item, in file order).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kandinsky.png import save_png

TASKS = ("text2img", "img2img", "inpaint", "controlnet", "controlnet_img2img")
CONTROLNET_TASKS = ("controlnet", "controlnet_img2img")  # Kandinsky 2.2 only
MODELS = ("2.1", "2.2")  # = kandinsky.settings.MODELS
# the input images each task's rows name (paths relative to the prompt file)
INPUTS = {"text2img": (), "img2img": ("image",), "inpaint": ("image", "mask"), "controlnet": ("hint",),
          "controlnet_img2img": ("image", "hint")}
PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")
MANIFEST = "manifest.jsonl"
PARTS = "manifest.parts"
MARKER = ".kandinsky-batch"  # marks a folder this package's batch runs write into
INDEX_DIGITS = 6  # 000000.png ...: names stay stable while a prompt file grows up to a million items


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message starts with ``FILE:LINE:``."""


@dataclass(frozen=True)
class Settings:
    """How an image is made. The run gives them all; a prompt-file row may override any but ``task``,
    ``crop``, ``mask_convention`` and ``model``. ``guidance=None`` is the task's default for the model (2.1's
    img2img 7, else 4: :func:`kandinsky.settings.default_guidance`). ``model``: the Kandinsky version the images
    are made with ("2.1" or "2.2"; the ControlNet tasks need "2.2")."""

    task: str = "text2img"
    steps: int = 100
    guidance: float | None = None
    prior_steps: int = 25
    prior_guidance: float = 4.0
    height: int = 512
    width: int = 512
    sampler: str = "ddim"
    strength: float = 0.3  # img2img only
    negative_prompt: str | None = None
    crop: bool = False
    mask_convention: str = "repaint"  # inpaint only
    model: str = "2.1"

    def __post_init__(self):
        if self.guidance is None:
            from kandinsky.settings import default_guidance

            object.__setattr__(self, "guidance", default_guidance(self.task, self.model))

    def task_settings(self):
        """The task's settings dataclass (:mod:`kandinsky.settings`): validated by the same code as the Python API
        and the CLI; a ValueError names the prompt-file column."""
        from kandinsky.settings import TASK_SETTINGS

        cls = TASK_SETTINGS[self.task]
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{field: getattr(self, column) for column, field in FIELDS.items() if field in names})
        except ValueError as error:
            name, _, rest = str(error).partition(": ")
            raise ValueError(f"{COLUMN.get(name, name)}: {rest}") from None

    def check(self) -> Settings:
        """These settings, or a ValueError naming the first bad field."""
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {list(TASKS)}, got {self.task!r}")
        if self.model not in MODELS:
            raise ValueError(f"model: expected one of {list(MODELS)}, got {self.model!r}")
        if self.task in CONTROLNET_TASKS and self.model != "2.2":
            raise ValueError(f"task: {self.task} needs Kandinsky 2.2 (model '2.2'), got model {self.model!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt: expected a string, got {self.negative_prompt!r}")
        self.task_settings()
        return self


# the run's settings as prompt-file columns -> the fields of the task settings (kandinsky.settings)
FIELDS = {"steps": "num_inference_steps", "guidance": "guidance_scale", "prior_steps": "prior_num_inference_steps",
          "prior_guidance": "prior_guidance_scale", "height": "height", "width": "width", "sampler": "sampler",
          "strength": "strength", "crop": "crop", "mask_convention": "mask_convention"}
COLUMN = {field: column for column, field in FIELDS.items()}
# a row may set these (types as in a JSON file; CSV cells are converted)
ROW_SETTINGS = {"steps": int, "guidance": float, "prior_steps": int, "prior_guidance": float, "height": int,
                "width": int, "sampler": str, "strength": float, "negative_prompt": str}
COLUMNS = ("prompt", "id", "seed", "image", "mask", "hint", *ROW_SETTINGS)


@dataclass(frozen=True)
class Item:
    """One image to make: row ``line`` of the prompt file, the ``index``-th item."""

    index: int
    line: int
    file: str  # the PNG's name in the output folder
    prompt: str
    seed: int
    settings: Settings
    image: Path | None = None
    mask: Path | None = None
    image_size: tuple[int, int] | None = None  # (width, height) of ``image``: a batch needs one size
    hint: Path | None = None  # ControlNet (Kandinsky 2.2): resized to the image size
    hint_size: tuple[int, int] | None = None  # (width, height) of ``hint``: a batch needs one size

    @property
    def id(self) -> str:
        return self.file[:-len(".png")]

    def batch_key(self) -> tuple:
        """Items with equal keys can share a pipeline call (a negative prompt's text may differ, not its presence:
        without one the prior's negative embedding is the zero image's)."""
        return (dataclasses.replace(self.settings, negative_prompt=None), self.settings.negative_prompt is None,
                self.image_size, self.hint_size)


# ------------------------------------------------------------------------------------------- prompt files


def read_prompt_file(path: str | os.PathLike, settings: Settings | None = None, seed: int = 0, *,
                     allow_outside: bool = False) -> list[Item]:
    """The items of a prompt file, every row checked (a :class:`PromptFileError` names the file and line of the
    first bad one) and every input image opened, before any work starts.

    ``.txt``: one prompt a line. ``.jsonl``: one JSON object a line with ``prompt`` and optionally ``id`` (the PNG's
    name, else the zero-padded index), ``seed`` (else ``seed`` + index), ``image`` / ``mask`` / ``hint`` (img2img and
    controlnet_img2img / inpaint / the ControlNet tasks; relative to the file's folder) and the per-item settings
    ``steps``, ``guidance``, ``prior_steps``, ``prior_guidance``, ``height``, ``width``, ``sampler``, ``strength``,
    ``negative_prompt``. ``.csv``: the same columns, with a header row; an empty cell is a missing value. Blank lines
    are skipped in ``.txt`` and ``.jsonl``; a byte-order mark (as spreadsheets save UTF-8) is ignored. ``image`` /
    ``mask`` / ``hint`` paths must stay inside the prompt file's folder (symbolic links resolved) unless
    ``allow_outside``.
    """
    path = Path(path)
    # the default is built here, not at import: Settings() reads kandinsky.settings, which imports torch
    settings = (settings if settings is not None else Settings()).check()
    if path.suffix.lower() not in PROMPT_SUFFIXES:
        raise PromptFileError(f"{path}: expected a {', '.join(PROMPT_SUFFIXES)} prompt file, got {path.suffix!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such prompt file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PromptFileError(f"{path}: cannot read the prompt file: {error}") from None
    items, lines_of_ids = [], {}
    for line, row in _rows(path, text):
        item = _item(path, line, row, len(items), settings, seed, allow_outside=allow_outside)
        if item.file in lines_of_ids:
            raise PromptFileError(f"{path}:{line}: id {item.id!r} repeats line {lines_of_ids[item.file]}")
        lines_of_ids[item.file] = line
        items.append(item)
    if not items:
        raise PromptFileError(f"{path}: no prompts in the file")
    return items


def _rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, row as a dict) of every non-blank row."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for line, prompt in enumerate(text.splitlines(), 1):
            if prompt.strip():
                yield line, {"prompt": prompt}
    elif suffix == ".jsonl":
        for line, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as error:
                raise PromptFileError(f"{path}:{line}: not valid JSON: {error.msg} (column {error.colno})") from None
            if not isinstance(row, dict):
                raise PromptFileError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
            yield line, row
    else:
        reader = csv.DictReader(text.splitlines(keepends=True))
        if reader.fieldnames is None:
            return
        unknown = [name for name in reader.fieldnames if name not in COLUMNS]
        if unknown:
            raise PromptFileError(f"{path}:1: unknown column(s) {unknown}; expected some of {list(COLUMNS)}")
        line = 1
        for row in reader:
            line, start = reader.line_num, line + 1  # a quoted cell may span lines: report where the row starts
            if None in row:
                raise PromptFileError(f"{path}:{start}: more cells than the {len(reader.fieldnames)} columns")
            cells = {name: value for name, value in row.items() if value not in (None, "")}
            if cells:
                yield start, {name: _csv_value(path, start, name, value) for name, value in cells.items()}


def _csv_value(path: Path, line: int, name: str, value: str) -> Any:
    kind = int if name == "seed" else ROW_SETTINGS.get(name, str)
    try:
        return kind(value)
    except ValueError:
        raise PromptFileError(f"{path}:{line}: {name}: expected {'an integer' if kind is int else 'a number'}, "
                              f"got {value!r}") from None


def _item(path: Path, line: int, row: dict, index: int, settings: Settings, base_seed: int, *,
          allow_outside: bool = False) -> Item:
    where = f"{path}:{line}"
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise PromptFileError(f"{where}: unknown field(s) {unknown}; expected some of {list(COLUMNS)}")
    if "prompt" not in row:
        raise PromptFileError(f"{where}: missing 'prompt'")
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        raise PromptFileError(f"{where}: prompt: expected a string, got {prompt!r}")
    overrides = {}
    for name, kind in ROW_SETTINGS.items():
        if name not in row:
            continue
        value = row[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PromptFileError(f"{where}: {name}: expected {_kind_name(kind)}, got {value!r}")
        overrides[name] = value
    try:
        item_settings = dataclasses.replace(settings, **overrides).check()
    except ValueError as error:
        raise PromptFileError(f"{where}: {error}") from None
    seed = row.get("seed", base_seed + index)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:  # what manual_seed takes
        raise PromptFileError(f"{where}: seed: expected an integer in [0, 2**64 - 1], got {seed!r}")
    file = f"{index:0{INDEX_DIGITS}d}.png"
    if "id" in row:
        file = f"{_check_id(where, row['id'])}.png"
    files, sizes = _inputs(path, where, row, settings.task, allow_outside)
    return Item(index, line, file, prompt, seed, item_settings, files.get("image"), files.get("mask"),
                sizes.get("image"), hint=files.get("hint"), hint_size=sizes.get("hint"))


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string"}[kind]


def _check_id(where: str, value: Any) -> str:
    name = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in '/\\:*?"<>|\0\n'):
        raise PromptFileError(f"{where}: id: expected a file name (no path separators, not starting with '.'), "
                              f"got {value!r}")
    return name


def _inputs(path: Path, where: str, row: dict, task: str,
            allow_outside: bool) -> tuple[dict[str, Path], dict[str, tuple[int, int]]]:
    """The row's input images (``image``, ``mask``, ``hint``: those ``task`` reads), opened to check them, and their
    sizes: (files by name, (width, height) by name)."""
    needed = INPUTS[task]
    for name in ("image", "mask", "hint"):
        if name in row and name not in needed:
            users = [t for t, names in INPUTS.items() if name in names]
            users = " or ".join(users) if len(users) < 3 else f"{', '.join(users[:-1])} or {users[-1]}"
            raise PromptFileError(f"{where}: {name}: only used with --task {users} (this run: {task})")
        if name in needed and name not in row:
            raise PromptFileError(f"{where}: missing {name!r} (--task {task} needs {' and '.join(needed)})")
    sizes, files = {}, {}
    for name in needed:
        value = row[name]
        if not isinstance(value, str) or not value:
            raise PromptFileError(f"{where}: {name}: expected a file path, got {value!r}")
        file = Path(value).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not allow_outside and not file.resolve().is_relative_to(path.parent.resolve()):
            raise PromptFileError(f"{where}: {name}: {value!r} leaves the prompt file's folder {path.parent} "
                                  "(--allow-outside-paths to accept it)")
        sizes[name], files[name] = _image_size(where, name, file), file
    if "mask" in sizes and sizes["mask"] != sizes["image"]:
        raise PromptFileError(f"{where}: mask: expected the image's size {sizes['image']}, got {sizes['mask']}")
    return files, sizes


def _image_size(where: str, name: str, file: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            image.verify()
            return image.size
    except FileNotFoundError:
        raise PromptFileError(f"{where}: {name}: no such file {str(file)!r}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL reports damaged files as SyntaxError too
        raise PromptFileError(f"{where}: {name}: cannot read image {str(file)!r}: {error}") from None


# ------------------------------------------------------------------------------------------- generation


def batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Consecutive items that share their settings (:meth:`Item.batch_key`), at most ``batch_size`` a batch. The
    split depends on the items alone, so that every number of processes generates the same batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    out: list[list[Item]] = []
    for item in items:
        if out and len(out[-1]) < batch_size and out[-1][0].batch_key() == item.batch_key():
            out[-1].append(item)
        else:
            out.append([item])
    return out


def generate(pipe, items: Sequence[Item], output_type: str = "pil"):
    """The images of ``items`` (one batch: :meth:`Item.batch_key` equal) from one call of ``pipe`` (a
    :class:`~kandinsky.pipeline.Kandinsky21`, or a :class:`~kandinsky.pipeline.Kandinsky22` for 2.2's settings),
    each item's noise from its own generator; ``output_type`` as the pipeline's."""
    import torch

    from kandinsky.images import load_image

    settings = items[0].settings
    if any(item.batch_key() != items[0].batch_key() for item in items):
        raise ValueError("items: expected items with the same settings (batches() groups them)")
    # the original p_sampler thresholds the whole batch with the first image's x0 quantile: per image here, which
    # is the same for one image and keeps an image independent of its batch
    options = {"threshold": "per_sample"} if settings.sampler == "p_sampler" else None
    common = dict(settings.task_settings().kwargs(), sampler_options=options, output_type=output_type,
                  generator=[torch.Generator().manual_seed(item.seed) for item in items])
    negatives = None if settings.negative_prompt is None else [i.settings.negative_prompt for i in items]
    prompts = [item.prompt for item in items]

    if settings.task == "text2img":
        return pipe.text2img(prompts, negatives, **common)
    if settings.task == "controlnet":
        return pipe.controlnet(prompts, [load_image(item.hint, "RGB") for item in items], negatives, **common)
    images = [load_image(item.image, "RGB") for item in items]
    if settings.task == "img2img":
        return pipe.img2img(prompts, images, negative_prompt=negatives, **common)
    if settings.task == "controlnet_img2img":
        hints = [load_image(item.hint, "RGB") for item in items]
        return pipe.controlnet_img2img(prompts, images, hints, negative_prompt=negatives, **common)
    masks = [load_image(item.mask, "L") for item in items]
    return pipe.inpaint(prompts, images, masks, negatives, **common)


# ------------------------------------------------------------------------------------------- files


def item_settings(item: Item, image_settings: dict, run_info: dict) -> dict:
    """What the PNG's ``settings`` chunk and the manifest record say about how ``item`` was made: the pipeline's
    (``image_settings``, :mod:`kandinsky.png`'s schema) and, under ``"batch"``, the item's place in the run."""
    place = {"id": item.id, "index": item.index, "line": item.line,
             "image": None if item.image is None else str(item.image),
             "mask": None if item.mask is None else str(item.mask),
             **({} if item.hint is None else {"hint": str(item.hint)})}
    return {**image_settings, "batch": {**run_info, **place}}


def finished(item: Item, folder: Path) -> bool:
    """Whether ``item``'s PNG exists, reads back and was made from this item with these settings. A PNG made
    from something else is a ValueError (never silently replaced)."""
    from PIL import Image

    path = folder / item.file
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            text = dict(image.info)
            image.verify()  # every chunk's checksum: a damaged file is made again
    except Exception:  # noqa: BLE001 - PIL raises many types for damaged files
        return False
    try:
        recorded = json.loads(text.get("settings", "{}"))
    except json.JSONDecodeError:
        recorded = {}
    recorded = recorded if isinstance(recorded, dict) else {}
    weights = recorded.get("weights") if isinstance(recorded.get("weights"), dict) else {}
    expected = {"prompt": item.prompt, "seed": str(item.seed), "negative_prompt": item.settings.negative_prompt,
                "model": item.settings.model, **item.settings.task_settings().recorded()}
    found = {"prompt": text.get("prompt"), "seed": text.get("seed"), "negative_prompt": text.get("negative_prompt"),
             "model": weights.get("model", "2.1"),  # what the pipeline records (2.1's images record none)
             **{k: recorded.get(k) for k in expected if k not in ("prompt", "seed", "negative_prompt", "model")}}
    different = [k for k in expected if found[k] != expected[k]]
    if different:
        key = different[0]
        raise ValueError(f"{path} was made from another item or settings ({COLUMN.get(key, key)}: {found[key]!r} "
                         f"there, {expected[key]!r} now); use another --output folder or delete it")
    return True


def merge_manifest(folder: Path, items: Sequence[Item]) -> int:
    """Write ``folder/manifest.jsonl``: one record per item whose PNG exists, in file order, from the previous
    manifest and the processes' parts (later records win); the parts are then removed. Returns the count.

    Records are matched to items by their file (the item's id): after an edit of the prompt file (rows moved,
    added or removed) a kept image keeps its record, with its new index and line, and a removed row's record goes.
    A PNG is only kept when it was made from its item (:func:`finished`), so the record matches it too."""
    folder = Path(folder)
    by_file = {item.file: item for item in items}
    records: dict[int, dict] = {}
    sources = [folder / MANIFEST] + sorted((folder / PARTS).glob("*.jsonl"))
    for source in sources:
        if not source.is_file():
            continue
        for raw in source.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
            item = by_file.get(record.get("file")) if isinstance(record, dict) else None
            if item is not None:
                records[item.index] = {**record, "index": item.index, "line": item.line}
    by_index = {item.index: item for item in items}
    lines = [json.dumps(records[i], sort_keys=True) for i in sorted(records) if (folder / by_index[i].file).is_file()]
    partial = folder / f".{MANIFEST}.partial"
    partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(partial, folder / MANIFEST)
    for source in sources[1:]:
        source.unlink(missing_ok=True)
    if (folder / PARTS).is_dir() and not any((folder / PARTS).iterdir()):
        (folder / PARTS).rmdir()
    return len(lines)


# ------------------------------------------------------------------------------------------- run


@dataclass
class Summary:
    """What one process did: images ``written`` and ``skipped`` (already there), and, on rank 0, the records in
    the merged manifest (``None`` elsewhere)."""

    written: int = 0
    skipped: int = 0
    manifest_records: int | None = None


def run(items: Sequence[Item], output: str | os.PathLike, load_pipeline: Callable[[], Any], *, batch_size: int = 1,
        processes=None, run_info: dict | None = None, progress: bool = False) -> Summary:
    """Generate the images of ``items`` that ``output`` lacks, this process's share of them when ``processes``
    (:func:`kandinsky.distributed.start`) holds several: batch ``k`` of :func:`batches` goes to rank
    ``k % world_size``. ``load_pipeline()`` is called once, only if there is something to generate. ``run_info``
    (the command, prompt file, device, ...) goes into every PNG's settings and manifest record, under
    ``"batch"`` beside the item's place in the run. Rank 0 merges the manifest once
    every process has finished; only rank 0 shows a progress bar (of its own share)."""
    from kandinsky.distributed import Processes

    processes = processes or Processes()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    wait = _barrier(processes)  # made by every process now, before any can fail
    lock = _lock_output(output, processes)
    try:
        return _run_locked(items, output, load_pipeline, batch_size, processes, run_info, progress, wait)
    finally:
        lock.release()


def _lock_output(output: Path, processes):
    """Rank 0 of this run locks the folder and every process learns whether it could: if another run holds the
    lock, all stop with one line, so two runs never write into one folder at once. A ``manifest.jsonl`` this
    package did not write (no ``.kandinsky-batch`` marker beside it) is a user's file, never replaced."""
    import torch
    from filelock import FileLock, Timeout

    lock = FileLock(str(output / f"{MARKER}.lock"))
    busy = 0
    if processes.main:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            busy = 1
    if int(processes.sum(torch.tensor([busy], device=processes.device))) > 0:  # nccl reduces device tensors
        raise ValueError(f"{output} is being written by another kandinsky batch run; wait for it or use another "
                         "--output folder")
    marker = output / MARKER
    if (output / MANIFEST).exists() and not marker.exists():
        lock.release()  # a no-op on the ranks that did not acquire it
        raise ValueError(f"{output / MANIFEST} was not written by kandinsky batch; use another --output folder")
    if processes.main:
        marker.touch()
    return lock


def _run_locked(items, output, load_pipeline, batch_size, processes, run_info, progress, wait) -> Summary:
    from tqdm.auto import tqdm

    mine = batches(items, batch_size)[processes.rank::processes.world_size]
    todo = [[item for item in batch if not finished(item, output)] for batch in mine]
    summary = Summary(skipped=sum(len(b) - len(t) for b, t in zip(mine, todo)))
    if any(todo):
        (output / PARTS).mkdir(exist_ok=True)
        part = output / PARTS / f"rank-{processes.rank:05d}.jsonl"
        pipe = load_pipeline()
        bar = tqdm(total=sum(map(len, todo)), desc="images (rank 0)" if processes.distributed else "images",
                   disable=not (progress and processes.main), unit="image")
        for batch, missing in zip(mine, todo):
            if not missing:
                continue
            began = time.perf_counter()
            images = generate(pipe, batch)  # whole, even if a rerun needs only some: bit-identical to one run
            seconds = (time.perf_counter() - began) / len(batch)
            for item, image in zip(batch, images):
                if item not in missing:
                    continue
                settings = item_settings(item, json.loads(image.info["settings"]), run_info or {})
                record = {"index": item.index, "id": item.id, "file": item.file, "line": item.line,
                          "prompt": item.prompt, "negative_prompt": item.settings.negative_prompt, "seed": item.seed,
                          "settings": settings, "seconds": round(seconds, 4), "batch_size": len(batch),
                          "rank": processes.rank,
                          "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                with open(part, "a", encoding="utf-8") as handle:  # before the PNG: a finished image has a record
                    handle.write(json.dumps(record, sort_keys=True, default=str) + "\n")
                info = {**image.info, "image_index": str(item.index), "settings": json.dumps(settings, sort_keys=True, default=str)}
                save_png(image, output / item.file, info)  # kandinsky.png's schema, with the item's place
                summary.written += 1
                bar.update(1)
        bar.close()
    wait()
    if processes.main:
        summary.manifest_records = merge_manifest(output, items)
    return summary


def _barrier(processes) -> Callable[[], None]:
    """A barrier for the end of the run. Processes finish at different times (a resumed run may leave one with
    nothing to do), so it waits up to a week instead of the process group's default timeout."""
    if not processes.distributed:
        return lambda: None
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    return lambda: dist.barrier(group=group)

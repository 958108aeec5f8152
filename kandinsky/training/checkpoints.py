"""What a training run reads and writes in its output folder (``OUT``): checkpoints (what ``--resume`` needs),
the loadable outputs (the trained component or the LoRA file), the run's settings and its log; and the checks
of ``OUT`` made before any work.

Layout::

    base.json                   where the components not trained here come from (the --weights source)
    unet/ | unet_inpaint/ | prior/   the trained component in our layout (its EMA weights with --ema)
    lora.safetensors            LoRA runs instead: the adapters (kandinsky.lora format)
    export.json                 the step the outputs above were exported from (written after them)
    train_config.json           the run's settings (what marks the folder as a training run's)
    train_log.jsonl             one line per optimizer step
    checkpoints/step-NNNNNNN/   trainable.safetensors, ema.safetensors, optimizer.pt, state.json
                                (the newest --keep-checkpoints are kept)
    cache/                      --cache without a folder: the frozen encoders' outputs
    base/                       --weights tiny --model 2.2 only: the tiny random 2.2 weights, which base.json
                                names (``tiny`` itself is 2.1's)
    profile/                    --profile-steps: summary.json and the profiler's trace (trace.json)

Every folder is written to a temporary name and renamed (:func:`kandinsky.weights.atomic_folder`), every small
JSON file to a temporary file and replaced (:func:`write_text`), so a run killed while saving leaves the previous
checkpoint and outputs intact. ``from_pretrained(OUT)`` (of :class:`~kandinsky.components.Components` or a
pipeline) loads the base with the trained component in its place; ``load_lora(OUT)`` adds trained adapters.

``OUT`` must be new, empty, or a training run's folder (``train_config.json``); a run's folder with a checkpoint
is continued only with ``--resume`` and the same settings (:func:`checkpoint_to_resume`), and never is the
``--weights`` folder or one of its bases (:func:`check_output_is_not_a_base`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kandinsky.training.config import RESUME_FIXED, ConfigError, TrainConfig

CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
LOCK_FILE = ".kandinsky-train.lock"  # held by the run writing the folder (lock_output)
EXPORT_RECORD = "export.json"
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
TINY_BASE = "base"  # the tiny 2.2 weights of a --weights tiny --model 2.2 run, inside OUT
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint set aside by a resumed run (no longer a step-NNNNNNN folder)


class DamagedCheckpoint(ValueError):
    """A checkpoint folder whose files cannot be read back whole."""


@dataclass
class Checkpoint:
    """The state of a run after ``step`` optimizer steps, as full (unsharded) CPU tensors."""

    step: int
    trainable: dict[str, torch.Tensor]  # the trainable parameters by name
    ema: dict[str, torch.Tensor] | None  # their moving average (float32), with --ema
    optimizer: dict  # the optimizer's state dict
    scaler: dict  # the gradient scaler's state dict
    world_size: int = 1
    records_sha256: str = ""  # kandinsky.training.data.records_digest of the data
    config: dict | None = None  # TrainConfig.as_json()
    base: dict | None = None  # TrainConfig.base: where the base weights came from
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss (--skip-nonfinite-steps)
    folder: Path | None = None  # where it was read from


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file atomically: a temporary file beside it, then ``os.replace`` (a reader or a
    killed writer never sees half a file)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_checkpoint(out: str | os.PathLike, checkpoint: Checkpoint, keep: int) -> Path:
    """Write ``OUT/checkpoints/step-NNNNNNN/`` atomically, then delete all but the newest ``keep``; returns it."""
    from safetensors.torch import save_file

    from kandinsky.weights import atomic_folder

    info = {"step": checkpoint.step, "world_size": checkpoint.world_size,
            "records_sha256": checkpoint.records_sha256, "config": checkpoint.config, "base": checkpoint.base,
            "skipped_steps": checkpoint.skipped_steps}

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in checkpoint.trainable.items()}, str(folder / TRAINABLE_FILE))
        if checkpoint.ema is not None:
            save_file({k: v.contiguous() for k, v in checkpoint.ema.items()}, str(folder / EMA_FILE))
        torch.save({"optimizer": checkpoint.optimizer, "scaler": checkpoint.scaler}, folder / OPTIMIZER_FILE)
        (folder / STATE_FILE).write_text(json.dumps(info, indent=2) + "\n")  # (inside the atomic folder)

    folder = Path(out) / CHECKPOINTS / f"step-{checkpoint.step:07d}"
    atomic_folder(folder, write, overwrite=True)
    for old in sorted(checkpoint_folders(out))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0][:300] if text else type(error).__name__)


def read_state(folder: str | os.PathLike) -> dict:
    """``state.json`` of a checkpoint folder, checked: raises :class:`DamagedCheckpoint` naming the file."""
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError(f"expected a JSON object, got {type(state).__name__}")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or f"step-{step:07d}" != Path(folder).name:
            raise ValueError(f"step {step!r} does not match the folder's name")
        if not isinstance(state.get("records_sha256"), str):
            raise ValueError("no records_sha256")
        TrainConfig.from_json(state.get("config"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as error:
        raise DamagedCheckpoint(f"{path}: {_first_line(error)}") from None
    return state


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """A checkpoint folder written by :func:`write_checkpoint` (its EMA is None where it has none), read whole
    and checked: any file that cannot be read back (truncated, corrupt, non-finite weights) raises
    :class:`DamagedCheckpoint` naming it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_state(folder)

    def tensors(name: str) -> dict[str, torch.Tensor]:
        try:
            loaded = load_file(str(folder / name))
        except Exception as error:  # safetensors reports damage with its own error type
            raise DamagedCheckpoint(f"{folder / name}: {_first_line(error)}") from None
        bad = [k for k, v in loaded.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if not loaded or bad:
            raise DamagedCheckpoint(f"{folder / name}: {'no tensors' if not loaded else f'non-finite {bad[:3]}'}")
        return loaded

    trainable = tensors(TRAINABLE_FILE)
    ema = tensors(EMA_FILE) if (folder / EMA_FILE).exists() else None
    try:
        saved = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        if not (isinstance(saved, dict) and isinstance(saved.get("optimizer"), dict)
                and isinstance(saved.get("scaler"), dict)):
            raise ValueError("expected {'optimizer': ..., 'scaler': ...}")
    except Exception as error:  # pickle, zip and EOF errors of a damaged file
        raise DamagedCheckpoint(f"{folder / OPTIMIZER_FILE}: {_first_line(error)}") from None
    return Checkpoint(info["step"], trainable, ema, saved["optimizer"], saved["scaler"],
                      world_size=info.get("world_size", 1), records_sha256=info["records_sha256"],
                      config=info["config"], base=info.get("base"), skipped_steps=info.get("skipped_steps", 0),
                      folder=folder)


def checkpoint_folders(out: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders of a run's output folder, in no particular order."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run's output folder, or None."""
    found = sorted(checkpoint_folders(out))
    return found[-1] if found else None


def is_run_folder(out: str | os.PathLike) -> bool:
    """Whether ``out`` is a training run's output folder (a readable ``train_config.json``, or checkpoints)."""
    out = Path(out)
    try:
        TrainConfig.from_json(json.loads((out / CONFIG_FILE).read_text(encoding="utf-8")))
        return True
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return bool(checkpoint_folders(out))


def check_output_folder(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` unless ``--output`` may hold this run: a new or empty folder, or a training run's
    folder (whether that run may be continued is :func:`checkpoint_to_resume`'s question). Never a file, nor a
    folder of other files (the run would mix its files with them, and replace some)."""
    out = Path(config.output).expanduser()
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--output: {out} is a broken symbolic link")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output: {out} is a file, not a folder; choose a new (or empty) folder")
    if not out.exists() or not any(p.name != LOCK_FILE for p in out.iterdir()) or is_run_folder(out):
        return
    raise ConfigError(f"--output: {out} is not empty and is not a training run's folder (no {CONFIG_FILE}): the "
                      "run would add to and replace files there; choose a new (or empty) folder")


def lock_output(out: Path):
    """The output folder taken for one run (created if new): a file lock inside it, held until the run ends
    (released by the caller, or with the process). Another run holding it (a second ``--resume`` while the first
    still trains, two runs started into one folder) is a :class:`ConfigError`: two runs never write one folder."""
    from filelock import FileLock, Timeout

    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"--output: {out} is being written by another kandinsky train run; wait for it to end or "
                          "choose another --output") from None
    return lock


def check_output_is_not_a_base(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` if ``--output`` is (or holds) the ``--weights`` folder or any folder its
    ``base.json`` files lead to: the run would replace the weights it reads, and its ``base.json`` would point
    at itself."""
    from kandinsky.weights import read_base

    out = Path(config.output).expanduser().resolve()
    source, seen = Path(config.weights).expanduser(), set()
    while source.is_dir():
        folder = source.resolve()
        if folder in seen:
            break
        seen.add(folder)
        if out == folder or out in folder.parents:
            what = "the --weights folder" if len(seen) == 1 else f"a base of --weights {config.weights}:"
            raise ConfigError(f"--output: {config.output} is {what} {folder} or holds it: training would replace "
                              "the weights it reads; choose another --output")
        try:
            base = read_base(folder)
        except (OSError, ValueError):
            break  # the weights' own loading reports it
        if base is None:
            break
        given = Path(base["source"]).expanduser()
        source = given if given.is_absolute() else folder / given


def checkpoint_to_resume(config: TrainConfig, records_sha256: str,
                         warn: Callable[[str], None] = lambda message: None) -> tuple[Checkpoint | None, list[Path]]:
    """The checkpoint that ``config`` continues (None: a fresh run), read whole, and the damaged newer checkpoint
    folders passed over (each reported through ``warn``; :func:`set_aside` moves them away once the run
    starts). Raises :class:`ConfigError` for an output folder that holds a run without ``--resume``, or a
    checkpoint of other settings, base weights or data, and ValueError when every checkpoint is damaged."""
    out = Path(config.output)
    folders = sorted(checkpoint_folders(out), reverse=True)
    if folders and not config.resume:
        raise ConfigError(f"--output: {out} already holds a training run ({folders[0].name}); pass --resume to "
                          "continue it, or choose another --output")
    if not folders:
        step = exported_step(out)
        if step is not None:
            raise ConfigError(f"--output: {out} holds a trained model (exported at step {step}) but no checkpoint "
                              "to continue from; choose another --output")
        return None, []
    damaged: list[tuple[Path, str]] = []
    for folder in folders:
        try:
            _check_same_run(config, read_state(folder), folder, records_sha256)
            checkpoint = read_checkpoint(folder)
        except DamagedCheckpoint as error:
            damaged.append((folder, str(error)))
            continue
        if damaged:
            warn(f"--resume: {damaged[0][1]}; the damaged checkpoint(s) {[f.name for f, _ in damaged]} are set aside "
                 f"and the run resumes from {folder.name}")
        return checkpoint, [f for f, _ in damaged]
    raise ValueError(f"--resume: no complete checkpoint in {out / CHECKPOINTS}: {damaged[0][1]}"
                     + (f" (and {len(damaged) - 1} more damaged)" if len(damaged) > 1 else ""))


def _check_same_run(config: TrainConfig, state: dict, folder: Path, records_sha256: str) -> None:
    saved = TrainConfig.from_json(state["config"])
    then, now = saved.resume_settings(), config.resume_settings()
    changed = {k: then[k] for k in RESUME_FIXED if then[k] != now[k]}
    then_base = state.get("base") or {"source": saved.weights, **saved.base_options}  # (older checkpoints)
    for key, name in (("source", "weights"), ("revision", "revision")):  # the adapters belong to that base
        if then_base.get(key) != config.base.get(key):
            changed[name] = then_base.get(key)
    if changed:
        raise ConfigError(f"--resume: {folder} was trained with other settings for {list(changed)} "
                          f"(then: {list(changed.values())}); continue it with those, or choose another --output")
    if state["records_sha256"] != records_sha256:
        raise ConfigError(f"--resume: {folder} was trained on other data (images or captions of --data changed): "
                          "its data order would not continue")


def set_aside(folders: list[Path]) -> None:
    """Rename damaged checkpoint folders to ``damaged-step-NNNNNNN`` (kept for inspection, no longer resumed
    from nor in the way of the resumed run's own checkpoint of that step)."""
    for folder in folders:
        target = folder.with_name(DAMAGED_PREFIX + folder.name)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        folder.rename(target)


# ------------------------------------------------------------------------------------------------- outputs


def start_outputs(config: TrainConfig, step: int) -> None:
    """``base.json`` and ``train_config.json`` of a run starting (or resuming) at ``step``, written atomically;
    the log is cut back to that step."""
    from kandinsky.weights import write_base

    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / CONFIG_FILE, json.dumps(config.as_json(), indent=2) + "\n")  # first: it marks the folder
    if config.tiny_22:
        write_tiny_22_base(out / TINY_BASE, config.weights)
        write_base(out, TINY_BASE)  # relative: the folder stays loadable wherever it is moved
    else:
        write_base(out, config.source, **config.base_options)
    truncate_log(out / LOG_FILE, step)


def tiny_22_parts(weights: str) -> dict:
    """The modules of the tiny random Kandinsky 2.2 of ``weights`` (``tiny`` or ``tiny:SEED``) that our weight
    files hold (:func:`kandinsky.tiny.components_22`; the ControlNet UNet where it cannot be saved yet)."""
    from kandinsky import tiny
    from kandinsky.weights import KINDS

    seed = int(weights.partition(":")[2] or 0)
    return {name: module for name, module in tiny.components_22(seed).items() if name in KINDS}


def write_tiny_22_base(folder: Path, weights: str) -> None:
    """The tiny 2.2 weights of ``weights`` in our layout at ``folder`` (once: the same seed writes the same
    weights), atomically."""
    from transformers.utils import logging as transformers_logging

    from kandinsky.components import Components
    from kandinsky.weights import atomic_folder

    if (folder / "unet" / "config.json").is_file():
        return
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # (the CLIP towers' "Writing model shards")
    try:
        atomic_folder(folder, lambda target: Components(**tiny_22_parts(weights)).save_pretrained(target))
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def append_log(out: str | os.PathLike, entry: dict) -> None:
    """One line of ``train_log.jsonl`` (non-finite numbers as null: the file stays standard JSON)."""
    entry = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}
    with (Path(out) / LOG_FILE).open("a", encoding="utf-8") as log:
        log.write(json.dumps(entry) + "\n")


def truncate_log(path: str | os.PathLike, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (a resumed run repeats the steps after its checkpoint); lines
    that cannot be read (a kill in the middle of one) are dropped."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(line + "\n" for line in kept))


def export_trained(config: TrainConfig, model: nn.Module, weights: dict[str, torch.Tensor], step: int) -> None:
    """The trained component under ``OUT`` in our layout, or with ``--lora-rank`` the LoRA file: ``model``'s
    architecture (and LoRA settings) with the full tensors ``weights`` (the EMA weights where there are any).
    ``export.json`` records ``step`` once the export is complete (:func:`exported_step`)."""
    from kandinsky.lora import LORA_FILE, lora_state_dict, save_lora
    from kandinsky.models import model_class
    from kandinsky.weights import save_converted

    out = Path(config.output)
    if config.lora_rank is not None:
        save_lora(out / LORA_FILE, lora_state_dict(model, weights), component=config.component, **model._lora_meta)
        what = LORA_FILE
    else:
        with torch.device("meta"):
            module = model_class(config.component)(model.config)
        module.load_state_dict(weights, assign=True)
        source = {"trained_from": config.source, "task": config.task, "step": step, "ema": config.ema}
        save_converted(module, config.component, out / config.component, overwrite=True, source_info=source)
        what = config.component
    write_text(out / EXPORT_RECORD, json.dumps({"step": step, "output": what}) + "\n")


def exported_step(out: str | os.PathLike) -> int | None:
    """The step of the last complete export in ``out`` (``export.json``), or None."""
    try:
        step = json.loads((Path(out) / EXPORT_RECORD).read_text(encoding="utf-8"))["step"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None

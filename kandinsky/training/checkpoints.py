"""What a training run reads and writes in its output folder (``OUT``): checkpoints (what ``--resume`` needs),
the loadable outputs (the trained component or the LoRA file), the run's settings and its log.

Layout::

    base.json                   where the components not trained here come from (the --weights source)
    unet/ | unet_inpaint/ | prior/   the trained component in our layout (its EMA weights with --ema)
    lora.safetensors            LoRA runs instead: the adapters (kandinsky.lora format)
    train_config.json           the run's settings
    train_log.jsonl             one line per optimizer step
    checkpoints/step-NNNNNNN/   trainable.safetensors, ema.safetensors, optimizer.pt, state.json
                                (the newest --keep-checkpoints are kept)
    cache/                      --cache without a folder: the frozen encoders' outputs

Every folder is written to a temporary name and renamed (:func:`kandinsky.weights.atomic_folder`), so a run
killed while saving leaves the previous checkpoint and outputs intact. ``from_pretrained(OUT)`` (of
:class:`~kandinsky.components.Components` or a pipeline) loads the base with the trained component in its place;
``load_lora(OUT)`` adds trained adapters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kandinsky.training.config import RESUME_FIXED, ConfigError, TrainConfig

CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


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


def write_checkpoint(out: str | os.PathLike, checkpoint: Checkpoint, keep: int) -> Path:
    """Write ``OUT/checkpoints/step-NNNNNNN/`` atomically, then delete all but the newest ``keep``; returns it."""
    from safetensors.torch import save_file

    from kandinsky.weights import atomic_folder

    info = {"step": checkpoint.step, "world_size": checkpoint.world_size,
            "records_sha256": checkpoint.records_sha256, "config": checkpoint.config}

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in checkpoint.trainable.items()}, str(folder / TRAINABLE_FILE))
        if checkpoint.ema is not None:
            save_file({k: v.contiguous() for k, v in checkpoint.ema.items()}, str(folder / EMA_FILE))
        torch.save({"optimizer": checkpoint.optimizer, "scaler": checkpoint.scaler}, folder / OPTIMIZER_FILE)
        (folder / STATE_FILE).write_text(json.dumps(info, indent=2) + "\n")

    folder = Path(out) / CHECKPOINTS / f"step-{checkpoint.step:07d}"
    atomic_folder(folder, write, overwrite=True)
    for old in sorted(checkpoint_folders(out))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """A checkpoint folder written by :func:`write_checkpoint` (its EMA is None where it has none)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / STATE_FILE).read_text())
    ema = load_file(str(folder / EMA_FILE)) if (folder / EMA_FILE).is_file() else None
    saved = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return Checkpoint(info["step"], load_file(str(folder / TRAINABLE_FILE)), ema, saved["optimizer"],
                      saved["scaler"], world_size=info.get("world_size", 1),
                      records_sha256=info.get("records_sha256", ""), config=info.get("config"))


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


def checkpoint_to_resume(config: TrainConfig, records_sha256: str) -> Path | None:
    """The checkpoint that ``config`` continues (None: a fresh run). Raises :class:`ConfigError` for an output
    folder that holds a run without ``--resume``, or a checkpoint of other settings or other data."""
    out = Path(config.output)
    latest = latest_checkpoint(out)
    if latest is not None and not config.resume:
        raise ConfigError(f"--output: {out} already holds a training run ({latest.name}); pass --resume to "
                          "continue it, or choose another --output")
    if latest is None:
        return None
    state = json.loads((latest / STATE_FILE).read_text())
    saved, current = state["config"], config.as_json()
    changed = [k for k in RESUME_FIXED if saved.get(k) != current.get(k)]
    if changed:
        raise ConfigError(f"--resume: {latest} was trained with other settings for {changed} "
                          f"(then: {[saved.get(k) for k in changed]})")
    if state["records_sha256"] != records_sha256:
        raise ConfigError(f"--resume: {latest} was trained on other data (images or captions of --data changed): "
                          "its data order would not continue")
    return latest


# ------------------------------------------------------------------------------------------------- outputs


def start_outputs(config: TrainConfig, step: int) -> None:
    """``base.json`` and ``train_config.json`` of a run starting (or resuming) at ``step``; the log is cut back to
    that step."""
    from kandinsky.weights import write_base

    out = Path(config.output)
    write_base(out, config.source, **config.base_options)
    (out / CONFIG_FILE).write_text(json.dumps(config.as_json(), indent=2) + "\n")
    truncate_log(out / LOG_FILE, step)


def append_log(out: str | os.PathLike, entry: dict) -> None:
    """One line of ``train_log.jsonl``."""
    with (Path(out) / LOG_FILE).open("a") as log:
        log.write(json.dumps(entry) + "\n")


def truncate_log(path: str | os.PathLike, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (a resumed run repeats the steps after its checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def export_trained(config: TrainConfig, model: nn.Module, weights: dict[str, torch.Tensor], step: int) -> None:
    """The trained component under ``OUT`` in our layout, or with ``--lora-rank`` the LoRA file: ``model``'s
    architecture (and LoRA settings) with the full tensors ``weights`` (the EMA weights where there are any)."""
    from kandinsky.lora import LORA_FILE, lora_state_dict, save_lora
    from kandinsky.models import model_class
    from kandinsky.weights import save_converted

    out = Path(config.output)
    if config.lora_rank is not None:
        save_lora(out / LORA_FILE, lora_state_dict(model, weights), component=config.component, **model._lora_meta)
        return
    with torch.device("meta"):
        module = model_class(config.component)(model.config)
    module.load_state_dict(weights, assign=True)
    source = {"trained_from": config.source, "task": config.task, "step": step, "ema": config.ema}
    save_converted(module, config.component, out / config.component, overwrite=True, source_info=source)

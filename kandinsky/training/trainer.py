"""The fine-tuning loop behind ``kandinsky train {prior,decoder,inpaint}``: full or LoRA fine-tuning of the prior,
the decoder UNet or the inpainting UNet, on one process or many (``torchrun``), resumable.

One optimizer step takes the global batch (``batch_size`` samples, the same whatever the number of processes),
gives each process its contiguous share, splits that into ``grad_accum`` micro-batches and minimises the mean of
the per-sample losses of :mod:`kandinsky.training.losses`. Every random draw of a sample is keyed by
``(seed, step, index in the global batch)`` (:func:`kandinsky.training.data.draw_sample`), so 1 and N processes,
and an interrupted-and-resumed run, compute the same steps.

Output folder (``OUT``)::

    base.json                   where the components not trained here come from (the --weights source)
    unet/ | unet_inpaint/ | prior/   the trained component in our layout (its EMA weights with --ema)
    lora.safetensors            LoRA runs instead: the adapters (kandinsky.lora format)
    train_config.json           the run's settings
    train_log.jsonl             one line per optimizer step
    checkpoints/step-NNNNNNN/   what --resume needs: trainable.safetensors, ema.safetensors,
                                optimizer.pt, state.json (the newest --keep-checkpoints are kept)
    cache/                      --cache without a folder: the frozen encoders' outputs

``Kandinsky21.from_pretrained(OUT)`` loads the base with the trained component in its place;
``pipe.load_lora(OUT)`` adds trained adapters.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kandinsky.training import distributed
from kandinsky.training.data import (
    CACHE_INDEX,
    CachedFeatures,
    EncodedFeatures,
    Encoders,
    batch_records,
    build_cache,
    cache_description,
    draw_sample,
    read_records,
    records_digest,
    with_dropout,
)
from kandinsky.training.losses import OBJECTIVES, decoder_loss, prior_loss

# task -> the component it trains
TASKS = {"prior": "prior", "decoder": "unet", "inpaint": "unet_inpaint"}
OPTIMIZERS = ("adamw", "adafactor")
FREEZE = ("resblocks", "attention")
PRECISIONS = ("no", "bf16", "fp16")
DEFAULT_LR = 1e-5  # full fine-tuning; the original used Adafactor at 5e-6
DEFAULT_LORA_LR = 1e-4
# the original datasets' conditioning dropout
DEFAULT_TEXT_DROPOUT = {"prior": 0.1, "decoder": 0.5, "inpaint": 0.5}
DEFAULT_IMAGE_DROPOUT = 0.1
CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
# settings a resumed run must share with the run it continues (the others may change, e.g. --steps)
RESUME_FIXED = ("task", "batch_size", "seed", "optimizer", "weight_decay", "lr", "lr_warmup", "objective",
                "snr_gamma", "lora_rank", "lora_alpha", "freeze", "ema", "resolution", "text_dropout",
                "image_dropout")


class ConfigError(ValueError):
    """A setting that cannot work, found before any work is done (exit code 2)."""


@dataclass
class TrainConfig:
    """Settings of one training run; the command-line options of ``kandinsky train`` (see ``--help``)."""

    task: str
    weights: str
    data: str
    output: str
    steps: int = 1000
    batch_size: int = 1  # global: all processes, all accumulation micro-batches together
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR, or DEFAULT_LORA_LR with lora_rank
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    lr_warmup: int = 0
    max_grad_norm: float | None = None
    seed: int = 0
    objective: str = "original"
    snr_gamma: float | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    freeze: tuple[str, ...] = ()
    ema: float | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    strategy: str = "ddp"
    save_every: int = 1000
    keep_checkpoints: int = 1
    resume: bool = False
    stop_after: int | None = None
    resolution: int = 512
    cache: str | None = None
    text_dropout: float | None = None  # None: DEFAULT_TEXT_DROPOUT[task]
    image_dropout: float = DEFAULT_IMAGE_DROPOUT
    revision: str | None = None
    cache_dir: str | None = None
    device: str | None = None
    progress: bool = True

    @property
    def component(self) -> str:
        return TASKS[self.task]

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LORA_LR if self.lora_rank else DEFAULT_LR

    @property
    def resolved_text_dropout(self) -> float:
        return DEFAULT_TEXT_DROPOUT[self.task] if self.text_dropout is None else self.text_dropout

    def check(self, world_size: int = 1) -> None:
        """Raise :class:`ConfigError` naming the option for any setting that cannot work."""
        def positive(name: str, value, allow_zero: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                raise ConfigError(f"--{name}: expected an integer >= {0 if allow_zero else 1}, got {value!r}")

        def choice(name: str, value, choices) -> None:
            if value not in choices:
                raise ConfigError(f"--{name}: expected one of {list(choices)}, got {value!r}")

        def probability(name: str, value) -> None:
            if not 0 <= value <= 1:
                raise ConfigError(f"--{name}: expected a probability in [0, 1], got {value}")

        choice("task", self.task, TASKS)
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "resolution"):
            positive(name.replace("_", "-"), getattr(self, name))
        for name in ("lr_warmup", "save_every", "seed"):
            positive(name.replace("_", "-"), getattr(self, name), allow_zero=True)
        if self.stop_after is not None:
            positive("stop-after", self.stop_after)
        if self.lora_rank is not None:
            positive("lora-rank", self.lora_rank)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("objective", self.objective, OBJECTIVES)
        choice("mixed-precision", self.mixed_precision, PRECISIONS)
        choice("strategy", self.strategy, distributed.STRATEGIES)
        for part in self.freeze:
            choice("freeze", part, FREEZE)
        if not self.resolved_lr > 0:
            raise ConfigError(f"--lr: expected a positive number, got {self.resolved_lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay: expected a number >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"--max-grad-norm: expected a positive number, got {self.max_grad_norm}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"--ema: expected a decay in (0, 1), e.g. 0.9999, got {self.ema}")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ConfigError("--lora-alpha: only with --lora-rank")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha: expected a positive number, got {self.lora_alpha}")
        probability("text-dropout", self.resolved_text_dropout)
        probability("image-dropout", self.image_dropout)
        if self.task == "prior":
            if self.freeze:
                raise ConfigError("--freeze: the original's resblocks/attention freezing applies to the decoder UNets, "
                                  "not the prior")
            if self.objective != "original" or self.snr_gamma is not None:
                raise ConfigError("--objective/--snr-gamma: the prior has one objective (x0 MSE); these are for "
                                  "decoder and inpaint")
        if self.snr_gamma is not None and self.objective != "eps":
            raise ConfigError("--snr-gamma: Min-SNR weighting needs --objective eps")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ConfigError(f"--snr-gamma: expected a positive number (5 is usual), got {self.snr_gamma}")
        if self.freeze and self.lora_rank is not None:
            raise ConfigError("--freeze: LoRA already freezes every base weight; use either --freeze or --lora-rank")
        if self.task != "prior" and self.resolution % 64:
            raise ConfigError(f"--resolution: expected a multiple of 64 (the MoVQ and the UNet halve it 6 times), "
                              f"got {self.resolution}")
        if self.optimizer == "adafactor" and self.strategy == "fsdp" and world_size > 1:
            raise ConfigError("--optimizer adafactor: transformers' Adafactor cannot update FSDP's sharded parameters; "
                              "use --strategy ddp or --optimizer adamw")
        if self.mixed_precision == "fp16" and self.strategy == "fsdp" and world_size > 1:
            raise ConfigError("--mixed-precision fp16: the gradient scaler would check each process's shard for "
                              "overflow separately under FSDP; use bf16 with --strategy fsdp (or ddp with fp16)")
        shares = world_size * self.grad_accum
        if self.batch_size % shares:
            raise ConfigError(f"--batch-size: the global batch ({self.batch_size}) must split evenly into "
                              f"{world_size} process(es) x {self.grad_accum} accumulation step(s)")


# ------------------------------------------------------------------------------------------------- model surgery


def freeze(model: nn.Module, parts: Sequence[str]) -> None:
    """The original ``freeze_decoder``: ``"resblocks"`` freezes every residual block's norms, convolutions and
    timestep projection (the original's ``in_layers``, ``emb_layers``, ``out_layers``; not the 1x1 skip
    convolution), ``"attention"`` every attention layer's ``qkv`` and ``proj_out`` (not its norm nor the context
    projection ``context_kv``, the original's ``encoder_kv``)."""
    from kandinsky.models.unet import Attention, ResBlock

    names = {"resblocks": (ResBlock, ("norm1", "conv1", "emb_proj", "norm2", "conv2")),
             "attention": (Attention, ("qkv", "proj_out"))}
    for part in parts:
        cls, children = names[part]
        for module in model.modules():
            if isinstance(module, cls):
                for child in children:
                    getattr(module, child).requires_grad_(False)


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the prior or a UNet (the elements of its top-level ``ModuleList``s, and the UNet's
    middle residual and attention blocks): the units of gradient checkpointing and of FSDP sharding."""
    from kandinsky.models.unet import Attention, ResBlock

    blocks = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            blocks += list(child)
        elif isinstance(child, (ResBlock, Attention)):
            blocks.append(child)
    return blocks


def checkpoint_blocks(blocks: Sequence[nn.Module]) -> None:
    """Gradient checkpointing: each block's activations are recomputed in the backward pass instead of kept.
    The block's own ``forward`` is wrapped (an instance attribute), so parameter names and the model file stay
    as they are."""
    for block in blocks:
        block.forward = functools.partial(_recomputed, block.forward)


def _recomputed(forward, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


class EMA:
    """Exponential moving average of the trainable parameters, in float32:
    ``average = decay * average + (1 - decay) * parameter`` after every optimizer step."""

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.average = {name: p.detach().float().clone() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self, parameters: dict[str, nn.Parameter]) -> None:
        for name, p in parameters.items():
            self.average[name].lerp_(p.detach().float(), 1 - self.decay)


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of 0-based ``step``: a linear warmup over ``lr_warmup`` steps, then constant."""
    if config.lr_warmup and step < config.lr_warmup:
        return config.resolved_lr * (step + 1) / config.lr_warmup
    return config.resolved_lr


def make_optimizer(config: TrainConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # the original trainers' settings: a fixed learning rate, no parameter-scale or relative-step heuristics
        return Adafactor(parameters, lr=config.resolved_lr, weight_decay=config.weight_decay,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    try:  # the fused kernel: one pass over each tensor (on the CPU much faster than the per-tensor loop)
        return torch.optim.AdamW(parameters, lr=config.resolved_lr, weight_decay=config.weight_decay, fused=True)
    except RuntimeError:  # torch < 2.4 on the CPU, or a device without the fused kernel
        return torch.optim.AdamW(parameters, lr=config.resolved_lr, weight_decay=config.weight_decay)


# ------------------------------------------------------------------------------------------------- the run


class Run:
    """One training run (see :func:`train`); ``processes`` says which share of the work is this process's."""

    def __init__(self, config: TrainConfig, processes: distributed.Processes):
        self.config, self.processes = config, processes
        self.out = Path(config.output)
        self.device = processes.device
        self.feature_task = "prior" if config.task == "prior" else "decoder"
        self.records = read_records(config.data)
        self.checkpoint = self._checkpoint_to_resume()
        self.features = self._features()
        self.model, self.wrapped, self.trainable = self._model()
        self.optimizer = make_optimizer(config, list(self.trainable.values()))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.ema = EMA(self.trainable, config.ema) if config.ema is not None else None
        self.step = 0
        if self.checkpoint is not None:
            self._load_checkpoint(self.checkpoint)

    # ---- setup -----------------------------------------------------------------------------------------------

    def _checkpoint_to_resume(self) -> Path | None:
        latest = latest_checkpoint(self.out)
        if latest is not None and not self.config.resume:
            raise ConfigError(f"--output: {self.out} already holds a training run ({latest.name}); pass --resume to "
                              "continue it, or choose another --output")
        if latest is None:
            return None
        state = json.loads((latest / "state.json").read_text())
        saved = state["config"]
        changed = [k for k in RESUME_FIXED if saved.get(k) != _jsonable(dataclasses.asdict(self.config)).get(k)]
        if changed:
            raise ConfigError(f"--resume: {latest} was trained with other settings for {changed} "
                              f"(then: {[saved.get(k) for k in changed]})")
        if state["records_sha256"] != records_digest(self.records):
            raise ConfigError(f"--resume: {latest} was trained on other data (images or captions of --data changed): "
                              "its data order would not continue")
        return latest

    def _base_options(self) -> dict:
        return {k: v for k, v in (("revision", self.config.revision),) if v is not None}

    def _parts(self) -> dict:
        from kandinsky.hub import resolve

        return resolve(self.config.weights, cache_dir=self.config.cache_dir, **self._base_options())

    def _encoders(self) -> Encoders:
        from kandinsky.pipeline import Kandinsky21

        pipe = Kandinsky21(**self._parts(), device=self.device, progress=False)
        return Encoders(pipe, self.feature_task, self.config.resolution)

    def _features(self):
        config = self.config
        if config.cache is None:
            return EncodedFeatures(self.records, self._encoders())
        folder = Path(config.cache)
        description = cache_description(self.feature_task, self.records, config.resolution,
                                        {"source": _source_name(config.weights), **self._base_options()})
        complete = (folder / CACHE_INDEX).is_file()
        build_cache(folder, self.records, None if complete else self._encoders(), description,
                    rank=self.processes.rank, world_size=self.processes.world_size, barrier=self.processes.barrier,
                    progress=config.progress)
        return CachedFeatures(folder)

    def _model(self) -> tuple[nn.Module, nn.Module, dict[str, nn.Parameter]]:
        config = self.config
        model = self._parts()[config.component].load()
        # trainable float32 copies (the loaded tensors are memory-mapped views of the weight files), contiguous
        # (FSDP shards only those; converted files hand convolution kernels over channels-last)
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
                tensor.data = tensor.data.to(self.device, dtype, copy=True, memory_format=torch.contiguous_format)
        model.train().requires_grad_(True)
        freeze(model, config.freeze)
        if config.lora_rank is not None:
            from kandinsky.lora import add_lora

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)  # lora_A's initialisation: the same on every process and run
                add_lora(model, config.lora_rank, config.lora_alpha)
        blocks = model_blocks(model)
        if config.gradient_checkpointing:
            checkpoint_blocks(blocks)
        wrapped = distributed.wrap(model, config.strategy, self.processes, blocks)
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ConfigError("--freeze: nothing left to train")
        return model, wrapped, trainable

    # ---- one step --------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the global batch of ``self.step``; returns the global mean losses."""
        config, processes = self.config, self.processes
        per_process = config.batch_size // processes.world_size
        micro = per_process // config.grad_accum
        records = batch_records(config.seed, self.step, config.batch_size, len(self.records))
        mine = range(processes.rank * per_process, (processes.rank + 1) * per_process)
        totals: dict[str, torch.Tensor] = {}
        for index in range(config.grad_accum):
            positions = list(mine[index * micro:(index + 1) * micro])
            # DDP decides in the forward pass whether the backward pass will synchronise
            with distributed.gradient_sync(self.wrapped, index == config.grad_accum - 1):
                losses = self._losses(positions, [records[p] for p in positions])
                loss = losses["loss"].sum() / per_process  # the processes' mean of these is the global batch mean
                self.scaler.scale(loss).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0) + value.detach().double().sum()
        grad_norm = None
        if config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), config.max_grad_norm))
        lr = learning_rate(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.trainable)
        self.step += 1
        names = sorted(totals)
        summed = processes.sum(torch.stack([totals[k] for k in names]).to(self.device))
        stats = {k: float(v) / config.batch_size for k, v in zip(names, summed)}
        stats["lr"] = lr
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm
        return stats

    def _losses(self, positions: list[int], records: list[int]) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,) of the samples at ``positions`` of the global batch."""
        config, device = self.config, self.device
        features = self.features.features(records)
        reference = features["latents"] if self.feature_task == "decoder" else features["image_embeds"]
        inpainting = config.task == "inpaint"
        draws = [draw_sample(config.seed, self.step, p, reference.shape[1:], text_dropout=config.resolved_text_dropout,
                             image_dropout=config.image_dropout if self.feature_task == "decoder" else 0.0,
                             mask_size=tuple(reference.shape[-2:]) if inpainting else None) for p in positions]
        text_dropped = torch.tensor([d.text_dropped for d in draws])
        image_dropped = torch.tensor([d.image_dropped for d in draws]) if self.feature_task == "decoder" else None
        batch = with_dropout(features, self.features.null, text_dropped, image_dropped)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        timesteps = torch.tensor([d.timestep for d in draws], dtype=torch.int64, device=device)
        noise = torch.stack([d.noise for d in draws]).to(device)
        precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            if self.feature_task == "prior":
                return prior_loss(self.wrapped, batch["image_embeds"], timesteps, noise,
                                  text_embeds=batch["text_embeds"], text_hidden_states=batch["text_hidden_states"],
                                  text_mask=batch["text_mask"])
            extra = {}
            if inpainting:
                mask = torch.from_numpy(np.stack([d.inpaint_mask for d in draws]))[:, None].to(device)  # (B, 1, h, w)
                extra = {"inpaint_mask": mask, "inpaint_image": batch["latents"] * mask}
            return decoder_loss(self.wrapped, batch["latents"], timesteps, noise,
                                text_hidden_states=batch["text_hidden_states"], text_embeds=batch["text_embeds"],
                                image_embeds=batch["image_embeds"], objective=config.objective,
                                snr_gamma=config.snr_gamma, **extra)

    # ---- checkpoints and outputs -----------------------------------------------------------------------------

    def save(self) -> None:
        """Write a checkpoint of the current step and the loadable outputs (every process must call it)."""
        from safetensors.torch import save_file

        from kandinsky.weights import atomic_folder

        processes = self.processes
        state = distributed.full_model_state(self.wrapped, processes)
        average = ({name: distributed.full_tensor(t).detach().cpu() for name, t in self.ema.average.items()}
                   if self.ema is not None else None)
        optimizer = distributed.full_optimizer_state(self.wrapped, self.optimizer, processes)
        if processes.main:
            trainable = {name: state[name] for name in self.trainable}
            info = {"step": self.step, "world_size": processes.world_size,
                    "records_sha256": records_digest(self.records),
                    "config": _jsonable(dataclasses.asdict(self.config))}

            def write(folder: Path) -> None:
                save_file({k: v.contiguous() for k, v in trainable.items()}, str(folder / "trainable.safetensors"))
                if average is not None:
                    save_file({k: v.contiguous() for k, v in average.items()}, str(folder / "ema.safetensors"))
                torch.save({"optimizer": optimizer, "scaler": self.scaler.state_dict()}, folder / "optimizer.pt")
                (folder / "state.json").write_text(json.dumps(info, indent=2) + "\n")

            atomic_folder(self.out / CHECKPOINTS / f"step-{self.step:07d}", write, overwrite=True)
            self._export(state, average)
            for old in sorted(_checkpoints(self.out))[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        processes.barrier()

    def _export(self, state: dict[str, torch.Tensor], average: dict[str, torch.Tensor] | None) -> None:
        """The trained component (or LoRA file) under ``OUT``, with the EMA weights when there are any."""
        from kandinsky.lora import LORA_FILE, lora_state_dict, save_lora
        from kandinsky.models import model_class
        from kandinsky.weights import save_converted

        config = self.config
        weights = {**state, **(average or {})}
        if config.lora_rank is not None:
            meta = self.model._lora_meta
            save_lora(self.out / LORA_FILE, lora_state_dict(self.model, weights), component=config.component, **meta)
            return
        with torch.device("meta"):
            module = model_class(config.component)(self.model.config)
        module.load_state_dict(weights, assign=True)
        source = {"trained_from": _source_name(config.weights), "task": config.task, "step": self.step,
                  "ema": config.ema}
        save_converted(module, config.component, self.out / config.component, overwrite=True, source_info=source)

    def _load_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import load_file

        processes = self.processes
        trainable = load_file(str(folder / "trainable.safetensors"))
        missing = sorted(set(self.trainable) - set(trainable))
        if missing:
            raise ConfigError(f"--resume: {folder} lacks trainable parameters {missing[:5]}")
        distributed.load_model_state(self.wrapped, trainable, processes)
        if self.ema is not None:
            average = load_file(str(folder / "ema.safetensors"))
            self.ema.average = {name: distributed.like(average[name], t) for name, t in self.ema.average.items()}
        saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        distributed.load_optimizer_state(self.wrapped, self.optimizer, saved["optimizer"], processes)
        self.scaler.load_state_dict(saved["scaler"])
        self.step = json.loads((folder / "state.json").read_text())["step"]

    # ---- the loop --------------------------------------------------------------------------------------------

    def run(self) -> Path:
        from tqdm import tqdm

        from kandinsky.weights import write_base

        config, processes = self.config, self.processes
        if processes.main:
            write_base(self.out, _source_name(config.weights), **self._base_options())
            (self.out / CONFIG_FILE).write_text(json.dumps(_jsonable(dataclasses.asdict(config)), indent=2) + "\n")
            _truncate_log(self.out / LOG_FILE, self.step)
        end = config.steps if config.stop_after is None else min(config.steps, self.step + config.stop_after)
        bar = tqdm(total=config.steps, initial=self.step, desc=f"train {config.task}", unit="step",
                   disable=not (config.progress and processes.main), dynamic_ncols=True)
        saved_at = self.step
        while self.step < end:
            start = time.perf_counter()
            stats = self.train_step()
            elapsed = time.perf_counter() - start
            stats.update(samples_per_s=config.batch_size / elapsed, seconds=elapsed)
            if processes.main:
                with (self.out / LOG_FILE).open("a") as log:
                    log.write(json.dumps({"step": self.step, **stats}) + "\n")
                bar.set_postfix(loss=f"{stats['loss']:.4g}", lr=f"{stats['lr']:.3g}",
                                samples_s=f"{stats['samples_per_s']:.3g}")
                bar.update()
            if config.save_every and self.step % config.save_every == 0 and self.step < end:
                self.save()
                saved_at = self.step
        bar.close()
        if saved_at != self.step or latest_checkpoint(self.out) is None:
            self.save()
        return self.out


def train(config: TrainConfig) -> Path:
    """Run (or, with ``config.resume``, continue) the training that ``config`` describes; returns ``OUT``.
    Under ``torchrun`` every process calls this; the process group is set up and torn down here."""
    processes = distributed.start(config.device)
    try:
        config.check(processes.world_size)
        if config.cache == "":
            config = dataclasses.replace(config, cache=str(Path(config.output) / "cache"))
        return Run(config, processes).run()
    finally:
        processes.close()


# ------------------------------------------------------------------------------------------------- helpers


def _checkpoints(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / "state.json").is_file()]


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run's output folder, or None."""
    found = sorted(_checkpoints(Path(out)))
    return found[-1] if found else None


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (a resumed run repeats the steps after its checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def _source_name(weights: str) -> str:
    """A local --weights folder as an absolute path (base.json must still point at it from OUT)."""
    local = Path(weights).expanduser()
    return str(local.resolve()) if local.exists() else weights


def _jsonable(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# ------------------------------------------------------------------------------------------------- command line


def build_parser(prog: str = "kandinsky train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune the prior, the decoder UNet or the inpainting UNet (full or LoRA), on one "
        "process or many: torchrun --nproc_per_node=N -m kandinsky train ...; see docs/training.md.")
    parser.add_argument("task", choices=list(TASKS), help="what to train: prior, decoder (UNet) or inpaint (UNet)")
    parser.add_argument("--weights", required=True, help="the base: anything Kandinsky21.from_pretrained accepts")
    parser.add_argument("--data", required=True, help="a folder (metadata.jsonl or same-stem .txt captions) or a CSV "
                        "file (image_name, caption)")
    parser.add_argument("--output", required=True, help="output folder: trained weights, checkpoints, log")
    run = parser.add_argument_group("optimisation")
    run.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    run.add_argument("--batch-size", type=int, default=1, help="GLOBAL batch per optimizer step, split across "
                     "processes and accumulation steps (default 1)")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process and step (default 1)")
    run.add_argument("--lr", type=float, default=None, help=f"learning rate (default {DEFAULT_LR}, "
                     f"{DEFAULT_LORA_LR} with --lora-rank)")
    run.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                     help="adamw (default) or adafactor (transformers', as the original trainers)")
    run.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (default 0)")
    run.add_argument("--lr-warmup", type=int, default=0, help="steps of linear learning-rate warmup (default 0)")
    run.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm (default: no clipping)")
    run.add_argument("--seed", type=int, default=0, help="seed of the data order, timesteps, noise, dropout, masks")
    run.add_argument("--objective", choices=OBJECTIVES, default="original",
                     help="decoders: original (MSE + variational bound, as the original) or eps (MSE only)")
    run.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR weighting gamma (with --objective eps)")
    run.add_argument("--ema", type=float, default=None, metavar="DECAY",
                     help="keep an exponential moving average of the weights (e.g. 0.9999); exported instead of them")
    model = parser.add_argument_group("what is trained")
    model.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank on the "
                       "attention projections instead of all weights")
    model.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling alpha (default: the rank)")
    model.add_argument("--freeze", choices=FREEZE, action="append", default=[],
                       help="decoders: freeze the residual blocks or the attention projections (repeatable)")
    data = parser.add_argument_group("data")
    data.add_argument("--resolution", type=int, default=512, help="decoders: training image size (default 512; "
                      "the original fine-tuned at 768)")
    data.add_argument("--cache", nargs="?", const="", default=None, metavar="DIR",
                      help="encode every image once with the frozen encoders into safetensors shards (default DIR: "
                      "OUT/cache), then train from them")
    data.add_argument("--text-dropout", type=float, default=None,
                      help="probability of an empty caption (default 0.5 decoders, 0.1 prior)")
    data.add_argument("--image-dropout", type=float, default=DEFAULT_IMAGE_DROPOUT,
                      help="decoders: probability of the zero-image CLIP embedding (default 0.1)")
    system = parser.add_argument_group("precision, memory, processes")
    system.add_argument("--mixed-precision", choices=PRECISIONS, default="no",
                        help="autocast to bf16 or fp16 (fp16 with a gradient scaler); weights stay float32")
    system.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward pass (less memory, ~1/3 more time)")
    system.add_argument("--strategy", choices=distributed.STRATEGIES, default="ddp",
                        help="with several processes: ddp (default) or fsdp (FSDP2: shard weights, gradients and "
                        "optimizer states)")
    system.add_argument("--device", default=None, help="default: cuda:<local rank> if available, else cpu")
    run_control = parser.add_argument_group("checkpoints")
    run_control.add_argument("--save-every", type=int, default=1000,
                             help="write a checkpoint and the outputs every N steps (0: only at the end)")
    run_control.add_argument("--keep-checkpoints", type=int, default=1, help="newest checkpoints kept (default 1)")
    run_control.add_argument("--resume", action="store_true", help="continue the run in --output from its newest "
                             "checkpoint (starts afresh if there is none)")
    run_control.add_argument("--stop-after", type=int, default=None, metavar="N",
                             help="end this invocation after N steps with a checkpoint (e.g. a job's time limit); "
                             "--resume continues")
    weights = parser.add_argument_group("base weights")
    weights.add_argument("--revision", default=None, help="hub revision of --weights")
    weights.add_argument("--cache-dir", default=None, help="converted-weights cache (default: $KANDINSKY21_CACHE "
                         "or ~/.cache/kandinsky21)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values["freeze"] = tuple(dict.fromkeys(values["freeze"]))
    values["progress"] = not values.pop("no_progress")
    return TrainConfig(**values)


def main(argv: list[str] | None = None, prog: str = "kandinsky train") -> int:
    """``kandinsky train``: returns the exit code (0 done, 1 runtime error, 2 bad settings, 130 interrupted)."""
    args = build_parser(prog).parse_args(argv)
    first = os.environ.get("RANK", "0") == "0"
    try:
        out = train(config_from_args(args))
    except KeyboardInterrupt:
        print("kandinsky: interrupted", file=sys.stderr)
        return 130
    except ConfigError as error:
        if first:
            print(f"kandinsky: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"kandinsky: error: {error}", file=sys.stderr)
        return 1
    if first:
        print(out)
    return 0

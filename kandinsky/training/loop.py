"""The fine-tuning loop behind ``kandinsky train {prior,decoder,inpaint}``: full or LoRA fine-tuning of the prior,
the decoder UNet or the inpainting UNet, on one process or many (``torchrun``), resumable.

One optimizer step takes the global batch (``batch_size`` samples, the same whatever the number of processes),
gives each process its contiguous share, splits that into ``grad_accum`` micro-batches and minimises the mean of
the per-sample losses of :mod:`kandinsky.training.losses`. Every random draw of a sample is keyed by
``(seed, step, index in the global batch)`` (:func:`kandinsky.training.data.draw_sample`), so 1 and N processes,
and an interrupted-and-resumed run, compute the same steps.

The models come from one :class:`~kandinsky.components.Components` of the ``--weights`` source: the frozen
encoders ready to run (:meth:`~kandinsky.components.Components.module`), the trained component as a fresh
float32 copy (:meth:`~kandinsky.components.Components.plain_copy`). What the run writes into its output folder is
described in :mod:`kandinsky.training.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from kandinsky import distributed
from kandinsky.training.checkpoints import (
    Checkpoint,
    append_log,
    checkpoint_to_resume,
    export_trained,
    latest_checkpoint,
    read_checkpoint,
    start_outputs,
    write_checkpoint,
)
from kandinsky.training.config import ConfigError, TrainConfig
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
from kandinsky.training.losses import decoder_loss, prior_loss

if TYPE_CHECKING:
    from kandinsky.components import Components

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


# ------------------------------------------------------------------------------------------------- optimisation


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
        from kandinsky.components import Components  # (transformers: only once a run starts)

        self.config, self.processes = config, processes
        self.out = Path(config.output)
        self.device = processes.device
        _check_base(config)
        self.records = read_records(config.data)
        self.records_sha256 = records_digest(self.records)
        resume_from = checkpoint_to_resume(config, self.records_sha256)
        components = Components.from_pretrained(config.weights, device=self.device, revision=config.revision,
                                                cache_dir=config.cache_dir)
        self.features = self._features(components)
        self.model, self.wrapped, self.trainable = self._model(components)
        self.optimizer = make_optimizer(config, list(self.trainable.values()))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.ema = EMA(self.trainable, config.ema) if config.ema is not None else None
        self.step = 0
        if resume_from is not None:
            self._load_checkpoint(resume_from)

    # ---- setup -----------------------------------------------------------------------------------------------

    def _features(self, components: Components) -> EncodedFeatures | CachedFeatures:
        config = self.config
        task = config.feature_task
        if config.cache is None:
            return EncodedFeatures(self.records, Encoders(components, task, config.resolution))
        folder = Path(config.cache)
        description = cache_description(task, self.records, config.resolution,
                                        {"source": config.source, **config.base_options})
        complete = (folder / CACHE_INDEX).is_file()
        build_cache(folder, self.records, None if complete else Encoders(components, task, config.resolution),
                    description, rank=self.processes.rank, world_size=self.processes.world_size,
                    barrier=self.processes.barrier, progress=config.progress)
        components.release(components.loaded())  # the encoders: training reads the cache instead
        return CachedFeatures(folder)

    def _model(self, components: Components) -> tuple[nn.Module, nn.Module, dict[str, nn.Parameter]]:
        config = self.config
        model = components.plain_copy(config.component)
        # trainable float32 copies on the device (a lazily loaded component's tensors are memory-mapped views of
        # the weight files), contiguous (FSDP shards only those; converted files hand convolution kernels over
        # channels-last)
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
            grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), config.max_grad_norm)
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
        # the one read-back of the step: the logged values
        stats = {k: float(v) / config.batch_size for k, v in zip(names, summed.tolist())}
        stats["lr"] = lr
        if grad_norm is not None:
            stats["grad_norm"] = float(grad_norm)
        return stats

    def _losses(self, positions: list[int], records: list[int]) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,) of the samples at ``positions`` of the global batch."""
        config, device = self.config, self.device
        features = self.features.features(records)
        decoder = config.feature_task == "decoder"
        reference = features["latents"] if decoder else features["image_embeds"]
        inpainting = config.task == "inpaint"
        draws = [draw_sample(config.seed, self.step, p, reference.shape[1:], text_dropout=config.resolved_text_dropout,
                             image_dropout=config.image_dropout if decoder else 0.0,
                             mask_size=tuple(reference.shape[-2:]) if inpainting else None) for p in positions]
        text_dropped = torch.tensor([d.text_dropped for d in draws])
        image_dropped = torch.tensor([d.image_dropped for d in draws]) if decoder else None
        batch = with_dropout(features, self.features.null, text_dropped, image_dropped)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # drawn on the host: the losses check them there and copy them over without waiting for the device
        timesteps = torch.tensor([d.timestep for d in draws], dtype=torch.int64)
        noise = torch.stack([d.noise for d in draws]).to(device, non_blocking=True)
        precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            if not decoder:
                return prior_loss(self.wrapped, batch["image_embeds"], timesteps, noise,
                                  text_embeds=batch["text_embeds"], text_hidden_states=batch["text_hidden_states"],
                                  text_mask=batch["text_mask"])
            extra = {}
            if inpainting:
                mask = torch.from_numpy(np.stack([d.inpaint_mask for d in draws]))[:, None]  # (B, 1, h, w)
                mask = mask.to(device, non_blocking=True)
                extra = {"inpaint_mask": mask, "inpaint_image": batch["latents"] * mask}
            return decoder_loss(self.wrapped, batch["latents"], timesteps, noise,
                                text_hidden_states=batch["text_hidden_states"], text_embeds=batch["text_embeds"],
                                image_embeds=batch["image_embeds"], objective=config.objective,
                                snr_gamma=config.snr_gamma, **extra)

    # ---- checkpoints and outputs -----------------------------------------------------------------------------

    def save(self) -> None:
        """Write a checkpoint of the current step and the loadable outputs (every process must call it)."""
        config, processes = self.config, self.processes
        state = distributed.full_model_state(self.wrapped, processes)
        average = ({name: distributed.full_tensor(t).detach().cpu() for name, t in self.ema.average.items()}
                   if self.ema is not None else None)
        optimizer = distributed.full_optimizer_state(self.wrapped, self.optimizer, processes)
        if processes.main:
            checkpoint = Checkpoint(self.step, {name: state[name] for name in self.trainable}, average, optimizer,
                                    self.scaler.state_dict(), world_size=processes.world_size,
                                    records_sha256=self.records_sha256, config=config.as_json())
            write_checkpoint(self.out, checkpoint, keep=config.keep_checkpoints)
            export_trained(config, self.model, {**state, **(average or {})}, self.step)
        processes.barrier()

    def _load_checkpoint(self, folder: Path) -> None:
        checkpoint = read_checkpoint(folder)
        missing = sorted(set(self.trainable) - set(checkpoint.trainable))
        if missing:
            raise ConfigError(f"--resume: {folder} lacks trainable parameters {missing[:5]}")
        distributed.load_model_state(self.wrapped, checkpoint.trainable, self.processes)
        if self.ema is not None:
            if checkpoint.ema is None:
                raise ConfigError(f"--resume: {folder} has no EMA weights")
            self.ema.average = {name: distributed.like(checkpoint.ema[name], t) for name, t in self.ema.average.items()}
        distributed.load_optimizer_state(self.wrapped, self.optimizer, checkpoint.optimizer, self.processes)
        self.scaler.load_state_dict(checkpoint.scaler)
        self.step = checkpoint.step

    # ---- the loop --------------------------------------------------------------------------------------------

    def run(self) -> Path:
        from tqdm import tqdm

        config, processes = self.config, self.processes
        if processes.main:
            start_outputs(config, self.step)
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
                append_log(self.out, {"step": self.step, **stats})
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


def _check_base(config: TrainConfig) -> None:
    """Refuse LoRA on a LoRA run's output: the base loads with its adapter (and a full run trains it merged into
    the weights), but the new run's output would load over the same base without it."""
    from kandinsky.lora import LORA_FILE

    if config.lora_rank is not None and (Path(config.weights).expanduser() / LORA_FILE).is_file():
        raise ConfigError(f"--lora-rank: --weights {config.weights} is a LoRA run's output, whose adapter this run's "
                          "output would not carry; train a LoRA of its base, or fine-tune fully")


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

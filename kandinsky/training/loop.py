"""The fine-tuning loop behind ``kandinsky train {prior,decoder,inpaint}``: full or LoRA fine-tuning of the prior,
the decoder UNet or the inpainting UNet, on one process or many (``torchrun``), resumable.

One optimizer step takes the global batch (``batch_size`` samples, the same whatever the number of processes),
gives each process its contiguous share, splits that into ``grad_accum`` micro-batches and minimises the mean of
the per-sample losses of :mod:`kandinsky.training.losses`. Every random draw of a sample is keyed by
``(seed, step, index in the global batch)`` (:func:`kandinsky.training.data.draw_sample`), so 1 and N processes,
and an interrupted-and-resumed run, compute the same steps.

The micro-batches are prepared by a :class:`torch.utils.data.DataLoader` (``--num-workers`` worker processes,
:class:`kandinsky.training.data.StepBatches`): the cached features or the decoded and preprocessed images, and
the random draws, while the training process computes the previous steps; without a cache the frozen encoders
run in the training process, on its device.

The models come from one :class:`~kandinsky.components.Components` of the ``--weights`` source: the frozen
encoders ready to run (:meth:`~kandinsky.components.Components.module`), the trained component as a fresh
float32 copy (:meth:`~kandinsky.components.Components.plain_copy`). What the run writes into its output folder is
described in :mod:`kandinsky.training.checkpoints`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from kandinsky import distributed
from kandinsky.hub import model_evidence
from kandinsky.training.checkpoints import (
    Checkpoint,
    append_log,
    check_output_folder,
    check_output_is_not_a_base,
    checkpoint_to_resume,
    export_trained,
    exported_step,
    latest_checkpoint,
    lock_output,
    set_aside,
    start_outputs,
    tiny_22_parts,
    write_checkpoint,
)
from kandinsky.training.config import DEFAULT_PREFETCH_FACTOR, ConfigError, TrainConfig
from kandinsky.training.data import (
    CACHE_INDEX,
    BatchPlan,
    CachedFeatures,
    DrawSettings,
    EncodedFeatures,
    Encoders,
    LoaderSettings,
    StepBatches,
    build_cache,
    cache_description,
    cache_problems,
    check_images,
    describe,
    read_records,
    records_digest,
    remove_damaged,
    step_loader,
    with_dropout,
)
from kandinsky.training.losses import decoder_loss, prior_loss
from kandinsky.training.profiling import PROFILE_FOLDER, Profiler, StepTimer

if TYPE_CHECKING:
    from kandinsky.components import Components

Result = TypeVar("Result")


class NonFiniteLoss(ValueError):
    """The loss (or the gradient norm) of a step is not finite: the run stops before that optimizer step."""


def warn(message: str) -> None:
    print(f"kandinsky: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- processes


def agreed(processes: distributed.Processes, action: Callable[[], Result]) -> Result:
    """``action()`` on every process; if it fails on any process, every process raises (the failure of the
    lowest failing rank), so that all stop together instead of some waiting forever at their next collective.
    The errors raised this way carry ``agreed = True``: the command line prints them once (on rank 0). One
    small all-reduce when nothing failed; ``action`` must not run collectives itself. One process: ``action()``.
    """
    error = None
    try:
        result = action()
    except Exception as caught:  # noqa: BLE001 - reported to the other processes, then raised again
        error = caught
    if not processes.distributed:
        if error is not None:
            raise error
        return result
    failed = processes.sum(torch.tensor([0 if error is None else 1], device=processes.device))
    if int(failed.item()) == 0:
        return result
    reports: list = [None] * processes.world_size
    own = None if error is None else (processes.rank, isinstance(error, ConfigError), describe(error))
    dist.all_gather_object(reports, own)
    rank, config_error, message = next(report for report in reports if report is not None)
    if error is not None and rank == processes.rank:
        error.agreed = True
        raise error
    raised = (ConfigError if config_error else ValueError)(message)
    raised.agreed = True
    if error is not None:
        raise raised from error
    raise raised


def _main_decides(processes: distributed.Processes, decision: Callable[[], bool]) -> bool:
    """``decision()`` taken on the main process and shared with the others (files seen by rank 0 decide)."""
    value = int(bool(decision())) if processes.main else 0
    if not processes.distributed:
        return bool(value)
    return bool(int(processes.sum(torch.tensor([value], device=processes.device)).item()))


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


def training_kernels(model: nn.Module, device: torch.device | str) -> nn.Module:
    """The trainer's fast layers in ``model`` (in place; returns it): on the CPU the residual blocks' 3x3
    convolutions become :class:`kandinsky.ops.cpu.Conv3x3`, whose float32 Winograd path is differentiable (forward,
    input and weight gradients at a quarter of the multiplications, on maps of 32x32 and more; bf16 / fp16 autocast
    keeps the plain convolution); nothing on other devices. Parameters, their names and their memory format do not
    change, nor do the layouts of the activations (``kandinsky.ops.cpu.optimize_training``)."""
    if torch.device(device).type == "cpu":
        from kandinsky.ops import cpu

        cpu.optimize_training(model)
    return model


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


def check_model_config(config, component: str, weights: str) -> None:
    """Raise ValueError naming the field for a model config (of the ``--weights`` folder) that cannot build a
    model that trains: every count (channels, layers, heads, groups, ...) a positive integer, level lists of
    integers >= 0."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, bool) or isinstance(value, str):
            continue
        low = 0 if field.name.endswith("levels") else 1
        items = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in items):
            raise ValueError(f"--weights {weights}: the {component} config has {field.name} = {value!r}; expected "
                             f"{'integers' if isinstance(value, tuple) else 'an integer'} >= {low}")


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
    """One training run (see :func:`train`); ``processes`` says which share of the work is this process's.

    Set-up happens in stages, each agreed between the processes (:func:`agreed`): the checks of the settings,
    the folders, the data and the checkpoint to resume (nothing written or loaded before they pass); then the
    output folder is the run's; then the models, the features (cache), the trained copy; then the wrapping
    (DDP / FSDP) and the resumed state."""

    def __init__(self, config: TrainConfig, processes: distributed.Processes):
        self.config, self.processes = config, processes
        self.out = Path(config.output)
        self.device = processes.device
        self.warn = warn if processes.main else (lambda message: None)
        self.step, self.skipped = 0, 0
        self.lock = None  # the output folder's, on the main process (lock_output)
        checkpoint, damaged, cache_damage = agreed(processes, self._preflight)

        def start() -> None:  # the output folder is the run's from here on
            if processes.main:
                self.lock = lock_output(self.out)
                set_aside(damaged)
                start_outputs(config, checkpoint.step if checkpoint is not None else 0)

        agreed(processes, start)
        components = agreed(processes, self._components)
        self.features = self._features(components, cache_damage)
        self.null = {key: value.to(self.device) for key, value in self.features.null.items()}
        self.model = agreed(processes, lambda: self._trained_copy(components))
        self.wrapped = distributed.wrap(self.model, config.strategy, processes, model_blocks(self.model))
        self.trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer(config, list(self.trainable.values()))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.ema = EMA(self.trainable, config.ema) if config.ema is not None else None
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)

    # ---- setup -----------------------------------------------------------------------------------------------

    def _preflight(self) -> tuple[Checkpoint | None, list[Path], list[str] | None]:
        """Every check that needs no model, before any work: the output folder (new, empty or this run's, never
        the weights), the data (paths, images), the checkpoint to resume, the cache. Returns the checkpoint
        (read whole), the damaged checkpoint folders passed over, and the damaged files of a complete cache
        (None: no complete cache)."""
        config = self.config
        check_output_is_not_a_base(config)
        check_output_folder(config)
        _check_base(config)
        if config.cache is not None and Path(config.cache).exists() and not Path(config.cache).is_dir():
            raise ConfigError(f"--cache: {config.cache} is a file, not a folder")
        self.records = read_records(config.data, allow_outside=config.allow_outside_paths)
        self.records_sha256 = records_digest(self.records)
        checkpoint, damaged = checkpoint_to_resume(config, self.records_sha256, self.warn)
        cache_damage = None
        if config.cache is not None and (Path(config.cache) / CACHE_INDEX).exists():
            cache_damage = cache_problems(config.cache, self._cache_description())
        if cache_damage != []:  # the images will be read: check them (each process its share)
            check_images(self.records, self.processes.rank, self.processes.world_size)
        return checkpoint, damaged, cache_damage

    def _cache_description(self) -> dict:
        config = self.config
        weights = config.base if config.resolved_model == "2.1" else {**config.base, "model": config.resolved_model}
        return cache_description(config.feature_task, self.records, config.resolution, weights)

    def _components(self) -> Components:
        from kandinsky.components import Components  # (transformers: only once a run starts)

        config = self.config
        if config.tiny_22:  # (the hub's "tiny" is 2.1's)
            return Components(**tiny_22_parts(config.weights), device=self.device,
                              source={"source": config.weights, "model": "2.2"})
        return Components.from_pretrained(config.weights, device=self.device, revision=config.revision,
                                          cache_dir=config.cache_dir)

    def _features(self, components: Components, damage: list[str] | None) -> EncodedFeatures | CachedFeatures:
        config, processes = self.config, self.processes
        task = config.feature_task
        if config.cache is None:
            return agreed(processes, lambda: EncodedFeatures(self.records, Encoders(components, task,
                                                                                      config.resolution)))
        folder = Path(config.cache)
        if damage:
            self.warn(f"cache: {folder} has damaged files ({'; '.join(damage[:3])}); they are encoded again")
            if processes.main:
                remove_damaged(folder, damage)
            processes.barrier()
        encoders = None if damage == [] else Encoders(components, task, config.resolution)
        build_cache(folder, self.records, encoders, self._cache_description(), rank=processes.rank,
                    world_size=processes.world_size, barrier=processes.barrier, progress=config.progress,
                    agree=lambda error: agreed(processes, lambda: _raise(error)))
        components.release(components.loaded())  # the encoders: training reads the cache instead
        return agreed(processes, lambda: CachedFeatures(folder))

    def _trained_copy(self, components: Components) -> nn.Module:
        """The trained component: a float32 copy on the device, frozen parts frozen, LoRA added, blocks
        checkpointed with ``--gradient-checkpointing``; not yet wrapped for several processes."""
        config = self.config
        model = components.plain_copy(config.component)
        check_model_config(model.config, config.component, config.weights)
        check_model_version(model.config, config)
        # trainable float32 copies on the device (a lazily loaded component's tensors are memory-mapped views of
        # the weight files), contiguous (FSDP shards only those; converted files hand convolution kernels over
        # channels-last)
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
                tensor.data = tensor.data.to(self.device, dtype, copy=True, memory_format=torch.contiguous_format)
        model.train().requires_grad_(True)
        training_kernels(model, self.device)
        freeze(model, config.freeze)
        if config.lora_rank is not None:
            from kandinsky.lora import add_lora

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)  # lora_A's initialisation: the same on every process and run
                add_lora(model, config.lora_rank, config.lora_alpha)
        if config.gradient_checkpointing:
            checkpoint_blocks(model_blocks(model))
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("--freeze: nothing left to train")
        return model

    # ---- one step --------------------------------------------------------------------------------------------

    def loader(self, end: int) -> torch.utils.data.DataLoader:
        """The micro-batches of this process from the current step to step ``end`` (exclusive), in order."""
        config, processes = self.config, self.processes
        plan = BatchPlan(config.seed, config.batch_size, config.grad_accum, len(self.records), processes.rank,
                         processes.world_size)
        draws = DrawSettings(config.seed, config.resolved_text_dropout,
                             config.image_dropout if config.decoder else 0.0, inpainting=config.task == "inpaint")
        dataset = StepBatches(self.features.reader(), plan, draws, self.features.sample_shape)
        settings = LoaderSettings(config.resolved_num_workers, config.prefetch_factor or DEFAULT_PREFETCH_FACTOR,
                                  pin=self.device.type == "cuda")
        return step_loader(dataset, self.step * config.grad_accum, end * config.grad_accum, settings, config.seed)

    def train_step(self, items: Iterator[dict], timer: StepTimer | None = None) -> dict[str, float]:
        """One optimizer step on the global batch of ``self.step``, its micro-batches taken from ``items`` (the
        iterator of :meth:`loader`); returns the global mean losses. ``timer`` records the time spent waiting
        for the data and running the encoders.

        The data of every micro-batch is read first, agreed between the processes (a file that cannot be read
        stops them all here with one line). A loss (or, with ``--max-grad-norm``, a gradient norm) that is not
        finite stops the run before the optimizer step (:class:`NonFiniteLoss`; the weights, the optimizer and
        the checkpoints are untouched), or with ``--skip-nonfinite-steps`` skips that optimizer step (and the
        EMA update), as a gradient scaler skips an overflowing one; the step still counts."""
        config, processes = self.config, self.processes
        per_process = config.batch_size // processes.world_size
        timer = timer or StepTimer()

        def read() -> list[dict]:
            batches = []
            for _ in range(config.grad_accum):
                with timer.waiting():
                    item = next(items)
                with timer.preparing():
                    batches.append(self._batch(item))
            return batches

        inputs = agreed(processes, read)
        totals: dict[str, torch.Tensor] = {}
        for index, micro_batch in enumerate(inputs):
            # DDP decides in the forward pass whether the backward pass will synchronise
            with distributed.gradient_sync(self.wrapped, index == config.grad_accum - 1):
                losses = self._losses(micro_batch)
                loss = losses["loss"].sum() / per_process  # the processes' mean of these is the global batch mean
                self.scaler.scale(loss).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0) + value.detach().double().sum()
        names = sorted(totals)
        summed = processes.sum(torch.stack([totals[k] for k in names]).to(self.device))
        # the one read-back of the step (the logged values), before the optimizer step: a non-finite loss must
        # not reach the weights
        stats = {k: float(v) / config.batch_size for k, v in zip(names, summed.tolist())}
        lr = learning_rate(config, self.step)
        stats["lr"] = lr
        unscaled = config.max_grad_norm is not None
        if unscaled:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), config.max_grad_norm)
            stats["grad_norm"] = float(grad_norm)
        # under fp16 an overflowing gradient is the scaler's to skip (it lowers its scale); the loss is not
        finite = math.isfinite(stats["loss"]) and (self.scaler.is_enabled() or math.isfinite(stats.get("grad_norm", 0.0)))
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.trainable)
        else:
            self._nonfinite(stats, unscaled)
        self.step += 1
        if config.skip_nonfinite_steps:
            stats["skipped_steps"] = self.skipped
        return stats

    def _nonfinite(self, stats: dict[str, float], unscaled: bool) -> None:
        what = (f"the loss is {stats['loss']}" if not math.isfinite(stats["loss"])
                else f"the gradient norm is {stats['grad_norm']}")
        if not self.config.skip_nonfinite_steps:
            latest = latest_checkpoint(self.out)
            error = NonFiniteLoss(
                f"step {self.step + 1}: {what}; stopped before its optimizer step (no weights changed): "
                f"{'the last checkpoint ' + latest.name if latest else 'no checkpoint'} and the exported model "
                "are kept. Lower --lr, clip with --max-grad-norm, or pass --skip-nonfinite-steps to skip such steps")
            error.agreed = True  # every process computed the same global loss and stops here
            raise error
        if self.scaler.is_enabled():  # the scaler sees the overflow too (and lowers its scale)
            if not unscaled:
                self.scaler.unscale_(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        stats["skipped"] = True
        self.warn(f"step {self.step + 1}: {what}; its optimizer step is skipped ({self.skipped} so far)")

    def _batch(self, item: dict) -> dict:
        """The model inputs of one micro-batch of the loader (:class:`~kandinsky.training.data.StepBatches`):
        features (read, or encoded here), conditioning dropped as drawn, timesteps, noise, inpainting masks; on
        the device (copied without waiting: pinned memory on CUDA), the timesteps on the host."""
        config, device = self.config, self.device
        if "error" in item:
            raise ValueError(item["error"])
        if item["step"] != self.step:  # (the loader runs from the step the run is at)
            raise RuntimeError(f"the data loader gave step {item['step'] + 1} for step {self.step + 1}")
        features = self.features.complete(item)
        batch = {k: v.to(device, non_blocking=True) for k, v in features.items()}
        text_dropped = item["text_dropped"].to(device, non_blocking=True)
        image_dropped = item["image_dropped"].to(device, non_blocking=True) if config.decoder else None
        batch = with_dropout(batch, self.null, text_dropped, image_dropped)
        # drawn on the host: the losses check them there and copy them over without waiting for the device
        batch["timesteps"] = item["timesteps"]
        batch["noise"] = item["noise"].to(device, non_blocking=True)
        if "inpaint_mask" in item:
            batch["inpaint_mask"] = item["inpaint_mask"].to(device, non_blocking=True)
        return batch

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,) of one micro-batch of :meth:`_inputs`."""
        config, device = self.config, self.device
        timesteps, noise = batch["timesteps"], batch["noise"]
        precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            if not config.decoder:
                return prior_loss(self.wrapped, batch["image_embeds"], timesteps, noise,
                                  text_embeds=batch["text_embeds"], text_hidden_states=batch["text_hidden_states"],
                                  text_mask=batch["text_mask"])
            extra = {}
            if "inpaint_mask" in batch:  # 1 = known latent pixel (the original trainer's convention)
                mask = batch["inpaint_mask"]
                extra = {"inpaint_mask": mask, "inpaint_image": batch["latents"] * mask}
            # (2.2's decoder reads no text: the features have none)
            return decoder_loss(self.wrapped, batch["latents"], timesteps, noise, image_embeds=batch["image_embeds"],
                                text_hidden_states=batch.get("text_hidden_states"),
                                text_embeds=batch.get("text_embeds"), objective=config.resolved_objective,
                                snr_gamma=config.snr_gamma, **extra)

    # ---- checkpoints and outputs -----------------------------------------------------------------------------

    def save(self, checkpoint: bool = True) -> None:
        """Write a checkpoint of the current step (unless ``checkpoint`` is False) and the loadable outputs
        (every process must call it). Non-finite weights are never written."""
        config, processes = self.config, self.processes
        state = distributed.full_model_state(self.wrapped, processes)
        average = ({name: distributed.full_tensor(t).detach().cpu() for name, t in self.ema.average.items()}
                   if self.ema is not None else None)
        optimizer = distributed.full_optimizer_state(self.wrapped, self.optimizer, processes) if checkpoint else None

        def write() -> None:
            if not processes.main:
                return
            trainable = {name: state[name] for name in self.trainable}
            bad = [k for k, v in {**trainable, **(average or {})}.items() if not torch.isfinite(v).all()]
            if bad:
                raise NonFiniteLoss(f"step {self.step}: the weights {bad[:3]} are not finite; nothing was saved "
                                    "(the last checkpoint and the exported model are kept)")
            if checkpoint:
                write_checkpoint(self.out, Checkpoint(
                    self.step, trainable, average, optimizer, self.scaler.state_dict(),
                    world_size=processes.world_size, records_sha256=self.records_sha256, config=config.as_json(),
                    base=config.base, skipped_steps=self.skipped), keep=config.keep_checkpoints)
            export_trained(config, self.model, {**state, **(average or {})}, self.step)

        agreed(processes, write)

    def _load_checkpoint(self, checkpoint: Checkpoint) -> None:
        folder = checkpoint.folder
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
        self.step, self.skipped = checkpoint.step, checkpoint.skipped_steps

    # ---- the loop --------------------------------------------------------------------------------------------

    def run(self) -> Path:
        from tqdm import tqdm

        config, processes = self.config, self.processes
        end = config.steps if config.stop_after is None else min(config.steps, self.step + config.stop_after)
        bar = tqdm(total=config.steps, initial=self.step, desc=f"train {config.task}", unit="step",
                   disable=not (config.progress and processes.main), dynamic_ncols=True)
        saved_at = self.step
        profiler = Profiler(config.profile_steps, self.device, self.out / PROFILE_FOLDER, self.step,
                            warn=self.warn) if config.profile_steps and processes.main else None
        loader = self.loader(end) if self.step < end else None
        items = iter(loader) if loader is not None else iter(())
        try:
            while self.step < end:
                timer = StepTimer()
                with profiler.step() if profiler is not None else contextlib.nullcontext():
                    start = time.perf_counter()
                    stats = self.train_step(items, timer)
                    elapsed = time.perf_counter() - start
                stats.update(samples_per_s=config.batch_size / elapsed, seconds=elapsed, data_s=timer.waited)
                if processes.main:
                    append_log(self.out, {"step": self.step, **stats})
                    bar.set_postfix(loss=f"{stats['loss']:.4g}", lr=f"{stats['lr']:.3g}",
                                    samples_s=f"{stats['samples_per_s']:.3g}")
                    bar.update()
                if config.save_every and self.step % config.save_every == 0 and self.step < end:
                    self.save()
                    saved_at = self.step
        except BaseException:
            if profiler is not None:
                profiler.abandon()  # a failed run writes no profile
            raise
        finally:
            del items, loader  # the loader's workers end with it
            bar.close()
        if profiler is not None:
            profiler.finish()
        if saved_at != self.step or _main_decides(processes, lambda: latest_checkpoint(self.out) is None):
            self.save()
        elif _main_decides(processes, lambda: exported_step(self.out) != self.step):
            self.save(checkpoint=False)  # the export of the last checkpoint was interrupted (or never made)
        return self.out


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def check_model_version(model_config, config: TrainConfig) -> None:
    """Raise ConfigError when the trained UNet is not of the Kandinsky version the run trains (``--model``):
    2.1's UNet reads text and image (``conditioning="text_image"``), 2.2's the image alone (``"image"``)."""
    conditioning = getattr(model_config, "conditioning", None)
    if conditioning is None:  # the prior: the same model in both versions
        return
    expected = {"2.1": "text_image", "2.2": "image"}[config.resolved_model]
    if conditioning != expected:
        other = "2.2" if conditioning == "image" else "2.1" if conditioning == "text_image" else None
        hint = f"; pass --model {other}" if other else " (ControlNet training is not supported)"
        raise ConfigError(f"--model {config.resolved_model}: the {config.component} of --weights {config.weights} is "
                          f"not Kandinsky {config.resolved_model}'s (its conditioning is {conditioning!r}){hint}")


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
        found = model_evidence(config.weights)
        if config.model is None:
            config = dataclasses.replace(config, model=found[0] if found is not None else "2.1")
        config.check(processes.world_size)
        if found is not None and found[0] != config.model:
            raise ConfigError(f"--model {config.model}: --weights {config.weights} holds Kandinsky {found[0]} weights "
                              f"({found[1]}); pass --model {found[0]} or leave it out")
        if config.cache == "":
            config = dataclasses.replace(config, cache=str(Path(config.output) / "cache"))
        run = Run(config, processes)  # if this fails, the output's lock goes with the Run (or the process)
        try:
            return run.run()
        finally:
            if run.lock is not None:
                run.lock.release()
            del run  # the wrapped model and its loader go before the process group (freed after it, gloo can hang)
            gc.collect()  # ... also where they sit in reference cycles
    finally:
        processes.close()

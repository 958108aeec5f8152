"""Training benchmark (``kandinsky bench train``): the full official decoder UNet, random weights, 64x64 latents
(512 px images), batch 1, float32, on the CPU.

* step time: our training step (``decoder_loss`` forward + backward, then the trainer's fused AdamW step) against
  diffusers 0.42.1 ``UNet2DConditionModel`` forward + backward with the same loss (``decoder_loss`` on its
  output). Ours runs the trainer's layers (:func:`~kandinsky.training.loop.training_kernels`: on the CPU the
  differentiable Winograd convolutions), here and in every measurement below. The two models share their
  weights and their forward + backward are interleaved in one process; the AdamW step is timed after diffusers'
  model is freed (its moments, 9 GiB, do not fit next to both backward passes) and added to ours. The losses of
  both sides on identical weights are compared;
* on a CPU with bf16 arithmetic, our ``--mixed-precision bf16`` step (bf16 autocast, float32 weights and AdamW)
  against our float32 step, its forward + backward interleaved with the two above;
* memory of forward + backward, each side alone in its own process, with and without gradient checkpointing
  (ours: the trainer's per-block checkpointing; diffusers: ``enable_gradient_checkpointing``): the peak resident
  memory, and the activations alone (the peak above the weights and their pre-allocated gradients);
* LoRA rank 4 (the trainer's adapters): trainable parameters, AdamW state bytes and step time, next to full
  fine-tuning's;
* torch.distributed, 2 processes on one machine (gloo): samples/s and the peak resident memory of each process
  for each case of :data:`DISTRIBUTED_CASES`;
* with CUDA: the step time and the CUDA memory of forward + backward of both sides in bfloat16 autocast.

At the full size the main process holds about 18 GiB while it times the AdamW step (weights, gradients and
AdamW moments of 1.2 B parameters); ``CONFIG = "tiny"`` (the tests) runs every measurement on a tiny UNet.
Run it with nothing else busy on the machine (the timings and the memory peaks are of the whole machine):
``python scripts/benchmark.py train``.
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kandinsky.benchmark import Result
from kandinsky.models.unet import UNet, UNetConfig
from kandinsky.ops.cpu import native_half
from kandinsky.parity.unet import diffusers_config, diffusers_unet, run_diffusers
from kandinsky.testing import randomize_
from kandinsky.training.losses import decoder_loss

CONFIGS = ("full", "tiny")
CONFIG = "full"  # what `kandinsky bench train` measures (the tests set "tiny")
LORA_RANK = 4
DISTRIBUTED_STEPS = 3  # timed steps per strategy, after one warm-up step
# name: (strategy, what is trained, gradient checkpointing). Full fine-tuning holds 18 GiB per replica at the
# full size (weights, gradients, AdamW moments), so two DDP replicas on one machine would need 36 GiB: DDP trains
# LoRA adapters, FSDP2 the whole UNet (a half of that state per process), with checkpointing to leave room.
DISTRIBUTED_CASES = {"DDP LoRA rank 4": ("ddp", "lora", False),
                     "FSDP2 full, checkpointing": ("fsdp", "full", True)}
BF16_AUTOCAST = torch.bfloat16


def unet_config(config: str) -> UNetConfig:
    """The official UNet, or a tiny one that diffusers can also build (equal text, image and context widths)."""
    if config not in CONFIGS:
        raise ValueError(f"config: expected one of {list(CONFIGS)}, got {config!r}")
    if config == "full":
        return UNetConfig()
    return UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                      head_channels=16, context_dim=32, text_hidden_dim=40, text_embed_dim=32, image_embed_dim=32,
                      norm_groups=8)


def latent_size(config: str) -> int:
    return 64 if config == "full" else 8


def training_batch(unet_cfg: UNetConfig, size: int, seed: int = 1, device: str | torch.device = "cpu") -> dict:
    """One sample: clean latents ``x0``, a timestep, noise and the UNet's conditioning, float32."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    return {"x0": randn(1, 4, size, size), "noise": randn(1, 4, size, size),
            "timesteps": torch.randint(0, 1000, (1,), generator=generator).to(device),
            "text_hidden_states": randn(1, 77, unet_cfg.text_hidden_dim),
            "text_embeds": randn(1, unet_cfg.text_embed_dim), "image_embeds": randn(1, unet_cfg.image_embed_dim)}


class DiffusersAsOurs(nn.Module):
    """diffusers' UNet behind our UNet's call signature, so that ``decoder_loss`` runs it unchanged."""

    def __init__(self, model: nn.Module, config: UNetConfig):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, x, timesteps, *, text_hidden_states, text_embeds, image_embeds):
        return run_diffusers(self.model, {"x": x, "timesteps": timesteps, "text_hidden_states": text_hidden_states,
                                          "text_embeds": text_embeds, "image_embeds": image_embeds})


def forward_loss(unet: nn.Module, batch: dict, autocast: torch.dtype | None = None) -> torch.Tensor:
    device = batch["x0"].device.type
    with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
        return decoder_loss(unet, batch["x0"], batch["timesteps"], batch["noise"],
                            text_hidden_states=batch["text_hidden_states"], text_embeds=batch["text_embeds"],
                            image_embeds=batch["image_embeds"])["loss"].mean()


def forward_backward(unet: nn.Module, batch: dict, autocast: torch.dtype | None = None) -> torch.Tensor:
    loss = forward_loss(unet, batch, autocast)
    loss.backward()
    return loss.detach()


def _optimizer(parameters) -> torch.optim.Optimizer:
    from kandinsky.training.config import TrainConfig
    from kandinsky.training.loop import make_optimizer

    return make_optimizer(TrainConfig(task="decoder", weights="", data="", output="", lr=1e-5), list(parameters))


def _timed(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
           synchronize: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, alternating between them, autograd on (unlike
    :func:`kandinsky.benchmark.interleaved`)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(warmup + repeats):
        for name, fn in cases.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------------------------------------- memory probes


def _build(side: str, unet_cfg: UNetConfig, checkpointing: bool, device: str = "cpu") -> nn.Module:
    """One side alone, random weights allocated directly, in training mode; ours with the trainer's layers
    (:func:`~kandinsky.training.loop.training_kernels`: on the CPU the Winograd convolutions)."""
    from kandinsky.training import loop

    with torch.device("meta"):
        if side == "ours":
            model = UNet(unet_cfg)
        else:
            from diffusers import UNet2DConditionModel
            model = UNet2DConditionModel(**diffusers_config(unet_cfg))
    model = randomize_(model.to_empty(device="cpu")).to(device).train()
    if side == "ours":
        loop.training_kernels(model, device)
        if checkpointing:
            loop.checkpoint_blocks(loop.model_blocks(model))
        return model
    if checkpointing:
        model.enable_gradient_checkpointing()
    return DiffusersAsOurs(model, unet_cfg)


def _rss_gib(field: str) -> float:
    kib = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)
    return int(kib) / 2**20


def memory_probe(side: str, checkpointing: str, config: str) -> None:
    """Forward + backward of one side in this (fresh) process; prints ``MEMORY {"baseline_gib", "peak_gib"}``:
    the resident memory with the weights and zeroed gradients allocated, and the peak after the backward."""
    unet_cfg = unet_config(config)
    model = _build(side, unet_cfg, checkpointing == "1")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # gradients belong to the baseline: backward accumulates into them
    batch = training_batch(unet_cfg, latent_size(config))
    gc.collect()
    baseline = _rss_gib("VmRSS")
    forward_backward(model, batch)
    print("MEMORY", json.dumps({"baseline_gib": baseline, "peak_gib": _rss_gib("VmHWM")}))


def _run_probe(command: list[str], marker: str) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"probe {command[2:]} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith(marker))
    return json.loads(line[len(marker):])


def _memory(config: str) -> list[Result]:
    probe = "from kandinsky.benchmark.train import memory_probe; memory_probe({!r}, {!r}, {!r})"
    measured = {(side, ckpt): _run_probe([sys.executable, "-c", probe.format(side, ckpt, config)], "MEMORY ")
                for side in ("ours", "diffusers") for ckpt in ("0", "1")}
    results = []
    for ckpt, label in (("0", "without"), ("1", "with")):
        ours, theirs = measured[("ours", ckpt)], measured[("diffusers", ckpt)]
        extra = {"unit": "GiB", "ours activations GiB": ours["peak_gib"] - ours["baseline_gib"],
                 "diffusers activations GiB": theirs["peak_gib"] - theirs["baseline_gib"]}
        if ckpt == "1":
            plain = measured[("ours", "0")]
            extra["ours peak with / without checkpointing"] = ours["peak_gib"] / plain["peak_gib"]
            extra["ours activations with / without checkpointing"] = (
                (ours["peak_gib"] - ours["baseline_gib"]) / (plain["peak_gib"] - plain["baseline_gib"]))
        results.append(Result("train", f"peak RSS GiB (not s) of forward + backward, {label} gradient checkpointing",
                              [ours["peak_gib"]], [theirs["peak_gib"]], extra))
    return results


# ------------------------------------------------------------------------------------------------- distributed


def distributed_probe(config: str, steps: int) -> None:
    """In each of the torchrun processes, every case of :data:`DISTRIBUTED_CASES` in turn (the trainer's
    wrapping and AdamW, one sample per process); the main process prints ``DISTRIBUTED {case: {"step_s": [...],
    "peak_gib": [...]}}`` with the peak resident memory of every process."""
    import torch.distributed as dist

    from kandinsky.lora import add_lora
    from kandinsky import distributed
    from kandinsky.training.loop import model_blocks

    processes = distributed.start("cpu")
    unet_cfg = unet_config(config)
    batch = training_batch(unet_cfg, latent_size(config), seed=1 + processes.rank)
    report = {}
    for name, (strategy, trained, checkpointing) in DISTRIBUTED_CASES.items():
        try:
            Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current resident memory
        except OSError:
            pass
        model = _build("ours", unet_cfg, checkpointing)
        if trained == "lora":
            torch.manual_seed(0)  # the adapters' initial A matrices, equal in every process
            add_lora(model, LORA_RANK)
        model = distributed.wrap(model, strategy, processes, model_blocks(model))
        optimizer = _optimizer(p for p in model.parameters() if p.requires_grad)
        times = []
        for step in range(steps + 1):
            processes.barrier()
            start = time.perf_counter()
            forward_backward(model, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            processes.barrier()
            if step:
                times.append(time.perf_counter() - start)
        peaks = [None] * processes.world_size
        dist.all_gather_object(peaks, _rss_gib("VmHWM"))
        report[name] = {"step_s": times, "peak_gib": peaks}
        del model, optimizer
        gc.collect()
    if processes.main:
        print("DISTRIBUTED", json.dumps(report))
    processes.close()


def _distributed(config: str) -> list[Result]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "kandinsky.benchmark.train", config, str(DISTRIBUTED_STEPS)]
    report = _run_probe(command, "DISTRIBUTED ")
    extra = {"processes": 2, "global batch": 2}
    for name in DISTRIBUTED_CASES:
        extra[f"{name} samples/s"] = 2 / statistics.median(report[name]["step_s"])
        extra[f"{name} peak RSS GiB per process"] = max(report[name]["peak_gib"])
    ddp, fsdp = DISTRIBUTED_CASES
    return [Result("train", f"2 processes (gloo), s per step: {ddp} (ours column) vs {fsdp} (diffusers column)",
                   report[ddp]["step_s"], report[fsdp]["step_s"], extra)]


# ------------------------------------------------------------------------------------------------- run


def _step_times(config: str, repeats: int) -> list[Result]:
    """Ours and diffusers' forward + backward interleaved on shared weights, then our AdamW step alone; on a CPU
    with bf16 arithmetic (:func:`~kandinsky.ops.cpu.native_half`) our bf16-autocast forward + backward joins the
    interleaving, a second result against our float32 step.

    Holding AdamW's moments (8 bytes per parameter) next to a backward's gradients and activations does not fit
    this machine at the full size together with diffusers' copy, so the optimizer step is timed once diffusers'
    model is gone and the activations are freed; a training step is the two in sequence, so our step time is
    forward + backward plus the median AdamW step."""
    from kandinsky.lora import add_lora, remove_lora
    from kandinsky.training.loop import training_kernels

    unet_cfg = unet_config(config)
    theirs, ours = diffusers_unet(unet_cfg, seed=0)  # ours shares diffusers' tensors except the fused projections
    # contiguous weights and the trainer's layers, as the trainer trains them (the converter may hand kernels over
    # channels-last)
    for p in ours.parameters():
        p.data = p.data.contiguous()
    training_kernels(ours.train().requires_grad_(True), "cpu")
    theirs = DiffusersAsOurs(theirs.train().requires_grad_(True), unet_cfg)
    batch = training_batch(unet_cfg, latent_size(config))
    with torch.no_grad():  # the same loss on identical weights
        losses = [float(forward_loss(model, batch)) for model in (ours, theirs)]
    loss_difference = abs(losses[0] - losses[1])

    def backward(model, autocast=None):
        def call():
            forward_backward(model, batch, autocast)
            model.zero_grad(set_to_none=True)  # one side's gradients at a time
        return call

    cases = {"ours": backward(ours), "diffusers": backward(theirs)}
    # --mixed-precision bf16 only where the CPU computes in bf16: elsewhere it would time torch's emulation
    mixed = native_half(BF16_AUTOCAST)
    if mixed:
        cases["ours bf16"] = backward(ours, BF16_AUTOCAST)
        with torch.no_grad():
            losses.append(float(forward_loss(ours, batch, BF16_AUTOCAST)))
    times = _timed(cases, repeats)
    del theirs
    gc.collect()

    for p in ours.parameters():
        p.grad = torch.zeros_like(p)  # the fused step's work does not depend on the values
    optimizer = _optimizer(ours.parameters())
    optimizer.step()  # the first step allocates the moments
    adamw_times = _timed({"adamw": optimizer.step}, repeats, warmup=0)["adamw"]
    adamw_s = statistics.median(adamw_times)
    full_parameters = sum(p.numel() for p in ours.parameters())
    extra = {"loss |ours - diffusers| before training": loss_difference, "trainable parameters": full_parameters,
             "ours forward+backward s": statistics.median(times["ours"]), "AdamW step s": adamw_s,
             "AdamW state GiB": _state_bytes(optimizer) / 2**30}
    del optimizer
    ours.zero_grad(set_to_none=True)
    gc.collect()

    add_lora(ours, LORA_RANK)
    lora_parameters = [p for p in ours.parameters() if p.requires_grad]
    lora_optimizer = _optimizer(lora_parameters)

    def lora_step():
        forward_backward(ours, batch)
        lora_optimizer.step()
        lora_optimizer.zero_grad(set_to_none=True)

    lora_times = _timed({"lora": lora_step}, repeats)["lora"]
    extra.update({f"LoRA rank {LORA_RANK} trainable parameters": sum(p.numel() for p in lora_parameters),
                  f"LoRA rank {LORA_RANK} AdamW state MiB": _state_bytes(lora_optimizer) / 2**20,
                  f"LoRA rank {LORA_RANK} step s": statistics.median(lora_times)})
    remove_lora(ours)
    size = latent_size(config)
    ours_step = [t + adamw_s for t in times["ours"]]
    results = [Result("train", f"training step 1x4x{size}x{size} float32: ours forward+backward+AdamW vs diffusers "
                      "forward+backward", ours_step, times["diffusers"], extra)]
    if mixed:  # autocast leaves the weights, gradients and so the AdamW step in float32
        results.append(Result(
            "train", f"training step 1x4x{size}x{size}, --mixed-precision bf16 (ours column) vs float32 (diffusers "
            "column), both ours forward+backward+AdamW", [t + adamw_s for t in times["ours bf16"]], ours_step,
            {"loss |bf16 autocast - float32| before training": abs(losses[2] - losses[0]),
             "float32 loss": losses[0]}))
    return results


def _cuda(config: str, repeats: int) -> list[Result]:
    """Step time (bf16 autocast) and forward + backward CUDA memory of both sides, with and without checkpointing."""
    unet_cfg = unet_config(config)
    batch = training_batch(unet_cfg, latent_size(config), device="cuda")
    sync = torch.cuda.synchronize
    models = {side: _build(side, unet_cfg, False, "cuda") for side in ("ours", "diffusers")}
    optimizer = _optimizer(models["ours"].parameters())

    def our_step():
        forward_backward(models["ours"], batch, BF16_AUTOCAST)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def their_step():
        forward_backward(models["diffusers"], batch, BF16_AUTOCAST)
        models["diffusers"].zero_grad(set_to_none=True)

    times = _timed({"ours": our_step, "diffusers": their_step}, repeats, synchronize=sync)
    optimizer.state.clear()
    memory = {}
    for checkpointing in (False, True):
        for side in ("ours", "diffusers"):
            model = _build(side, unet_cfg, checkpointing, "cuda") if checkpointing else models[side]
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            sync()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            forward_backward(model, batch, BF16_AUTOCAST)
            sync()
            memory[(side, checkpointing)] = (torch.cuda.max_memory_allocated() - baseline) / 2**30
            model.zero_grad(set_to_none=True)
            del model
            gc.collect()
    extra = {f"{side} activations GiB{' (checkpointing)' if ckpt else ''}": value
             for (side, ckpt), value in memory.items()}
    size = latent_size(config)
    return [Result("train", f"CUDA training step 1x4x{size}x{size} bf16 autocast: ours forward+backward+AdamW vs "
                   "diffusers forward+backward", times["ours"], times["diffusers"], extra)]


def run(args, config: str | None = None) -> list[Result]:
    """Every measurement of the module docstring; ``args``: ``repeats`` and ``no_memory`` (skips the memory probes
    and the distributed processes)."""
    config = config or CONFIG
    # the memory probes first, while this process is small: they run in processes of their own beside it
    results = [] if args.no_memory else _memory(config) + _distributed(config)
    results[:0] = _step_times(config, args.repeats)
    gc.collect()
    if torch.cuda.is_available():
        results += _cuda(config, args.repeats)
    return results


if __name__ == "__main__":  # a torchrun process of the distributed measurement
    distributed_probe(sys.argv[1], int(sys.argv[2]))

"""Decoder UNet benchmark: the full official configuration, batch 2 (classifier-free guidance doubles the
batch of one image), 64x64 latents (512 px images) and 96x96 (768 px), ours vs diffusers 0.42.1 with the
same weights, interleaved in one process; peak memory of each side in its own process. Run it alone on a quiet
machine: ``python scripts/benchmark.py unet``.

``--model 2.2`` times Kandinsky 2.2's UNet (image conditioning only: diffusers' ``encoder_hid_dim_type="image_proj"``),
``--model 2.2 --controlnet`` its ControlNet UNet (plus a depth hint at the image size); ``--sizes`` other latent
sides. ``CONFIG = "tiny"`` (the tests) runs the tiny configurations of :mod:`kandinsky.tiny` instead.
"""

from __future__ import annotations

import gc
import statistics

import torch

from kandinsky import ops
from kandinsky.benchmark import Result, count_flops, interleaved, peak_rss_gib
from kandinsky.models.unet import UNet, UNetConfig
from kandinsky.parity.unet import CONFIGS_22, diffusers_config, diffusers_unet, inputs, run_diffusers, run_ours
from kandinsky.testing import randomize_

SIZES = (64, 96)
CONFIGS = ("full", "tiny")
CONFIG = "full"  # what `kandinsky bench unet` measures (the tests set "tiny")
VARIANTS = ("2.1", "2.2", "2.2-controlnet")


def unet_config(variant: str = "2.1", config: str | None = None) -> UNetConfig:
    """The UNet of ``variant`` ("2.1", "2.2" or "2.2-controlnet") at ``config`` ("full": official; "tiny")."""
    from kandinsky import tiny

    config = config or CONFIG
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
    if config not in CONFIGS:
        raise ValueError(f"config: expected one of {list(CONFIGS)}, got {config!r}")
    if config == "tiny":
        return {"2.1": tiny.UNET, "2.2": tiny.UNET_22, "2.2-controlnet": tiny.UNET_22_CONTROLNET}[variant]
    return {"2.1": UNetConfig(), "2.2": CONFIGS_22["unet"], "2.2-controlnet": CONFIGS_22["unet_controlnet"]}[variant]


def variant_of(args) -> str:
    """The UNet ``kandinsky bench unet`` times: ``--model`` and ``--controlnet``."""
    model = getattr(args, "model", "2.1") or "2.1"
    return f"{model}-controlnet" if getattr(args, "controlnet", False) else model


def memory_probe(side: str, size: str, dtype: str, variant: str = "2.1", config: str = "full") -> None:
    """Build one side alone (random weights allocated directly in ``dtype``) and run one forward; the
    caller reads this process's peak RSS."""
    torch_dtype = getattr(torch, dtype)
    unet = unet_config(variant, config)
    with torch.device("meta"):
        if side == "ours":
            model = UNet(unet)
        else:
            from diffusers import UNet2DConditionModel
            model = UNet2DConditionModel(**diffusers_config(unet))
    model = randomize_(model.to(torch_dtype).to_empty(device="cpu")).eval()
    if side == "ours":
        ops.optimize(model, "cpu", torch_dtype)  # as Kandinsky21 loads it
    batch = inputs(unet, height=int(size), width=int(size), dtype=torch_dtype)
    with torch.inference_mode():
        (run_ours if side == "ours" else run_diffusers)(model, batch)


def run(args) -> list[Result]:
    dtype = getattr(torch, args.dtype)
    variant = variant_of(args)
    config = unet_config(variant)
    sizes = tuple(getattr(args, "sizes", None) or (SIZES if CONFIG == "full" else (16,)))
    label = {"2.1": "", "2.2": "Kandinsky 2.2, ", "2.2-controlnet": "Kandinsky 2.2 ControlNet, "}[variant]
    # Memory first, while this process is small (the probes run in their own processes either way).
    memory = {}
    if not getattr(args, "no_memory", False):
        for size in sizes:
            memory[size] = {f"peak RSS {side} GiB": peak_rss_gib("kandinsky.benchmark.unet:memory_probe", side,
                                                                 str(size), args.dtype, variant, CONFIG)
                            for side in ("ours", "diffusers")}
    theirs, ours = diffusers_unet(config, seed=0)
    if dtype != torch.float32:  # diffusers' bf16 = its weights cast, as a user would do
        theirs, ours = theirs.to(dtype), ours.to(dtype)
    ops.optimize(ours, "cpu", dtype)  # as Kandinsky21 loads it
    gc.collect()
    results = []
    for size in sizes:
        batch = inputs(config, batch=2, height=size, width=size, dtype=dtype)
        # the direct-convolution count: ours does fewer multiplications (Winograd) for the same result
        flops = count_flops(lambda: run_diffusers(theirs, batch))
        times = interleaved({"ours": lambda: run_ours(ours, batch), "diffusers": lambda: run_diffusers(theirs, batch)},
                            repeats=args.repeats, warmup=1)
        extra = {"TFLOP": flops / 1e12,
                 "ours GFLOP/s": flops / 1e9 / statistics.median(times["ours"]),
                 "diffusers GFLOP/s": flops / 1e9 / statistics.median(times["diffusers"])}
        results.append(Result("unet", f"{label}2x{config.x_channels}x{size}x{size} {args.dtype}", times["ours"],
                              times["diffusers"], extra))
    del theirs, ours
    gc.collect()
    for result, size in zip(results, sizes):
        result.extra.update(memory.get(size, {}))
    return results

"""Decoder UNet benchmark: the full official configuration, batch 2 (classifier-free guidance doubles the
batch of one image), 64x64 latents (512 px images) and 96x96 (768 px), ours vs diffusers 0.42.1 with the
same weights, interleaved in one process; peak memory of each side in its own process. Run it alone on a quiet
machine: ``python scripts/benchmark.py unet``.
"""

from __future__ import annotations

import gc
import statistics

import torch

from kandinsky import ops
from kandinsky.benchmark import Result, count_flops, interleaved, peak_rss_gib
from kandinsky.models.unet import UNet, UNetConfig
from kandinsky.parity.unet import diffusers_config, diffusers_unet, inputs, run_diffusers, run_ours
from kandinsky.testing import randomize_

SIZES = (64, 96)


def memory_probe(side: str, size: str, dtype: str) -> None:
    """Build one side alone (random weights allocated directly in ``dtype``) and run one forward; the
    caller reads this process's peak RSS."""
    torch_dtype = getattr(torch, dtype)
    config = UNetConfig()
    with torch.device("meta"):
        if side == "ours":
            model = UNet(config)
        else:
            from diffusers import UNet2DConditionModel
            model = UNet2DConditionModel(**diffusers_config(config))
    model = randomize_(model.to(torch_dtype).to_empty(device="cpu")).eval()
    if side == "ours":
        ops.optimize(model, "cpu", torch_dtype)  # as Kandinsky21 loads it
    batch = inputs(config, height=int(size), width=int(size), dtype=torch_dtype)
    with torch.inference_mode():
        (run_ours if side == "ours" else run_diffusers)(model, batch)


def run(args) -> list[Result]:
    dtype = getattr(torch, args.dtype)
    config = UNetConfig()
    # Memory first, while this process is small (the probes run in their own processes either way).
    memory = {}
    if not args.no_memory:
        for size in SIZES:
            memory[size] = {f"peak RSS {side} GiB": peak_rss_gib("kandinsky.benchmark.unet:memory_probe", side, str(size), args.dtype)
                            for side in ("ours", "diffusers")}
    theirs, ours = diffusers_unet(config, seed=0)
    if dtype != torch.float32:  # diffusers' bf16 = its weights cast, as a user would do
        theirs, ours = theirs.to(dtype), ours.to(dtype)
    ops.optimize(ours, "cpu", dtype)  # as Kandinsky21 loads it
    gc.collect()
    results = []
    for size in SIZES:
        batch = inputs(config, batch=2, height=size, width=size, dtype=dtype)
        # the direct-convolution count: ours does fewer multiplications (Winograd) for the same result
        flops = count_flops(lambda: run_diffusers(theirs, batch))
        times = interleaved({"ours": lambda: run_ours(ours, batch), "diffusers": lambda: run_diffusers(theirs, batch)},
                            repeats=args.repeats, warmup=1)
        extra = {"TFLOP": flops / 1e12,
                 "ours GFLOP/s": flops / 1e9 / statistics.median(times["ours"]),
                 "diffusers GFLOP/s": flops / 1e9 / statistics.median(times["diffusers"])}
        results.append(Result("unet", f"2x4x{size}x{size} {args.dtype}", times["ours"], times["diffusers"], extra))
    del theirs, ours
    gc.collect()
    for result, size in zip(results, SIZES):
        result.extra.update(memory.get(size, {}))
    return results

"""Profile one decoder UNet step on a CUDA GPU, ours against diffusers 0.42.1 (full official config, random
weights, batch 2, 96x96 latents = 768 px): the time of one call waited for, the time per call of back-to-back
calls (as in our sampling loop, which never waits for the GPU), and the kernels that take the time. Everything
is timed before the profiler runs, whose instrumentation can slow the kernel launches that follow it.

Run on a GPU machine: ``python scripts/gpu_profile.py [--dtype float16] [--top 12]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kandinsky.benchmark.gpu import back_to_back
from kandinsky.models.unet import UNetConfig
from kandinsky.parity.unet import diffusers_unet, inputs, run_diffusers, run_ours


def kernel_table(fn, top: int) -> tuple[float, str]:
    """(total GPU kernel milliseconds of one call, the ``top`` kernels by GPU time)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) / 1e3
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    lines = [f"  {e.self_device_time_total / 1e3:7.2f} ms {e.count:5d}x  {e.key[:110]}" for e in events[:top]]
    return total, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    theirs, ours = diffusers_unet(UNetConfig())
    theirs, ours = theirs.to("cuda", dtype), ours.to("cuda", dtype)
    batch = {k: v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")
             for k, v in inputs(UNetConfig(), batch=2, height=96, width=96).items()}
    sides = {"ours": lambda: run_ours(ours, batch), "diffusers": lambda: run_diffusers(theirs, batch)}
    cuda = torch.device("cuda")
    with torch.inference_mode():
        reference = sides["diffusers"]().float()
        report = {}
        for name, fn in sides.items():
            for _ in range(3):
                fn()
            difference = ((fn().float() - reference).abs().max() / reference.abs().max()).item()
            torch.cuda.synchronize()
            begin = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            report[name] = (f"{name}: one call {1e3 * (time.perf_counter() - begin):.2f} ms, back-to-back "
                            f"{1e3 * back_to_back(fn, cuda, calls=20):.2f} ms per call, max rel diff vs diffusers "
                            f"{difference:.2e}")
        for name, fn in sides.items():
            total, table = kernel_table(fn, args.top)
            print(f"{report[name]}, kernels {total:.2f} ms\n{table}", flush=True)


if __name__ == "__main__":
    main()

"""Time the CPU paths of the residual blocks' 3x3 convolutions on every shape of the official UNet (batch 2,
64x64 and 96x96 latents) and MoVQ (batch 1, 512 px decode and encode): oneDNN's direct convolution
(``F.conv2d`` on channels-last tensors), the GEMM path (maps of at most ``cpu.GEMM_MAX_PIXELS``), Winograd
F(2x2, 3x3) and F(4x4, 3x3), the median of several calls each, interleaved; with each fast path's error against a float64 direct convolution (on a band of output
rows that includes the image border), relative to the output scale.

The shapes come from a forward pass of the full-size models on the meta device (no weights, no memory).
``python scripts/conv_sweep.py [--threads 2] [--calls 5] [--only unet64,movq_decode] [--band 256] [--min-pixels N]``;
``--band`` sets F(4x4, 3x3)'s GEMM rows per chunk (``cpu._WINOGRAD43_TILES_PER_CHUNK``).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.nn.functional as F

from kandinsky.models import movq, unet
from kandinsky.ops import cpu
from kandinsky.testing import conv3x3_case

REFERENCE_ROWS = 16  # output rows compared with the float64 convolution


def conv_shapes(model: torch.nn.Module, run) -> collections.Counter:
    """{(B, C, K, H, W): calls per forward} of ``model``'s residual-block 3x3 convolutions under ``run(model)``."""
    found = collections.Counter()

    def record(conv, inputs, output):
        x = inputs[0]
        found[(x.shape[0], conv.in_channels, conv.out_channels, x.shape[2], x.shape[3])] += 1

    hooks = [conv.register_forward_hook(record) for sub in model.modules()
             if isinstance(sub, (unet.ResBlock, movq.ResBlock)) for conv in (sub.conv1, sub.conv2)]
    with torch.device("meta"), torch.no_grad():
        run(model)
    for hook in hooks:
        hook.remove()
    return found


def model_shapes() -> dict[str, collections.Counter]:
    with torch.device("meta"):
        unet_model, movq_model = unet.UNet(unet.UNetConfig()), movq.MoVQ(movq.MoVQConfig())

    def unet_step(size):
        return lambda model: model(torch.randn(2, 4, size, size), torch.ones(2),
                                   text_hidden_states=torch.randn(2, 77, 1024), text_embeds=torch.randn(2, 768),
                                   image_embeds=torch.randn(2, 768))

    return {"unet64": conv_shapes(unet_model, unet_step(64)), "unet96": conv_shapes(unet_model, unet_step(96)),
            "movq_decode": conv_shapes(movq_model, lambda model: model.decode(torch.randn(1, 4, 64, 64))),
            "movq_encode": conv_shapes(movq_model, lambda model: model.encode(torch.randn(1, 3, 512, 512)))}


def relative_error(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """max |out - float64 direct| / max |float64 direct| over the first output rows (the top border included)."""
    rows = min(REFERENCE_ROWS, x.shape[2])
    reference = F.conv2d(x[:, :, :rows + 1].double(), weight.double(), bias.double(), padding=1)[:, :, :rows]
    return ((out[:, :, :rows].double() - reference).abs().max() / reference.abs().max()).item()


def paths(height: int, width: int) -> dict:
    found = {"direct": lambda x, w, b: F.conv2d(x, w, b, padding=1)}
    if height * width <= cpu.GEMM_MAX_PIXELS:
        found["GEMM"] = cpu.gemm_conv3x3
    if height % 2 == 0 and width % 2 == 0:
        found["F(2,3)"] = cpu.winograd_conv3x3
    if height % 4 == 0 and width % 4 == 0:
        found["F(4,3)"] = cpu.winograd43_conv3x3
    return found


def sweep(shape: tuple[int, ...], calls: int) -> tuple[dict[str, float], dict[str, float]]:
    """({path: median seconds}, {path: relative error}) for one convolution shape."""
    x, weight, bias = conv3x3_case(*shape)
    candidates = paths(*shape[3:])
    times = {name: [] for name in candidates}
    errors = {}
    with torch.no_grad():
        for name, convolve in candidates.items():  # warm-up, and the error of the first call
            errors[name] = relative_error(convolve(x, weight, bias), x, weight, bias)
        for _ in range(calls):
            for name, convolve in candidates.items():
                start = time.perf_counter()
                convolve(x, weight, bias)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per path and shape (median)")
    parser.add_argument("--only", default="", help="comma-separated models: unet64, unet96, movq_decode, movq_encode")
    parser.add_argument("--band", type=int, default=None, help="F(4x4, 3x3) GEMM rows per chunk")
    parser.add_argument("--min-pixels", type=int, default=1, help="skip smaller maps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.band:
        cpu._WINOGRAD43_TILES_PER_CHUNK = args.band
    models = model_shapes()
    chosen = [m for m in args.only.split(",") if m] or list(models)
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"F(4,3) band {cpu._WINOGRAD43_TILES_PER_CHUNK} tiles, median of {args.calls} calls; ms per call, "
          f"error relative to the output scale vs float64")
    done = {}
    for model in chosen:
        print(f"\n{model}: shape (B, C, K, H, W) x calls per forward")
        print(f"{'shape':>28} {'n':>3} {'direct':>9} {'GEMM':>9} {'F(2,3)':>9} {'F(4,3)':>9} {'4,3/best':>8}"
              f" {'err F(2,3)':>10} {'err F(4,3)':>10}")
        totals = collections.Counter()
        for shape, count in sorted(models[model].items(), key=lambda item: (-item[0][3], item[0][1:3])):
            if shape[3] * shape[4] < args.min_pixels:
                continue
            if shape not in done:
                done[shape] = sweep(shape, args.calls)
            times, errors = done[shape]
            others = min(t for name, t in times.items() if name != "F(4,3)")
            totals["direct"] += count * times["direct"]
            totals["best of direct, GEMM, F(2,3)"] += count * others
            totals["best of all"] += count * min(times.values())
            cells = [f"{times[name] * 1e3:9.1f}" if name in times else f"{'-':>9}"
                     for name in ("direct", "GEMM", "F(2,3)", "F(4,3)")]
            ratio = f"{times['F(4,3)'] / others:8.2f}" if "F(4,3)" in times else f"{'-':>8}"
            errs = [f"{errors[name]:10.1e}" if name in errors else f"{'-':>10}" for name in ("F(2,3)", "F(4,3)")]
            print(f"{str(shape):>28} {count:3d} {' '.join(cells)} {ratio} {' '.join(errs)}", flush=True)
        print("  per forward (shapes swept, seconds): " + ", ".join(f"{k} {v:.2f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()

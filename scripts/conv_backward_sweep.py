"""Time a training step's 3x3 convolutions (forward + backward) on the UNet's shapes at batch 1 (64x64 latents),
float32: the plain convolution against the pieces of :class:`kandinsky.ops.cpu.WinogradConv3x3` and the GEMM
path under autograd, the median of several calls each, interleaved. Every tensor is contiguous (NCHW), as in the
trainer's model.

Columns (ms per call):

* ``direct fwd``, ``direct bwd``: oneDNN's convolution and its backward (input, weight and bias gradients), as
  the plain model trains (diffusers' side of ``kandinsky bench train``);
* ``W fwd``, ``W dx``, ``W dW``: the pieces of :class:`WinogradConv3x3` (F(4x4, 3x3) where the sides are
  multiples of 4, else F(2x2, 3x3)), as it runs them: the forward (its output transposed to NCHW), the input
  gradient (the transposed convolution through the same path; the output gradient transposed to channels-last
  first, and the result back), the weight gradient in the transformed domain plus the bias gradient (a sum);
* ``dW oneDNN``: ``aten.convolution_backward`` for the weight and bias gradients only (the alternative to ``W dW``);
* ``autograd plain``, ``autograd ours``: forward + ``backward()`` of ``nn.Conv2d`` and of :class:`Conv3x3` as it
  trains (whatever path its dispatch takes for the shape), weight gradients accumulated into ``.grad``;
* ``GEMM``: forward + backward of :func:`gemm_conv3x3` under autograd (maps of at most ``GEMM_MAX_PIXELS``).

``ours/dir`` is (W fwd + W dx + the faster of W dW and dW oneDNN) / (direct fwd + direct bwd).

``python scripts/conv_backward_sweep.py [--threads 2] [--calls 5] [--all] [--tile 2]``: the four levels' square
layers (384 channels at 64x64, 768 at 32x32, 1152 at 16x16, 1536 at 8x8), or with ``--all`` every shape of the
UNet's residual blocks (with the calls per forward, and the totals); ``--tile 2`` times F(2x2, 3x3)'s pieces
instead (on these shapes the dispatch takes F(4x4, 3x3); F(2x2, 3x3) is for sides that are even but not
multiples of 4).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.nn.functional as F
from conv_sweep import conv_shapes
from torch import nn

from kandinsky.models import unet
from kandinsky.ops import cpu
from kandinsky.ops.generic import swap
from kandinsky.testing import conv3x3_case

LEVELS = {(1, 384, 384, 64, 64): 10, (1, 768, 768, 32, 32): 9, (1, 1152, 1152, 16, 16): 9, (1, 1536, 1536, 8, 8): 13}
COLUMNS = ("direct fwd", "direct bwd", "W fwd", "W dx", "W dW", "dW oneDNN", "autograd plain", "autograd ours", "GEMM")


def unet_shapes() -> collections.Counter:
    with torch.device("meta"):
        model = unet.UNet(unet.UNetConfig())
    return conv_shapes(model, lambda m: m(torch.randn(1, 4, 64, 64), torch.ones(1),
                                          text_hidden_states=torch.randn(1, 77, 1024),
                                          text_embeds=torch.randn(1, 768), image_embeds=torch.randn(1, 768)))


def cases(shape: tuple[int, ...], tile: int | None) -> dict:
    """{column: callable} for one (B, C, K, H, W) shape; the tensors are made here, once."""
    b, c, k, height, width = shape
    x, weight, bias = (t.contiguous() for t in conv3x3_case(*shape))  # the trainer's layout
    grad_y = torch.randn(b, k, height, width, generator=torch.Generator().manual_seed(1))
    backward = torch.ops.aten.convolution_backward
    conv_args = ([k], [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    found = {"direct fwd": lambda: F.conv2d(x, weight, bias, padding=1),
             "direct bwd": lambda: backward(grad_y, x, weight, *conv_args, [True, True, True])}
    tile = tile or (4 if height % 4 == 0 and width % 4 == 0 else 2 if height % 2 == 0 and width % 2 == 0 else None)
    if tile is not None:
        convolve, weight_grad = cpu._winograd_path(tile)
        channels_last = torch.channels_last

        def input_grad():
            return convolve(grad_y.contiguous(memory_format=channels_last), weight, None, True).contiguous()

        def weight_and_bias_grad():
            grad_cl = grad_y.contiguous(memory_format=channels_last)  # (once per backward, shared with W dx)
            return weight_grad(x, grad_cl), grad_cl.sum((0, 2, 3))

        found["W fwd"] = lambda: convolve(x, weight, bias).contiguous()
        found["W dx"] = input_grad
        found["W dW"] = weight_and_bias_grad
        found["dW oneDNN"] = lambda: backward(grad_y, x, weight, *conv_args, [False, True, True])

    layers = {}
    for name, cls in (("plain", None), ("ours", cpu.Conv3x3)):
        layers[name] = nn.Conv2d(c, k, 3, padding=1)
        if cls is not None:
            swap(layers[name], cls)
        with torch.no_grad():
            layers[name].weight.copy_(weight)
            layers[name].bias.copy_(bias)

    def autograd(layer):
        inputs = x.clone().requires_grad_()

        def call():
            inputs.grad = None
            layer.zero_grad(set_to_none=True)
            layer(inputs).backward(grad_y)
        return call

    found["autograd plain"] = autograd(layers["plain"])
    found["autograd ours"] = autograd(layers["ours"])
    if height * width <= cpu.GEMM_MAX_PIXELS:
        x_gemm, weight_gemm, bias_gemm = (t.clone().requires_grad_() for t in (x, weight, bias))

        def gemm():
            x_gemm.grad = weight_gemm.grad = bias_gemm.grad = None
            cpu.gemm_conv3x3(x_gemm, weight_gemm, bias_gemm).backward(grad_y)
        found["GEMM"] = gemm
    return found


def sweep(shape: tuple[int, ...], calls: int, tile: int | None) -> dict[str, float]:
    """{column: median seconds} for one shape; the pieces run under ``torch.no_grad`` (as in the Function)."""
    found = cases(shape, tile)
    times = {name: [] for name in found}
    for index in range(calls + 1):  # the first round warms up
        for name, fn in found.items():
            start = time.perf_counter()
            if name.startswith(("autograd", "GEMM")):
                fn()
            else:
                with torch.no_grad():
                    fn()
            if index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per column and shape (median)")
    parser.add_argument("--all", action="store_true", help="every shape of the UNet's residual blocks")
    parser.add_argument("--tile", type=int, choices=(2, 4), default=None,
                        help="time this Winograd tile's pieces (default: the one the sides allow, 4 before 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = unet_shapes() if args.all else LEVELS
    pieces = f"F({args.tile}x{args.tile}, 3x3)" if args.tile else "F(4x4, 3x3) (F(2x2, 3x3) for sides not divisible by 4)"
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}, median of "
          f"{args.calls} calls, ms per call; W pieces: {pieces}; Conv3x3 under autograd: Winograd from "
          f"{cpu.TRAIN_WINOGRAD_MIN_PIXELS} pixels, GEMM up to {cpu.TRAIN_GEMM_MAX_PIXELS} pixels from "
          f"{cpu.TRAIN_GEMM_MIN_CHANNELS} channels, else direct")
    print(f"{'shape (B, C, K, H, W)':>26} {'n':>3} " + " ".join(f"{name:>9}" for name in COLUMNS)
          + f" {'ours/dir':>8} {'ag ours/plain':>13}")
    totals = collections.Counter()
    for shape, count in sorted(shapes.items(), key=lambda item: (-item[0][3], item[0][1:3])):
        times = sweep(shape, args.calls, args.tile)
        direct = times["direct fwd"] + times["direct bwd"]
        cells = [f"{times[name] * 1e3:9.1f}" if name in times else f"{'-':>9}" for name in COLUMNS]
        ratio = f"{'-':>8}"
        if "W fwd" in times:
            ours = times["W fwd"] + times["W dx"] + min(times["dW oneDNN"], times["W dW"])
            ratio = f"{ours / direct:8.2f}"
        autograd = times["autograd ours"] / times["autograd plain"]
        print(f"{shape!s:>26} {count:3d} {' '.join(cells)} {ratio} {autograd:13.2f}", flush=True)
        totals["autograd plain"] += count * times["autograd plain"]
        totals["autograd ours"] += count * times["autograd ours"]
    print("  per forward + backward (shapes swept x calls, seconds): "
          + ", ".join(f"{k} {v:.2f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()

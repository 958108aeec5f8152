"""CPU kernels swapped into the models by :func:`kandinsky.ops.optimize` (inference) and
:func:`optimize_training` (the trainer's 3x3 convolutions).

* :class:`Conv3x3` for the residual blocks' 3x3 convolutions (UNet and MoVQ): Winograd F(2x2, 3x3)
  (:func:`winograd_conv3x3`) for wide float32 maps, one GEMM over the nine shifted windows
  (:func:`gemm_conv3x3`) for small maps, oneDNN's direct convolution otherwise; Winograd F(4x4, 3x3)
  (:func:`winograd43_conv3x3`, 4x fewer multiplications, float32 error a few 1e-6 of the output scale) before
  F(2x2, 3x3) where the sides are multiples of 4 (``scripts/conv_sweep.py`` times the three);
* :class:`OneDNNLinear` for the prior's linear layers, the attention projections of the UNet and MoVQ, and the
  GEMM of :func:`gemm_conv3x3`: the same GEMMs through oneDNN instead of MKL, which is much faster for these
  shapes on CPUs where MKL is slow (AMD EPYC);
* half-precision weights on a CPU without native arithmetic in their dtype (:func:`native_half`): every
  convolution and linear layer computes in float32 from its weights upcast per call (``Upcast*``), and the
  attention of the UNet, MoVQ and prior runs on float32 queries, keys and values. Parameters and the
  activations between layers stay in the half dtype (the memory saving); no float32 copy of the weights is
  kept, only one buffer per thread, the size of the largest layer (:func:`float_weight`).

Under autograd (training) :class:`Conv3x3` keeps its float32 Winograd paths from 32x32 on, differentiable
(:class:`WinogradConv3x3`: the input gradient by the same Winograd convolution, the weight gradient in its
transformed domain), and its GEMM path on the 8x8 maps of 1024+ channels; bfloat16 / float16 and autocast train on
the plain layer. The other float32 fast paths (oneDNN's linear layers) are inference only and fall back to the
plain layer under autograd; the upcast layers are differentiable. The thresholds are where each path measured
faster (see the benchmark results; ``scripts/conv_sweep.py`` and ``scripts/conv_backward_sweep.py`` per layer).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from kandinsky.models import movq, prior, unet
from kandinsky.ops import native
from kandinsky.ops.generic import FastModule, LastQueryBlock, SubpixelUpsample, swap

# Winograd F(2x2, 3x3): a 3x3 convolution of 4x4 input tiles (stride 2) computed as 16 channel GEMMs in a
# transformed domain, 2.25x fewer multiplications than direct. The transforms use only 0, +-1 and +-1/2,
# so float32 results stay as close to exact as the direct convolution's.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))  # kernel transform
_WINOGRAD_TILES_PER_CHUNK = 512  # GEMM rows per chunk: keeps the transform buffers in cache, GEMMs efficient
# Winograd from this many input and output channels (float32): below, the transforms, which cost the same
# per channel, outweigh the saved multiplications
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_MIN_PIXELS = 1024  # ... and from this many pixels (32x32)
GEMM_MAX_PIXELS = 256  # maps of at most this many pixels (16x16) that no Winograd path takes: the GEMM path
_WINOGRAD43_TILES_PER_CHUNK = 256  # F(4x4, 3x3): GEMM rows per chunk
# F(4x4, 3x3) from this many input and output channels and pixels (16x16), sides divisible by 4: it measured
# faster than oneDNN's direct convolution and F(2x2, 3x3) on every UNet and MoVQ shape from 24x24 (128
# channels at 512x512 only just), and than the GEMM path on the UNet's 16x16 maps (0.6-0.7x its time on
# most); on 8x8 maps the GEMM path is the faster, on 12x12 they are within ~10%
WINOGRAD43_MIN_CHANNELS = 128
WINOGRAD43_MIN_PIXELS = 256
# Under autograd (training: contiguous activations and kernels; forward + backward timed per layer by
# scripts/conv_backward_sweep.py, the UNet at batch 1) oneDNN's direct convolution keeps more of its ground on
# small maps: Winograd (F(4x4, 3x3) 0.5-0.85x the direct time on the 64x64 and 32x32 maps) only from 32x32, as on
# 16x16 maps it took 1.3-2x the direct time at 384 channels, 1.15-1.3x at 768, 0.85-1.05x at 1152 and 1536 (0.8-0.9x
# only from 1920 input channels); the GEMM path on maps of at most 16x16 with at least 1024 input and output
# channels (forward + backward 0.45-0.5x the direct time at 8x8 with 1536-3072 input channels, 0.63-0.69x at 16x16
# with 1152-2304; 1.0-1.1x at 384 and 768 channels)
TRAIN_WINOGRAD_MIN_PIXELS = 1024
TRAIN_GEMM_MAX_PIXELS = 256
TRAIN_GEMM_MIN_CHANNELS = 1024


# Winograd F(4x4, 3x3) (Lavin & Gray): 6x6 input tiles (stride 4), 36 channel GEMMs, 4x fewer multiplications
# than direct. Interpolation points 0, +-1, +-2: the transforms scale by up to 8 (input), 1/24 (kernel) and 8
# (output), so float32 rounding grows to ~15x F(2x2, 3x3)'s, still far below 1e-4 of the output scale. The
# points 0, +-1, +-1/2 were no more accurate; 0, +-1, 1/2, -2 were (~2.5x) but need denser transforms.
_WINOGRAD43_G = ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
                 (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0))  # kernel transform


def _kernel_transform(transform: tuple[tuple[float, ...], ...], like: torch.Tensor) -> torch.Tensor:
    """``G (x) G`` as a (T*T, 9) matrix (dtype and device of ``like``): row ``(a, b)`` maps the nine taps ``g[i, j]``
    of a 3x3 kernel to ``(G g G^T)[a, b]``."""
    g = torch.tensor(transform, dtype=like.dtype, device=like.device)
    return torch.einsum("ai,bj->abij", g, g).reshape(-1, 9)


def _winograd_kernel(weight: torch.Tensor, transform: tuple[tuple[float, ...], ...] = _WINOGRAD_G,
                     transposed: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """(K, C, 3, 3) kernel -> (T*T, C, K): ``G g G^T`` for every (output, input) channel pair, G (T, 3), the
    GEMM operand of :func:`_winograd_bands` (a view of ``out``, T*T*C*K elements, if given).

    ``transposed``: (T*T, K, C) for the transposed convolution (the input gradient), whose kernel is ``weight``
    rotated by 180 degrees with its two channel axes swapped. The rotation reverses the nine taps, so it is
    folded into ``G (x) G`` (its columns reversed) and the swap is a view: no copy of the weights.
    """
    k, c = weight.shape[:2]
    tt = len(transform) ** 2
    if weight.is_contiguous():  # (as loaded from a file, and the trainer's parameters) into (T*T, K, C)
        kernel = weight.new_empty((tt, k, c)) if out is None else out.view(tt, k, c)
        if _native(weight):
            native.winograd_kernel(weight, torch.tensor(transform, dtype=torch.float32), transposed, kernel)
        else:  # one GEMM (T*T, 9) x (9, K*C)
            gg = _kernel_transform(transform, weight)
            torch.mm(gg.flip(1) if transposed else gg, weight.view(k * c, 9).t(), out=kernel.view(tt, k * c))
        return kernel if transposed else kernel.transpose(1, 2)
    gg = _kernel_transform(transform, weight)
    if transposed:
        gg = gg.flip(1)
    # channels-last (the inference layout), (K, 9, C) taps (or (C, 9, K) transposed): a view; per-channel GEMMs
    # (transposed, the input gradient of an optimized model under autograd, they read the taps strided: slower)
    taps = (weight.transpose(0, 1) if transposed else weight).permute(0, 2, 3, 1)
    taps = taps.reshape(taps.shape[0], 9, taps.shape[3])
    # (K, T*T, C), read by the GEMM as transposed (T*T, C, K)
    kernel = torch.matmul(gg, taps, out=None if out is None else out.view(taps.shape[0], tt, taps.shape[2]))
    return kernel.permute(1, 2, 0)


def _winograd23_input(d: list[torch.Tensor], out: torch.Tensor) -> None:
    """``out[i] = sum_j B^T[i, j] d[j]`` for F(2x2, 3x3)'s B^T."""
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])


def _winograd23_output(m: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """``out[i] = sum_j A^T[i, j] m[j]`` for F(2x2, 3x3)'s A^T."""
    torch.add(m[0], m[1], out=out[0]).add_(m[2])
    torch.sub(m[1], m[2], out=out[1]).sub_(m[3])


def _padded_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H+2, W+2, C) with a zero border of one pixel. Only the border is zeroed: ``F.pad`` fills
    the whole output before copying ``x`` in, an extra pass over the map (its fills took 0.39 s of a profiled 8 s
    MoVQ decode). Not differentiable (the Winograd paths run without autograd)."""
    b, c, height, width = x.shape
    padded = x.new_empty((b, height + 2, width + 2, c))
    padded[:, 1:-1, 1:-1].copy_(x.permute(0, 2, 3, 1))
    padded[:, 0::height + 1].zero_()  # the first and last rows
    padded[:, 1:-1, 0::width + 1].zero_()  # the first and last columns
    return padded


def _input_tile_bands(x: torch.Tensor, tile: int, transform_input, tiles_per_chunk: int,
                      activation: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Yield ``(r0, n, tiles)`` for each band of ``n`` tile rows from tile row ``r0``: the band's transformed input
    tiles ``B^T d B``, (T, T, B, n, cols, C) with T = tile + 2, for Winograd F(tile x tile, 3x3) of the
    zero-padded ``x``. The bands hold about ``tiles_per_chunk`` tiles each. By the compiled transform
    (:mod:`kandinsky.ops.native`, reading ``x`` in place when its channels are contiguous) where there is one,
    else by ``transform_input`` along each axis of a padded copy. ``activation``: (B, C) ``(scale, shift)``, the
    tiles of ``silu(x * scale + shift)`` instead (compiled transform only)."""
    b, c, height, width = x.shape
    t, rows, cols = tile + 2, height // tile, width // tile
    band = max(1, min(rows, tiles_per_chunk // (b * cols)))  # tile rows per chunk
    if _native(x):
        x = x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)
        for r0 in range(0, rows, band):
            n = min(band, rows - r0)
            tiles = x.new_empty((t, t, b, n, cols, c))
            native.input_tiles(x, tile, r0, n, tiles, activation)
            yield r0, n, tiles
        return
    if activation is not None:
        raise RuntimeError("an activated input needs the compiled transforms (kandinsky.ops.native)")
    padded = _padded_channels_last(x)  # (B, H+2, W+2, C)
    for r0 in range(0, rows, band):
        n = min(band, rows - r0)
        col_t = x.new_empty((t, b, tile * n + 2, cols, c))
        tiles = x.new_empty((t, t, b, n, cols, c))
        src = padded[:, tile * r0:tile * r0 + tile * n + 2]  # the band's padded rows, overlapping by 2
        # separable: along columns (tiles overlap by two pixels) then rows
        transform_input([src[:, :, j:j + tile * cols:tile] for j in range(t)], col_t)
        transform_input([col_t[:, :, j:j + tile * n:tile] for j in range(t)], tiles)
        yield r0, n, tiles


def _winograd_bands(x: torch.Tensor, bias: torch.Tensor | None, kernel: torch.Tensor, tile: int, transform_input,
                    transform_output, tiles_per_chunk: int,
                    activation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The Winograd F(tile x tile, 3x3) convolution with the (T*T, C, K) transformed ``kernel`` (T = tile + 2)
    and the one-axis transforms B^T (``transform_input``) and A^T (``transform_output``).

    The image is processed in bands of tile rows, so that the transformed input (T*T/tile^2 times the band's
    pixels) and the GEMM output stay small; per-band buffers stay under glibc's mmap threshold, so they are
    recycled without page faults.
    """
    b, c, height, width = x.shape
    k, t = kernel.shape[2], tile + 2
    rows, cols = height // tile, width // tile  # output tiles
    out = torch.empty((b, height, width, k), dtype=x.dtype, device=x.device)
    out_tiles = out.view(b, rows, tile, cols, tile, k)
    for r0, n, tiles in _input_tile_bands(x, tile, transform_input, tiles_per_chunk, activation):
        products = torch.bmm(tiles.view(t * t, -1, c), kernel).view(t, t, b, n, cols, k)
        if _native(x):
            native.output_tiles(products, bias, tile, r0, out.permute(0, 3, 1, 2))
            continue
        if bias is not None:
            products[1, 1] += bias  # A^T's column 1 is all ones: A^T m A adds the (1, 1) entry to every output
        # output transform A^T m A: along rows into a buffer, then columns straight into the output pixels
        row_t = x.new_empty((tile, t, b, n, cols, k))
        transform_output(list(products), list(row_t))
        for r in range(tile):
            transform_output(list(row_t[r]), [out_tiles[:, r0:r0 + n, r, :, j] for j in range(tile)])
    return out.permute(0, 3, 1, 2)


def _native(x: torch.Tensor) -> bool:
    """Whether the compiled transforms (:mod:`kandinsky.ops.native`) take ``x``: float32 on the CPU, where they
    could be built."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and native.library() is not None


def _check_winograd(name: str, tile: int, x: torch.Tensor, weight: torch.Tensor, transposed: bool = False) -> None:
    _, c, height, width = x.shape
    if height % tile or width % tile:
        raise ValueError(f"x: {name} needs height and width divisible by {tile}, got {height}x{width}")
    if transposed and (weight.shape[0], *weight.shape[2:]) != (c, 3, 3):
        raise ValueError(f"weight: expected shape ({c}, C, 3, 3) for the transposed convolution of x with {c} "
                         f"channels, got {tuple(weight.shape)}")
    if not transposed and weight.shape[1:] != (c, 3, 3):
        raise ValueError(f"weight: expected shape (K, {c}, 3, 3) for x with {c} channels, got {tuple(weight.shape)}")


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False,
                     activation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for even H and W by Winograd F(2x2, 3x3); returns a
    channels-last (B, K, H, W) tensor. ``transposed``: ``F.conv_transpose2d(x, weight, bias, padding=1)``
    instead (x with K channels, a (B, C, H, W) result), the convolution's input gradient. Not differentiable
    itself (it writes into buffers with ``out=``; :class:`WinogradConv3x3` is). The kernel is transformed on every
    call (no second copy is kept). ``activation``: (B, C) ``(scale, shift)``, the convolution of
    ``silu(x * scale + shift)`` computed as ``x`` is read (:func:`activated_conv3x3`)."""
    _check_winograd("winograd_conv3x3", 2, x, weight, transposed)
    return _winograd_bands(x, bias, _winograd_kernel(weight, _WINOGRAD_G, transposed), 2, _winograd23_input,
                           _winograd23_output, _WINOGRAD_TILES_PER_CHUNK, activation)


def _reusable_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer kept across calls: a normal tensor even when first needed under ``torch.inference_mode``, where
    an inference tensor could not be written to by later calls outside it."""
    with torch.inference_mode(False):
        return torch.empty(numel, dtype=dtype)


# per thread: the transformed kernel of the F(4x4, 3x3) layer running now, or its weight gradient in the
# transformed domain (the backward pass)
_kernel_scratch = threading.local()


def _scratch_kernel(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``numel`` elements of this thread's reused buffer (:func:`_winograd43_kernel`), grown as needed. Whatever a
    caller wrote there before is overwritten by the next caller: never hold a view of it across layers (a
    backward pass recomputes its transformed kernels)."""
    buffer = getattr(_kernel_scratch, "buffer", None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = _kernel_scratch.buffer = None  # free the old one first
        buffer = _kernel_scratch.buffer = _reusable_buffer(numel, dtype)
    return buffer[:numel]


def _winograd43_kernel(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """:func:`_winograd_kernel` for F(4x4, 3x3), in a per-thread buffer that every layer reuses.

    The transformed kernel is 4x the layer's weights: a fresh one per call would be served by ``mmap`` and
    fault its pages in again on every call, which made the transform several times slower (see
    :func:`float_weight`). The buffer is as large as the largest layer's transformed kernel.
    """
    out = None
    if weight.device.type == "cpu" and _inference(weight, weight):
        out = _scratch_kernel(36 * weight.shape[0] * weight.shape[1], weight.dtype)
    return _winograd_kernel(weight, _WINOGRAD43_G, transposed, out)


def _winograd43_input(d: list[torch.Tensor], out: torch.Tensor) -> None:
    """``out[i] = sum_j B^T[i, j] d[j]`` for F(4x4, 3x3)'s B^T, in 12 elementwise passes (shared terms)."""
    torch.add(d[4], d[0], alpha=4, out=out[0]).add_(d[2], alpha=-5)  # 4 d0 - 5 d2 + d4
    torch.add(d[5], d[1], alpha=4, out=out[5]).add_(d[3], alpha=-5)  # 4 d1 - 5 d3 + d5
    torch.add(d[4], d[2], alpha=-4, out=out[1])  # (d4 - 4 d2) +- (d3 - 4 d1)
    torch.add(d[3], d[1], alpha=-4, out=out[2])
    out[1].add_(out[2])
    torch.add(out[1], out[2], alpha=-2, out=out[2])
    torch.sub(d[4], d[2], out=out[3])  # (d4 - d2) +- 2 (d3 - d1)
    torch.sub(d[3], d[1], out=out[4])
    out[3].add_(out[4], alpha=2)
    torch.add(out[3], out[4], alpha=-4, out=out[4])


def _winograd43_output(m: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """``out[i] = sum_j A^T[i, j] m[j]`` for F(4x4, 3x3)'s A^T, in 10 elementwise passes (shared terms)."""
    torch.add(m[1], m[2], out=out[0])  # s = m1 + m2, t = m3 + m4: out0 = m0 + s + t, out2 = s + 4 t
    torch.add(m[3], m[4], out=out[2])
    out[0].add_(out[2])
    torch.add(out[0], out[2], alpha=3, out=out[2])
    out[0].add_(m[0])
    torch.sub(m[1], m[2], out=out[1])  # u = m1 - m2, v = m3 - m4: out1 = u + 2 v, out3 = u + 8 v + m5
    torch.sub(m[3], m[4], out=out[3])
    out[1].add_(out[3], alpha=2)
    torch.add(out[1], out[3], alpha=6, out=out[3]).add_(m[5])


def winograd43_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False,
                       activation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for H and W divisible by 4 by Winograd F(4x4, 3x3); returns a
    channels-last (B, K, H, W) tensor. ``transposed``: ``F.conv_transpose2d(x, weight, bias, padding=1)``
    instead (x with K channels, a (B, C, H, W) result), the convolution's input gradient. Not differentiable
    itself (it writes into buffers with ``out=``; :class:`WinogradConv3x3` is). The kernel is transformed on every
    call, into a buffer that every layer reuses (:func:`_winograd43_kernel`). ``activation``: as
    :func:`winograd_conv3x3`'s."""
    _check_winograd("winograd43_conv3x3", 4, x, weight, transposed)
    return _winograd_bands(x, bias, _winograd43_kernel(weight, transposed), 4, _winograd43_input,
                           _winograd43_output, _WINOGRAD43_TILES_PER_CHUNK, activation)


def _winograd23_output_adjoint(y: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """``out[i] = sum_j A[i, j] y[j]`` for F(2x2, 3x3)'s A^T (the transpose of :func:`_winograd23_output`)."""
    out[0].copy_(y[0])
    torch.add(y[0], y[1], out=out[1])
    torch.sub(y[0], y[1], out=out[2])
    torch.neg(y[1], out=out[3])


def _winograd43_output_adjoint(y: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """``out[i] = sum_j A[i, j] y[j]`` for F(4x4, 3x3)'s A^T (the transpose of :func:`_winograd43_output`), in 9
    elementwise passes (shared terms)."""
    out[0].copy_(y[0])
    out[5].copy_(y[3])
    torch.add(y[0], y[2], out=out[1])  # p = y0 + y2, q = y1 + y3: out1 = p + q, out2 = p - q
    torch.add(y[1], y[3], out=out[2])
    out[1].add_(out[2])
    torch.add(out[1], out[2], alpha=-2, out=out[2])
    torch.add(y[0], y[2], alpha=4, out=out[3])  # r = y0 + 4 y2, s = y1 + 4 y3: out3 = r + 2 s, out4 = r - 2 s
    torch.add(y[1], y[3], alpha=4, out=out[4])
    out[3].add_(out[4], alpha=2)
    torch.add(out[3], out[4], alpha=-4, out=out[4])


def _winograd_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, tile: int, transform, transform_input,
                          output_adjoint, tiles_per_chunk: int, scratch: bool) -> torch.Tensor:
    """The gradient of the weight of ``F.conv2d(x, weight, padding=1)`` for the output gradient ``grad_y``, a
    contiguous (K, C, 3, 3) tensor, computed in Winograd F(tile x tile, 3x3)'s transformed domain.

    The forward's products are ``M[xi] = V[xi] U[xi]`` (V the transformed input tiles ``B^T d B``, U the
    transformed kernel ``G g G^T``) read by ``Y = A^T M A``; backwards ``dM = A dY A^T``, ``dU[xi] = sum over
    tiles of dM[xi]^T V[xi]`` (the forward's GEMM count and sizes), band by band as the forward (V is transformed
    again rather than kept from the forward: 2.25x the input), and ``dg = G^T dU G``. ``scratch``: dU in this
    thread's reused buffer (:func:`_scratch_kernel`, the size of a transformed kernel), else a fresh one.

    It measured 0.5-0.95x the time of oneDNN's weight gradient on the UNet's 64x64 and 32x32 maps at batch 1 (the
    maps Winograd trains on), 0.7-1.3x on 16x16 maps and 1.15-1.3x on 8x8 maps (few tiles per GEMM).
    """
    b, c, height, width = x.shape
    k, t = grad_y.shape[1], tile + 2
    rows, cols = height // tile, width // tile
    # (B, rows, tile, cols, tile, K): a view in any layout (only splits of axes)
    dy = grad_y.permute(0, 2, 3, 1).unflatten(1, (rows, tile)).unflatten(3, (cols, tile))
    numel = t * t * k * c
    grad_u = (_scratch_kernel(numel, x.dtype) if scratch else x.new_empty(numel)).view(t * t, k, c)
    if _native(grad_y) and grad_y.stride(1) != 1:
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    for r0, n, tiles in _input_tile_bands(x, tile, transform_input, tiles_per_chunk):
        grad_m = x.new_empty((t, t, b, n, cols, k))
        if _native(grad_y):
            native.output_adjoint_tiles(grad_y, tile, r0, n, grad_m)
        else:  # A dY A^T, separable: along columns (per output row of the tile), then rows
            row_t = x.new_empty((tile, t, b, n, cols, k))
            for r in range(tile):
                output_adjoint([dy[:, r0:r0 + n, r, :, j] for j in range(tile)], list(row_t[r]))
            output_adjoint(list(row_t), list(grad_m))
        # dU[xi] (K, C) += dM[xi]^T (K, N) V[xi] (N, C)
        m, v = grad_m.view(t * t, -1, k).transpose(1, 2), tiles.view(t * t, -1, c)
        if r0 == 0:
            torch.bmm(m, v, out=grad_u)
        else:
            grad_u.baddbmm_(m, v)
    gg = _kernel_transform(transform, x)
    # dW[k, c, ij] = sum_xi dU[xi, k, c] gg[xi, ij]: one GEMM into a contiguous (K, C, 3, 3) gradient
    return torch.mm(grad_u.view(t * t, k * c).t(), gg).view(k, c, 3, 3)


def _winograd_path(tile: int):
    """(convolution, weight gradient) of Winograd F(tile x tile, 3x3) for :class:`WinogradConv3x3`; looked up at
    each call, so that a test can wrap the module's functions."""
    if tile == 4:
        return winograd43_conv3x3, functools.partial(
            _winograd_weight_grad, tile=4, transform=_WINOGRAD43_G, transform_input=_winograd43_input,
            output_adjoint=_winograd43_output_adjoint, tiles_per_chunk=_WINOGRAD43_TILES_PER_CHUNK, scratch=True)
    return winograd_conv3x3, functools.partial(
        _winograd_weight_grad, tile=2, transform=_WINOGRAD_G, transform_input=_winograd23_input,
        output_adjoint=_winograd23_output_adjoint, tiles_per_chunk=_WINOGRAD_TILES_PER_CHUNK, scratch=False)


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if tensor.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class WinogradConv3x3(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, padding=1)`` by Winograd F(tile x tile, 3x3) (``tile`` 4 or 2), differentiable:
    ``WinogradConv3x3.apply(x, weight, bias, tile)``, H and W divisible by ``tile``, float32.

    * forward: :func:`winograd43_conv3x3` or :func:`winograd_conv3x3`;
    * input gradient: the transposed convolution of the output gradient, itself a same-padding 3x3 convolution
      (kernel rotated, channels swapped), so it runs through the same Winograd path;
    * weight gradient: in the transformed domain (:func:`_winograd_weight_grad`), the same GEMM count as the
      forward, also 4x (2.25x) fewer multiplications than oneDNN's; bias gradient: the sum of the output gradient.

    The output and the input gradient come in ``x``'s memory format, so a trained model keeps its contiguous
    activations: oneDNN's plain convolutions elsewhere in the model ran 1.4-1.7x slower on channels-last inputs
    with contiguous kernels (16x16 and 8x8 maps), while transposing the Winograd kernels' channels-last results
    costs ~1-2 ms on the UNet's largest map. Grad mode is off inside ``forward`` and ``backward``, so the
    per-thread kernel buffer (:func:`_scratch_kernel`) serves both; it holds only the layer running now, so the
    backward transforms its kernel again rather than keeping the forward's.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.tile, ctx.with_bias = tile, bias is not None
        return _winograd_path(tile)[0](x, weight, bias).contiguous(memory_format=_memory_format(x))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        convolve, weight_grad = _winograd_path(ctx.tile)
        # the Winograd kernels read channels-last tiles: one transposition here rather than strided reads in each
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = convolve(grad_y, weight, None, True).contiguous(memory_format=_memory_format(x))
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(x, grad_y).contiguous(memory_format=_memory_format(weight))
        if ctx.with_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def _shifted_windows(x: torch.Tensor) -> list[torch.Tensor]:
    """The nine (B, H, W, C) windows of the zero-padded (B, C, H, W) ``x``, taps (kh, kw) in row-major order."""
    height, width = x.shape[2:]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, C)
    return [padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)]


def gemm_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` as one GEMM over the nine shifted windows; returns a
    channels-last (B, K, H, W) tensor.

    For small maps oneDNN spends much of its time re-laying out the kernel for few output pixels, while
    this GEMM reads the kernel as it is: the columns are ordered as the kernel's memory, [kh, kw, C] for a
    channels-last kernel, [C, kh, kw] for a contiguous one (as loaded from a file, and the trainer's), so the GEMM
    operand is always a view. (A reshaped copy of a contiguous kernel would also be what autograd keeps for the
    backward: 1.8 GiB more for a training step of the UNet.) Without autograd the [C, kh, kw] columns come from
    the compiled :func:`~kandinsky.ops.native.columns3x3` where there is one.
    """
    b, c, height, width = x.shape
    if weight.is_contiguous():
        kernel = weight.view(weight.shape[0], c * 9)
        if _native(x) and x.stride(1) == 1 and _inference(x, weight):
            columns = native.columns3x3(x)  # (B*H*W, [C, kh, kw])
        else:
            columns = torch.stack(_shifted_windows(x), dim=-1).view(b * height * width, c * 9)
    else:
        columns = torch.cat(_shifted_windows(x), dim=-1).view(b * height * width, 9 * c)  # (B*H*W, [kh, kw, C])
        kernel = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * c)  # a view when channels-last
    out = onednn_linear(columns, kernel, bias)  # (B*H*W, K); oneDNN's GEMM is the faster for these shapes
    return out.view(b, height, width, -1).permute(0, 3, 1, 2)


def _inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def _is_same_padding_3x3(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


class Conv3x3(FastModule, nn.Conv2d):
    """``nn.Conv2d(C, K, 3, padding=1)`` with faster CPU paths. Without autograd (channels-last outputs):

    * float32 maps of at least ``WINOGRAD43_MIN_PIXELS`` with sides divisible by 4 and at least
      ``WINOGRAD43_MIN_CHANNELS`` input and output channels: :func:`winograd43_conv3x3`;
    * else float32 maps of at least ``WINOGRAD_MIN_PIXELS`` with even sides and at least ``WINOGRAD_MIN_CHANNELS``
      input and output channels: :func:`winograd_conv3x3`;
    * else maps of at most ``GEMM_MAX_PIXELS``: :func:`gemm_conv3x3`.

    Under autograd (training; outputs in the input's memory format), float32 only and not under autocast:

    * the same Winograd choice on maps of at least ``TRAIN_WINOGRAD_MIN_PIXELS``, differentiable
      (:class:`WinogradConv3x3`);
    * else maps of at most ``TRAIN_GEMM_MAX_PIXELS`` with at least ``TRAIN_GEMM_MIN_CHANNELS`` input and output
      channels: :func:`gemm_conv3x3`, differentiable as it is.

    In float32 the kernel may be contiguous or channels-last: the Winograd paths transform it either way, and the
    GEMM path orders its columns as the kernel's memory. So :func:`kandinsky.ops.optimize` leaves it as loaded,
    no copy out of the weights file (only oneDNN's direct convolution, the fallback for other maps, re-lays out a
    contiguous kernel per call).
    """

    @property
    def any_kernel_layout(self) -> bool:
        return self.weight.dtype == torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x, self.weight, self.bias)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This layer's convolution of ``x`` with ``weight`` and ``bias``, by the path for ``x``'s size and dtype."""
        height, width = x.shape[2:]
        if x.device.type != "cpu":
            return self._conv_forward(x, weight, bias)
        if not _inference(x, weight):
            return self._differentiable(x, weight, bias)
        tile = self._winograd_tile(x) if x.dtype == torch.float32 else None
        if tile is not None:
            return _winograd_path(tile)[0](x, weight, bias)
        if height * width <= GEMM_MAX_PIXELS:
            return gemm_conv3x3(x, weight, bias)
        return self._conv_forward(x, weight, bias)

    def _differentiable(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution under autograd: the float32 paths that train faster than the plain layer (see
        ``TRAIN_WINOGRAD_MIN_PIXELS``), with outputs in ``x``'s memory format; the plain layer otherwise and for
        other dtypes and under autocast (which would run the Winograd GEMMs in the half dtype)."""
        floats = (x, weight) if bias is None else (x, weight, bias)
        if torch.is_autocast_enabled("cpu") or any(t.dtype != torch.float32 for t in floats):
            return self._conv_forward(x, weight, bias)
        height, width = x.shape[2:]
        tile = self._winograd_tile(x) if height * width >= TRAIN_WINOGRAD_MIN_PIXELS else None
        if tile is not None:
            return WinogradConv3x3.apply(x, weight, bias, tile)
        if height * width <= TRAIN_GEMM_MAX_PIXELS and min(x.shape[1], self.out_channels) >= TRAIN_GEMM_MIN_CHANNELS:
            # differentiable as it is (its oneDNN GEMM falls back to F.linear under autograd)
            return gemm_conv3x3(x, weight, bias).contiguous(memory_format=_memory_format(x))
        return self._conv_forward(x, weight, bias)

    def _winograd_tile(self, x: torch.Tensor) -> int | None:
        """4: Winograd F(4x4, 3x3) for ``x``'s size and this layer's channels, 2: F(2x2, 3x3), None: neither."""
        _, c, height, width = x.shape
        channels = min(c, self.out_channels)
        if (height * width >= WINOGRAD43_MIN_PIXELS and height % 4 == 0 and width % 4 == 0
                and channels >= WINOGRAD43_MIN_CHANNELS):
            return 4
        if (height * width >= WINOGRAD_MIN_PIXELS and height % 2 == 0 and width % 2 == 0
                and channels >= WINOGRAD_MIN_CHANNELS):
            return 2
        return None

    def convolve_activated(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``self(F.silu(x * scale + shift))`` for float32 ``scale`` and ``shift`` of shape (B, C), an affine map per
        sample and channel (a GroupNorm, :func:`group_norm_scale_shift`), or (B, C, h, w) with h and w dividing
        ``x``'s height and width, where each pixel takes its block's (MoVQ's spatial norm at the latent's size,
        :func:`spatial_norm_scale_shift`). On a Winograd path with the compiled transforms (inference) the
        activation is applied as the input transform reads ``x``, so the activated map is never written out;
        elsewhere it is computed first."""
        if scale.dim() == 2:
            scale, shift = scale[:, :, None, None], shift[:, :, None, None]
        tile = self._winograd_tile(x) if _native(x) and _inference(x, self.weight) else None
        if tile is None:
            if scale.shape[2:] != (1, 1):  # nearest upsampling by integer factors: each block repeats its pixel
                scale, shift = (F.interpolate(t, size=x.shape[2:], mode="nearest") for t in (scale, shift))
            return self(F.silu(torch.addcmul(shift, x, scale)))
        activation = tuple(t.permute(0, 2, 3, 1).contiguous() for t in (scale, shift))  # (B, h, w, C)
        return _winograd_path(tile)[0](x, self.weight, self.bias, activation=activation)


def group_norm_scale_shift(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) float32 ``(scale, shift)`` such that ``norm(x) == x * scale + shift`` per sample and channel, for a
    float32 (B, C, H, W) ``x``, from statistics accumulated in float64 in one read of ``x`` (channels-last) (:func:`kandinsky.ops.native.channel_moments`; GroupNorm's own CPU kernel applies the same affine map)."""
    b, c, height, width = x.shape
    groups, per_group = norm.num_groups, c // norm.num_groups
    x = x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)
    moments = native.channel_moments(x).view(b, 2, groups, per_group).sum(-1) / (height * width * per_group)
    mean, mean_square = moments.unbind(1)  # (B, G) each
    rstd = (mean_square - mean * mean).clamp_min(0).add(norm.eps).rsqrt()
    scale = rstd.repeat_interleave(per_group, dim=1)  # (B, C)
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if norm.affine:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
    return scale.float(), shift.float()


def spatial_norm_scale_shift(norm: movq.SpatialNorm, x: torch.Tensor, zq: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) float32 ``(scale, shift)`` such that ``norm(x, zq)`` is ``x * scale + shift`` with each pixel of
    ``x`` taking the values of its block, for MoVQ's spatial norm with an (h, w) latent ``zq`` whose sides divide
    ``x``'s: ``(x * a + b) * S + T`` with the GroupNorm's (B, C) ``a``, ``b`` and ``S``, ``T`` from ``zq``."""
    a, b = group_norm_scale_shift(norm.norm, x)
    latent_scale, latent_shift = norm.to_scale_shift(zq).float().chunk(2, dim=1)  # (B, C, h, w) each
    return latent_scale * a[:, :, None, None], torch.addcmul(latent_shift, latent_scale, b[:, :, None, None])


def _fuses_norms(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether a fused residual block folds its norms into ``conv``'s input transform for the input ``x``."""
    return (isinstance(conv, Conv3x3) and _native(x) and _inference(x, conv.weight) and x.stride(1) == 1
            and x.shape[1] <= native.MAX_MOMENT_CHANNELS and conv._winograd_tile(x) is not None)


class FusedUNetResBlock(FastModule, unet.ResBlock):
    """``unet.ResBlock`` (without resampling) whose two GroupNorm + SiLU steps, the second with the timestep's scale
    and shift, run inside the Winograd input transforms of ``conv1`` and ``conv2``
    (:meth:`Conv3x3.convolve_activated`): the statistics take one read of the map, and the normalised and
    activated maps, two passes each over the largest activations, are never written. The plain forward where the
    convolutions take no Winograd path (small maps), under autograd and in other dtypes."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is not None or not _fuses_norms(x, self.conv1):
            return super().forward(x, emb)
        h = self.conv1.convolve_activated(x, *group_norm_scale_shift(self.norm1, x))
        emb_scale, emb_shift = self.emb_proj(F.silu(emb)).chunk(2, dim=1)  # (B, C) each
        scale, shift = group_norm_scale_shift(self.norm2, h)
        # silu((h * scale + shift) * (1 + emb_scale) + emb_shift): one affine map per sample and channel
        h = self.conv2.convolve_activated(h, (scale * (1 + emb_scale)).contiguous(),
                                          torch.addcmul(emb_shift, shift, 1 + emb_scale).contiguous())
        return h.add_(x if self.skip is None else self.skip(x))  # h: conv2's fresh output, no autograd here


class FusedMoVQResBlock(FastModule, movq.ResBlock):
    """``movq.ResBlock`` with its norms folded into its convolutions as :class:`FusedUNetResBlock`'s: the encoder's
    GroupNorms, and the decoder's spatial norms, whose scale and shift vary per latent pixel
    (:func:`spatial_norm_scale_shift`)."""

    def _activation(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None):
        if isinstance(norm, movq.SpatialNorm):
            return spatial_norm_scale_shift(norm, x, zq)
        return group_norm_scale_shift(norm, x)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        spatial = isinstance(self.norm1, movq.SpatialNorm)
        if not _fuses_norms(x, self.conv1) or (spatial and (x.shape[2] % zq.shape[2] or x.shape[3] % zq.shape[3])):
            return super().forward(x, zq)
        h = self.conv1.convolve_activated(x, *self._activation(self.norm1, x, zq))
        h = self.conv2.convolve_activated(h, *self._activation(self.norm2, h, zq))
        return h.add_(x if self.shortcut is None else self.shortcut(x))


def _detect_onednn_dtypes() -> tuple[torch.dtype, ...]:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


# Read by onednn_linear as a constant (torch.compile cannot trace the detection)
_ONEDNN_DTYPES = _detect_onednn_dtypes()


def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN's linear kernel runs on this CPU: none without the kernel in this torch build;
    bfloat16 needs AVX-512 BF16 (or AMX), without which oneDNN cannot build a bfloat16 primitive at all."""
    return _ONEDNN_DTYPES


def _onednn_linear_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


# The same call as an opaque custom op for torch.compile (eager calls skip the custom op's dispatch overhead)
_onednn_linear = torch.library.custom_op("kandinsky::onednn_linear", mutates_args=())(_onednn_linear_eager)


@_onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` through oneDNN instead of MKL where that applies (CPU, no autograd, a dtype of
    :func:`onednn_dtypes`), ``F.linear`` otherwise. Same GEMM: the results differ in summation order only.
    Under ``torch.compile`` it is one opaque custom op: inductor cannot lower oneDNN's op on a weight it did
    not pack itself, and this way a compiled model keeps the eager model's numbers."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in _ONEDNN_DTYPES
            and _inference(x, weight)):
        if torch.compiler.is_compiling():
            return _onednn_linear(x, weight, bias)
        return _onednn_linear_eager(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(FastModule, nn.Linear):
    """``nn.Linear`` whose GEMM runs through :func:`onednn_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


class OneDNNLastQueryBlock(LastQueryBlock):
    """:class:`~kandinsky.ops.generic.LastQueryBlock` whose sliced QKV GEMMs run through :func:`onednn_linear`."""

    linear = staticmethod(onednn_linear)


# --- half precision without native arithmetic ---------------------------------------------------------

HALF_ENV = "KANDINSKY21_CPU_HALF"  # "native" or "upcast": overrides the detection of native_half()
HALF_DTYPES = (torch.bfloat16, torch.float16)
# CPU flags (torch.cpu.get_capabilities) of instructions that compute in each half dtype: x86, then ARM
_NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"),
                 torch.float16: ("avx512_fp16", "amx_fp16", "fp16_arith")}


@functools.cache
def _native_half_dtypes() -> frozenset[torch.dtype]:
    """The half dtypes this CPU has arithmetic instructions for."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # torch before get_capabilities: oneDNN's own checks
        mkldnn = torch.ops.mkldnn
        checks = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
        return frozenset(d for d, name in checks.items() if hasattr(mkldnn, name) and getattr(mkldnn, name)())
    flags = capabilities()
    return frozenset(d for d, names in _NATIVE_FLAGS.items() if any(flags.get(name) for name in names))


def native_half(dtype: torch.dtype) -> bool:
    """Whether the CPU computes in ``dtype`` natively: always for float32 and float64; for bfloat16 with
    AVX512-BF16 or AMX (x86) or the BF16 extension (ARM); for float16 with AVX512-FP16 or AMX-FP16 (x86) or
    FP16 arithmetic (ARM). Elsewhere torch emulates half-precision GEMMs and convolutions, several times
    slower than float32, and :func:`optimize` makes such layers compute in float32.

    The environment variable ``KANDINSKY21_CPU_HALF`` overrides the detection for the half dtypes:
    ``native`` computes in the half dtype, ``upcast`` in float32.
    """
    if dtype not in HALF_DTYPES:
        return True
    choice = os.environ.get(HALF_ENV, "")
    if choice not in ("", "native", "upcast"):
        raise ValueError(f"{HALF_ENV}: expected 'native' or 'upcast' (or unset to detect), got {choice!r}")
    return choice == "native" if choice else dtype in _native_half_dtypes()


def _float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float()


_scratch = threading.local()  # per thread: the float32 weights of the layer running now


def float_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight.float()``, without autograd in a per-thread buffer that every layer reuses (same layout).

    A fresh float32 copy per call costs more than the conversion: glibc serves allocations over 32 MiB by
    ``mmap`` and returns them on free, so every call would fault the pages in again (measured ~1 GB/s,
    against ~6 GB/s for the conversion into reused memory). The buffer is as large as the largest layer.
    """
    dense = weight.is_contiguous() or (weight.ndim == 4 and weight.is_contiguous(memory_format=torch.channels_last))
    if not (dense and weight.device.type == "cpu" and _inference(x, weight)):
        return weight.float()
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < weight.numel():
        buffer = _scratch.buffer = _reusable_buffer(weight.numel(), torch.float32)
    return buffer[:weight.numel()].as_strided(weight.shape, weight.stride()).copy_(weight)


def float32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` computed in float32 whatever the arguments' dtypes (through :func:`onednn_linear`, which
    was faster than MKL in float32 for the UNet's and the prior's shapes too); returns float32."""
    return onednn_linear(x.float(), float_weight(weight, x), _float(bias))


class UpcastLinear(FastModule, nn.Linear):
    """``nn.Linear`` with half-precision weights, computed in float32 from the weights upcast per call;
    the output in the weights' dtype."""

    float_output = False  # True: keep the float32 output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = float32_linear(x, self.weight, self.bias)
        return out if self.float_output else out.to(self.weight.dtype)


class UpcastAttentionInput(UpcastLinear):
    """:class:`UpcastLinear` for a projection to attention queries, keys or values: its float32 output goes
    to ``F.scaled_dot_product_attention``, which then runs in float32."""

    float_output = True


class UpcastConv2d(FastModule, nn.Conv2d):
    """``nn.Conv2d`` with half-precision weights, computed in float32 from the weights upcast per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x.float(), float_weight(self.weight, x), _float(self.bias)).to(self.weight.dtype)


class UpcastConv3x3(Conv3x3):
    """:class:`Conv3x3` with half-precision weights, computed in float32 from the weights upcast per call:
    the float32 paths (Winograd included) apply, to the upcast kernel in the layout of the weights."""

    any_kernel_layout = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x.float(), float_weight(self.weight, x), _float(self.bias)).to(self.weight.dtype)


class UpcastSubpixelUpsample(SubpixelUpsample):
    """:class:`~kandinsky.ops.generic.SubpixelUpsample` computing its convolutions in float32."""

    compute_dtype = torch.float32


class UpcastLastQueryBlock(LastQueryBlock):
    """:class:`~kandinsky.ops.generic.LastQueryBlock` whose sliced QKV GEMMs, and so its attention, run in float32."""

    linear = staticmethod(float32_linear)


_ATTENTION_INPUTS = ((unet.Attention, ("qkv", "context_kv")), (movq.AttentionBlock, ("qkv",)),
                     (prior.Attention, ("qkv",)))
_UPCAST = {nn.Linear: UpcastLinear, nn.Conv2d: UpcastConv2d, Conv3x3: UpcastConv3x3,
           SubpixelUpsample: UpcastSubpixelUpsample, LastQueryBlock: UpcastLastQueryBlock}
_CHEAP = (FastModule, nn.Embedding, nn.LayerNorm, nn.GroupNorm)  # lookups and norms (float32 statistics inside)
_warned: set[torch.dtype] = set()


def _upcast(module: nn.Module, dtype: torch.dtype) -> None:
    """Swap the float32-computing layers into ``module``, whose floating-point weights are ``dtype``, and warn
    once per dtype about what still computes in it."""
    ours = tuple(cls for cls, _ in _ATTENTION_INPUTS)
    attention_inputs = {id(getattr(sub, name)) for sub in module.modules() for cls, names in _ATTENTION_INPUTS
                        if isinstance(sub, cls) for name in names}
    for sub in module.modules():
        if id(sub) in attention_inputs and type(sub) is nn.Linear:
            swap(sub, UpcastAttentionInput)
        elif type(sub) in _UPCAST:
            swap(sub, _UPCAST[type(sub)])
    # left in dtype: layers of other kinds with weights, and the attention of other models (the transformers
    # text encoders), whose projections are upcast but return dtype, as the rest of those models expects
    left = sorted({type(sub).__name__ for sub in module.modules()
                   if (not any(sub.children()) and not isinstance(sub, _CHEAP)
                       and any(p.dtype == dtype for p in sub.parameters(recurse=False)))
                   or (type(sub).__name__.endswith("Attention") and not isinstance(sub, ours)
                       and any(isinstance(layer, UpcastLinear) for layer in sub.children()))})
    if left and dtype not in _warned:
        _warned.add(dtype)
        name = str(dtype).removeprefix("torch.")
        warnings.warn(f"this CPU has no native {name} arithmetic: convolutions and linear layers compute in float32 "
                      f"from the {name} weights, but these parts of {type(module).__name__} still compute in {name}, "
                      f"slower than in float32: {', '.join(left)}. dtype=torch.float32 runs them at full speed "
                      f"(twice the weight memory)", stacklevel=4)


def _swap_conv3x3(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, (unet.ResBlock, movq.ResBlock)):
            for conv in (sub.conv1, sub.conv2):
                if type(conv) is nn.Conv2d and _is_same_padding_3x3(conv):
                    swap(conv, Conv3x3)


def optimize_training(module: nn.Module) -> nn.Module:
    """Swap :class:`Conv3x3` into the residual blocks of every UNet and MoVQ in ``module`` (in place; returns it),
    for training on the CPU: in float32 its Winograd paths are differentiable (:class:`WinogradConv3x3`).

    Only that swap, unlike :func:`optimize`: the kernels keep their memory format (the trainer's parameters are
    contiguous, which FSDP shards), and the other fast modules are inference only. :func:`kandinsky.ops.plain`
    undoes it.
    """
    _swap_conv3x3(module)
    return module


def _attention_linears(block: nn.Module) -> tuple[nn.Module, ...]:
    if isinstance(block, movq.AttentionBlock):
        return block.qkv, block.proj
    return block.qkv, block.context_kv, block.proj_out


def optimize(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Swap the CPU kernels into every UNet, MoVQ and Prior in ``module`` (in place) for weights of ``dtype``;
    where :func:`native_half` says ``dtype`` is emulated, make every linear layer and convolution in
    ``module`` (text encoders included) compute in float32."""
    onednn = dtype in onednn_dtypes() and native_half(dtype)
    _swap_conv3x3(module)
    for sub in module.modules():
        if dtype == torch.float32 and type(sub) is unet.ResBlock and sub.resample is None:
            swap(sub, FusedUNetResBlock)
        elif dtype == torch.float32 and type(sub) is movq.ResBlock:
            swap(sub, FusedMoVQResBlock)
        if isinstance(sub, prior.Prior) and onednn:
            for layer in sub.modules():
                if type(layer) is nn.Linear:
                    swap(layer, OneDNNLinear)
                elif type(layer) is LastQueryBlock:
                    swap(layer, OneDNNLastQueryBlock)
        if isinstance(sub, (unet.Attention, movq.AttentionBlock)) and onednn:
            # thousands of tokens by 512-1536 channels: oneDNN's shapes
            for layer in _attention_linears(sub):
                if type(layer) is nn.Linear:
                    swap(layer, OneDNNLinear)
    if not native_half(dtype):
        _upcast(module, dtype)
    return module

"""Small layers shared by several models.

Precision policy: weights may be float32, bfloat16 or float16; normalisation statistics and
timestep embeddings are computed in float32 and cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps as ``[cos, sin]`` halves, in float32: (B, dim).

    This is the guided-diffusion layout (diffusers: ``flip_sin_to_cos=True, downscale_freq_shift=0``).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 whatever the input dtype.

    PyTorch's own half-precision kernel is not enough even on CUDA, where it accumulates in float32: it
    stores the mean in the input dtype, so a group at mean 50 with unit spread comes out wrong by up to
    0.017 (float16) or 0.093 (bfloat16), measured on an H200 (tests/test_cuda.py).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm whose statistics are computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


# Winograd F(2x2, 3x3): a 3x3 convolution of 4x4 input tiles (stride 2) computed as 16 channel GEMMs in a
# transformed domain, 2.25x fewer multiplications than direct. The transforms use only 0, +-1 and +-1/2,
# so float32 results stay as close to exact as the direct convolution's (measured max relative error
# 3-4e-7 against float64, direct oneDNN 1.5e-6).
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))  # kernel transform
_WINOGRAD_TILES_PER_CHUNK = 512  # GEMM rows per chunk: keeps the transform buffers in cache, GEMMs efficient
WINOGRAD_MIN_CHANNELS = 256  # Conv3x3 uses Winograd from this many input and output channels (CPU, float32)
WINOGRAD_MIN_PIXELS = 1024  # ... and from this many pixels (32x32); smaller maps take the GEMM or direct path


def _winograd_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) kernel -> (16, C, K): ``G g G^T`` for every (output, input) channel pair."""
    k, c = weight.shape[:2]
    g = torch.tensor(_WINOGRAD_G, dtype=weight.dtype, device=weight.device)
    gg = torch.einsum("ai,bj->abij", g, g).reshape(16, 9)
    # a view for channels-last kernels; the result is (K, 16, C), read by the GEMM as transposed (16, C, K)
    return torch.matmul(gg, weight.permute(0, 2, 3, 1).reshape(k, 9, c)).permute(1, 2, 0)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for even H and W by Winograd F(2x2, 3x3); returns a
    channels-last (B, K, H, W) tensor. Inference only (it writes into buffers with ``out=``).

    The image is processed in bands of tile rows, so that the transformed input (4x the band's pixels)
    and the GEMM output stay small; the kernel is transformed on every call (no second copy is kept).
    """
    b, c, height, width = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"x: winograd_conv3x3 needs even height and width, got {height}x{width}")
    if weight.shape[1:] != (c, 3, 3):
        raise ValueError(f"weight: expected shape (K, {c}, 3, 3) for x with {c} channels, got {tuple(weight.shape)}")
    k = weight.shape[0]
    rows, cols = height // 2, width // 2  # output tiles of 2x2 pixels
    band = max(1, min(rows, _WINOGRAD_TILES_PER_CHUNK // (b * cols)))  # tile rows per chunk
    kernel = _winograd_kernel(weight)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, C)
    out = torch.empty((b, height, width, k), dtype=x.dtype, device=x.device)
    out_tiles = out.view(b, rows, 2, cols, 2, k)
    for r0 in range(0, rows, band):
        n = min(band, rows - r0)
        # per-band buffers stay under glibc's mmap threshold, so they are recycled without page faults
        col_t = x.new_empty((4, b, 2 * n + 2, cols, c))
        tiles = x.new_empty((4, 4, b, n, cols, c))
        src = padded[:, 2 * r0:2 * r0 + 2 * n + 2]  # the band's padded rows, overlapping by 2
        # input transform B^T d B, separable: along columns (tiles overlap by two pixels) then rows
        c0, c1, c2, c3 = (src[:, :, j:j + 2 * cols:2] for j in range(4))
        torch.sub(c0, c2, out=col_t[0])
        torch.add(c1, c2, out=col_t[1])
        torch.sub(c2, c1, out=col_t[2])
        torch.sub(c1, c3, out=col_t[3])
        d0, d1, d2, d3 = (col_t[:, :, j:j + 2 * n:2] for j in range(4))
        torch.sub(d0, d2, out=tiles[0])
        torch.add(d1, d2, out=tiles[1])
        torch.sub(d2, d1, out=tiles[2])
        torch.sub(d1, d3, out=tiles[3])
        products = torch.bmm(tiles.view(16, -1, c), kernel).view(4, 4, b, n, cols, k)
        if bias is not None:
            products[1, 1] += bias  # A^T m A adds the (1, 1) entry to all four outputs
        # output transform A^T m A: along rows, then columns straight into the output pixels
        for r, row in enumerate((products[0] + products[1] + products[2], products[1] - products[2] - products[3])):
            torch.add(row[0], row[1], out=out_tiles[:, r0:r0 + n, r, :, 0]).add_(row[2])
            torch.sub(row[1], row[2], out=out_tiles[:, r0:r0 + n, r, :, 1]).sub_(row[3])
    return out.permute(0, 3, 1, 2)


def _inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


class Conv3x3(nn.Conv2d):
    """3x3 convolution with padding 1, with two faster CPU inference paths (measured on 2 threads against
    oneDNN's direct convolution, channels-last):

    * float32 maps of 32x32 or more with even sides and 256 channels or more: Winograd F(2x2, 3x3)
      (:func:`winograd_conv3x3`), 1.3-1.7x faster at 256-768 channels (slower at 128: the transforms,
      which cost the same per channel, then outweigh the saved multiplications);
    * maps of 16x16 or less: one GEMM over the nine shifted windows. There oneDNN spends much of its time
      re-laying out the kernel (up to 85 MB) for few output pixels, while the GEMM reads the channels-last
      kernel as it is (~2x faster at 8x8, ~1.5x at 16x16, slower from 32x32 on).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        if x.device.type != "cpu":
            return super().forward(x)
        if height * width <= 256:
            padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, C)
            windows = [padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)]
            columns = torch.cat(windows, dim=-1).view(b * height * width, 9 * c)  # (B*H*W, [kh, kw, C])
            kernel = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, 9 * c)  # a view when channels-last
            out = torch.addmm(self.bias, columns, kernel.t())  # (B*H*W, C_out)
            return out.view(b, height, width, -1).permute(0, 3, 1, 2)  # channels-last (B, C_out, H, W)
        if (x.dtype == torch.float32 and height * width >= WINOGRAD_MIN_PIXELS and height % 2 == 0 and width % 2 == 0
                and min(c, self.out_channels) >= WINOGRAD_MIN_CHANNELS and _inference(x, self.weight)):
            return winograd_conv3x3(x, self.weight, self.bias)
        return super().forward(x)

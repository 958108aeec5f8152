"""Small layers shared by several models.

Precision policy: weights may be float32, bfloat16 or float16; normalisation statistics and
timestep embeddings are computed in float32 and cast back to the input dtype.
"""

from __future__ import annotations

import dataclasses
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


def check_config(config) -> None:
    """Refuse a config dataclass whose integer fields are not positive integers, or whose tuple fields do not hold
    integers (``*_levels``: >= 0, others >= 1, ``channel_mult`` not empty): a ``ValueError`` naming the field,
    before any layer is built (a negative width would otherwise fail deep inside torch)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(field.default, int) and not isinstance(field.default, bool):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name}: expected a positive integer, got {value!r}")
        elif isinstance(field.default, tuple):
            least = 0 if field.name.endswith("levels") else 1
            if not isinstance(value, tuple) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= least for v in value) or \
                    (field.name == "channel_mult" and not value):
                raise ValueError(f"{field.name}: expected a tuple of integers >= {least}, got {value!r}")


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

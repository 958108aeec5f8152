"""MoVQGAN: the image autoencoder of Kandinsky 2.1 (Zheng et al., "MoVQ: Modulating Quantized Vectors", 2022).

A VQGAN whose decoder normalisation layers are *spatially conditioned* on the latent: every decoder
norm is ``GroupNorm(features) * scale(latent) + shift(latent)`` where scale and shift are 1x1 convs of
the latent, nearest-resized to the feature map. Kandinsky decodes the diffusion output *without*
quantising it (``decode``), the codebook is only used by ``quantize``.

Example::

    movq = MoVQ(MoVQConfig())                  # or kandinsky.convert.from_original("movq", ...)
    latents = movq.encode(images)              # (B,3,H,W) in [-1,1] -> (B,4,H/8,W/8)
    quantized, indices = movq.quantize(latents, return_indices=True)
    images = movq.decode(latents)              # no quantisation, like the original MOVQ.decode
    big = movq.decode_tiled(big_latents)       # large images in a few GiB (approximate, see decode_tiled)

Two exact rewrites in the spatial norm keep it small next to the 3x3 convs:

* its two 1x1 convs run on the small latent, and the per-latent-pixel scale/shift is broadcast over the
  nearest-upsampled blocks: a 1x1 conv commutes with nearest upsampling;
* the GroupNorm affine is folded into that scale/shift, and norm + modulation + SiLU run in place on the
  one tensor ``group_norm`` allocates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.models.layers import GroupNorm32, check_config


@dataclass
class MoVQConfig:
    """Hyperparameters; the defaults are the official Kandinsky 2.1 MoVQ (67.8M parameters).

    ``attention_levels`` lists the resolution levels (0 = full resolution) whose blocks are followed
    by self-attention, in encoder and decoder alike; the middle blocks always have one. The original
    expresses this as ``attn_resolutions=[32]`` at nominal ``resolution=256``, i.e. level 3.
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (3,)
    z_channels: int = 4
    embed_dim: int = 4
    n_embed: int = 16384
    norm_groups: int = 32  # the encoder's GroupNorms
    decoder_norm_groups: int = 32  # the decoder's (spatial) GroupNorms: diffusers' VQModel always has 32 there

    def __post_init__(self):
        check_config(self)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class EncoderNorm(GroupNorm32):
    """GroupNorm (``norm_groups`` groups, eps 1e-6, statistics in float32), optionally followed by SiLU.

    Takes (and ignores) ``zq`` so that encoder and decoder blocks share one code path.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__(groups, channels, eps=1e-6)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
        x = super().forward(x)  # a fresh tensor: SiLU may run in place
        return F.silu(x, inplace=True) if silu else x


class SpatialNorm(nn.Module):
    """MoVQ's latent-conditioned norm: ``GroupNorm(x) * scale(zq_up) + shift(zq_up)`` (+ optional SiLU).

    ``to_scale_shift`` is the original's ``conv_y`` and ``conv_b`` fused into one 1x1 conv.
    """

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.to_scale_shift = nn.Conv2d(zq_channels, 2 * channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor, silu: bool = False) -> torch.Tensor:
        B, C, H, W = x.shape
        h, w = zq.shape[-2:]
        if H % h or W % w:  # not an integer upsampling factor: resize the latent itself (never hit by MoVQ)
            zq = F.interpolate(zq, size=(H, W), mode="nearest")
            h, w = H, W
        # Nearest upsampling by an integer factor repeats each latent pixel over an (sh, sw) block, and a
        # 1x1 conv commutes with it: compute scale/shift at latent size and broadcast over the blocks.
        sh, sw = H // h, W // w
        scale, shift = self.to_scale_shift(zq).float().chunk(2, dim=1)  # (B,C,h,w) each
        # Fold the GroupNorm affine in: (x̂ g + b) scale + shift = x̂ (g scale) + (b scale + shift).
        gamma = self.norm.weight.float()[:, None, None]
        beta = self.norm.bias.float()[:, None, None]
        scale, shift = scale * gamma, torch.addcmul(shift, scale, beta)

        # Statistics in float32 (a copy only for half-precision inputs); x̂ is a fresh tensor we may overwrite.
        out = F.group_norm(x.float(), self.norm.num_groups, None, None, self.norm.eps)
        blocks = out.view(B, C, h, sh, w, sw)
        blocks.mul_(scale[:, :, :, None, :, None]).add_(shift[:, :, :, None, :, None])
        if silu:
            F.silu(out, inplace=True)
        return out.to(x.dtype)


class ResBlock(nn.Module):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> conv3x3, plus a (1x1-projected) residual."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, zq_channels: int | None = None):
        super().__init__()

        def norm(channels: int) -> nn.Module:
            return EncoderNorm(channels, groups) if zq_channels is None else SpatialNorm(channels, zq_channels, groups)

        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x, zq, silu=True))
        h = self.conv2(self.norm2(h, zq, silu=True))
        residual = x if self.shortcut is None else self.shortcut(x)
        return h.add_(residual)  # h is the conv's fresh output (not needed by its backward)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection (scale C^-1/2)."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None = None):
        super().__init__()
        self.norm = EncoderNorm(channels, groups) if zq_channels is None else SpatialNorm(channels, zq_channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x, zq).flatten(2).transpose(1, 2)  # (B, HW, C), a view
        q, k, v = self.qkv(tokens).unflatten(-1, (3, 1, C)).permute(2, 0, 3, 1, 4)  # each (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        out = self.proj(out.squeeze(1))  # (B, HW, C)
        return out.transpose(1, 2).view(B, C, H, W) + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (the original's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2h, 2w)


class Level(nn.Module):
    """The res blocks (each optionally followed by attention) of one resolution, plus its resampler."""

    def __init__(self, channels_in: int, channels_out: int, num_blocks: int, attention: bool,
                 resample: nn.Module | None, groups: int, zq_channels: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(channels_in if i == 0 else channels_out, channels_out, groups, zq_channels)
            for i in range(num_blocks)
        )
        self.attentions = nn.ModuleList(
            AttentionBlock(channels_out, groups, zq_channels) for _ in range(num_blocks if attention else 0)
        )
        self.resample = resample

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, zq)
            if self.attentions:
                x = self.attentions[i](x, zq)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, z_channels, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, config: MoVQConfig):
        super().__init__()
        c, mult, groups = config.channels, config.channel_mult, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, c, 3, padding=1)
        widths = [c] + [c * m for m in mult]
        last = len(mult) - 1
        self.levels = nn.ModuleList(
            Level(widths[i], widths[i + 1], config.num_res_blocks, i in config.attention_levels,
                  Downsample(widths[i + 1]) if i != last else None, groups)
            for i in range(len(mult))
        )
        width = widths[-1]
        self.mid_block1 = ResBlock(width, width, groups)
        self.mid_attention = AttentionBlock(width, groups)
        self.mid_block2 = ResBlock(width, width, groups)
        self.norm_out = EncoderNorm(width, groups)
        self.conv_out = nn.Conv2d(width, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
        x = self.mid_block2(self.mid_attention(self.mid_block1(x)))
        return self.conv_out(self.norm_out(x, silu=True))


class Decoder(nn.Module):
    """(B, z_channels, h, w) features + (B, embed_dim, h, w) conditioning latent -> image (B, out, h*f, w*f).

    ``levels[i]`` works at resolution level i (0 = full resolution) and runs from the deepest level up.
    """

    def __init__(self, config: MoVQConfig):
        super().__init__()
        c, mult, groups, zq = config.channels, config.channel_mult, config.decoder_norm_groups, config.embed_dim
        width = c * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid_block1 = ResBlock(width, width, groups, zq)
        self.mid_attention = AttentionBlock(width, groups, zq)
        self.mid_block2 = ResBlock(width, width, groups, zq)
        # level i receives the output width of level i+1 (the deepest level receives the middle width)
        widths_in = [c * m for m in mult[1:]] + [width]
        self.levels = nn.ModuleList(
            Level(widths_in[i], c * mult[i], config.num_res_blocks + 1, i in config.attention_levels,
                  Upsample(c * mult[i]) if i != 0 else None, groups, zq)
            for i in range(len(mult))
        )
        self.norm_out = SpatialNorm(c * mult[0], zq, groups)
        self.conv_out = nn.Conv2d(c * mult[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(z, zq), zq)

    def trunk(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """The stages at latent resolution (conv_in, middle, deepest level incl. its upsampling): all the
        attention of the official config, and small enough to run on a whole 1536 px latent."""
        x = self.conv_in(z)
        x = self.mid_block2(self.mid_attention(self.mid_block1(x, zq), zq), zq)
        return self.levels[-1](x, zq)

    def head(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """The remaining upsampling levels and the output conv: features at 2x latent resolution -> image."""
        for level in reversed(self.levels[:-1]):
            x = level(x, zq)
        return self.conv_out(self.norm_out(x, zq, silu=True))


def _check_input(name: str, x: torch.Tensor, channels: int, multiple: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, {channels}, H, W), "
                         f"got a {x.ndim}-D tensor of shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (shape (B, {channels}, H, W)), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"{name} height and width must be divisible by {multiple}, got {tuple(x.shape[2:])}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of length ``tile`` covering ``range(size)``, ``tile - overlap`` apart; the last one is
    moved back to end at ``size`` (so every tile is full size; its overlap with the previous one may be larger)."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _blend_ramp(starts: list[int], start: int, length: int, factor: int, device: torch.device) -> torch.Tensor:
    """1-D blending weight (length * factor output pixels) of the tile at ``start``: rises linearly across
    the overlap with the previous tile and falls across the overlap with the next one, 1 elsewhere. Within
    an overlap shared by two tiles only, the two ramps sum to exactly 1."""
    index = starts.index(start)
    pixels = torch.arange(length * factor, device=device, dtype=torch.float32) + 0.5
    weight = torch.ones_like(pixels)
    if index > 0:  # overlap with the previous tile: its end minus our start
        n = (starts[index - 1] + length - start) * factor
        weight = torch.minimum(weight, pixels / n)
    if index + 1 < len(starts):
        n = (start + length - starts[index + 1]) * factor
        weight = torch.minimum(weight, (length * factor - pixels) / n)
    return weight


class MoVQ(nn.Module):
    """The MoVQ autoencoder: ``encode`` (no quantisation), ``quantize``, ``decode`` (no quantisation).

    Inputs are cast to the weights' dtype; GroupNorm statistics and codebook distances are float32.
    """

    def __init__(self, config: MoVQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.codebook = nn.Embedding(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], H and W divisible by 8 -> latents (B, 4, H/8, W/8), not quantised."""
        _check_input("images", images, self.config.in_channels, self.config.downsample_factor)
        images = images.to(self.dtype)
        return self.quant_conv(self.encoder(images)).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1]. The latents are NOT
        quantised (they are also the spatial norms' conditioning), as the original ``MOVQ.decode``."""
        _check_input("latents", latents, self.config.embed_dim)
        latents = latents.to(self.dtype)
        return self.decoder(self.post_quant_conv(latents), latents).contiguous()

    def decode_tiled(self, latents: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """``decode`` for large latents: the decoder's latent-resolution trunk (middle blocks and deepest level,
        where all the attention is) runs on the whole latent; the memory-hungry upsampling levels run on
        overlapping ``tile`` x ``tile`` latent tiles (latent pixels; 64 = a 512 px tile), blended with linear
        ramps across each overlap. Peak memory: the trunk plus one tile, whatever the image size.

        Not identical to ``decode``: the tiled levels' GroupNorms take their statistics over their tile only
        and see zero padding at tile borders (hidden by the overlap). Measured errors: docs/parity.md.
        A latent no larger than one tile is decoded in one piece (exactly ``decode``).
        """
        _check_input("latents", latents, self.config.embed_dim)
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile must be a positive int (latent pixels), got {tile!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
            raise ValueError(f"overlap must be an int in [0, tile={tile}) (latent pixels), got {overlap!r}")
        B, _, h, w = latents.shape
        if h <= tile and w <= tile:
            return self.decode(latents)
        f = self.config.downsample_factor
        latents = latents.to(self.dtype)
        features = self.decoder.trunk(self.post_quant_conv(latents), latents)  # (B, C, s*h, s*w)
        s = features.shape[2] // h
        tops, lefts = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        # weighted sum of the tiles and sum of the weights, in float32 (for half-precision models)
        blended = torch.zeros(B, self.config.out_channels, h * f, w * f, device=latents.device)
        total = torch.zeros(h * f, w * f, device=latents.device)
        for top in tops:
            row_weight = _blend_ramp(tops, top, min(tile, h), f, latents.device)
            for left in lefts:
                weight = row_weight[:, None] * _blend_ramp(lefts, left, min(tile, w), f, latents.device)
                piece = self.decoder.head(features[:, :, top * s:(top + tile) * s, left * s:(left + tile) * s],
                                          latents[:, :, top:top + tile, left:left + tile])
                rows, cols = slice(top * f, top * f + piece.shape[2]), slice(left * f, left * f + piece.shape[3])
                blended[:, :, rows, cols].add_(piece.float() * weight)
                total[rows, cols].add_(weight)
                del piece
        return (blended / total).to(self.dtype)

    def quantize(self, latents: torch.Tensor, return_indices: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Replace each latent pixel by its nearest codebook vector (squared L2, first index on ties).

        Returns the quantised latents (B, 4, h, w), and with ``return_indices=True`` also the code
        indices (B, h, w) (int64).
        """
        _check_input("latents", latents, self.config.embed_dim)
        B, D, h, w = latents.shape
        codebook = self.codebook.weight.float()  # (n_embed, D)
        flat = latents.float().permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        # |z|^2 + |e|^2 - 2 z.e, the original's formula (its rounding decides near-ties the same way);
        # rows in chunks so that the (rows, n_embed) distance matrix stays small.
        codebook_sq = codebook.square().sum(1)
        indices = torch.cat([
            (rows.square().sum(1, keepdim=True) + codebook_sq).sub_(rows @ codebook.t(), alpha=2).argmin(1)
            for rows in flat.split(4096)
        ])
        quantized = self.codebook.weight[indices].view(B, h, w, D).permute(0, 3, 1, 2).contiguous()
        quantized = quantized.to(latents.dtype)
        if return_indices:
            return quantized, indices.view(B, h, w)
        return quantized

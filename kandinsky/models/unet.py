"""The Kandinsky 2.1 decoder UNet (text-to-image and inpainting): a guided-diffusion UNet conditioned on
the CLIP image embedding and the XLM-RoBERTa text encoder.

Conditioning, as in the original 2.1 model:

* the image embedding becomes ``num_image_tokens`` context tokens, put *before* the projected text
  hidden states; every attention layer attends jointly over [context tokens ; spatial tokens];
* the pooled text embedding (projected, then LayerNorm) plus a projection of the image embedding is
  added to the timestep embedding, which every residual block turns into a GroupNorm scale and shift.

Output: 8 channels, ``[:4]`` the noise prediction, ``[4:]`` the learned-range variance interpolation.
The inpainting UNet is the same class with ``in_channels=9``: ``cat([latents, masked_image_latents, mask])``.

Example::

    unet = UNet(UNetConfig())
    out = unet(latents, timesteps, text_hidden_states=hidden, text_embeds=pooled, image_embeds=image)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.models.layers import GroupNorm32, LayerNorm32, timestep_embedding


@dataclass
class UNetConfig:
    """Hyperparameters; the defaults are the official Kandinsky 2.1 decoder (``decoder_fp16.ckpt``)."""

    in_channels: int = 4  # 9 for inpainting: latents, masked-image latents, mask
    out_channels: int = 8  # noise prediction (4) + variance interpolation (4)
    model_channels: int = 384
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    # levels with attention (level i works at 1/2**i of the latent size); the middle block always attends
    attention_levels: tuple[int, ...] = (1, 2, 3)
    head_channels: int = 64
    context_dim: int = 768  # width of the context tokens the attention layers read (original: model_dim)
    text_hidden_dim: int = 1024  # XLM-RoBERTa hidden states
    text_embed_dim: int = 768  # projected pooled text embedding
    image_embed_dim: int = 768  # CLIP image embedding
    num_image_tokens: int = 10
    norm_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def size_multiple(self) -> int:
        """Latent height and width must be multiples of this (one halving per level transition)."""
        return 2 ** (len(self.channel_mult) - 1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, timestep scale/shift on the second GroupNorm, SiLU-conv, residual.

    ``resample="down"``/``"up"`` average-pools / nearest-upsamples both branches between the first
    activation and the first conv (guided diffusion's ``resblock_updown``).
    """

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int, groups: int,
                 resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.norm1 = GroupNorm32(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(time_embed_dim, 2 * out_channels)
        self.norm2 = GroupNorm32(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.norm1(x)))
        x = self._resample(x)
        h = self.conv1(h)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = F.silu(torch.addcmul(shift, self.norm2(h), 1 + scale))
        h = self.conv2(h)
        return h + (x if self.skip is None else self.skip(x))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels whose keys and values are prefixed by the context tokens'."""

    def __init__(self, channels: int, context_dim: int, head_channels: int, groups: int):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention channels ({channels}) must be a multiple of head_channels ({head_channels})")
        self.heads = channels // head_channels
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)  # [q | k | v], each head-major
        self.context_kv = nn.Linear(context_dim, 2 * channels)  # [k | v] of the context tokens
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        heads, ch = self.heads, c // self.heads
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)  # (B, T = H*W, C)
        q, k, v = self.qkv(tokens).unflatten(-1, (3, heads, ch)).permute(2, 0, 3, 1, 4)  # (B, heads, T, ch) each
        context_k, context_v = self.context_kv(context).unflatten(-1, (2, heads, ch)).permute(2, 0, 3, 1, 4)
        k = torch.cat([context_k, k], dim=2)  # (B, heads, S + T, ch): context first, as in the original
        v = torch.cat([context_v, v], dim=2)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, ch)
        h = self.proj_out(h.transpose(1, 2).reshape(b, height * width, c))  # (B, T, C)
        return x + h.view(b, height, width, c).permute(0, 3, 1, 2)


class Block(nn.Module):
    """One UNet stage step: a residual block, optionally attention, optionally an upsampling residual block."""

    def __init__(self, res: ResBlock, attn: Attention | None = None, upsample: ResBlock | None = None):
        super().__init__()
        self.res = res
        self.attn = attn
        self.upsample = upsample

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context)
        if self.upsample is not None:
            x = self.upsample(x, emb)
        return x


class UNet(nn.Module):
    """The Kandinsky 2.1 decoder UNet; see the module docstring for the conditioning."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        cfg = config
        mc, groups, temb = cfg.model_channels, cfg.norm_groups, cfg.time_embed_dim

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(cin, cout, temb, groups, resample)

        def attn(channels: int) -> Attention:
            return Attention(channels, cfg.context_dim, cfg.head_channels, groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.text_embed_proj = nn.Linear(cfg.text_embed_dim, temb)
        self.text_embed_norm = LayerNorm32(temb)
        self.image_embed_proj = nn.Linear(cfg.image_embed_dim, temb)
        self.image_to_tokens = nn.Linear(cfg.image_embed_dim, cfg.num_image_tokens * cfg.context_dim)
        self.text_to_context = nn.Linear(cfg.text_hidden_dim, cfg.context_dim)

        ch = mc * cfg.channel_mult[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        skip_channels = [ch]
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = mc * mult
                self.down_blocks.append(Block(res(ch, out), attn(out) if level in cfg.attention_levels else None))
                ch = out
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down_blocks.append(Block(res(ch, ch, "down")))
                skip_channels.append(ch)

        self.mid_res1 = res(ch, ch)
        self.mid_attn = attn(ch)
        self.mid_res2 = res(ch, ch)

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                out = mc * mult
                self.up_blocks.append(Block(
                    res(ch + skip_channels.pop(), out),
                    attn(out) if level in cfg.attention_levels else None,
                    res(out, out, "up") if level and i == cfg.num_res_blocks else None,
                ))
                ch = out

        self.norm_out = GroupNorm32(groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def _check_inputs(self, x, timesteps, text_hidden_states, text_embeds, image_embeds) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected a (B, {cfg.in_channels}, h, w) latent tensor, got shape {tuple(x.shape)}")
        b, _, height, width = x.shape
        m = cfg.size_multiple
        if height % m or width % m:
            raise ValueError(f"x: latent height and width must be multiples of {m}, got {height}x{width}")
        expected = {
            "text_hidden_states": (text_hidden_states, 3, f"(B={b}, L, {cfg.text_hidden_dim})", cfg.text_hidden_dim),
            "text_embeds": (text_embeds, 2, f"(B={b}, {cfg.text_embed_dim})", cfg.text_embed_dim),
            "image_embeds": (image_embeds, 2, f"(B={b}, {cfg.image_embed_dim})", cfg.image_embed_dim),
        }
        for name, (tensor, ndim, shape, dim) in expected.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name}: expected a tensor of shape {shape}, got {type(tensor).__name__}")
            if tensor.ndim != ndim or tensor.shape[0] != b or tensor.shape[-1] != dim:
                raise ValueError(f"{name}: expected shape {shape} (batch of x), got {tuple(tensor.shape)}")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps: expected a scalar or shape ({b},), got {tuple(timesteps.shape)}")
        return timesteps

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, *, text_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Predict noise and variance interpolation.

        Args:
            x: (B, in_channels, h, w) latents (inpainting: latents, masked-image latents, mask), h and w
                multiples of ``config.size_multiple`` (8 for the official model).
            timesteps: (B,) or scalar diffusion timesteps (0..999, may be fractional).
            text_hidden_states: (B, L, text_hidden_dim) XLM-RoBERTa hidden states (L = 77).
            text_embeds: (B, text_embed_dim) projected pooled text embedding.
            image_embeds: (B, image_embed_dim) CLIP image embedding (from the prior).

        Returns:
            (B, out_channels, h, w) in the dtype of the weights (inputs are cast to it).
        """
        timesteps = self._check_inputs(x, timesteps, text_hidden_states, text_embeds, image_embeds)
        cfg = self.config
        dtype = self.conv_in.weight.dtype
        b = x.shape[0]
        text_hidden_states, text_embeds, image_embeds = (
            t.to(dtype) for t in (text_hidden_states, text_embeds, image_embeds))

        # timestep + pooled text + image -> one embedding that modulates every residual block
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))
        emb = emb + (self.text_embed_norm(self.text_embed_proj(text_embeds)) + self.image_embed_proj(image_embeds))
        # context tokens: [image tokens ; text tokens]  (B, num_image_tokens + L, context_dim)
        image_tokens = self.image_to_tokens(image_embeds).view(b, cfg.num_image_tokens, cfg.context_dim)
        context = torch.cat([image_tokens, self.text_to_context(text_hidden_states)], dim=1)

        h = self.conv_in(x.to(dtype))
        skips = [h]
        for block in self.down_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb), context), emb)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h.contiguous()  # plain NCHW also when the kernels are channels-last (as converted files hold them)

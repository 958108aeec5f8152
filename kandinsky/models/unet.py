"""The Kandinsky 2.1 and 2.2 decoder UNet (text-to-image, inpainting, ControlNet): a guided-diffusion UNet
conditioned on a CLIP image embedding, and in 2.1 also on the XLM-RoBERTa text encoder.

The conditioning is a config choice (``UNetConfig.conditioning``); everything else is the same network.

* ``"text_image"`` (Kandinsky 2.1, the default): the image embedding becomes ``num_image_tokens`` context
  tokens, put *before* the projected text hidden states; every attention layer attends jointly over
  [context tokens ; spatial tokens]. The pooled text embedding (projected, then LayerNorm) plus a projection
  of the image embedding is added to the timestep embedding, which every residual block turns into a
  GroupNorm scale and shift.
* ``"image"`` (Kandinsky 2.2): no text. The image embedding becomes ``num_image_tokens`` (32) context tokens
  by a linear layer then a LayerNorm over each token (diffusers' ``ImageProjection``), and a projection of
  it, LayerNorm'd, is added to the timestep embedding (``ImageTimeEmbedding``).
* ``"image_hint"`` (Kandinsky 2.2 ControlNet): as ``"image"``, and a hint image (B, 3, 8h, 8w) in [0, 1] (a
  depth map) goes through a fixed conv stack (:class:`HintEncoder`, diffusers' ``ImageHintTimeEmbedding``) to
  4 channels at the latent size, concatenated after the latents: ``in_channels`` counts them (8).

Output: 8 channels, ``[:4]`` the noise prediction, ``[4:]`` the learned-range variance interpolation.
The inpainting UNet is the same class with ``in_channels=9``: ``cat([latents, masked_image_latents, mask])``.

Example::

    unet = UNet(UNetConfig())                                            # 2.1
    out = unet(latents, timesteps, image_embeds=image, text_hidden_states=hidden, text_embeds=pooled)
    unet = UNet(UNetConfig(conditioning="image", image_embed_dim=1280, num_image_tokens=32))   # 2.2
    out = unet(latents, timesteps, image_embeds=image)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.models.layers import GroupNorm32, LayerNorm32, check_config, timestep_embedding

CONDITIONINGS = ("text_image", "image", "image_hint")  # Kandinsky 2.1, 2.2, 2.2 ControlNet
HINT_CHANNELS = 4  # what the hint encoder adds to the UNet's input channels

@dataclass
class UNetConfig:
    """Hyperparameters; the defaults are the official Kandinsky 2.1 decoder (``decoder_fp16.ckpt``).

    ``conditioning``: ``"text_image"`` (2.1), ``"image"`` (2.2) or ``"image_hint"`` (2.2 ControlNet); the text
    fields (``text_hidden_dim``, ``text_embed_dim``) are unused by the last two. The official Kandinsky 2.2
    decoder is ``UNetConfig(conditioning="image", image_embed_dim=1280, num_image_tokens=32)`` (inpainting:
    ``in_channels=9``; ControlNet-depth: ``conditioning="image_hint", in_channels=8``).
    """

    in_channels: int = 4  # 9 for inpainting: latents, masked-image latents, mask; 8 with a hint: latents, hint
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
    num_image_tokens: int = 10  # 2.2: 32
    norm_groups: int = 32
    conditioning: str = "text_image"

    def __post_init__(self):
        check_config(self)
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning: expected one of {list(CONDITIONINGS)}, got {self.conditioning!r}")
        if self.conditioning == "image_hint" and self.in_channels <= HINT_CHANNELS:
            raise ValueError(f"in_channels: with a hint it counts the hint encoder's {HINT_CHANNELS} channels too, "
                             f"got {self.in_channels}")

    @property
    def has_text(self) -> bool:
        """Whether the UNet reads the text encoder (Kandinsky 2.1)."""
        return self.conditioning == "text_image"

    @property
    def has_hint(self) -> bool:
        """Whether the UNet reads a hint image (Kandinsky 2.2 ControlNet)."""
        return self.conditioning == "image_hint"

    @property
    def x_channels(self) -> int:
        """The channels of the ``x`` the forward takes (``in_channels`` less the hint encoder's)."""
        return self.in_channels - HINT_CHANNELS if self.has_hint else self.in_channels

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


class HintEncoder(nn.Sequential):
    """The ControlNet hint (B, 3, H, W) -> (B, 4, H/8, W/8): 3x3 convolutions with SiLU between them, three of
    stride 2 (diffusers' ``ImageHintTimeEmbedding.input_hint_block``, the same layer indices)."""

    WIDTHS = (3, 16, 16, 32, 32, 96, 96, 256, HINT_CHANNELS)
    STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)

    def __init__(self):
        layers: list[nn.Module] = []
        for i, stride in enumerate(self.STRIDES):
            if i:
                layers.append(nn.SiLU())
            layers.append(nn.Conv2d(self.WIDTHS[i], self.WIDTHS[i + 1], 3, padding=1, stride=stride))
        super().__init__(*layers)


class UNet(nn.Module):
    """The Kandinsky 2.1 / 2.2 decoder UNet; see the module docstring for the conditioning."""

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
        if cfg.has_text:
            self.text_embed_proj = nn.Linear(cfg.text_embed_dim, temb)
            self.text_embed_norm = LayerNorm32(temb)
            self.image_embed_proj = nn.Linear(cfg.image_embed_dim, temb)
            self.image_to_tokens = nn.Linear(cfg.image_embed_dim, cfg.num_image_tokens * cfg.context_dim)
            self.text_to_context = nn.Linear(cfg.text_hidden_dim, cfg.context_dim)
        else:
            self.image_embed_proj = nn.Linear(cfg.image_embed_dim, temb)
            self.image_embed_norm = LayerNorm32(temb)
            self.image_to_tokens = nn.Linear(cfg.image_embed_dim, cfg.num_image_tokens * cfg.context_dim)
            self.image_tokens_norm = LayerNorm32(cfg.context_dim)
            if cfg.has_hint:
                self.hint_encoder = HintEncoder()

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

    def _check_inputs(self, x, timesteps, image_embeds, text_hidden_states, text_embeds, hint) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.x_channels:
            raise ValueError(f"x: expected a (B, {cfg.x_channels}, h, w) latent tensor, got shape {tuple(x.shape)}")
        b, _, height, width = x.shape
        m = cfg.size_multiple
        if height % m or width % m:
            raise ValueError(f"x: latent height and width must be multiples of {m}, got {height}x{width}")
        expected = {}
        if cfg.has_text:
            expected["text_hidden_states"] = (text_hidden_states, 3, f"(B={b}, L, {cfg.text_hidden_dim})",
                                              cfg.text_hidden_dim)
            expected["text_embeds"] = (text_embeds, 2, f"(B={b}, {cfg.text_embed_dim})", cfg.text_embed_dim)
        expected["image_embeds"] = (image_embeds, 2, f"(B={b}, {cfg.image_embed_dim})", cfg.image_embed_dim)
        unused = [name for name, value, wanted in (("text_hidden_states", text_hidden_states, cfg.has_text),
                                                   ("text_embeds", text_embeds, cfg.has_text),
                                                   ("hint", hint, cfg.has_hint)) if value is not None and not wanted]
        if unused:
            raise ValueError(f"{', '.join(unused)}: this UNet (conditioning {cfg.conditioning!r}) takes no such input")
        for name, (tensor, ndim, shape, dim) in expected.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name}: expected a tensor of shape {shape}, got {type(tensor).__name__}")
            if tensor.ndim != ndim or tensor.shape[0] != b or tensor.shape[-1] != dim:
                raise ValueError(f"{name}: expected shape {shape} (batch of x), got {tuple(tensor.shape)}")
        if cfg.has_hint:
            shape = (b, 3, 8 * height, 8 * width)
            if not isinstance(hint, torch.Tensor) or tuple(hint.shape) != shape:
                got = tuple(hint.shape) if isinstance(hint, torch.Tensor) else type(hint).__name__
                raise ValueError(f"hint: expected a tensor of shape {shape} (batch of x, 8x its size), got {got}")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps: expected a scalar or shape ({b},), got {tuple(timesteps.shape)}")
        return timesteps

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, *, image_embeds: torch.Tensor,
                text_hidden_states: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                hint: torch.Tensor | None = None) -> torch.Tensor:
        """Predict noise and variance interpolation.

        Args:
            x: (B, config.x_channels, h, w) latents (inpainting: latents, masked-image latents, mask), h and w
                multiples of ``config.size_multiple`` (8 for the official model).
            timesteps: (B,) or scalar diffusion timesteps (0..999, may be fractional).
            image_embeds: (B, image_embed_dim) CLIP image embedding (from the prior).
            text_hidden_states: (B, L, text_hidden_dim) XLM-RoBERTa hidden states (L = 77); 2.1 only.
            text_embeds: (B, text_embed_dim) projected pooled text embedding; 2.1 only.
            hint: (B, 3, 8h, 8w) ControlNet hint (a depth map in [0, 1]); ``conditioning="image_hint"`` only.

        Returns:
            (B, out_channels, h, w) in the dtype of the weights (inputs are cast to it).
        """
        timesteps = self._check_inputs(x, timesteps, image_embeds, text_hidden_states, text_embeds, hint)
        cfg = self.config
        dtype = self.conv_in.weight.dtype
        b = x.shape[0]
        image_embeds = image_embeds.to(dtype)
        # the timestep embedding, to which the conditioning is added: it modulates every residual block
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))
        image_tokens = self.image_to_tokens(image_embeds).view(b, cfg.num_image_tokens, cfg.context_dim)
        if cfg.has_text:  # 2.1: + pooled text + image; context tokens [image tokens ; text tokens]
            text_hidden_states, text_embeds = text_hidden_states.to(dtype), text_embeds.to(dtype)
            emb = emb + (self.text_embed_norm(self.text_embed_proj(text_embeds)) + self.image_embed_proj(image_embeds))
            context = torch.cat([image_tokens, self.text_to_context(text_hidden_states)], dim=1)
        else:  # 2.2: + image; context tokens: the image tokens, each LayerNorm'd
            emb = emb + self.image_embed_norm(self.image_embed_proj(image_embeds))
            context = self.image_tokens_norm(image_tokens)
        if cfg.has_hint:  # the hint encoder's 4 channels after the latents
            x = torch.cat([x.to(dtype), self.hint_encoder(hint.to(dtype))], dim=1)

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

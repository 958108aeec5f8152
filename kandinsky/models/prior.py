"""The Kandinsky 2.1 and 2.2 image prior: a causal transformer that predicts a clean CLIP image embedding from
CLIP text features (the unCLIP "diffusion prior", Ramesh et al. 2022). The two differ only in their CLIP widths:
2.1 reads ViT-L/14 (``clip_dim`` = ``text_width`` = 768), 2.2 ViT-bigG/14 (1280), both over a 2048-wide
transformer: ``PriorConfig(clip_dim=1280, text_width=1280)`` is the official 2.2 prior.

Sequence (length ``text_ctx + 4`` = 81), then learned positions::

    [ text token states (77) | text embedding | time embedding | noisy image embedding | prd token ]

Pre-LN blocks with causal self-attention, where padding text tokens are also masked as keys; the final
LayerNorm'd prd token is projected back to the CLIP dimension: the prediction of the clean (x0)
embedding. Everything is in the *normalised* embedding space; :meth:`Prior.normalize` /
:meth:`Prior.denormalize` use the CLIP image-embedding statistics the module carries as buffers.

Under the causal mask the first ``text_ctx + 1`` positions (the text) attend only to each other, so their
states in every block do not depend on the timestep or the noisy embedding. A sampling loop runs them once
(:meth:`Prior.encode_text`) and each step only the last three positions against their keys and values:
the full forward's output up to float rounding, for 3/81 of its projections and MLPs.

Example::

    prior = Prior(PriorConfig())                        # official size, ~1.0 B parameters
    x0 = prior(x_t, timesteps, text_embeds=text_embeds, text_hidden_states=text_hidden_states,
               text_mask=text_mask)                     # (B, 768), normalised space
    image_embeds = prior.denormalize(x0)

    text = prior.encode_text(text_embeds=text_embeds, text_hidden_states=text_hidden_states, text_mask=text_mask)
    x0 = prior(x_t, timesteps, text_prefix=text)        # the same x0; every step of a loop reuses `text`
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.models.layers import LayerNorm32, check_config, timestep_embedding

NUM_EXTRA_TOKENS = 4  # text embedding, time embedding, noisy image embedding, prd token
NUM_STEP_TOKENS = 3  # the positions that change with every step: time, noisy image embedding, prd token


@dataclass
class PriorConfig:
    """Hyperparameters; the defaults are the official Kandinsky 2.1 prior (``prior_fp16.ckpt``); Kandinsky 2.2's
    is ``PriorConfig(clip_dim=1280, text_width=1280)``."""

    text_ctx: int = 77  # text token positions
    width: int = 2048  # transformer width
    layers: int = 20
    heads: int = 32
    clip_dim: int = 768  # CLIP image/text embedding size (in and out)
    text_width: int = 768  # width of the CLIP text tower's hidden states

    def __post_init__(self):
        check_config(self)


class PrefixCache:
    """One block's keys and values of the prefix positions, (B, heads, P, head_dim) each: the first call through
    the block stores its own; every later call attends to them as well, before its own positions."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values to attend to: these, after the prefix's (stored if there are none yet)."""
        if self.keys is None:
            self.keys, self.values = keys, values
            return keys, values
        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (output rows ordered q | k | v, each
    head-major) and ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, cache: PrefixCache | None = None) -> torch.Tensor:
        """(B, L, W) -> (B, L, W); with a filled ``cache`` of P positions, ``attn_mask`` has P + L columns."""
        batch, length, width = x.shape
        # (B, L, 3W) -> 3 x (B, heads, L, head_dim)
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.extend(k, v)
        # the CPU kernels accumulate the softmax in float32 for bf16/fp16 inputs
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, L, head_dim)
        return self.out(h.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as both references


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = LayerNorm32(width)
        self.attn = Attention(width, heads)
        self.norm2 = LayerNorm32(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, cache: PrefixCache | None = None) -> torch.Tensor:
        """(B, L, W) -> (B, L, W); ``cache``: see :class:`Attention`."""
        x = x + self.attn(self.norm1(x), attn_mask, cache)
        return x + self.mlp(self.norm2(x))


@dataclass
class TextPrefix:
    """The text positions of a batch, run through every block once (:meth:`Prior.encode_text`)."""

    caches: list[PrefixCache]  # per block: keys and values of the text_ctx + 1 text positions
    attn_mask: torch.Tensor  # (B, 1, 3, L) bool: the mask's rows of the three per-step positions

    @property
    def batch(self) -> int:
        return self.attn_mask.shape[0]


class Prior(nn.Module):
    """The image prior. ``forward`` predicts the clean normalised CLIP image embedding (x0).

    Buffers ``clip_mean`` / ``clip_std`` (clip_dim,) are persistent: they are part of the model (the
    official release ships them separately, in ``ViT-L-14_stats.th``; the converter folds them in).
    """

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        c = config
        if c.width % c.heads:
            raise ValueError(f"config: width ({c.width}) must be a multiple of heads ({c.heads})")
        length = c.text_ctx + NUM_EXTRA_TOKENS
        self.time_embed = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.text_hidden_proj = nn.Linear(c.text_width, c.width)
        self.text_embed_proj = nn.Linear(c.clip_dim, c.width)
        self.image_embed_proj = nn.Linear(c.clip_dim, c.width)
        self.prd_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.positional_embedding = nn.Parameter(torch.zeros(1, length, c.width))
        self.blocks = nn.ModuleList([Block(c.width, c.heads) for _ in range(c.layers)])
        self.final_norm = LayerNorm32(c.width)
        self.out_proj = nn.Linear(c.width, c.clip_dim)
        # identity statistics until real ones are loaded
        self.register_buffer("clip_mean", torch.zeros(c.clip_dim))
        self.register_buffer("clip_std", torch.ones(c.clip_dim))

    def normalize(self, embeds: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings -> the prior's normalised space: (embeds - mean) / std."""
        return (embeds - self.clip_mean.to(embeds.dtype)) / self.clip_std.to(embeds.dtype)

    def denormalize(self, embeds: torch.Tensor) -> torch.Tensor:
        """The prior's normalised space -> CLIP image embeddings: embeds * std + mean."""
        return embeds * self.clip_std.to(embeds.dtype) + self.clip_mean.to(embeds.dtype)

    def _check_text(self, batch: int | None, text_embeds, text_hidden_states, text_mask) -> None:
        """``batch``: the rows ``x`` has (``None``: take them from ``text_embeds``)."""
        c = self.config
        source = "x"
        if batch is None and isinstance(text_embeds, torch.Tensor) and text_embeds.ndim == 2:
            batch, source = text_embeds.shape[0], "text_embeds"
        expected = {"text_embeds": (batch, c.clip_dim), "text_hidden_states": (batch, c.text_ctx, c.text_width)}
        for name, tensor in (("text_embeds", text_embeds), ("text_hidden_states", text_hidden_states)):
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected[name] or not tensor.is_floating_point():
                got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"{name}: expected a float tensor {expected[name]} (batch from {source}), got {got}")
        if text_mask is not None and (not isinstance(text_mask, torch.Tensor) or text_mask.dtype != torch.bool
                                      or tuple(text_mask.shape) != (batch, c.text_ctx)):
            got = f"{tuple(text_mask.shape)} {text_mask.dtype}" if isinstance(text_mask, torch.Tensor) else type(text_mask).__name__
            raise ValueError(f"text_mask: expected a bool tensor ({batch}, {c.text_ctx}), True = real token, got {got}")

    def _check_step(self, x, timesteps) -> torch.Tensor:
        """Check ``x`` and ``timesteps``; returns the (B,) timesteps."""
        c = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != c.clip_dim or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a float tensor (B, {c.clip_dim}), got {got}")
        batch = x.shape[0]
        if isinstance(timesteps, int):
            timesteps = torch.tensor(timesteps, device=x.device)
        if not isinstance(timesteps, torch.Tensor) or timesteps.is_floating_point() or timesteps.is_complex() \
                or timesteps.dtype == torch.bool or timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] != batch):
            got = f"{tuple(timesteps.shape)} {timesteps.dtype}" if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
            raise ValueError(f"timesteps: expected an integer tensor ({batch},) or a scalar, got {got}")
        return timesteps.expand(batch)

    def attention_mask(self, text_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Boolean (B, 1, L, L) mask, True = may attend: causal, and padding text tokens hidden as keys. ``L`` is
        ``text_mask``'s text positions (``text_ctx`` without one) plus the 4 extra tokens.

        Every token may also attend to itself. This changes nothing the output depends on (a padding
        token's own state is never read by a real token nor by the prd token, being masked as a key),
        but keeps a query whose every earlier key is padding from a NaN softmax row.
        """
        length = (self.config.text_ctx if text_mask is None else text_mask.shape[1]) + NUM_EXTRA_TOKENS
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if text_mask is None:
            return causal.expand(batch, 1, length, length)
        key_valid = F.pad(text_mask, (0, NUM_EXTRA_TOKENS), value=True)  # (B, L): the 4 extra tokens are real
        eye = torch.eye(length, dtype=torch.bool, device=device)
        return (causal & (key_valid[:, None, :] | eye))[:, None]

    def _sequence(self, text_embeds: torch.Tensor, text_hidden_states: torch.Tensor, text_mask: torch.Tensor | None,
                  step_tokens: torch.Tensor | None = None, text_positions: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' input: the T text token states and the text embedding, then ``step_tokens`` (B, 3, W) if
        given, with their positions added; and the (B, 1, T + 4, T + 4) attention mask of the whole sequence.

        ``text_positions``: (T,) the positions among the ``text_ctx`` that ``text_hidden_states`` (B, T, ·) and
        ``text_mask`` (B, T) hold, in order; ``None``: all of them.
        """
        dtype = self.out_proj.weight.dtype
        tokens = torch.cat([
            self.text_hidden_proj(text_hidden_states.to(dtype)),  # (B, T, W)
            self.text_embed_proj(text_embeds.to(dtype))[:, None],  # (B, 1, W)
            *([] if step_tokens is None else [step_tokens]),  # (B, 3, W)
        ], dim=1)
        positional = self.positional_embedding
        if text_positions is not None:  # the learned rows of those text positions, then the 4 extra tokens'
            positional = torch.cat([positional[:, text_positions], positional[:, self.config.text_ctx:]], dim=1)
        tokens = tokens + positional[:, :tokens.shape[1]].to(dtype)
        return tokens, self.attention_mask(text_mask, tokens.shape[0], tokens.device)

    def _step_tokens(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        dtype = self.out_proj.weight.dtype
        time = self.time_embed(timestep_embedding(timesteps, self.config.width).to(dtype))  # (B, W)
        return torch.cat([time[:, None], self.image_embed_proj(x.to(dtype))[:, None],
                          self.prd_token.to(dtype).expand(x.shape[0], -1, -1)], dim=1)  # (B, 3, W)

    def encode_text(self, *, text_embeds: torch.Tensor, text_hidden_states: torch.Tensor,
                    text_mask: torch.Tensor | None = None) -> TextPrefix:
        """Run the text positions through every block once, for ``forward(..., text_prefix=...)``.

        Args: as :meth:`forward`'s. Returns a :class:`TextPrefix` of batch B (every block's keys and values of
        the ``text_ctx + 1`` text positions), valid for these weights until they change.
        """
        self._check_text(None, text_embeds, text_hidden_states, text_mask)
        tokens, attn_mask = self._sequence(text_embeds, text_hidden_states, text_mask)  # (B, 78, W)
        prefix = tokens.shape[1]
        caches = [PrefixCache() for _ in self.blocks]
        for block, cache in zip(self.blocks, caches):  # (the last block's outputs are never read, only its cache)
            tokens = block(tokens, attn_mask[..., :prefix, :prefix], cache)
        return TextPrefix(caches, attn_mask[..., prefix:, :])

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, *, text_embeds: torch.Tensor | None = None,
                text_hidden_states: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                text_prefix: TextPrefix | None = None) -> torch.Tensor:
        """Predict the clean normalised image embedding.

        Args:
            x: (B, clip_dim) noisy image embedding, normalised space.
            timesteps: (B,) integer diffusion steps (or a scalar, broadcast).
            text_embeds: (B, clip_dim) pooled projected CLIP text embedding.
            text_hidden_states: (B, text_ctx, text_width) CLIP text tower last hidden states.
            text_mask: (B, text_ctx) bool, True for real tokens; ``None`` = all real.
            text_prefix: in place of the three text arguments, their :meth:`encode_text` (batch B): only the
                three per-step positions are computed.

        Returns:
            (B, clip_dim) predicted x0 in the normalised space, in the weights' dtype.
        """
        timesteps = self._check_step(x, timesteps)
        batch = x.shape[0]
        dtype = self.out_proj.weight.dtype
        if text_prefix is not None:
            if not (text_embeds is None and text_hidden_states is None and text_mask is None):
                raise ValueError("text_prefix: give either text_prefix or text_embeds, text_hidden_states and "
                                 "text_mask, not both")
            if not isinstance(text_prefix, TextPrefix) or len(text_prefix.caches) != len(self.blocks):
                raise ValueError(f"text_prefix: expected a TextPrefix of this prior's {len(self.blocks)} blocks "
                                 f"(from encode_text), got {type(text_prefix).__name__}")
            if text_prefix.batch != batch:
                raise ValueError(f"text_prefix: encoded for batch {text_prefix.batch}, but x has {batch} rows")
            tokens = self._step_tokens(x, timesteps) + self.positional_embedding[:, -NUM_STEP_TOKENS:].to(dtype)
            for block, cache in zip(self.blocks, text_prefix.caches):
                tokens = block(tokens, text_prefix.attn_mask, cache)  # (B, 3, W)
            return self.out_proj(self.final_norm(tokens[:, -1]))
        self._check_text(batch, text_embeds, text_hidden_states, text_mask)
        tokens, attn_mask = self._sequence(text_embeds, text_hidden_states, text_mask,
                                           self._step_tokens(x, timesteps))  # (B, 81, W)
        for block in self.blocks:
            tokens = block(tokens, attn_mask)
        return self.out_proj(self.final_norm(tokens[:, -1]))  # the prd token: (B, clip_dim)

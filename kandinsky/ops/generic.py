"""Speed work that helps on every device: exact rewrites that do less arithmetic, and the memory format.

* :class:`SubpixelUpsample`: MoVQ's nearest x2 upsampling + 3x3 conv as four 2x2 convs on the
  low-resolution input, 16/36 of the multiply-adds;
* :class:`LastQueryBlock`: the prior's last block computes only the last position, the one
  ``Prior.forward`` reads;
* :class:`PaddingFreePrior`: the prior leaves out the text positions that are padding in every row of the batch
  (a short prompt and the empty one fill 2-20 of the 77);
* channels-last UNet and MoVQ (:func:`channels_last`): convolutions then need no layout reorders (and on CPU
  no per-call re-layout of each kernel), and attention reads (B, H*W, C) tokens of a feature map as a view.
  Weight files hold the kernels in their plain (O, I, kh, kw) layout, so converting a kernel is a copy out of
  the memory-mapped file; a fast module that reads its kernel in either layout says so
  (:attr:`FastModule.any_kernel_layout`) and keeps the file's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.models import movq, prior, unet


class FastModule:
    """Mixin of a subclass of a plain model class that adds no state, only a faster ``forward``.

    :func:`swap` gives an existing module such a class, so parameters, buffers, hooks and state-dict
    keys stay the module's own; :func:`plain_class` finds the class it replaced.
    """

    any_kernel_layout = False  # True: as fast with contiguous as with channels-last kernels (no copy needed)


def plain_class(cls: type) -> type:
    """The first class in ``cls``'s MRO that is not a :class:`FastModule`."""
    return next(c for c in cls.__mro__ if not issubclass(c, FastModule))


def swap(module: nn.Module, cls: type) -> None:
    """Make ``module`` an instance of ``cls``, which must share its plain class (no copy, same object)."""
    if plain_class(cls) is not plain_class(type(module)):
        raise TypeError(f"cannot swap a {type(module).__name__} for a {cls.__name__}")
    module.__class__ = cls


def subpixel_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) kernel of a conv applied after nearest x2 upsampling -> (4*O, I, 2, 2): one 2x2 kernel
    on the low-resolution input per output phase (row parity a, column parity b), phases major.

    Output row 2i+a of the upsampled conv reads upsampled rows 2i+a-1..2i+a+1, i.e. low-res rows
    (i-1, i, i) for a=0 and (i, i, i+1) for a=1: taps that land on the same low-res row are summed.
    """
    def fold(w: torch.Tensor, dim: int) -> torch.Tensor:  # 3 taps along `dim` -> (2 phases, 2 taps)
        t0, t1, t2 = w.unbind(dim)
        return torch.stack([torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)])

    rows = fold(weight, 2)  # (2a, O, I, 2, 3)
    both = fold(rows, 4)  # (2b, 2a, O, I, 2, 2)
    return both.transpose(0, 1).flatten(0, 2)  # (a, b, O) -> 4*O


class SubpixelUpsample(FastModule, movq.Upsample):
    """``movq.Upsample`` computed as four 2x2 convs on the low-resolution input (one per output phase),
    interleaved into a channels-last output of the input's dtype.

    The convs run in ``compute_dtype`` (``None``: the input's); subclasses may set float32.
    """

    compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        O = self.conv.out_channels
        dtype = self.compute_dtype or x.dtype
        # taps summed in float32 (matters for bf16 weights), then to the dtype of the convs
        kernels = subpixel_kernels(self.conv.weight.float()).to(dtype, memory_format=torch.channels_last)
        # padding 1 on every side: phase a=0 reads rows (i-1, i) = output row i, a=1 reads (i, i+1) = row i+1
        bias = self.conv.bias.to(dtype).repeat(4)
        phases = F.conv2d(F.pad(x.to(dtype), (1, 1, 1, 1)), kernels, bias)  # (B, 4*O, h+1, w+1)
        phases = phases.unflatten(1, (2, 2, O))
        out = torch.empty(B, O, 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        blocks = out.view(B, O, h, 2, w, 2)  # output pixel (2i+a, 2j+b) = blocks[..., i, a, j, b]
        for a in (0, 1):
            for b in (0, 1):
                blocks[:, :, :, a, :, b] = phases[:, a, b, :, a:a + h, b:b + w]
        return out


class LastQueryBlock(FastModule, prior.Block):
    """``prior.Block`` that computes only the last position: (B, L, W) -> (B, 1, W).

    ``Prior.forward`` reads only the last position (the prd token) of its last block, whose other
    queries, output projections and MLP rows are then wasted work. Subclasses may route the GEMMs
    elsewhere through :meth:`linear`.
    """

    linear = staticmethod(F.linear)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, cache: prior.PrefixCache | None = None
                ) -> torch.Tensor:
        batch, length, width = x.shape
        heads, head_dim = self.attn.heads, width // self.attn.heads
        h = self.norm1(x)
        # the q rows come first in the fused weight: slices are views, not copies
        weight, bias = self.attn.qkv.weight, self.attn.qkv.bias
        q = self.linear(h[:, -1:], weight[:width], bias[:width])  # (B, 1, W)
        kv = self.linear(h, weight[width:], bias[width:])  # (B, L, 2W)
        q = q.view(batch, 1, heads, head_dim).transpose(1, 2)  # (B, heads, 1, head_dim)
        k, v = kv.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)  # (B, heads, L, head_dim) each
        if cache is not None:
            k, v = cache.extend(k, v)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[..., -1:, :])  # (B, heads, 1, head_dim)
        x = x[:, -1:] + self.attn.out(h.transpose(1, 2).reshape(batch, 1, width))
        return x + self.mlp(self.norm2(x))


class PaddingFreePrior(FastModule, prior.Prior):
    """``prior.Prior`` whose blocks run without the text positions that are padding in every row of the batch.

    A padding position is masked as a key for every other query, so no state the output depends on reads it:
    leaving it out gives the same output, up to float rounding, for the work of the remaining positions only
    (prompts of 5 and 12 tokens: 16 of the 81). The positions kept are a data-dependent shape; finding them
    reads the mask on the host once per call (``forward`` or ``encode_text``).
    """

    def _sequence(self, text_embeds, text_hidden_states, text_mask, step_tokens=None, text_positions=None):
        if text_mask is not None and text_positions is None:
            text_positions = text_mask.any(dim=0).nonzero()[:, 0]  # (T,) read by at least one row
            if len(text_positions) < text_mask.shape[1]:
                text_hidden_states, text_mask = text_hidden_states[:, text_positions], text_mask[:, text_positions]
            else:
                text_positions = None
        return super()._sequence(text_embeds, text_hidden_states, text_mask, step_tokens, text_positions)


def channels_last(module: nn.Module) -> nn.Module:
    """Make the kernels of every UNet and MoVQ in ``module`` channels-last (in place; returns it), except those of
    layers with :attr:`FastModule.any_kernel_layout`. A copy only of the kernels not yet in that format: those
    loaded from a file, whose memory-mapped pages the copy reads in and whose new pages it faults in."""
    for sub in module.modules():
        if isinstance(sub, (unet.UNet, movq.MoVQ)):
            for layer in sub.modules():
                if getattr(layer, "any_kernel_layout", False):
                    continue
                for param in layer.parameters(recurse=False):
                    if param.dim() == 4 and not param.is_contiguous(memory_format=torch.channels_last):
                        param.data = param.data.contiguous(memory_format=torch.channels_last)
    return module


def optimize(module: nn.Module) -> nn.Module:
    """Apply the device-independent rewrites to every UNet, MoVQ and Prior in ``module`` (in place); the memory
    format is :func:`channels_last`'s, applied after the device's swaps."""
    for sub in module.modules():
        if type(sub) is movq.Upsample:
            swap(sub, SubpixelUpsample)
        if isinstance(sub, prior.Prior):
            swap(sub, PaddingFreePrior)
            if len(sub.blocks) and type(sub.blocks[-1]) is prior.Block:
                swap(sub.blocks[-1], LastQueryBlock)
    return module

"""Device-specific speed work, kept out of the models (which read like the paper).

:func:`optimize` swaps faster modules into a model that is already correct: each fast module is a
subclass of the plain layer it replaces, adds no state and computes the same function, so parameters
stay shared (nothing is copied) and state-dict keys do not change. :func:`plain` undoes the swaps.

* every device (:mod:`kandinsky.ops.generic`): channels-last UNet and MoVQ kernels, MoVQ's sub-pixel upsampling,
  the prior's last block computing only the position the prior reads, and the prior leaving out the text
  positions that are padding in every row;
* CPU (:mod:`kandinsky.ops.cpu`): Winograd / GEMM 3x3 convolutions in the residual blocks, oneDNN linear
  layers in the prior; for bfloat16 / float16 weights on a CPU without native arithmetic in that dtype
  (:func:`native_half`), convolutions and linear layers that compute in float32 from the half-precision weights.

Example::

    unet = ops.optimize(load_converted(folder), "cpu", torch.float32)
"""

from __future__ import annotations

import torch
from torch import nn

from kandinsky.ops import cpu, generic
from kandinsky.ops.cpu import native_half
from kandinsky.ops.generic import FastModule, plain_class, swap


def optimize(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Swap the fast modules for ``device`` and weights of ``dtype`` into every UNet, MoVQ and Prior in
    ``module``, in place; returns ``module``. Idempotent; modules of other kinds are left as they are, except
    that on a CPU without native ``dtype`` arithmetic (:func:`native_half`) every linear layer and convolution
    computes in float32 (text encoders included).

    The kernels of the UNet and MoVQ become channels-last (:func:`generic.channels_last`), a copy only for
    kernels not already in that format, except those of the layers that run as fast in any layout (on the CPU
    the float32 residual-block convolutions, most of the UNet's weights): those stay as the file holds them.
    Weight files hold the plain state dict (contiguous (O, I, kh, kw) kernels), so this is where the physical
    layout is applied, once per load: the other kernels of a model from
    :func:`~kandinsky.weights.load_converted` are copied out of the memory-mapped file here.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {dtype!r}")
    device = torch.device(device)
    plain(module)  # what is swapped in depends on device, dtype and the CPU only, not on earlier calls
    generic.optimize(module)
    if device.type == "cpu":
        cpu.optimize(module, dtype)
    return generic.channels_last(module)  # after the swaps: the layers that read any layout keep theirs


def plain(module: nn.Module) -> nn.Module:
    """Undo :func:`optimize`'s swaps in ``module`` (in place; returns it): every fast module becomes the
    plain layer it replaced. The memory format of the kernels is left as it is."""
    for sub in module.modules():
        if isinstance(sub, FastModule):
            swap(sub, plain_class(type(sub)))
    return module

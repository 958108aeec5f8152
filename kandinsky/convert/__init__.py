"""Conversion of official weights into our modules: the only package that knows foreign key names.

Two layouts are read:

* ``original``: the ai-forever/Kandinsky-2 checkpoints (``movq_final.ckpt``, ``prior_fp16.ckpt``,
  ``decoder_fp16.ckpt``, ``inpainting_fp16.ckpt``) with the original constructor arguments as config;
* ``diffusers``: the kandinsky-community repositories (``config.json`` + state dict per component).

Example::

    from kandinsky.convert import from_original
    movq = from_original("movq", {"ddconfig": {...}, "n_embed": 16384, "embed_dim": 4}, state_dict)

Both functions are strict: a ``ValueError`` lists every unconsumed source key, every parameter of ours
left unfilled and every shape mismatch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
from torch import nn

from kandinsky.convert.core import Source, build_strict

COMPONENTS = ("movq", "prior", "unet", "unet_inpaint")
# component -> module under kandinsky/convert/ that implements `original(...)` and `diffusers(...)`
_CONVERTERS = {"movq": "movq", "prior": "prior", "unet": "unet", "unet_inpaint": "unet"}


def _converter(component: str):
    if component not in _CONVERTERS:
        raise ValueError(f"component must be one of {list(COMPONENTS)}, got {component!r}")
    return importlib.import_module(f"kandinsky.convert.{_CONVERTERS[component]}")


def official_original_config(component: str) -> dict:
    """The original constructor arguments of the official ``component`` checkpoint (CONFIG_2_1)."""
    return dict(_converter(component).OFFICIAL_ORIGINAL_CONFIGS[component])


def _convert(layout: str, component: str, config: Mapping, state_dict: Mapping[str, torch.Tensor],
             dtype: torch.dtype | None, **extra) -> nn.Module:
    from kandinsky.models import model_class

    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict of the {layout} hyperparameters, got {type(config).__name__}")
    source = Source(state_dict, layout)
    convert = getattr(_converter(component), layout)
    our_config, converted = convert(component, dict(config), source, **extra)
    cls = model_class(component)
    return build_strict(component, lambda: cls(our_config), converted, source, dtype)


def from_original(component: str, config: Mapping, state_dict: Mapping[str, torch.Tensor], *,
                  dtype: torch.dtype | None = torch.float32, **extra) -> nn.Module:
    """Build our ``component`` from the original repository's hyperparameters and checkpoint state dict.

    ``config`` is what the original constructor received (the fixtures' ``original_config``).
    ``extra`` carries component-specific inputs, e.g. ``clip_stats=(mean, std)`` for the prior.
    Floating-point weights are cast to ``dtype`` (``None`` keeps the checkpoint's dtype).
    """
    return _convert("original", component, config, state_dict, dtype, **extra)


def from_diffusers(component: str, config: Mapping, state_dict: Mapping[str, torch.Tensor], *,
                   dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Build our ``component`` from a diffusers ``config.json`` dict and its state dict."""
    return _convert("diffusers", component, config, state_dict, dtype)

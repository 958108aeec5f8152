"""Conversion of official weights into our modules and back: the only package that knows foreign key names.

Two layouts are read and written:

* ``original``: the ai-forever/Kandinsky-2 checkpoints (``movq_final.ckpt``, ``prior_fp16.ckpt``,
  ``decoder_fp16.ckpt``, ``inpainting_fp16.ckpt``) with the original constructor arguments as config;
* ``diffusers``: the kandinsky-community repositories (``config.json`` + state dict per component), Kandinsky 2.1's
  and 2.2's: ``from_diffusers("unet", ...)`` reads every UNet variant (2.1, 2.2, 2.2 ControlNet; ``"unet_inpaint"``
  for 9 input channels; ``"unet_controlnet"`` for the ControlNet UNet alone) and tells them apart by the config (see
  :mod:`kandinsky.convert.unet`). Kandinsky 2.2 has no original layout.

Example::

    from kandinsky.convert import from_original
    movq = from_original("movq", {"ddconfig": {...}, "n_embed": 16384, "embed_dim": 4}, state_dict)

Both functions are strict: a ``ValueError`` lists every unconsumed source key, every parameter of ours
left unfilled and every shape mismatch. The way back is exact (renames, splits and row permutations):
``from_original("movq", *to_original("movq", movq)[:2])`` has bit-identical weights. The same layer
tables give :func:`module_map`, our module paths against the foreign ones, for the divergence tracer.

    config, state_dict, extras = to_original("prior", prior)      # extras: {"clip_stats": (mean, std)}
    config, state_dict = to_diffusers("unet", unet, dtype=torch.float16)
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
from torch import nn

from kandinsky.convert.core import Source, build_strict

COMPONENTS = ("movq", "prior", "unet", "unet_inpaint", "unet_controlnet")
LAYOUTS = ("original", "diffusers")
# component -> module under kandinsky/convert/ that implements `original(...)` and `diffusers(...)`
_CONVERTERS = {"movq": "movq", "prior": "prior", "unet": "unet", "unet_inpaint": "unet", "unet_controlnet": "unet"}
# components that are another component's model under a name of their own: Kandinsky 2.2's ControlNet UNet is a
# "unet" (the unet converter and model class) whose config must have conditioning "image_hint"
_MODEL_OF = {"unet_controlnet": "unet"}


def _converter(component: str):
    if component not in _CONVERTERS:
        raise ValueError(f"component must be one of {list(COMPONENTS)}, got {component!r}")
    return importlib.import_module(f"kandinsky.convert.{_CONVERTERS[component]}")


def model_component(component: str) -> str:
    """The component whose model class and config class ``component`` uses (:func:`kandinsky.models.model_class`):
    ``"unet"`` for ``"unet_controlnet"``, else ``component`` itself."""
    _converter(component)
    return _MODEL_OF.get(component, component)


def check_model(component: str, config) -> None:
    """Refuse a config that is not ``component``'s: a ``unet_controlnet`` must read a hint (conditioning
    ``"image_hint"``). ``ValueError`` naming both."""
    if component == "unet_controlnet" and getattr(config, "conditioning", None) != "image_hint":
        raise ValueError(f"component 'unet_controlnet' is Kandinsky 2.2's ControlNet UNet (conditioning 'image_hint'), "
                         f"got a UNet with conditioning {getattr(config, 'conditioning', None)!r}")


def official_original_config(component: str) -> dict:
    """The original constructor arguments of the official ``component`` checkpoint (CONFIG_2_1)."""
    configs = _converter(component).OFFICIAL_ORIGINAL_CONFIGS
    if component not in configs:
        raise ValueError(f"component {component!r} has no original layout (Kandinsky 2.2: ai-forever's own code loads "
                         "the kandinsky-community diffusers repositories); expected one of " + str(list(configs)))
    return dict(configs[component])


def _convert(layout: str, component: str, config: Mapping, state_dict: Mapping[str, torch.Tensor],
             dtype: torch.dtype | None, **extra) -> nn.Module:
    from kandinsky.models import model_class

    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict of the {layout} hyperparameters, got {type(config).__name__}")
    if layout == "original" and component == "unet_controlnet":
        official_original_config(component)  # raises: Kandinsky 2.2 has no original layout
    source = Source(state_dict, layout)
    convert = getattr(_converter(component), layout)
    our_config, converted = convert(model_component(component), dict(config), source, **extra)
    check_model(component, our_config)
    cls = model_class(model_component(component))
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


# --------------------------------------------------------------------------------------------- ours -> foreign


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return layout


def foreign_config(component: str, config, layout: str) -> dict:
    """The foreign hyperparameters of our ``config``: the original constructor arguments (what
    :func:`from_original` takes) or the diffusers ``config.json`` dict (what :func:`from_diffusers` takes)."""
    converter = _converter(component)
    if _check_layout(layout) == "diffusers":
        return converter.to_diffusers_config(config)
    if component in ("unet", "unet_inpaint", "unet_controlnet"):
        return converter.to_original_config(model_component(component), config)
    return converter.to_original_config(config)


def to_layout(component: str, config, state_dict: Mapping[str, torch.Tensor], layout: str, *,
              dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors keyed like our state dict (the weights, or anything shaped like them, such as their
    gradients) in the foreign ``layout``: ``(foreign state dict, extras)``. ``extras`` is empty except for the
    original prior, whose CLIP statistics live outside the checkpoint (``{"clip_stats": (mean, std)}``).
    Floating-point tensors are cast to ``dtype`` (``None`` keeps theirs); all are fresh contiguous copies."""
    from kandinsky.convert.core import write_layers

    converter = _converter(component)
    _check_layout(layout)
    if hasattr(converter, "write_state"):
        return converter.write_state(layout, config, dict(state_dict), dtype)
    return write_layers(component, layout, state_dict, converter.layers(layout, config), dtype), {}


def to_original(component: str, module: nn.Module, *, dtype: torch.dtype | None = None
                ) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Our module in the original layout: ``(constructor arguments, state dict, extras)``, the inverse of
    :func:`from_original` (``extras`` as in :func:`to_layout`)."""
    state, extras = to_layout(component, module.config, module.state_dict(), "original", dtype=dtype)
    return foreign_config(component, module.config, "original"), state, extras


def to_diffusers(component: str, module: nn.Module, *, dtype: torch.dtype | None = None
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our module in the diffusers layout: ``(config.json dict, state dict)``, the inverse of :func:`from_diffusers`."""
    state, _ = to_layout(component, module.config, module.state_dict(), "diffusers", dtype=dtype)
    return foreign_config(component, module.config, "diffusers"), state


def layer_table(component: str, config, layout: str) -> list:
    """The converter's :class:`~kandinsky.convert.core.Layer` table of ``component`` at our ``config`` in ``layout``:
    every layer of ours with its foreign module path(s) and how the tensors are rearranged."""
    return _converter(component).layers(_check_layout(layout), config)


def module_map(component: str, config, layout: str) -> dict[str, str]:
    """Our module path -> the module path in ``layout`` whose output is the same tensor (same values,
    possibly another shape of the same element order), for the modules that have one ("" is the whole model)."""
    from kandinsky.convert.core import traced_modules

    return traced_modules(layer_table(component, config, layout))

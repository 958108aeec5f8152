"""Compiled exports of the models: ``torch.export`` programs (``.pt2``) and ONNX graphs, with a dynamic batch
and latent size.

Targets (their inputs, in this order, are the ONNX input names):

* ``movq_decode``: ``latents`` (B, 4, h, w), h and w from 2 -> images (B, 3, 8h, 8w);
* ``movq_encode``: ``images`` (B, 3, H, W), H and W multiples of 8 from 16 -> latents (B, 4, H/8, W/8);
* ``prior``: ``x`` (B, 768), ``timesteps`` (B,) int64, ``text_embeds`` (B, 768), ``text_hidden_states``
  (B, 77, 768), ``text_mask`` (B, 77) bool -> the predicted clean embedding (B, 768);
* ``unet`` / ``unet_inpaint``: ``x`` (B, 4 or 9, h, w), h and w multiples of 8 from 16, ``timesteps`` (B,) int64,
  ``text_hidden_states`` (B, 77, 1024), ``text_embeds`` (B, 768), ``image_embeds`` (B, 768) -> (B, 8, h, w);
  Kandinsky 2.2's (``conditioning="image"``) read no text: ``x``, ``timesteps``, ``image_embeds`` (B, 1280);
* ``unet_controlnet`` (Kandinsky 2.2's ControlNet UNet, ``conditioning="image_hint"``): ``x`` (B, 4, h, w),
  ``timesteps``, ``image_embeds`` (B, 1280), ``hint`` (B, 3, 8h, 8w) in [0, 1] -> (B, 8, h, w).

A UNet's inputs follow its config's conditioning: :func:`input_names` gives them for a model.

Example::

    from kandinsky.export import export_program, save_onnx, save_program
    program = export_program("unet", unet)          # torch.export.ExportedProgram
    save_program(program, "unet.pt2")                # torch.export.load("unet.pt2").module()(*inputs)
    save_onnx("movq_decode", movq, "movq.onnx")      # + movq.onnx.data (the weights, external data)
    save_onnx("unet_controlnet", controlnet_unet, "controlnet.onnx")   # Kandinsky 2.2

The plain modules are exported: a model given after :func:`kandinsky.ops.optimize` has its fast modules
swapped back first (in place, :func:`kandinsky.ops.plain`); their state is the same. Outputs match eager
to float rounding (tests/test_export.py measures them, with onnxruntime for the ONNX graphs).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from kandinsky import ops

FORMATS = ("pt2", "onnx")


class MoVQDecode(nn.Module):
    def __init__(self, movq: nn.Module):
        super().__init__()
        self.movq = movq

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.movq.decode(latents)


class MoVQEncode(nn.Module):
    def __init__(self, movq: nn.Module):
        super().__init__()
        self.movq = movq

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.movq.encode(images)


class PriorCall(nn.Module):
    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, x, timesteps, text_embeds, text_hidden_states, text_mask) -> torch.Tensor:
        return self.prior(x, timesteps, text_embeds=text_embeds, text_hidden_states=text_hidden_states,
                          text_mask=text_mask)


class UNetCall(nn.Module):
    """Kandinsky 2.1's UNet: text and image conditioning."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, text_hidden_states, text_embeds, image_embeds) -> torch.Tensor:
        return self.unet(x, timesteps, text_hidden_states=text_hidden_states, text_embeds=text_embeds,
                         image_embeds=image_embeds)


class ImageUNetCall(nn.Module):
    """Kandinsky 2.2's UNet: the image embedding only."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, image_embeds) -> torch.Tensor:
        return self.unet(x, timesteps, image_embeds=image_embeds)


class HintUNetCall(nn.Module):
    """Kandinsky 2.2's ControlNet UNet: the image embedding and the hint image."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, image_embeds, hint) -> torch.Tensor:
        return self.unet(x, timesteps, image_embeds=image_embeds, hint=hint)


# a UNet's call by its config's conditioning: (wrapper, input names)
UNET_CALLS = {
    "text_image": (UNetCall, ("x", "timesteps", "text_hidden_states", "text_embeds", "image_embeds")),
    "image": (ImageUNetCall, ("x", "timesteps", "image_embeds")),
    "image_hint": (HintUNetCall, ("x", "timesteps", "image_embeds", "hint")),
}


def _unet_call(unet: nn.Module) -> nn.Module:
    return UNET_CALLS[unet.config.conditioning][0](unet)


@dataclass(frozen=True)
class Target:
    component: str  # the pipeline component the model is
    wrapper: Callable[[nn.Module], nn.Module]
    inputs: tuple[str, ...] | Mapping[str, tuple[str, ...]]  # a UNet's: by its conditioning (input_names)


_UNET_INPUTS = {conditioning: names for conditioning, (_, names) in UNET_CALLS.items()}
TARGETS = {
    "movq_decode": Target("movq", MoVQDecode, ("latents",)),
    "movq_encode": Target("movq", MoVQEncode, ("images",)),
    "prior": Target("prior", PriorCall, ("x", "timesteps", "text_embeds", "text_hidden_states", "text_mask")),
    "unet": Target("unet", _unet_call, _UNET_INPUTS),
    "unet_inpaint": Target("unet_inpaint", _unet_call, _UNET_INPUTS),
    "unet_controlnet": Target("unet_controlnet", _unet_call, _UNET_INPUTS),  # Kandinsky 2.2
}
TEXT_TOKENS = 77  # both text encoders' context length


def _target(target: str) -> Target:
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {list(TARGETS)}, got {target!r}")
    return TARGETS[target]


def input_names(target: str, config) -> tuple[str, ...]:
    """The inputs of ``target`` for a model of ``config``, in order (the ONNX graph's input names): a UNet's
    follow its conditioning (2.1: text and image; 2.2: image; ControlNet: image and hint)."""
    inputs = _target(target).inputs
    return inputs[config.conditioning] if isinstance(inputs, Mapping) else inputs


def sample_inputs(target: str, config, batch: int = 2, height: int | None = None, width: int | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of ``target`` for a model of ``config``, float32 (the models cast them to their dtype).

    ``height`` / ``width`` are the latent size (the image size for ``movq_encode``); by default two blocks
    of the smallest size the model accepts, different in the two directions so that they cannot be confused.
    """
    _target(target)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    def timesteps() -> torch.Tensor:
        return torch.randint(0, 1000, (batch,), generator=generator)

    if target.startswith("movq"):
        multiple = config.downsample_factor if target == "movq_encode" else 1
        height, width = height or 2 * multiple, width or 3 * multiple
        if target == "movq_encode":
            return (randn(batch, config.in_channels, height, width).clamp(-1, 1),)
        return (randn(batch, config.embed_dim, height, width),)
    if target == "prior":
        valid = torch.arange(1, batch + 1) * config.text_ctx // (batch + 1)  # prefix masks of different lengths
        return (randn(batch, config.clip_dim), timesteps(), randn(batch, config.clip_dim),
                randn(batch, config.text_ctx, config.text_width), torch.arange(config.text_ctx)[None] < valid[:, None])
    multiple = config.size_multiple
    height, width = height or 2 * multiple, width or 3 * multiple
    x, t = randn(batch, config.x_channels, height, width), timesteps()
    if config.has_text:
        return (x, t, randn(batch, TEXT_TOKENS, config.text_hidden_dim), randn(batch, config.text_embed_dim),
                randn(batch, config.image_embed_dim))
    if config.has_hint:  # a depth map in [0, 1] at the image size
        return (x, t, randn(batch, config.image_embed_dim),
                torch.rand(batch, 3, 8 * height, 8 * width, generator=generator))
    return (x, t, randn(batch, config.image_embed_dim))


def dynamic_shapes(target: str, config) -> tuple[dict[int, Dim], ...]:
    """torch.export dynamic dimensions of every input: the batch, and the latent (image) height and width in
    multiples of what the model accepts, at least two of them (16 latent pixels for the official UNet)."""
    spec = _target(target)
    batch = Dim("batch", min=1)
    if target == "prior":
        return tuple({0: batch} for _ in spec.inputs)
    multiple = config.downsample_factor if target == "movq_encode" else (1 if target == "movq_decode" else
                                                                           config.size_multiple)
    # a size of one block (one pixel at the deepest level) would broadcast where the traced sizes do not
    height, width = Dim("height", min=2), Dim("width", min=2)
    spatial = {0: batch, 2: height * multiple if multiple > 1 else height,
               3: width * multiple if multiple > 1 else width}
    names = input_names(target, config)
    # the ControlNet's hint is the image: 8 pixels per latent pixel
    return (spatial,) + tuple({0: batch, 2: height * (8 * multiple), 3: width * (8 * multiple)} if name == "hint"
                              else {0: batch} for name in names[1:])


def _wrapped(target: str, model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model: expected our {_target(target).component} model, got {type(model).__name__}")
    if target.startswith("unet"):  # the ControlNet target and the ControlNet UNet go together
        conditioning = getattr(model.config, "conditioning", None)
        if (conditioning == "image_hint") != (target == "unet_controlnet"):
            wanted = ("a ControlNet UNet (conditioning image_hint)" if target == "unet_controlnet" else
                      "a UNet without a hint (conditioning text_image or image)")
            raise ValueError(f"model: the {target} target takes {wanted}, got a UNet with conditioning "
                             f"{conditioning!r}")
    return _target(target).wrapper(ops.plain(model)).eval()


def export_program(target: str, model: nn.Module, example: tuple[torch.Tensor, ...] | None = None
                   ) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``target`` (see the module docstring) on our ``model``, dynamic in batch and
    latent size; ``example`` inputs default to :func:`sample_inputs`."""
    wrapped = _wrapped(target, model)
    example = example if example is not None else sample_inputs(target, model.config)
    with torch.no_grad():
        return torch.export.export(wrapped, example, dynamic_shapes=dynamic_shapes(target, model.config))


def _write_files(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Call ``write(temporary_path)`` (it may also write ``temporary_path.data``) in a sibling folder, then move
    the files into place: an interrupted export leaves no partial file under ``path``."""
    path = Path(path)
    existing = [p for p in [path, *_onnx_data_files(path)] if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))} already exist(s) (pass overwrite=True to replace)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(temporary / path.name)
        for produced in sorted(temporary.iterdir(), key=lambda p: p.name == path.name):  # the main file last
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return path


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``torch.export.save`` into ``path`` (``.pt2``), atomically."""
    return _write_files(path, lambda temporary: torch.export.save(program, str(temporary)), overwrite)


def save_onnx(target: str, model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False,
              example: tuple[torch.Tensor, ...] | None = None) -> Path:
    """ONNX export of ``target`` on our ``model`` through ``torch.onnx.export(..., dynamo=True)`` into ``path``,
    the weights into ``path.data`` beside it (external data: the official UNet is past protobuf's 2 GB).
    Inputs and the output (``output``) are named as in the module docstring; the batch, height and width
    dimensions are dynamic and named so."""
    wrapped = _wrapped(target, model)
    example = example if example is not None else sample_inputs(target, model.config)
    path = Path(path)
    # The graph names its weights file, so the pair is one output: the new weights go to a file of a new name
    # (PATH.<token>.data) and the rename of the graph over PATH is the one step that switches to them. A kill at
    # any point leaves the old pair or the new pair, each loadable; the old weights file is removed afterwards.
    token = secrets.token_hex(4)
    old = _onnx_data_files(path)

    def write(temporary: Path) -> None:
        staged = temporary.with_name(f"{path.name}.{token}")  # torch names the weights file <staged>.data
        with torch.no_grad():
            torch.onnx.export(wrapped, example, str(staged), dynamo=True, external_data=True,
                              dynamic_shapes=dynamic_shapes(target, model.config),
                              input_names=list(input_names(target, model.config)), output_names=["output"],
                              verbose=False)
        staged.rename(temporary)

    written = _write_files(path, write, overwrite)
    for stale in old:
        if stale.name != f"{path.name}.{token}.data":
            stale.unlink(missing_ok=True)
    return written


def _onnx_data_files(path: Path) -> list[Path]:
    """The external-data files of the ONNX graph ``path`` (``PATH.data``, ``PATH.<token>.data``)."""
    return sorted(p for p in path.parent.glob(f"{glob.escape(path.name)}*.data") if p.is_file())


def export(target: str, model: nn.Module, path: str | os.PathLike, *, format: str, overwrite: bool = False) -> Path:
    """Write ``target`` of ``model`` to ``path`` as ``format`` ``"pt2"`` or ``"onnx"`` (the ``kandinsky export``
    command)."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    if format == "onnx":
        return save_onnx(target, model, path, overwrite=overwrite)
    return save_program(export_program(target, model), path, overwrite=overwrite)

"""Divergence tracer: where do our module and a reference implementation of it first disagree?

Both run on identical weights and inputs while forward hooks record the output of every module that has a
counterpart (the converter's key map, :func:`kandinsky.convert.module_map`); each pair is compared in the
order our modules finish (a block after its layers), with its max absolute and relative error (relative to
the reference's largest magnitude), and the first pair above the tolerance is marked: when a parity check
fails on new weights, a new torch or a new diffusers, "block X differs first".

Example::

    from kandinsky.parity.trace import trace
    report = trace(unet, diffusers_unet, {"x": x, "timesteps": t, "text_hidden_states": h,
                                          "text_embeds": e, "image_embeds": i})
    print(report)                  # the table
    report.first                   # the first row above the tolerance, or None

``reference`` is a diffusers model (``VQModel``, ``PriorTransformer``, ``UNet2DConditionModel``: Kandinsky 2.1's
or 2.2's, the ControlNet UNet included), the original code's module (``MOVQ``, ``PriorDiffusionModel``,
``Text2ImUNet`` / ``InpaintText2ImUNet``, when importable; its calls follow the original fixtures' conventions) or
another of our own models (same module paths). ``inputs`` uses our argument names (a 2.2 UNet's: ``x``,
``timesteps``, ``image_embeds`` and the ControlNet's ``hint``; no text); MoVQ inputs are ``{"latents": ...}``
(decode) or ``{"images": ...}`` (encode). Our model is traced plain: :func:`kandinsky.ops.plain` undoes any
:func:`kandinsky.ops.optimize` swaps first (in place).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from kandinsky import ops
from kandinsky.convert import module_map
from kandinsky.models.prior import NUM_EXTRA_TOKENS
from kandinsky.ops.generic import plain_class

DEFAULT_TOLERANCE = 1e-4  # float32 against float32: the tolerance of the diffusers parity checks


@dataclass
class TraceRow:
    """One pair of module outputs; ``call`` counts the calls of a module run more than once."""

    ours: str
    reference: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    call: int = 0
    note: str = ""


@dataclass
class Trace:
    rows: list[TraceRow]
    tolerance: float

    @property
    def first(self) -> TraceRow | None:
        """The first pair (in the order our modules finished) whose relative error exceeds the tolerance."""
        return next((row for row in self.rows if not row.note and not row.max_rel <= self.tolerance), None)

    def table(self) -> str:
        first = self.first
        width = max([len(_name(r.ours, r.call)) for r in self.rows] + [4])
        ref_width = max([len(_name(r.reference, r.call)) for r in self.rows] + [9])
        lines = [f"{'#':>4}  {'ours':<{width}}  {'reference':<{ref_width}}  {'shape':<18}  "
                 f"{'max abs':>9}  {'max rel':>9}",
                 f"{'-' * 4}  {'-' * width}  {'-' * ref_width}  {'-' * 18}  {'-' * 9}  {'-' * 9}"]
        for index, row in enumerate(self.rows, 1):
            mark = row.note or ("<-- first above the tolerance" if row is first else "")
            names = f"{_name(row.ours, row.call):<{width}}  {_name(row.reference, row.call):<{ref_width}}"
            lines.append(f"{index:>4}  {names}  {str(row.shape):<18}  {row.max_abs:9.2e}  {row.max_rel:9.2e}  "
                         f"{mark}".rstrip())
        if first is None:
            lines.append(f"all {len(self.rows)} pairs within {self.tolerance:.0e} (relative)")
        else:
            lines.append(f"first divergence: ours {_name(first.ours, first.call)} vs reference "
                         f"{_name(first.reference, first.call)}, max rel {first.max_rel:.2e} > {self.tolerance:.0e}")
        return "\n".join(lines)

    __str__ = table


def _name(path: str, call: int) -> str:
    return (path or "(model)") + (f" #{call + 1}" if call else "")


def _first_tensor(output) -> torch.Tensor | None:
    """The tensor a module returned: itself, the first of a tuple, or the first field of a diffusers output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    return None


class _Recorder:
    """Forward hooks on ``paths`` of ``model`` that keep a float64 CPU copy of every output, in finishing order."""

    def __init__(self, model: nn.Module, paths):
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.order: list[tuple[str, int]] = []
        modules = dict(model.named_modules())
        self.handles = [modules[path].register_forward_hook(self._hook(path)) for path in paths if path in modules]

    def _hook(self, path: str) -> Callable:
        def record(module, args, output):
            tensor = _first_tensor(output)
            if tensor is None:
                return
            calls = self.outputs.setdefault(path, [])
            self.order.append((path, len(calls)))
            calls.append(tensor.detach().to("cpu", torch.float64, copy=True))
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def component_of(model: nn.Module) -> str:
    """The converter component of one of our models (``movq``, ``prior``, ``unet``, ``unet_inpaint``; a 2.2
    ControlNet UNet is a ``unet``)."""
    from kandinsky.models.movq import MoVQ
    from kandinsky.models.prior import Prior
    from kandinsky.models.unet import UNet

    if isinstance(model, MoVQ):
        return "movq"
    if isinstance(model, Prior):
        return "prior"
    if isinstance(model, UNet):
        return "unet_inpaint" if model.config.in_channels == 9 else "unet"
    raise ValueError(f"ours: expected our MoVQ, Prior or UNet, got {type(model).__name__}")


def layout_of(reference: nn.Module, ours: nn.Module) -> str:
    """``"ours"`` (same class as ours), ``"diffusers"`` (a diffusers model) or ``"original"``."""
    if plain_class(type(reference)) is plain_class(type(ours)):
        return "ours"
    return "diffusers" if type(reference).__module__.startswith("diffusers") else "original"


def run_ours(component: str, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Our model called on ``inputs`` (our argument names)."""
    inputs = dict(inputs)
    if component == "movq":
        return model.encode(inputs["images"]) if "images" in inputs else model.decode(inputs["latents"])
    return model(inputs.pop("x"), inputs.pop("timesteps"), **inputs)


def run_reference(component: str, layout: str, model: nn.Module, inputs: Mapping[str, torch.Tensor]):
    """The reference called on ``inputs`` given in our argument names, in its own convention."""
    if layout == "ours":
        return run_ours(component, model, inputs)
    i = inputs
    if component == "movq":
        if "images" in i:
            encoded = model.encode(i["images"])
            return encoded.latents if layout == "diffusers" else encoded
        if layout == "diffusers":
            return model.decode(i["latents"], force_not_quantize=True).sample
        return model.decode(i["latents"])
    if component == "prior":
        if layout == "diffusers":
            return model(i["x"], timestep=i["timesteps"], proj_embedding=i["text_embeds"],
                         encoder_hidden_states=i["text_hidden_states"], attention_mask=i["text_mask"]
                         ).predicted_image_embedding
        return model.model(i["x"], i["timesteps"], text_emb=i["text_embeds"], text_enc=i["text_hidden_states"],
                           mask=i["text_mask"], causal_mask=model.causal_mask)
    if "text_hidden_states" not in i:  # Kandinsky 2.2: the image embedding (and the ControlNet's hint) only
        if layout != "diffusers":
            raise ValueError("reference: Kandinsky 2.2's UNets have no original implementation; trace them against "
                             "diffusers or our own")
        added = {"image_embeds": i["image_embeds"], **({"hint": i["hint"]} if "hint" in i else {})}
        return model(i["x"], i["timesteps"], encoder_hidden_states=None, added_cond_kwargs=added).sample
    if layout == "diffusers":
        return model(i["x"], i["timesteps"], encoder_hidden_states=i["text_hidden_states"],
                     added_cond_kwargs={"text_embeds": i["text_embeds"], "image_embeds": i["image_embeds"]}).sample
    text = dict(full_emb=i["text_hidden_states"], pooled_emb=i["text_embeds"], image_emb=i["image_embeds"])
    if component == "unet_inpaint":  # the original builds the 9 channels from latents, masked image and mask
        x = i["x"]
        return model(x[:, :4], i["timesteps"], inpaint_image=x[:, 4:8], inpaint_mask=x[:, 8:], **text)
    return model(i["x"], i["timesteps"], **text)


def _compare(ours: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor | None) -> tuple[float, float, str]:
    if ours.numel() != reference.numel():
        return math.nan, math.nan, f"not compared: reference shape {tuple(reference.shape)}"
    if valid is not None and ours.ndim == 3 and ours.shape[:2] == valid.shape:
        ours, reference = ours[valid], reference.reshape(ours.shape)[valid]
    diff = (ours.flatten() - reference.flatten()).abs().max().item() if ours.numel() else 0.0
    scale = reference.abs().max().item() if reference.numel() else 0.0
    return diff, diff / max(scale, 1e-30), ""


@torch.no_grad()
def trace(ours: nn.Module, reference: nn.Module, inputs: Mapping[str, torch.Tensor], *,
          tolerance: float = DEFAULT_TOLERANCE, key_map: Mapping[str, str] | None = None,
          component: str | None = None, layout: str | None = None) -> Trace:
    """Run ``ours`` and ``reference`` on ``inputs`` and compare every pair of mapped module outputs.

    ``key_map`` (our module path -> reference module path) defaults to the converter's map for the
    reference's layout (``layout``: detected from the reference's class) at our config; ``component`` is
    detected from our model. Returns a :class:`Trace`; ``str(trace)`` is the table.
    """
    if not isinstance(inputs, Mapping):
        raise ValueError(f"inputs: expected a dict of tensors in our argument names, got {type(inputs).__name__}")
    if not tolerance > 0:
        raise ValueError(f"tolerance: expected a positive number, got {tolerance!r}")
    ops.plain(ours)
    component = component or component_of(ours)
    layout = layout or layout_of(reference, ours)
    if key_map is None:
        key_map = ({path: path for path, _ in ours.named_modules()} if layout == "ours"
                   else module_map(component, ours.config, layout))
    ours.eval()
    reference.eval()
    mine, theirs = _Recorder(ours, list(key_map)), _Recorder(reference, list(key_map.values()))
    try:
        run_ours(component, ours, inputs)
        run_reference(component, layout, reference, inputs)
    finally:
        mine.remove()
        theirs.remove()
    # The prior's padding text tokens are masked as keys, so nothing reads their states, and implementations
    # fill them differently (ours lets them attend to themselves): its token sequences are compared on the
    # real tokens only.
    valid = None
    if component == "prior" and inputs.get("text_mask") is not None:
        valid = torch.nn.functional.pad(inputs["text_mask"].cpu(), (0, NUM_EXTRA_TOKENS), value=True)
    rows = []
    for path, call in mine.order:
        counterpart = key_map[path]
        calls = theirs.outputs.get(counterpart, [])
        if call >= len(calls):
            continue
        ours_out, reference_out = mine.outputs[path][call], calls[call]
        max_abs, max_rel, note = _compare(ours_out, reference_out, valid)
        rows.append(TraceRow(path, counterpart, tuple(ours_out.shape), max_abs, max_rel, call, note))
    return Trace(rows, tolerance)


# --------------------------------------------------------------------------------------------- references


def diffusers_reference(component: str, ours: nn.Module) -> nn.Module:
    """The diffusers model holding our module's weights (:func:`kandinsky.convert.to_diffusers`), eval mode."""
    import diffusers

    from kandinsky.convert import to_diffusers

    classes = {"movq": diffusers.VQModel, "prior": diffusers.PriorTransformer,
               "unet": diffusers.UNet2DConditionModel, "unet_inpaint": diffusers.UNet2DConditionModel}
    config, state = to_diffusers(component, ops.plain(ours))
    with torch.device("meta"):  # no random initialisation of a model about to be overwritten
        reference = classes[component](**config)
    reference.load_state_dict(state, strict=True, assign=True)
    if component == "prior":  # a non-persistent buffer: built as diffusers builds it
        mask = reference.causal_attention_mask
        reference.causal_attention_mask = torch.full(mask.shape, -10000.0).triu_(1)
    leftover = [name for name, t in [*reference.named_parameters(), *reference.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"diffusers {type(reference).__name__}: tensors outside the state dict: {leftover}")
    return reference.eval()


TRACED = ("movq", "prior", "unet", "unet_inpaint", "unet_controlnet")  # kandinsky parity trace's components
MODELS = ("2.1", "2.2")


def official_config(component: str, model: str = "2.1"):
    """Our config of the official ``component`` of Kandinsky ``model`` (``unet_controlnet``: 2.2 only)."""
    from kandinsky.models import config_class

    if model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {model!r}")
    if model == "2.2":
        from kandinsky.parity.prior import CONFIG_22
        from kandinsky.parity.unet import CONFIGS_22

        return CONFIG_22 if component == "prior" else CONFIGS_22.get(component) or config_class(component)()
    if component == "unet_controlnet":
        raise ValueError("unet_controlnet: Kandinsky 2.2's ControlNet UNet; use --model 2.2")
    from kandinsky.parity.unet import CONFIGS_21

    return CONFIGS_21.get(component) or config_class(component)()


def _random_config(component: str, args):
    """--random's config: the official one of --model, or --config's JSON (a UNet's adjusted to ``component``:
    9 input channels for inpainting, the hint's 4 more and ``image_hint`` for the ControlNet)."""
    import dataclasses
    import json
    from pathlib import Path

    from kandinsky.models import config_from_dict

    model = args.model or ("2.2" if component == "unet_controlnet" else "2.1")
    if not args.config:
        return official_config(component, model)
    base = "unet" if component.startswith("unet") else component
    config = config_from_dict(base, json.loads(Path(args.config).read_text()))
    if base == "unet":
        if (config.conditioning == "text_image") != (model == "2.1"):
            version = "2.1" if config.conditioning == "text_image" else "2.2"
            raise ValueError(f"--config: {args.config} is a Kandinsky {version} UNet (conditioning "
                             f"{config.conditioning!r}); --model {model} needs a {model} one")
        if component == "unet_inpaint":
            config = dataclasses.replace(config, in_channels=9)
        elif component == "unet_controlnet":
            config = dataclasses.replace(config, in_channels=config.x_channels + 4, conditioning="image_hint")
    return config


def _load_ours(component: str, args) -> nn.Module:
    import json
    from pathlib import Path

    from kandinsky.models import model_class
    from kandinsky.testing import randomize_
    from kandinsky.weights import is_converted, load_converted

    if component == "unet_controlnet" and args.model == "2.1":
        raise ValueError("unet_controlnet: Kandinsky 2.2's ControlNet UNet, not a 2.1 model (--model 2.2)")
    if args.random:
        config = _random_config(component, args)
        return randomize_(model_class("unet" if component.startswith("unet") else component)(config), args.seed).eval()
    if is_converted(args.weights):
        stored = json.loads((Path(args.weights) / "config.json").read_text()).get("component")
        if stored != component:
            raise ValueError(f"--weights: {args.weights} holds a {stored}, not a {component}")
        return load_converted(args.weights, dtype=torch.float32)
    from kandinsky.hub import resolve

    model = {} if args.model is None else {"model": args.model}  # None: detected from --weights
    parts = resolve(args.weights, revision=args.revision, cache_dir=args.cache_dir, **model)
    if component not in parts:
        raise ValueError(f"--weights: {args.weights} has no {component}")
    return parts[component].load().float().eval()


def main(argv: list[str] | None = None) -> int:
    """``kandinsky parity trace COMPONENT``: exit code 0 when every pair is within the tolerance, 1 otherwise."""
    import argparse
    import sys

    from kandinsky.export import input_names, sample_inputs

    parser = argparse.ArgumentParser(prog="kandinsky parity trace", description=__doc__.splitlines()[0] + " Runs "
                                     "ours and diffusers on the same weights and inputs and prints, module by module, "
                                     "where they first differ.")
    parser.add_argument("component", choices=TRACED,
                        help="the model (unet_controlnet: Kandinsky 2.2's ControlNet UNet)")
    parser.add_argument("--model", default=None, choices=MODELS,
                        help="the Kandinsky version: with --random, whose official config (default: 2.1); with "
                             "--weights, how to read them (default: detected)")
    parser.add_argument("--weights", default="kandinsky-community/kandinsky-2-1",
                        help="hub repository, pipeline folder (any layout) or one converted component folder")
    parser.add_argument("--revision", default=None, help="hub revision of --weights")
    parser.add_argument("--cache-dir", default=None, help="converted-weights cache")
    parser.add_argument("--random", action="store_true", help="seeded random weights instead of --weights")
    parser.add_argument("--config", default=None, help="with --random: our config JSON (e.g. configs/unet_tiny.json, "
                                                       "configs/unet_22_tiny.json with --model 2.2; default: the "
                                                       "official size)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"relative error that counts as a divergence (default: {DEFAULT_TOLERANCE:g}, float32)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the random inputs (default: 2)")
    parser.add_argument("--height", type=int, default=None, help="latent height (default: the smallest allowed x 2)")
    parser.add_argument("--width", type=int, default=None, help="latent width (default: the smallest allowed x 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and weights (default: 0)")
    args = parser.parse_args(argv)
    try:
        ours = _load_ours(args.component, args)
        component = component_of(ours)
        reference = diffusers_reference(component, ours)
        targets = ["movq_decode", "movq_encode"] if args.component == "movq" else [args.component]
        diverged = False
        for target in targets:
            height, width = args.height, args.width
            if target == "movq_encode" and height:
                height, width = height * ours.config.downsample_factor, (width or 3) * ours.config.downsample_factor
            inputs = sample_inputs(target, ours.config, args.batch, height, width, args.seed)
            report = trace(ours, reference, dict(zip(input_names(target, ours.config), inputs)),
                           tolerance=args.tolerance)
            print(f"{target}: ours vs diffusers {type(reference).__name__}\n{report}\n")
            diverged = diverged or report.first is not None
    except (ValueError, OSError, ImportError) as error:
        print(f"kandinsky: error: {error}", file=sys.stderr)
        return 1
    return 1 if diverged else 0

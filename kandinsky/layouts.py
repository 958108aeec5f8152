"""Our weights written in the official layouts: diffusers model repositories and the original checkpoints.

A model fine-tuned here can then be shared with a diffusers user or fed to the original code::

    from kandinsky.layouts import export_component
    export_component("movq", movq, "out/movq", layout="diffusers")     # config.json + diffusion_pytorch_model...
    export_component("unet", unet, "out/unet", layout="original")      # decoder_fp16.ckpt, float16 as released
    pipe.save_pretrained("out/k21", layout="diffusers")                 # prior/ decoder/ inpaint/: export_pipeline

* ``"diffusers"``: a pipeline becomes three model repositories that diffusers loads offline:
  ``prior/`` (``KandinskyPriorPipeline``: prior, CLIP text and vision towers, tokenizer, unCLIP scheduler,
  image processor), ``decoder/`` (``KandinskyPipeline``: UNet, MoVQ, M-CLIP, tokenizer, DDIM scheduler) and,
  with an inpainting UNet, ``inpaint/`` (``KandinskyInpaintPipeline``). The schedulers are the official
  repositories' configurations. Weights keep their dtype unless ``dtype`` is given. A Kandinsky 2.2 pipeline (its
  UNets read the image embedding only) becomes ``prior/`` (``KandinskyV22PriorPipeline``), ``decoder/``
  (``KandinskyV22Pipeline``: UNet, MoVQ, scheduler), ``inpaint/`` (``KandinskyV22InpaintPipeline``) and
  ``controlnet/`` (``KandinskyV22ControlnetPipeline``), the folders of kandinsky-2-2-prior, -decoder,
  -decoder-inpaint and -controlnet-depth; the decoders' scheduler is the store's (``"scheduler"``: the config a 2.2
  repository came with), else the DDIM configuration our pipelines sample with by default.
* ``"original"``: the files of ``ai-forever/Kandinsky_2.1`` (``decoder_fp16.ckpt``, ``inpainting_fp16.ckpt``,
  ``prior_fp16.ckpt``, ``movq_final.ckpt``, ``ViT-L-14_stats.th``, ``text_encoder/``): tensor-only pickles with
  the original key names, which the original code's ``load_state_dict`` accepts, in float16 by default as
  released. The original code takes CLIP ViT-L/14 from OpenAI's ``clip`` package: the CLIP towers are not written.
  Kandinsky 2.2 has no such layout (ai-forever's own 2.2 code loads the kandinsky-community diffusers repositories):
  a 2.2 pipeline is refused with a ``ValueError`` pointing at ``"diffusers"``.

The weights go through the converters' layer tables (:mod:`kandinsky.convert`), so an export is exact:
converting it back gives bit-identical tensors (in the same dtype). Every exported folder is written with
:func:`kandinsky.weights.atomic_folder` (complete or absent; an existing one is replaced only with
``overwrite``) and records its provenance in ``kandinsky21_export.json`` (:data:`kandinsky.weights.EXPORT_FILE`, which also marks
it as replaceable with ``overwrite``): the package version, layout, dtype,
components, LoRA handling and, when the caller knows them, source and revision.

Models with LoRA adapters (:mod:`kandinsky.lora`) are written fused (``lora="fuse"``: ``W + B A * scaling``
in float32, then cast; the adapters' current scale included) or, in the diffusers layout, as the base
weights plus one adapter file per model (``lora="separate"``: ``<model>/pytorch_lora_weights.safetensors``
in PEFT format on diffusers' module names, which ``pipe.unet.load_lora_adapter(folder, prefix=None)`` reads).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kandinsky.convert import COMPONENTS as CONVERTED
from kandinsky.convert import foreign_config, layer_table, to_layout
from kandinsky.text_encoders import CLIP_MEAN, CLIP_STD
from kandinsky.weights import DTYPES, EXPORT_FILE, atomic_folder, save_converted

LAYOUTS = ("diffusers", "original")
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose loaders these folders are written for
DIFFUSERS_MODEL_FILE = "diffusion_pytorch_model.safetensors"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
ORIGINAL_FILES = {"prior": "prior_fp16.ckpt", "unet": "decoder_fp16.ckpt", "unet_inpaint": "inpainting_fp16.ckpt",
                  "movq": "movq_final.ckpt"}
CLIP_STATS_FILE = "ViT-L-14_stats.th"
ORIGINAL_TEXT_ENCODER = "text_encoder"
LORA_MODES = ("fuse", "separate")
_DIFFUSERS_CLASSES = {"movq": "VQModel", "prior": "PriorTransformer", "unet": "UNet2DConditionModel",
                      "unet_inpaint": "UNet2DConditionModel", "unet_controlnet": "UNet2DConditionModel"}
CONTROLNET = "unet_controlnet"
SCHEDULER = "scheduler"  # a pipeline's component: the decoder's diffusers scheduler config (Kandinsky 2.2)
# the official repositories' scheduler configurations (kandinsky-2-1 and kandinsky-2-1-prior)
_DECODER_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                      "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
                      "steps_offset": 1, "prediction_type": "epsilon", "thresholding": False}
_PRIOR_SCHEDULER = {"_class_name": "UnCLIPScheduler", "clip_sample": True, "clip_sample_range": 10.0,
                    "num_train_timesteps": 1000, "prediction_type": "sample", "variance_type": "fixed_small_log"}
# pipeline folder -> (diffusers pipeline class, {diffusers component: our component}); the first is the main model
DIFFUSERS_PIPELINES = {
    "prior": ("KandinskyPriorPipeline", {"prior": "prior", "text_encoder": "clip_text", "image_encoder": "clip_vision",
                                         "tokenizer": "clip_tokenizer"}),
    "decoder": ("KandinskyPipeline", {"unet": "unet", "movq": "movq", "text_encoder": "mclip",
                                      "tokenizer": "mclip_tokenizer"}),
    "inpaint": ("KandinskyInpaintPipeline", {"unet": "unet_inpaint", "movq": "movq", "text_encoder": "mclip",
                                             "tokenizer": "mclip_tokenizer"}),
}
# Kandinsky 2.2's: kandinsky-2-2-prior, -decoder, -decoder-inpaint, -controlnet-depth (no text encoder in a decoder)
DIFFUSERS_PIPELINES_22 = {
    "prior": ("KandinskyV22PriorPipeline", {"prior": "prior", "text_encoder": "clip_text",
                                            "image_encoder": "clip_vision", "tokenizer": "clip_tokenizer"}),
    "decoder": ("KandinskyV22Pipeline", {"unet": "unet", "movq": "movq"}),
    "inpaint": ("KandinskyV22InpaintPipeline", {"unet": "unet_inpaint", "movq": "movq"}),
    "controlnet": ("KandinskyV22ControlnetPipeline", {"unet": CONTROLNET, "movq": "movq"}),
}
ORIGINAL_22 = ("layout: Kandinsky 2.2 has no original layout (ai-forever's own 2.2 code loads the kandinsky-community "
               "diffusers repositories); use layout='diffusers'")


def _check(layout: str, dtype, lora: str) -> torch.dtype | None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    if lora not in LORA_MODES:
        raise ValueError(f"lora: expected one of {list(LORA_MODES)}, got {lora!r}")
    if lora == "separate" and layout == "original":
        raise ValueError("lora: the original code has no LoRA loader; export the adapters fused (lora='fuse')")
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: expected None or one of {list(DTYPES)}, got {dtype!r}")


def _json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _provenance(folder: Path, layout: str, dtype: torch.dtype | None, components: list[str], lora: str | None,
                provenance: Mapping | None) -> None:
    from kandinsky import __version__

    record = {"format": "kandinsky21-export", "exported_by": f"kandinsky21 {__version__}", "torch": torch.__version__,
              "layout": layout, "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
              "components": components, "lora": lora, "source": None, "revision": None,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **dict(provenance or {})}
    _json(folder / EXPORT_FILE, record)


# --------------------------------------------------------------------------------------------- our state dicts


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(target, memory_format=torch.contiguous_format, copy=True)


def _lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-wrapped layers of ``module`` by path (none without peft adapters)."""
    if not any(".lora_A." in key for key in module.state_dict()):
        return {}
    from peft.tuners.lora import LoraLayer

    return {path: sub for path, sub in module.named_modules() if isinstance(sub, LoraLayer)}


def _state(module: nn.Module, lora: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """(our plain state dict, adapters). LoRA layers become plain weights: fused with their adapters
    (``lora="fuse"``), or the base weights with the adapters returned as {path: (lora_A, lora_B, scaling)}."""
    from kandinsky.lora import adapter_names, delta_weight

    state = dict(module.state_dict())
    adapters = {}
    names = adapter_names(module)
    if lora == "separate" and len(names) > 1:
        raise ValueError(f"module: {len(names)} LoRA adapters; lora='separate' writes one adapter file per model "
                         "(fuse them, or load one adapter)")
    for path, wrapped in _lora_layers(module).items():
        for key in [k for k in state if k.startswith(f"{path}.")]:
            del state[key]
        base = wrapped.get_base_layer()
        weight = base.weight.detach()
        if lora == "fuse":
            weight = (weight.float() + delta_weight(wrapped)).to(weight.dtype)
        else:
            name = names[0]
            adapters[path] = (wrapped.lora_A[name].weight.detach(), wrapped.lora_B[name].weight.detach(),
                              float(wrapped.scaling[name]))
        state[f"{path}.weight"] = weight
        if base.bias is not None:
            state[f"{path}.bias"] = base.bias.detach()
    return state, adapters


# --------------------------------------------------------------------------------------------- one component


def _diffusers_lora(component: str, config, adapters: dict[str, tuple], dtype) -> tuple[dict, dict]:
    """Adapters on our layers -> PEFT adapters on diffusers' layers: a fused layer's lora_B rows split like
    its weight, lora_A shared (the product is the same block of rows)."""
    table = {item.ours: item for item in layer_table(component, config, "diffusers")}
    weights, targets, ranks, alphas = {}, [], set(), set()
    for path, (lora_a, lora_b, scaling) in adapters.items():
        item = table[path]
        for foreign, rows in zip(item.foreign, item.to_foreign("weight", lora_b)):
            weights[f"{foreign}.lora_A.weight"] = _cast(lora_a, dtype)
            weights[f"{foreign}.lora_B.weight"] = _cast(rows, dtype)
            targets.append(foreign)
        ranks.add(lora_a.shape[0])
        alphas.add(scaling * lora_a.shape[0])
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"{component}: adapters of several ranks {sorted(ranks)} or scalings cannot share one file")
    config = {"r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": sorted(targets), "lora_dropout": 0.0,
              "bias": "none"}
    return weights, {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True)}


def _write_model(component: str, module: nn.Module, folder: Path, layout: str, dtype, lora: str) -> None:
    """Write one converted model (movq, prior, unet, unet_inpaint) into ``folder`` (which exists)."""
    state, adapters = _state(module, lora)
    foreign, extras = to_layout(component, module.config, state, layout, dtype=dtype)
    if layout == "original":
        torch.save(foreign, folder / ORIGINAL_FILES[component])
        if "clip_stats" in extras:
            torch.save(extras["clip_stats"], folder / CLIP_STATS_FILE)
        return
    config = {"_class_name": _DIFFUSERS_CLASSES[component], "_diffusers_version": DIFFUSERS_VERSION,
              **foreign_config(component, module.config, "diffusers")}
    _json(folder / "config.json", config)
    save_file(foreign, str(folder / DIFFUSERS_MODEL_FILE), metadata={"format": "pt"})
    if adapters:
        weights, metadata = _diffusers_lora(component, module.config, adapters, dtype)
        save_file(weights, str(folder / DIFFUSERS_LORA_FILE), metadata=metadata)


def export_component(component: str, module: nn.Module, folder: str | os.PathLike, *, layout: str,
                     dtype: torch.dtype | str | None = "default", overwrite: bool = False, lora: str = "fuse",
                     provenance: Mapping | None = None) -> Path:
    """Write our ``module`` (``component``: movq, prior, unet or unet_inpaint) into ``folder`` in ``layout``.

    ``"diffusers"``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (a diffusers model folder);
    ``"original"``: the official checkpoint file (``movq_final.ckpt``, ...; the prior also
    ``ViT-L-14_stats.th``); ``"ours"``: :func:`kandinsky.weights.save_converted`. ``dtype``: the weights' dtype
    in the files (default: float16 for the original layout, as released; as stored otherwise; ``None``: as
    stored). ``provenance``: extra fields of ``kandinsky21_export.json``, e.g. ``{"source": ..., "revision": ...}``.
    Returns the folder.
    """
    if component not in CONVERTED:
        raise ValueError(f"component: expected one of {list(CONVERTED)}, got {component!r}")
    if not isinstance(module, nn.Module) or not hasattr(module, "config"):
        raise ValueError(f"module: expected our {component} model, got {type(module).__name__}")
    if layout == "ours":
        if _lora_layers(module):
            raise ValueError("module: has LoRA adapters; save them with kandinsky.lora.save_lora, or export to "
                             "'diffusers' / 'original' (fused)")
        return save_converted(module, component, folder, overwrite=overwrite,
                              source_info=dict(provenance or {}) or None)
    dtype = _check(layout, _default_dtype(layout, dtype), lora)

    def write(temporary: Path) -> None:
        _write_model(component, module, temporary, layout, dtype, lora)
        extra = {"original_configs": {component: foreign_config(component, module.config, "original")}} \
            if layout == "original" else {}
        _provenance(temporary, layout, dtype, [component], lora, {**dict(provenance or {}), **extra})

    return atomic_folder(folder, write, overwrite=overwrite)


def _default_dtype(layout: str, dtype):
    if isinstance(dtype, str) and dtype == "default":
        return torch.float16 if layout == "original" else None
    return dtype


# --------------------------------------------------------------------------------------------- text encoders


def _save_transformers(model: nn.Module, folder: Path, dtype: torch.dtype | None) -> None:
    """A transformers CLIP tower with ``save_pretrained`` (config.json + model.safetensors), cast to ``dtype``."""
    state = None if dtype is None else {k: _cast(v, dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(str(folder), state_dict=state)


def _mclip_state(mclip: nn.Module, dtype) -> dict[str, torch.Tensor]:
    return {key: _cast(value, dtype) for key, value in mclip.state_dict().items()}


def _write_mclip_diffusers(mclip: nn.Module, folder: Path, dtype) -> None:
    """diffusers' ``MultilingualCLIP`` folder: its ``MCLIPConfig`` (model type "M-CLIP") takes the widths as
    transformerDimSize / imageDimSize (the official config's transformerDimensions / numDims are kept beside them)."""
    folder.mkdir()
    config = mclip.to_config()
    _json(folder / "config.json", {**config, "model_type": "M-CLIP",
                                   "transformerDimSize": config["transformerDimensions"], "imageDimSize": config["numDims"]})
    save_file(_mclip_state(mclip, dtype), str(folder / "model.safetensors"), metadata={"format": "pt"})


def _write_mclip_original(mclip: nn.Module, tokenizer, folder: Path, dtype) -> None:
    """The original ``text_encoder/``: M-CLIP config.json, pytorch_model.bin and the tokenizer's files."""
    folder.mkdir()
    _json(folder / "config.json", mclip.to_config())
    torch.save(_mclip_state(mclip, dtype), folder / "pytorch_model.bin")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


# --------------------------------------------------------------------------------------------- a pipeline


def _write_diffusers_pipeline(name: str, load: Callable[[str], object], folder: Path, dtype, lora: str,
                              pipelines: Mapping = DIFFUSERS_PIPELINES, decoder_scheduler: dict | None = None) -> None:
    pipeline_class, parts = pipelines[name]
    folder.mkdir()
    index = {"_class_name": pipeline_class, "_diffusers_version": DIFFUSERS_VERSION}
    image_size = None
    for part, ours in parts.items():
        component = load(ours)
        target = folder / part
        if ours in CONVERTED:
            target.mkdir()
            _write_model(ours, component, target, "diffusers", dtype, lora)
            index[part] = ["diffusers", _DIFFUSERS_CLASSES[ours]]
        elif ours == "mclip":
            _write_mclip_diffusers(component, target, dtype)
            index[part] = ["kandinsky", "MultilingualCLIP"]
        elif ours in ("clip_text", "clip_vision"):
            _save_transformers(component, target, dtype)
            index[part] = ["transformers", type(component).__name__]
            image_size = component.config.image_size if ours == "clip_vision" else image_size
        else:
            component.save_pretrained(str(target))
            index[part] = ["transformers", type(component).__name__]
    scheduler = _PRIOR_SCHEDULER if name == "prior" else (decoder_scheduler or _DECODER_SCHEDULER)
    scheduler = {k: v for k, v in scheduler.items() if k == "_class_name" or not k.startswith("_")}  # no bookkeeping
    (folder / "scheduler").mkdir()
    _json(folder / "scheduler" / "scheduler_config.json", {**scheduler, "_diffusers_version": DIFFUSERS_VERSION})
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    if name == "prior":
        size = image_size
        (folder / "image_processor").mkdir()
        _json(folder / "image_processor" / "preprocessor_config.json", {
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "do_convert_rgb": True})
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    _json(folder / "model_index.json", index)


def _model(load: Callable[[str], object], available: set[str]) -> str:
    """The Kandinsky version of a pipeline's components: 2.2 with a ControlNet UNet or UNets that read no text,
    else 2.1 (without UNets, a prior is written as 2.1's ``KandinskyPriorPipeline``: the same components as
    ``KandinskyV22PriorPipeline``'s)."""
    if CONTROLNET in available:
        return "2.2"
    for name in ("unet", "unet_inpaint"):
        if name in available:
            return "2.1" if getattr(load(name).config, "has_text", True) else "2.2"
    return "2.1"


def export_pipeline(components: Mapping[str, Callable[[], object]], folder: str | os.PathLike, *, layout: str,
                    dtype: torch.dtype | str | None = "default", overwrite: bool = False, lora: str = "fuse",
                    provenance: Mapping | None = None) -> Path:
    """Write a pipeline's components in ``layout`` into ``folder`` (one atomic write; see the module docstring).

    ``components`` maps the pipeline's component names (``prior``, ``unet``, ``mclip``, ``clip_tokenizer``, ...)
    to zero-argument loaders, called when the component is written (a lazily loaded pipeline never holds
    every model at once); ``"scheduler"`` (Kandinsky 2.2) gives the decoder's diffusers scheduler config. The
    diffusers layout writes ``prior/`` when the prior is there, ``decoder/`` with the UNet, ``inpaint/`` with the
    inpainting UNet, and for Kandinsky 2.2 (told by its UNets' configs) ``controlnet/`` with the ControlNet UNet;
    each needs the rest of its pipeline (a ``ValueError`` names what is missing). A 2.2 pipeline has no original
    layout (``ValueError``). ``dtype``, ``lora``, ``provenance``: as in :func:`export_component`.
    """
    dtype = _check(layout, _default_dtype(layout, dtype), lora)
    available = set(components) - {SCHEDULER}

    def load(name: str):
        if name not in available:
            raise ValueError(f"components: no {name!r}")
        return components[name]()

    model = _model(load, available)
    if layout == "original" and model == "2.2":
        raise ValueError(ORIGINAL_22)
    pipelines = DIFFUSERS_PIPELINES if model == "2.1" else DIFFUSERS_PIPELINES_22
    if layout == "diffusers":
        folders = [name for name, (_, parts) in pipelines.items() if next(iter(parts.values())) in available]
        for name in folders:
            missing = sorted(set(pipelines[name][1].values()) - available)
            if missing:
                raise ValueError(f"components: the diffusers {name}/ pipeline also needs {missing}")
        if not folders:
            raise ValueError(f"components: nothing to write in the diffusers layout (needs prior, unet, "
                             f"unet_inpaint or unet_controlnet), got {sorted(available)}")
    else:
        written = [name for name in (*ORIGINAL_FILES, "mclip") if name in available]
        if not written:
            raise ValueError(f"components: nothing to write in the original layout (needs one of "
                             f"{[*ORIGINAL_FILES, 'mclip']}), got {sorted(available)}")

    def write(temporary: Path) -> None:
        if layout == "diffusers":
            everything = []
            scheduler = components[SCHEDULER]() if model == "2.2" and SCHEDULER in components else None
            for name in folders:
                _write_diffusers_pipeline(name, load, temporary / name, dtype, lora, pipelines, scheduler)
                parts = list(pipelines[name][1].values())
                _provenance(temporary / name, layout, dtype, parts, lora, provenance)  # each is a repository
                everything += [part for part in parts if part not in everything]
            _provenance(temporary, layout, dtype, everything, lora, provenance)
            return
        configs = {}  # the original code keeps its configs in code: record ours, so any size reads back
        for name in written:
            if name == "mclip":
                tokenizer = load("mclip_tokenizer") if "mclip_tokenizer" in available else None
                _write_mclip_original(load("mclip"), tokenizer, temporary / ORIGINAL_TEXT_ENCODER, dtype)
            else:
                module = load(name)
                configs[name] = foreign_config(name, module.config, "original")
                _write_model(name, module, temporary, layout, dtype, lora)
        _provenance(temporary, layout, dtype, written, lora, {**dict(provenance or {}), "original_configs": configs})

    return atomic_folder(folder, write, overwrite=overwrite)

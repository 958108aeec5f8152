"""The component store: every model and tokenizer of a Kandinsky 2.1 or 2.2 pipeline, made ready in one place.

Every task (the pipeline's text2img / img2img / inpaint / mix, training, export, evaluation, the component
benchmarks, the tracer) gets its models from a :class:`Components`, so that what is done to a model here
(its device and dtype, the device-specific fast modules of :mod:`kandinsky.ops`, ``torch.compile``, LoRA
adapters) holds for every task that uses it.

A component is an ``nn.Module`` (or a tokenizer) given as it is, a :class:`~kandinsky.hub.Lazy` loader that runs
on first use, or absent. :meth:`Components.module` returns a model ready to run: on the store's device and dtype,
with the fast modules swapped in, in eval mode.

Example::

    from kandinsky.components import Components
    components = Components.from_config("tiny", seed=0)          # or .from_pretrained("kandinsky-community/...")
    components.load_lora("runs/cats", scale=0.8)                  # every task now sees the adapter
    unet = components.module("unet")                              # ready: device, dtype, ops, eval
    components.save_pretrained("out/k21", layout="diffusers")

A Kandinsky 2.2 store has no M-CLIP (its decoder reads no text) and may hold a third UNet, ``unet_controlnet``
(a decoder-stage module beside those of :data:`kandinsky.hub.MODULES`), and the decoder's diffusers scheduler config
(``scheduler``: what :meth:`Kandinsky22.from_pretrained <kandinsky.pipeline.Kandinsky22.from_pretrained>` samples
with; saved with the models).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kandinsky import ops
from kandinsky.hub import CONTROLNET, DECODER_STAGE, MODULES, PRIOR_STAGE, SCHEDULER, TOKENIZERS, Lazy, resolve, \
    tiny_seed
from kandinsky.validation import check_device, check_number

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OFFLOAD = (None, "sequential")
ALL_MODULES = MODULES + (CONTROLNET,)  # the modules a store may hold
DECODER_MODULES = DECODER_STAGE + (CONTROLNET,)
COMPILABLE = ("unet", "unet_inpaint", CONTROLNET)  # what compile() applies to: the models run once per sampler step


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter loaded into the store: the file it came from (and its SHA-256), the component it
    changes, and the scale of its contribution (1 = as trained)."""

    path: str
    component: str
    scale: float
    sha256: str
    name: str  # peft's adapter name inside the module

    def describe(self) -> dict:
        """What a PNG's metadata records of the adapter (:mod:`kandinsky.png`)."""
        return {"path": self.path, "component": self.component, "scale": self.scale, "sha256": self.sha256}


class Components:
    """Which models exist (loaded or lazy), where they run, what was done to them.

    Args:
        clip_tokenizer, clip_text, clip_vision, prior, mclip_tokenizer, mclip, unet, unet_inpaint, movq,
            unet_controlnet: each an ``nn.Module`` (a tokenizer for the two tokenizers), a
            :class:`~kandinsky.hub.Lazy` loader or ``None``.
        device: where the models run. dtype: their weight dtype (float32, float16 or bfloat16).
        offload: ``None`` keeps every loaded module on ``device``; ``"sequential"`` keeps only the prior stage
            (CLIP + prior) or the decoder stage (M-CLIP + UNet + MoVQ) resident: the other stage's lazily loaded
            modules are dropped (reloaded memory-mapped when needed), the others moved to CPU.
        source: where the weights came from (``{"source": ..., "revision": ...}``), as the PNG metadata records
            it; the constructors fill it in.
        scheduler: the decoder's diffusers scheduler config (a dict with its ``_class_name``, as in
            ``scheduler_config.json``), a :class:`~kandinsky.hub.Lazy` loader of one (or of None), or ``None``:
            Kandinsky 2.2's decoder repositories say how to sample (:meth:`scheduler_config`).
    """

    def __init__(self, *, clip_tokenizer=None, clip_text=None, clip_vision=None, prior=None, mclip_tokenizer=None,
                 mclip=None, unet=None, unet_inpaint=None, movq=None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, offload: str | None = None, source: dict | None = None,
                 unet_controlnet=None, scheduler=None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        if offload not in OFFLOAD:
            raise ValueError(f"offload: expected None or 'sequential', got {offload!r}")
        self.device = check_device("device", device)
        self.dtype = dtype
        self.offload = offload
        self.source = dict(source or {"source": "modules"})
        self._tokenizers = {"clip_tokenizer": clip_tokenizer, "mclip_tokenizer": mclip_tokenizer}
        given = dict(clip_text=clip_text, clip_vision=clip_vision, prior=prior, mclip=mclip, unet=unet,
                     unet_inpaint=unet_inpaint, movq=movq, unet_controlnet=unet_controlnet)
        for name, value in given.items():
            if value is not None and not isinstance(value, (Lazy, nn.Module)):
                raise ValueError(f"{name}: expected an nn.Module, a Lazy loader or None, got {type(value).__name__}")
        if scheduler is not None and not isinstance(scheduler, Lazy) and not (
                isinstance(scheduler, dict) and isinstance(scheduler.get("_class_name"), str)):
            raise ValueError(f"scheduler: expected a diffusers scheduler config (a dict with its \"_class_name\"), a "
                             f"Lazy loader or None, got {type(scheduler).__name__}")
        self._scheduler = dict(scheduler) if isinstance(scheduler, dict) else scheduler
        self._loaders: dict[str, Lazy] = {k: v for k, v in given.items() if isinstance(v, Lazy)}
        self._modules: dict[str, nn.Module] = {k: v for k, v in given.items() if isinstance(v, nn.Module)}
        self._compile_options: dict | None = None
        self._compiled: dict[str, tuple[nn.Module, Callable]] = {}
        self.adapters: list[Adapter] = []

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = "kandinsky-community/kandinsky-2-1", *,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        revision: str | None = None, cache_dir: str | None = None, offload: str | None = None,
                        **sources) -> Components:
        """Weights from the hub, a local folder (any layout) or ``"tiny"`` / ``"tiny:SEED"`` (the tiny random
        weights), each loaded on first use (:func:`kandinsky.hub.resolve`; ``sources``: ``prior_source``,
        ``inpaint_source``, ``controlnet_source``, ``clip_source``, ``model``, ...). Kandinsky 2.2 sources (detected,
        or ``model="2.2"``) give 2.2's components (no M-CLIP; ``unet_controlnet``; the decoder's scheduler config).
        A training output folder gives what it trained: a full run its model over its base (``base.json``), a LoRA
        run its base with its adapter loaded."""
        from kandinsky.lora import LORA_FILE

        parts = resolve(source, revision=revision, cache_dir=cache_dir, **sources)
        seed = tiny_seed(source)
        described = {"source": f"tiny:{seed}" if seed is not None else str(source),
                     **({"revision": revision} if revision else {})}
        components = cls(**parts, device=device, dtype=dtype, offload=offload, source=described)
        adapter = Path(source).expanduser() / LORA_FILE
        if seed is None and adapter.is_file():
            components.load_lora(adapter)
        return components

    @classmethod
    def from_config(cls, name: str = "tiny", *, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, offload: str | None = None) -> Components:
        """Seeded random weights at a named configuration, built in memory (``"tiny"``: :mod:`kandinsky.tiny`)."""
        if name != "tiny":
            raise ValueError(f"name: expected 'tiny', got {name!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        from kandinsky import tiny

        return cls(**tiny.components(seed), device=device, dtype=dtype, offload=offload,
                   source={"source": f"tiny:{seed}"})

    @classmethod
    def from_diffusers(cls, prior_pipeline, decoder_pipeline, *, inpaint_pipeline=None,
                       device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                       offload: str | None = None, controlnet_pipeline=None) -> Components:
        """From live diffusers pipelines (``KandinskyPriorPipeline`` and ``KandinskyPipeline`` /
        ``KandinskyImg2ImgPipeline`` / ``KandinskyInpaintPipeline``, or their Kandinsky 2.2 counterparts
        ``KandinskyV22PriorPipeline`` and ``KandinskyV22Pipeline`` / ``...Img2ImgPipeline`` / ``...InpaintPipeline`` /
        ``...ControlnetPipeline`` / ``...ControlnetImg2ImgPipeline``). The prior, UNets and MoVQ are converted
        into our modules (each UNet named by its config: ``unet``, ``unet_inpaint`` with 9 input channels,
        ``unet_controlnet`` with a hint); the tokenizers and CLIP towers are reused (copied when ``device`` or
        ``dtype`` differ from theirs, so that the diffusers pipelines stay as they were); M-CLIP (2.1 only: the 2.2
        decoder pipelines have no text encoder) is copied into our class."""
        from kandinsky.convert import from_diffusers
        from kandinsky.text_encoders import MultilingualCLIP

        def convert(component: str, model: nn.Module) -> nn.Module:
            state = {k: v.detach() for k, v in model.state_dict().items()}
            return from_diffusers(component, dict(model.config), state, dtype=dtype).eval()

        unets = {}
        for pipe in (decoder_pipeline, inpaint_pipeline, controlnet_pipeline):
            if pipe is not None:
                config = pipe.unet.config
                component = "unet_inpaint" if config.in_channels == 9 else "unet"
                name = CONTROLNET if config.get("addition_embed_type") == "image_hint" else component
                unets[name] = convert(component, pipe.unet)
        first = next(decoder_pipeline.unet.parameters())
        dtype, device = dtype or first.dtype, check_device("device", device or first.device)

        def reused(encoder: nn.Module) -> nn.Module:
            weight = next(encoder.parameters())
            return (encoder if (weight.dtype, weight.device) == (dtype, device) else copy.deepcopy(encoder)).eval()

        text_encoder = getattr(decoder_pipeline, "text_encoder", None)  # M-CLIP: Kandinsky 2.1 only
        mclip = None if text_encoder is None else MultilingualCLIP.from_diffusers_module(text_encoder)
        scheduler = getattr(decoder_pipeline, "scheduler", None)
        if text_encoder is None and scheduler is not None:  # 2.2: the decoder's sampling travels with the store
            scheduler = {**scheduler.config, "_class_name": type(scheduler).__name__}
        else:
            scheduler = None
        return cls(clip_tokenizer=prior_pipeline.tokenizer, clip_text=reused(prior_pipeline.text_encoder),
                   clip_vision=reused(prior_pipeline.image_encoder), prior=convert("prior", prior_pipeline.prior),
                   mclip_tokenizer=getattr(decoder_pipeline, "tokenizer", None), mclip=mclip,
                   movq=convert("movq", decoder_pipeline.movq), **unets, device=device, dtype=dtype,
                   offload=offload, source={"source": "diffusers pipelines"}, scheduler=scheduler)

    # ---- what is there --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The components present (loaded or lazy), modules then tokenizers."""
        return [name for name in ALL_MODULES + TOKENIZERS if self.has(name)]

    def has(self, name: str) -> bool:
        if name in TOKENIZERS:
            return self._tokenizers.get(name) is not None
        return name in self._modules or name in self._loaders

    def scheduler_config(self) -> dict | None:
        """The decoder's diffusers scheduler config (a copy), loading it if lazy, or None if the store has none."""
        if isinstance(self._scheduler, Lazy):
            loaded = self._scheduler.load()
            self._scheduler = None if loaded is None else dict(loaded)
        return None if self._scheduler is None else dict(self._scheduler)

    def loaded(self) -> list[str]:
        """The modules in memory now."""
        return list(self._modules)

    def replace(self, name: str, module: nn.Module) -> None:
        """Put ``module`` in place of the module ``name`` (its lazy loader, if any, is dropped)."""
        if name not in ALL_MODULES:
            raise ValueError(f"name: expected one of {list(ALL_MODULES)}, got {name!r}")
        if not isinstance(module, nn.Module):
            raise ValueError(f"module: expected an nn.Module, got {type(module).__name__}")
        self._loaders.pop(name, None)
        self._compiled.pop(name, None)
        self._modules[name] = module

    # ---- ready models ---------------------------------------------------------------------------------

    def module(self, name: str) -> nn.Module:
        """The module ``name`` ready to run: loaded if lazy, on the store's device and dtype, with the fast
        modules of :func:`kandinsky.ops.optimize`, in eval mode."""
        if name not in ALL_MODULES:
            raise ValueError(f"name: expected one of {list(ALL_MODULES)}, got {name!r}")
        if self.offload == "sequential":
            self.release(DECODER_MODULES if name in PRIOR_STAGE else PRIOR_STAGE)
        module = self._modules.get(name)
        if module is None:
            module = self._modules[name] = self._load(name)
        first = next(module.parameters(), None)
        if first is not None and (first.device != self.device or
                                  (first.is_floating_point() and first.dtype != self.dtype)):
            module.to(device=self.device, dtype=self.dtype)
        return ops.optimize(module, self.device, self.dtype).eval()

    def plain_copy(self, name: str) -> nn.Module:
        """A new copy of module ``name`` for code that changes its weights (training) or needs plain layers
        (export): its own tensors, no fast modules, on CPU; the store's adapters of ``name`` fused into it (never
        dropped silently)."""
        if name not in ALL_MODULES:
            raise ValueError(f"name: expected one of {list(ALL_MODULES)}, got {name!r}")
        from kandinsky import lora

        if name in self._modules and (lora.has_lora(self._modules[name]) or name not in self._loaders):
            module = ops.plain(copy.deepcopy(self._modules[name]))
            return (lora.fuse_lora(module) if lora.has_lora(module) else module).cpu()
        return self._load(name)

    def tokenizer(self, name: str):
        """The tokenizer ``name`` (``"clip_tokenizer"`` or ``"mclip_tokenizer"``), loading it if lazy."""
        if name not in TOKENIZERS:
            raise ValueError(f"name: expected one of {list(TOKENIZERS)}, got {name!r}")
        tokenizer = self._tokenizers.get(name)
        if tokenizer is None:
            raise ValueError(self._missing(name))
        if isinstance(tokenizer, Lazy):
            tokenizer = self._tokenizers[name] = tokenizer.load()
        return tokenizer

    def runnable(self, name: str) -> Callable:
        """:meth:`module`, through ``torch.compile`` when :meth:`compile` asked for it and ``name`` is a UNet."""
        module = self.module(name)
        if self._compile_options is None or name not in COMPILABLE:
            return module
        cached = self._compiled.get(name)
        if cached is None or cached[0] is not module:  # a reloaded module (offload) compiles again
            cached = self._compiled[name] = (module, torch.compile(module, **self._compile_options))
        return cached[1]

    def compile(self, **options) -> Components:
        """Run the UNets through ``torch.compile(unet, **options)`` from their next use on;
        ``compile(disable=True)`` turns it off again."""
        self._compile_options = None if options.get("disable") else options
        self._compiled = {}
        return self

    @property
    def compile_options(self) -> dict | None:
        return self._compile_options

    def compiled(self, name: str) -> Callable | None:
        """The compiled variant of ``name`` made so far, if any."""
        cached = self._compiled.get(name)
        return None if cached is None else cached[1]

    def release(self, names: Sequence[str]) -> None:
        """Free the modules ``names``: lazily loaded ones are dropped (reloaded when needed), the others
        moved to CPU. Modules that carry adapters stay as they are."""
        for name in names:
            self._compiled.pop(name, None)  # it holds the module
            module = self._modules.get(name)
            if module is None:
                continue
            if name in self._loaders and not any(a.component == name for a in self.adapters):
                del self._modules[name]  # memory-mapped weights: reloading later is cheap
            elif self.device.type != "cpu":
                module.to("cpu")

    def _load(self, name: str) -> nn.Module:
        loader = self._loaders.get(name)
        if loader is None:
            raise ValueError(self._missing(name))
        return loader.load()

    @staticmethod
    def _missing(name: str) -> str:
        return f"these components have no {name!r}: build them with one (from_pretrained loads every component a task needs)"

    # ---- adapters -------------------------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> Components:
        """Add the LoRA adapter of ``path`` (a ``lora.safetensors`` file of ``kandinsky train --lora-rank``, or
        the training's output folder) to the component it was trained for, its effect scaled by ``scale``.
        Adapters stack: each one loaded adds its own. All or nothing: a file that does not fit leaves the
        store as it was."""
        from kandinsky import lora

        scale = check_number("scale", scale)
        file = lora.lora_file(path)
        weights, meta = lora.read_lora(file)
        name = meta["component"]
        if not self.has(name):
            raise ValueError(f"{file}: an adapter for {name!r}, which these components do not have")
        adapter = f"adapter{len(self.adapters)}"
        lora.load_lora_weights(self.module(name), weights, meta, scale, adapter=adapter, source=file)
        self._compiled.pop(name, None)
        self.adapters.append(Adapter(str(file), name, float(scale), _sha256(file), adapter))
        return self

    def unload_lora(self) -> Components:
        """Remove every adapter: the base layers come back untouched, so do the base outputs, exactly."""
        from kandinsky import lora

        return self._drop_adapters(lora.remove_lora)

    def fuse_lora(self) -> Components:
        """Merge every adapter into its base weights (``W + scale * alpha / rank * B A``): faster, and
        permanent (:meth:`unload_lora` can no longer remove them)."""
        from kandinsky import lora

        return self._drop_adapters(lora.fuse_lora)

    def _drop_adapters(self, drop: Callable[[nn.Module], nn.Module]) -> Components:
        from kandinsky import lora

        for name, module in self._modules.items():
            if lora.has_lora(module):
                drop(module)
                self._compiled.pop(name, None)
        self.adapters = []
        return self

    # ---- saving ---------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False, layout: str = "ours",
                        **export_options) -> None:
        """Write every component into ``folder``: our layout (:mod:`kandinsky.weights`, loaded memory-mapped by
        :meth:`from_pretrained`), or ``layout="diffusers"`` / ``"original"`` (:func:`kandinsky.layouts.export_pipeline`;
        ``export_options``: ``dtype``, ``lora``, ``provenance``). Lazy components are loaded one at a time.
        Existing component folders are an error, or with ``overwrite`` replaced, each only once its new copy is
        complete and only if this package wrote it. Our layout stores adapters fused (the weights a task runs). The
        decoder's scheduler config, when the store has one (Kandinsky 2.2), is written too (``scheduler/``)."""
        from kandinsky.weights import check_output, save_component

        folder = Path(folder)
        names = self.names()
        if layout != "ours":
            from kandinsky.layouts import export_pipeline

            savers = {name: self._saver(name) for name in names}
            if self._scheduler is not None:
                savers[SCHEDULER] = self.scheduler_config
            export_pipeline(savers, folder, layout=layout, overwrite=overwrite, **export_options)
            return
        if export_options:
            raise ValueError(f"{sorted(export_options)}: only for layout='diffusers' or 'original'")
        scheduler = self.scheduler_config()
        if scheduler is not None:
            names.append(SCHEDULER)
        existing = [str(folder / name) for name in names if (folder / name).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{', '.join(existing)} already exist (pass overwrite=True to replace them)")
        for name in names:  # every refusal (a folder this package did not write) before the first write
            check_output(folder / name, overwrite=overwrite, component=name)
        for name in names:
            save_component(name, scheduler if name == SCHEDULER else self._for_saving(name), folder / name,
                           overwrite=overwrite)

    def _saver(self, name: str) -> Callable:
        return lambda: self.tokenizer(name) if name in TOKENIZERS else self._stored(name)

    def _stored(self, name: str) -> nn.Module:
        """Module ``name`` as it is now (adapters included), with plain layers, without loading it for keeps."""
        return ops.plain(self._modules[name]) if name in self._modules else self._load(name)

    def _for_saving(self, name: str):
        if name in TOKENIZERS:
            return self.tokenizer(name)
        module = self._stored(name)
        from kandinsky import lora

        return lora.fuse_lora(copy.deepcopy(module)) if lora.has_lora(module) else module

    def __repr__(self) -> str:
        state = {name: "loaded" if name in self._modules else "lazy" for name in ALL_MODULES if self.has(name)}
        return (f"Components({state}, device={self.device}, dtype={self.dtype}, offload={self.offload!r}, "
                f"adapters={[a.path for a in self.adapters]})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

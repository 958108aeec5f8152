"""Kandinsky 2.1 end to end: prompt -> prior -> CLIP image embedding -> decoder UNet -> MoVQ -> image.

:class:`Kandinsky21` holds the nine pieces (two tokenizers, three pretrained encoders, prior, UNet,
inpainting UNet, MoVQ) and runs the four tasks: :meth:`~Kandinsky21.text2img`, :meth:`~Kandinsky21.img2img`,
:meth:`~Kandinsky21.inpaint` and :meth:`~Kandinsky21.mix` (with :meth:`~Kandinsky21.prior` and
:meth:`~Kandinsky21.interpolate` for the image embeddings alone).

Arguments, defaults and random draws follow diffusers 0.42.1 (``KandinskyPriorPipeline`` +
``KandinskyPipeline`` / ``KandinskyImg2ImgPipeline`` / ``KandinskyInpaintPipeline``, i.e.
``KandinskyCombinedPipeline``): the same seed gives the same image. Where the original ai-forever code
differs, its behaviour is an explicit option (``crop=True``, ``mask_convention="legacy"``).

Example::

    from kandinsky.pipeline import Kandinsky21
    pipe = Kandinsky21.from_pretrained("kandinsky-community/kandinsky-2-1", device="cuda", dtype=torch.float16)
    image = pipe.text2img("red cat, 4k photo", generator=torch.Generator().manual_seed(0))[0]
    image.save("cat.png")

Conventions (the same in every task):

* classifier-free guidance batches are ``[unconditional, conditional]`` (diffusers' order; the original
  uses the reverse, which gives the same result); guidance is applied to the 4 noise channels, the 4
  variance channels come from the conditional half; ``guidance_scale <= 1`` skips the unconditional half;
* images go in as PIL images, ``uint8``/float ``[0, 1]`` arrays ``(H, W, 3)`` or float tensors
  ``(B, 3, H, W)`` in ``[0, 1]``; they come out as ``output_type`` ``"pil"`` (list of PIL images), ``"np"``
  (float32 ``(B, H, W, 3)`` in ``[0, 1]``) or ``"pt"`` (float32 ``(B, 3, H, W)`` in ``[0, 1]``);
* height and width are rounded up to multiples of 64 px (both references do); ``crop=True`` crops the
  result back to the requested size (the original's behaviour; diffusers returns the rounded size).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kandinsky import schedulers
from kandinsky.text_encoders import encode_clip_images, encode_clip_text, encode_multilingual, zero_image_embeds

PRIOR_SAMPLER = "unclip"  # diffusers' UnCLIPScheduler (= the original prior's respaced p_sample loop)
OUTPUT_TYPES = ("pil", "np", "pt")
MASK_CONVENTIONS = ("repaint", "legacy")
# Stages of the two-stage model; `offload="sequential"` keeps only one stage's modules resident.
PRIOR_STAGE = ("clip_text", "clip_vision", "prior")
DECODER_STAGE = ("mclip", "unet", "unet_inpaint", "movq")
MODULES = PRIOR_STAGE + DECODER_STAGE
TOKENIZERS = ("clip_tokenizer", "mclip_tokenizer")


class Lazy:
    """A module that is built only when a call needs it: ``Lazy(lambda: load_converted(folder))``.

    The loader is kept, so that ``offload="sequential"`` can drop the module and load it again later
    (from memory-mapped files this costs little).
    """

    def __init__(self, load: Callable[[], nn.Module], description: str = ""):
        self.load = load
        self.description = description

    def __repr__(self) -> str:
        return f"Lazy({self.description or self.load!r})"


# ------------------------------------------------------------------------------------------- validation


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _check_number(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, Sequence) and len(prompt) == 0:
        raise ValueError(f"{name}: expected a string or a non-empty list of strings, got an empty list")
    raise ValueError(f"{name}: expected a string or a non-empty list of strings, got {type(prompt).__name__}")


def _negative_list(negative_prompt: str | Sequence[str] | None, count: int) -> list[str] | None:
    """None, or one negative prompt per prompt (a single string applies to every prompt)."""
    if negative_prompt is None:
        return None
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != count:
        raise ValueError(f"negative_prompt: expected one negative prompt per prompt ({count}), got {len(negatives)}")
    return negatives


def rounded_size(height: int, width: int, factor: int = 8) -> tuple[int, int]:
    """(height, width) rounded up to multiples of ``factor ** 2`` px (64 for the MoVQ's factor 8), as both
    references do: the latents (size / factor) must survive the UNet's three halvings."""
    height, width = _check_positive_int("height", height), _check_positive_int("width", width)
    multiple = factor * factor
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


# ------------------------------------------------------------------------------------------- images in


def _images_to_tensor(image: Any, height: int, width: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images -> ((B, 3, height, width) float32 in [-1, 1], (H, W) of the input before resizing)."""
    from PIL import Image

    if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        image = [image] if not (isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4) else image
    if isinstance(image, (list, tuple)) and len(image) == 0:
        raise ValueError("image: expected an image or a non-empty list of images, got an empty list")
    if isinstance(image, (list, tuple)) and all(isinstance(i, Image.Image) for i in image):
        sizes = {i.size for i in image}
        if len(sizes) != 1:
            raise ValueError(f"image: all images must have the same size, got {sorted(sizes)}")
        w0, h0 = image[0].size
        # PIL bicubic with reducing_gap=1 is what diffusers' image processors use
        arrays = [np.asarray(i.convert("RGB").resize((width, height), resample=Image.BICUBIC, reducing_gap=1))
                  for i in image]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return pixels * 2 - 1, (h0, w0)
    if isinstance(image, (list, tuple)) and all(isinstance(i, np.ndarray) for i in image):
        image = np.stack(image) if image[0].ndim == 3 else np.concatenate(image)
    elif isinstance(image, (list, tuple)) and all(isinstance(i, torch.Tensor) for i in image):
        image = torch.stack(image) if image[0].ndim == 3 else torch.cat(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"image: expected arrays of shape (H, W, 3) or (B, H, W, 3), got {image.shape}")
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image: expected PIL images, arrays (H, W, 3) or tensors (B, 3, H, W), got {type(image).__name__}")
    if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(f"image: expected a float tensor (B, 3, H, W) in [0, 1], got {tuple(image.shape)} {image.dtype}")
    image = image.detach().float().cpu()
    low, high = image.min().item(), image.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"image: expected values in [0, 1], got [{low:.3g}, {high:.3g}] "
                         "(a [-1, 1] tensor x converts with x / 2 + 0.5)")
    size = tuple(image.shape[-2:])
    if size != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        image = image.clamp(0, 1)
    return image * 2 - 1, size


def _mask_to_tensor(mask_image: Any, height: int, width: int, image_size: tuple[int, int]) -> torch.Tensor:
    """A mask -> (B, 1, height, width) float32 in {0, 1}: 1 where the mask is >= 0.5 (diffusers' binarisation)."""
    from PIL import Image

    if isinstance(mask_image, Image.Image):
        mask_image = [mask_image]
    if isinstance(mask_image, (list, tuple)) and len(mask_image) == 0:
        raise ValueError("mask_image: expected a mask or a non-empty list of masks, got an empty list")
    if isinstance(mask_image, (list, tuple)) and all(isinstance(m, Image.Image) for m in mask_image):
        sizes = {m.size[::-1] for m in mask_image}
        if sizes != {image_size}:
            raise ValueError(f"mask_image: expected the size of image (H, W) = {image_size}, got {sorted(sizes)}")
        arrays = [np.asarray(m.convert("L").resize((width, height), resample=Image.LANCZOS)) for m in mask_image]
        mask = torch.from_numpy(np.stack(arrays)[:, None].astype(np.float32) / 255.0)
    else:
        if isinstance(mask_image, (list, tuple)):
            mask_image = np.stack([np.asarray(m) for m in mask_image])
        if isinstance(mask_image, np.ndarray):
            if mask_image.dtype == np.uint8:
                mask_image = mask_image.astype(np.float32) / 255.0
            mask_image = torch.from_numpy(np.ascontiguousarray(mask_image.astype(np.float32)))
        if not isinstance(mask_image, torch.Tensor):
            raise ValueError(f"mask_image: expected a PIL image, an array or a tensor, got {type(mask_image).__name__}")
        mask = mask_image.detach().float().cpu()
        if mask.ndim == 2:  # (H, W)
            mask = mask[None, None]
        elif mask.ndim == 3:  # (1, H, W) or (B, H, W)
            mask = mask[:, None]
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"mask_image: expected (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask_image.shape)}")
        if tuple(mask.shape[-2:]) != image_size:
            raise ValueError(f"mask_image: expected the size of image (H, W) = {image_size}, got {tuple(mask.shape[-2:])}")
        low, high = mask.min().item(), mask.max().item()
        if low < 0 or high > 1:
            raise ValueError(f"mask_image: expected values in [0, 1], got [{low:.3g}, {high:.3g}]")
        if tuple(mask.shape[-2:]) != (height, width):
            mask = F.interpolate(mask, size=(height, width), mode="nearest")
    return (mask >= 0.5).float()


def dilate_repaint(keep: torch.Tensor) -> torch.Tensor:
    """Grow the repaint area (0 in ``keep``) of a (B, 1, h, w) latent keep-mask by one latent pixel.

    Reproduces diffusers' ``prepare_mask`` exactly, including its asymmetry: a repaint pixel spreads to
    its up, down, left, right, up-left and down-right neighbours (not to up-right / down-left).
    """
    repaint = 1 - keep
    # conv2d is a cross-correlation: out[i, j] = sum_kl w[k, l] * in[i + k - 1, j + l - 1]; pixel q becomes
    # repaint if some repaint p has q - p in {(0,0), (+-1,0), (0,+-1), (-1,-1), (1,1)}: w[1 - di, 1 - dj] = 1.
    kernel = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=keep.dtype, device=keep.device)
    spread = F.conv2d(repaint, kernel[None, None], padding=1)
    return (spread <= 0).to(keep.dtype)


# ------------------------------------------------------------------------------------------- images out


def to_output(images: torch.Tensor, output_type: str):
    """Decoded images (B, 3, H, W) in about [-1, 1] -> the requested output type, values in [0, 1]."""
    images = (images.float() * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images.cpu()
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def _check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: expected one of {list(OUTPUT_TYPES)}, got {output_type!r}")
    return output_type


def _check_sampler(sampler: str) -> str:
    if sampler not in schedulers.SAMPLERS or sampler == PRIOR_SAMPLER:
        names = [s for s in schedulers.SAMPLERS if s != PRIOR_SAMPLER]
        raise ValueError(f"sampler: expected one of {names}, got {sampler!r}")
    return sampler


# ------------------------------------------------------------------------------------------- pipeline


class Kandinsky21:
    """The Kandinsky 2.1 pipeline: prior (CLIP text -> CLIP image embedding) + decoder (UNet + MoVQ).

    Every module argument is an ``nn.Module``, a :class:`Lazy` (loaded on first use) or ``None`` (the
    tasks that need it then raise). Build it with :meth:`from_pretrained` (hub repos or local folders),
    :meth:`from_diffusers` (live diffusers pipelines), or directly from modules.

    Args:
        clip_tokenizer, clip_text: CLIP tokenizer and ``CLIPTextModelWithProjection`` (the prior's text input).
        clip_vision: ``CLIPVisionModelWithProjection`` (negative embedding, image items of :meth:`interpolate`).
        prior: our :class:`~kandinsky.models.prior.Prior`.
        mclip_tokenizer, mclip: XLM-RoBERTa tokenizer and :class:`~kandinsky.text_encoders.MultilingualCLIP`.
        unet, unet_inpaint: our :class:`~kandinsky.models.unet.UNet` (4 and 9 input channels).
        movq: our :class:`~kandinsky.models.movq.MoVQ`.
        device: where the models run. dtype: their weight dtype (float32, float16 or bfloat16); the
            sampler state and the guidance arithmetic stay in float32.
        offload: ``None`` keeps every loaded module on ``device``; ``"sequential"`` keeps only the prior
            stage (CLIP + prior) or the decoder stage (M-CLIP + UNet + MoVQ) resident: the other stage's
            lazily loaded modules are dropped (reloaded memory-mapped when needed), the others moved to CPU.
        progress: tqdm progress bars for the sampling loops.
    """

    def __init__(self, *, clip_tokenizer=None, clip_text=None, clip_vision=None, prior=None,
                 mclip_tokenizer=None, mclip=None, unet=None, unet_inpaint=None, movq=None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 offload: str | None = None, progress: bool = True):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        if offload not in (None, "sequential"):
            raise ValueError(f"offload: expected None or 'sequential', got {offload!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload
        self.progress = progress
        self.tokenizers = {"clip_tokenizer": clip_tokenizer, "mclip_tokenizer": mclip_tokenizer}
        given = dict(clip_text=clip_text, clip_vision=clip_vision, prior=prior, mclip=mclip, unet=unet,
                     unet_inpaint=unet_inpaint, movq=movq)
        self._loaders: dict[str, Lazy] = {k: v for k, v in given.items() if isinstance(v, Lazy)}
        self._modules: dict[str, nn.Module] = {k: v for k, v in given.items() if isinstance(v, nn.Module)}
        for name, value in given.items():
            if value is not None and not isinstance(value, (Lazy, nn.Module)):
                raise ValueError(f"{name}: expected an nn.Module, a Lazy loader or None, got {type(value).__name__}")
        self._compile_options: dict | None = None  # see compile_unet
        self._compiled_unets: dict[str, tuple[nn.Module, Callable]] = {}
        self.prior_schedule = schedulers.NoiseSchedule.squared_cosine(1000)
        self.decoder_schedule = schedulers.NoiseSchedule.linear(1000, 0.00085, 0.012)
        # img2img noises the start image with Ho et al.'s betas, not the decoder's (both references do)
        self.img2img_schedule = schedulers.NoiseSchedule.linear(1000, 0.0001, 0.02)

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str = "kandinsky-community/kandinsky-2-1", *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, revision: str | None = None,
                        cache_dir: str | None = None, offload: str | None = None, progress: bool = True,
                        **sources) -> Kandinsky21:
        """Official weights from the hub or a local folder, converted once into a local cache and then
        loaded memory-mapped, each component only when a task needs it (see :mod:`kandinsky.hub`).

        ``source``: a hub repo id (``"kandinsky-community/kandinsky-2-1"``, diffusers layout, or
        ``"ai-forever/Kandinsky_2.1"``, original layout) or a local folder in either layout or ours.
        ``sources`` may override ``prior_source``, ``inpaint_source`` and ``clip_source``.
        """
        from kandinsky.hub import resolve

        parts = resolve(source, revision=revision, cache_dir=cache_dir, **sources)
        return cls(**parts, device=device, dtype=dtype, offload=offload, progress=progress)

    @classmethod
    def from_diffusers(cls, prior_pipeline, decoder_pipeline, *, inpaint_pipeline=None,
                       device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                       offload: str | None = None, progress: bool = True) -> Kandinsky21:
        """From live diffusers pipelines: a ``KandinskyPriorPipeline`` and a ``KandinskyPipeline`` /
        ``KandinskyImg2ImgPipeline`` (4-channel UNet) or ``KandinskyInpaintPipeline`` (9-channel UNet).

        The prior, UNet and MoVQ weights are converted into our modules; the tokenizers and the text and
        image encoders are reused as they are (M-CLIP is copied into our equivalent class).
        """
        from kandinsky.convert import from_diffusers
        from kandinsky.text_encoders import MultilingualCLIP

        def convert(component: str, model: nn.Module) -> nn.Module:
            state = {k: v.detach() for k, v in model.state_dict().items()}
            return from_diffusers(component, dict(model.config), state, dtype=dtype).eval()

        unets = {}
        for pipe in (decoder_pipeline, inpaint_pipeline):
            if pipe is None:
                continue
            component = "unet_inpaint" if pipe.unet.config.in_channels == 9 else "unet"
            unets[component] = convert(component, pipe.unet)
        first = next(decoder_pipeline.unet.parameters())
        dtype = dtype or first.dtype
        return cls(
            clip_tokenizer=prior_pipeline.tokenizer, clip_text=prior_pipeline.text_encoder.eval(),
            clip_vision=prior_pipeline.image_encoder.eval(), prior=convert("prior", prior_pipeline.prior),
            mclip_tokenizer=decoder_pipeline.tokenizer,
            mclip=MultilingualCLIP.from_diffusers_module(decoder_pipeline.text_encoder),
            movq=convert("movq", decoder_pipeline.movq), **unets,
            device=device or first.device, dtype=dtype, offload=offload, progress=progress)

    def save_pretrained(self, folder: str, *, overwrite: bool = False) -> None:
        """Write every component this pipeline has into ``folder`` in our layout (see :mod:`kandinsky.hub`),
        which :meth:`from_pretrained` then loads memory-mapped. Lazy components are loaded one at a time."""
        from pathlib import Path

        from kandinsky.hub import save_component

        folder = Path(folder)
        for name in MODULES + TOKENIZERS:
            present = self.tokenizers.get(name) if name in TOKENIZERS else \
                (self._modules.get(name) or self._loaders.get(name))
            if present is None:
                continue
            if (folder / name).exists() and not overwrite:
                raise FileExistsError(f"{folder / name} already exists (pass overwrite=True to replace it)")
            component = self.tokenizer(name) if name in TOKENIZERS else \
                (self._modules.get(name) or self._loaders[name].load())
            if overwrite and (folder / name).exists():
                import shutil

                shutil.rmtree(folder / name)
            save_component(name, component, folder / name)

    # ---- module management ----------------------------------------------------------------------------

    def module(self, name: str) -> nn.Module:
        """The module ``name`` on the pipeline's device and dtype, loading it first if it is lazy."""
        if name not in MODULES:
            raise ValueError(f"name: expected one of {list(MODULES)}, got {name!r}")
        if self.offload == "sequential":
            self._release(DECODER_STAGE if name in PRIOR_STAGE else PRIOR_STAGE)
        module = self._modules.get(name)
        if module is None:
            loader = self._loaders.get(name)
            if loader is None:
                raise ValueError(f"this pipeline has no {name!r} module: build it with one "
                                 f"(from_pretrained loads every component a task needs)")
            module = loader.load()
            self._modules[name] = module
        first = next(module.parameters(), None)
        if first is not None and (first.device != self.device or
                                  (first.is_floating_point() and first.dtype != self.dtype)):
            module.to(device=self.device, dtype=self.dtype)
        if name == "prior" and self.device.type == "cpu" and torch.backends.mkldnn.is_available():
            # The prior is GEMM-bound; oneDNN's GEMM beats MKL's for its shapes (1.4x on AMD EPYC), same results to ~1e-6.
            module.use_onednn()
        return module.eval()

    def compile_unet(self, **options) -> Kandinsky21:
        """Run the decoder UNets through ``torch.compile(unet, **options)`` from their next use on (e.g.
        ``mode="max-autotune"`` on CUDA); ``compile_unet(disable=True)`` turns it off again. The first call per
        input shape compiles (tens of seconds to minutes); results match the eager UNet to float rounding.

        Example::

            pipe = Kandinsky21.from_pretrained(..., device="cuda", dtype=torch.float16).compile_unet()
        """
        self._compile_options = None if options.get("disable") else options
        self._compiled_unets = {}
        return self

    def _compiled(self, name: str) -> Callable:
        """``module(name)``, through ``torch.compile`` when :meth:`compile_unet` asked for it."""
        module = self.module(name)
        if self._compile_options is None:
            return module
        cached = self._compiled_unets.get(name)
        if cached is None or cached[0] is not module:  # a reloaded module (offload) compiles again
            cached = self._compiled_unets[name] = (module, torch.compile(module, **self._compile_options))
        return cached[1]

    def _release(self, names: Sequence[str]) -> None:
        for name in names:
            self._compiled_unets.pop(name, None)  # it holds the module
            module = self._modules.get(name)
            if module is None:
                continue
            if name in self._loaders:
                del self._modules[name]  # memory-mapped weights: reloading later is cheap
            elif self.device.type != "cpu":
                module.to("cpu")

    def tokenizer(self, name: str):
        """The tokenizer ``name`` (``"clip_tokenizer"`` or ``"mclip_tokenizer"``), loading it if lazy."""
        tokenizer = self.tokenizers.get(name)
        if tokenizer is None:
            raise ValueError(f"this pipeline has no {name!r}: build it with one")
        if isinstance(tokenizer, Lazy):
            tokenizer = self.tokenizers[name] = tokenizer.load()
        return tokenizer

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        return generator

    # ---- prior ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prior(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
              num_inference_steps: int = 25, guidance_scale: float = 4.0, num_images_per_prompt: int = 1,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP image embeddings of the prompts: ``(image_embeds, negative_image_embeds)``, each
        (len(prompt) * num_images_per_prompt, 768) float32, rows ordered prompt-major.

        Without ``negative_prompt`` the negative embedding is the CLIP embedding of an all-zeros image; with
        it, the prior's output for the negative prompt (which is then also the prior's unconditional text).
        """
        prompts = _prompt_list(prompt)
        negatives = _negative_list(negative_prompt, len(prompts))
        steps = _check_positive_int("num_inference_steps", num_inference_steps)
        guidance = _check_number("guidance_scale", guidance_scale)
        per_prompt = _check_positive_int("num_images_per_prompt", num_images_per_prompt)
        generator = self._generator(generator)

        # diffusers runs the negative prompts through the prior in the same batch, after the prompts
        batch_prompts = prompts + negatives if negatives is not None else prompts
        uncond_prompts = 2 * negatives if negatives is not None else [""] * len(prompts)
        tokenizer, text_model = self.tokenizer("clip_tokenizer"), self.module("clip_text")

        def encode(texts: list[str]):
            embeds, hidden, mask = encode_clip_text(tokenizer, text_model, texts)
            return (embeds.repeat_interleave(per_prompt, 0), hidden.repeat_interleave(per_prompt, 0),
                    mask.repeat_interleave(per_prompt, 0))

        text_embeds, text_hidden_states, text_mask = encode(batch_prompts)
        use_guidance = guidance > 1.0
        if use_guidance:  # [unconditional, conditional]
            uncond = encode(uncond_prompts)
            text_embeds, text_hidden_states, text_mask = (torch.cat([u, c]) for u, c in
                                                          zip(uncond, (text_embeds, text_hidden_states, text_mask)))
        prior = self.module("prior")
        dtype = self.dtype
        text_embeds, text_hidden_states = text_embeds.to(dtype), text_hidden_states.to(dtype)

        def denoise(x: torch.Tensor, t) -> torch.Tensor:
            x_in = torch.cat([x, x]) if use_guidance else x
            timesteps = t.reshape(-1)[:1].expand(x_in.shape[0])  # the sampler's (B,) timesteps are all equal
            x0 = prior(x_in.to(dtype), timesteps, text_embeds=text_embeds, text_hidden_states=text_hidden_states,
                       text_mask=text_mask).float()
            if use_guidance:
                uncond_x0, cond_x0 = x0.chunk(2)
                x0 = uncond_x0 + guidance * (cond_x0 - uncond_x0)
            return x0

        rows = len(batch_prompts) * per_prompt
        x = schedulers.randn((rows, prior.config.clip_dim), generator, self.device)
        timesteps = schedulers.sampler_timesteps(PRIOR_SAMPLER, self.prior_schedule, steps)
        x = schedulers.sample(PRIOR_SAMPLER, denoise, x, self.prior_schedule, timesteps, generator=generator,
                              progress=self.progress)
        image_embeds = prior.denormalize(x.float())  # float32: the buffers are cast to x's dtype
        if negatives is not None:
            image_embeds, negative_embeds = image_embeds.chunk(2)
        else:
            negative_embeds = zero_image_embeds(self.module("clip_vision"), rows).float()
        return image_embeds, negative_embeds.to(image_embeds.device)

    @torch.no_grad()
    def interpolate(self, images_and_prompts: Sequence, weights: Sequence[float], num_inference_steps: int = 25,
                    guidance_scale: float = 4.0, negative_prior_prompt: str | None = None,
                    negative_prompt: str = "", generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A weighted sum of image embeddings of prompts (through the prior) and images (through CLIP):
        ``(image_embeds (1, 768), negative_image_embeds (1, 768))`` (original ``mix_images``, diffusers
        ``KandinskyPriorPipeline.interpolate``; no renormalisation).

        Each prompt runs the prior with the same ``generator`` in turn, as diffusers does. The negative
        embedding is the zero-image embedding, or the prior of ``negative_prompt`` when it is not empty.
        (diffusers also runs a discarded prior pass for an empty negative prompt; we skip it, so the
        generator's state afterwards differs, the returned embeddings do not.)
        """
        from PIL import Image

        if not isinstance(images_and_prompts, Sequence) or isinstance(images_and_prompts, str) or \
                len(images_and_prompts) == 0:
            raise ValueError("images_and_prompts: expected a non-empty list of prompts and images")
        if not isinstance(weights, Sequence) or len(weights) != len(images_and_prompts):
            raise ValueError(f"weights: expected one weight per item of images_and_prompts "
                             f"({len(images_and_prompts)}), got {weights!r}")
        weights = [_check_number("weights", w) for w in weights]
        if not any(weights):
            raise ValueError(f"weights: expected at least one non-zero weight, got {weights}")
        if abs(sum(weights)) < 1e-6 * max(abs(w) for w in weights):
            # Both references use the weights as given (no renormalisation): a zero sum is a pure difference.
            warnings.warn(f"weights {weights} sum to zero: the mix is a difference of embeddings, not an average",
                          UserWarning, stacklevel=2)
        generator = self._generator(generator)
        prior_args = dict(negative_prompt=negative_prior_prompt, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, generator=generator)
        total = None
        for item, weight in zip(images_and_prompts, weights):
            if isinstance(item, str):
                embeds = self.prior(item, **prior_args)[0]
            elif isinstance(item, (Image.Image, torch.Tensor)):
                pixels = item if isinstance(item, Image.Image) else _unit_range("images_and_prompts", item)
                embeds = encode_clip_images(self.module("clip_vision"), pixels).float()
            else:
                raise ValueError(f"images_and_prompts: expected prompts (str), PIL images or (B, 3, H, W) tensors "
                                 f"in [0, 1], got {type(item).__name__}")
            embeds = weight * embeds.to(self.device)
            total = embeds if total is None else total + embeds
        image_embeds = total.sum(0, keepdim=True)
        if negative_prompt == "":
            negative = zero_image_embeds(self.module("clip_vision"), 1).float()
        else:
            negative = self.prior(negative_prompt, **prior_args)[0]
        return image_embeds, negative.to(image_embeds.device)

    # ---- decoder ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, prompt: str | Sequence[str], image_embeds: torch.Tensor, negative_image_embeds: torch.Tensor,
               negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 100,
               guidance_scale: float = 4.0, height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
               generator: torch.Generator | None = None, sampler: str = "ddim", output_type: str = "pil",
               crop: bool = False, sampler_options: dict | None = None):
        """The decoder alone (diffusers ``KandinskyPipeline``): image embeddings (from :meth:`prior`) -> images.

        ``image_embeds`` / ``negative_image_embeds`` have one row per prompt, or one row per output image
        (len(prompt) * num_images_per_prompt).
        """
        prompts = _prompt_list(prompt)
        generator = self._generator(generator)
        plan = self._plan(prompts, negative_prompt, num_inference_steps, guidance_scale, height, width,
                          num_images_per_prompt, sampler, output_type)
        image_embeds, negative_image_embeds = self._expand_embeds(image_embeds, negative_image_embeds, plan)
        return self._decoder(plan, image_embeds, negative_image_embeds, generator, crop, sampler_options)

    @torch.no_grad()
    def text2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 prior_guidance_scale: float = 4.0, height: int = 512, width: int = 512,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None, sampler: str = "ddim",
                 output_type: str = "pil", crop: bool = False, sampler_options: dict | None = None):
        """Prompts -> images (diffusers ``KandinskyCombinedPipeline``, same seed -> same image).

        The prior's noise is drawn first, then the decoder's, from the one ``generator``. A negative prompt
        conditions both stages (prior: its embedding is the negative image embedding; decoder: it is the
        unconditional text), as the separate diffusers pipelines do it.
        """
        prompts = _prompt_list(prompt)
        plan = self._plan(prompts, negative_prompt, num_inference_steps, guidance_scale, height, width,
                          num_images_per_prompt, sampler, output_type)
        generator = self._generator(generator)
        image_embeds, negative_image_embeds = self.prior(
            prompts, negative_prompt=plan["negatives"], num_inference_steps=prior_num_inference_steps,
            guidance_scale=prior_guidance_scale, num_images_per_prompt=plan["per_prompt"], generator=generator)
        return self._decoder(plan, image_embeds, negative_image_embeds, generator, crop, sampler_options)

    @torch.no_grad()
    def img2img(self, prompt: str | Sequence[str], image, strength: float = 0.3,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 100,
                guidance_scale: float = 7.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
                height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
                generator: torch.Generator | None = None, sampler: str = "ddim", output_type: str = "pil",
                crop: bool = False, image_embeds: torch.Tensor | None = None,
                negative_image_embeds: torch.Tensor | None = None, sampler_options: dict | None = None):
        """Repaint ``image`` towards ``prompt`` (diffusers ``KandinskyImg2ImgPipeline``, its defaults:
        strength 0.3, guidance 7).

        The image is resized to the (rounded) size, MoVQ-encoded, noised at timestep
        ``int(1000 * strength) - 2`` with betas 1e-4..0.02, and the last ``int(steps * strength)`` steps
        are run. ``strength`` 1 starts from almost pure noise. Pass ``image_embeds`` /
        ``negative_image_embeds`` to skip the prior.
        """
        prompts = _prompt_list(prompt)
        strength = _check_number("strength", strength)
        if not 0 < strength <= 1:
            raise ValueError(f"strength: expected a number in (0, 1], got {strength}")
        plan = self._plan(prompts, negative_prompt, num_inference_steps, guidance_scale, height, width,
                          num_images_per_prompt, sampler, output_type)
        height, width = self._size(plan)
        pixels, _ = _images_to_tensor(image, height, width)
        pixels = self._match_batch("image", pixels, len(prompts))
        generator = self._generator(generator)
        image_embeds, negative_image_embeds = self._embeds_or_prior(
            plan, image_embeds, negative_image_embeds, prior_num_inference_steps, prior_guidance_scale, generator)

        movq = self.module("movq")
        latents = movq.encode(pixels.to(self.device, self.dtype)).float()
        latents = latents.repeat_interleave(plan["per_prompt"], 0)
        steps = plan["steps"]
        timesteps = schedulers.sampler_timesteps(plan["sampler"], self.decoder_schedule, steps)
        start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[start:]
        # diffusers' (and the original's) noise level: 1000 * strength - 2 (strength 1 -> t = 998)
        noise_timestep = max(int(self.img2img_schedule.num_train_timesteps * strength) - 2, 0)
        noise = schedulers.randn(latents.shape, generator, self.device)
        x = schedulers.add_noise(latents, noise, noise_timestep, self.img2img_schedule)
        return self._decoder(plan, image_embeds, negative_image_embeds, generator, crop, sampler_options,
                             x=x, timesteps=timesteps)

    @torch.no_grad()
    def inpaint(self, prompt: str | Sequence[str], image, mask_image,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 100,
                guidance_scale: float = 4.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
                height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
                generator: torch.Generator | None = None, sampler: str = "ddim", output_type: str = "pil",
                crop: bool = False, mask_convention: str = "repaint", image_embeds: torch.Tensor | None = None,
                negative_image_embeds: torch.Tensor | None = None, sampler_options: dict | None = None):
        """Repaint the masked part of ``image`` (diffusers ``KandinskyInpaintPipeline``, 9-channel UNet).

        ``mask_image`` (same size as ``image``; PIL, array or tensor in [0, 1]) is binarised at 0.5.
        ``mask_convention="repaint"`` (default, diffusers >= 0.19): 1 / white = repaint, 0 / black = keep.
        ``"legacy"`` (the original code, diffusers < 0.19): 1 / white = keep, 0 / black = repaint. In
        latent space the repaint area grows by one pixel, as in diffusers.

        With ``sampler="p_sampler"`` the kept region of the predicted x0 is replaced by the image latents at
        every step (and x0 clamped to [-2, 2]), as the original's p_sampler path does; diffusers' samplers
        never blend. ``sampler_options={"x0_fn": ...}`` replaces that step.
        """
        if mask_convention not in MASK_CONVENTIONS:
            raise ValueError(f"mask_convention: expected one of {list(MASK_CONVENTIONS)}, got {mask_convention!r}")
        prompts = _prompt_list(prompt)
        plan = self._plan(prompts, negative_prompt, num_inference_steps, guidance_scale, height, width,
                          num_images_per_prompt, sampler, output_type)
        height, width = self._size(plan)
        pixels, image_size = _images_to_tensor(image, height, width)
        mask = _mask_to_tensor(mask_image, height, width, image_size)
        if mask.shape[0] not in (1, pixels.shape[0]) and pixels.shape[0] != 1:
            raise ValueError(f"mask_image: expected 1 or {pixels.shape[0]} masks (one per image), got {mask.shape[0]}")
        pixels = self._match_batch("image", pixels, len(prompts))
        mask = self._match_batch("mask_image", mask, len(prompts))
        keep = 1 - mask if mask_convention == "repaint" else mask  # internally 1 = keep, as both references
        generator = self._generator(generator)
        image_embeds, negative_image_embeds = self._embeds_or_prior(
            plan, image_embeds, negative_image_embeds, prior_num_inference_steps, prior_guidance_scale, generator)

        movq = self.module("movq")
        latents = movq.encode(pixels.to(self.device, self.dtype)).float()
        keep = F.interpolate(keep.to(self.device), size=latents.shape[-2:], mode="nearest")
        keep = dilate_repaint(keep)
        masked_latents = latents * keep
        condition = torch.cat([masked_latents, keep], dim=1).repeat_interleave(plan["per_prompt"], 0)
        known = (latents.repeat_interleave(plan["per_prompt"], 0), keep.repeat_interleave(plan["per_prompt"], 0))
        return self._decoder(plan, image_embeds, negative_image_embeds, generator, crop, sampler_options,
                             condition=condition, unet_name="unet_inpaint", known=known)

    @torch.no_grad()
    def mix(self, images_and_prompts: Sequence, weights: Sequence[float], num_inference_steps: int = 100,
            guidance_scale: float = 4.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
            negative_prior_prompt: str | None = None, negative_prompt: str = "", height: int = 512,
            width: int = 512, num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
            sampler: str = "ddim", output_type: str = "pil", crop: bool = False,
            sampler_options: dict | None = None):
        """Images from a weighted mix of prompts and images (:meth:`interpolate`, then the decoder with an
        empty prompt, as the original ``mix_images`` and diffusers' interpolate example do)."""
        plan = self._plan([""], None, num_inference_steps, guidance_scale, height, width, num_images_per_prompt,
                          sampler, output_type)
        generator = self._generator(generator)
        image_embeds, negative_image_embeds = self.interpolate(
            images_and_prompts, weights, num_inference_steps=prior_num_inference_steps,
            guidance_scale=prior_guidance_scale, negative_prior_prompt=negative_prior_prompt,
            negative_prompt=negative_prompt, generator=generator)
        image_embeds, negative_image_embeds = self._expand_embeds(image_embeds, negative_image_embeds, plan)
        return self._decoder(plan, image_embeds, negative_image_embeds, generator, crop, sampler_options)

    # ---- decoder internals ------------------------------------------------------------------------------

    def _plan(self, prompts, negative_prompt, steps, guidance, height, width, per_prompt, sampler, output_type):
        rounded_size(height, width)  # validates
        return dict(prompts=prompts, negatives=_negative_list(negative_prompt, len(prompts)),
                    steps=_check_positive_int("num_inference_steps", steps), guidance=_check_number("guidance_scale", guidance),
                    requested=(int(height), int(width)),
                    per_prompt=_check_positive_int("num_images_per_prompt", per_prompt),
                    sampler=_check_sampler(sampler), output_type=_check_output_type(output_type))

    def _size(self, plan) -> tuple[int, int]:
        """The requested size rounded up for the MoVQ (64 px multiples for the official one)."""
        return rounded_size(*plan["requested"], self.module("movq").config.downsample_factor)

    def _expand_embeds(self, image_embeds, negative_image_embeds, plan):
        rows, count = len(plan["prompts"]) * plan["per_prompt"], len(plan["prompts"])
        out = []
        for name, embeds in (("image_embeds", image_embeds), ("negative_image_embeds", negative_image_embeds)):
            if isinstance(embeds, (list, tuple)):
                embeds = torch.cat(list(embeds))
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2:
                raise ValueError(f"{name}: expected a (B, D) tensor, got {getattr(embeds, 'shape', type(embeds))}")
            if embeds.shape[0] == count and rows != count:
                embeds = embeds.repeat_interleave(plan["per_prompt"], 0)
            elif embeds.shape[0] == 1 and rows != 1:
                embeds = embeds.expand(rows, -1)
            if embeds.shape[0] != rows:
                raise ValueError(f"{name}: expected {count} or {rows} rows, got {embeds.shape[0]}")
            out.append(embeds.float().to(self.device))
        return out

    def _embeds_or_prior(self, plan, image_embeds, negative_image_embeds, prior_steps, prior_guidance, generator):
        if (image_embeds is None) != (negative_image_embeds is None):
            raise ValueError("image_embeds, negative_image_embeds: pass both or neither")
        if image_embeds is None:
            return self.prior(plan["prompts"], negative_prompt=plan["negatives"], num_inference_steps=prior_steps,
                              guidance_scale=prior_guidance, num_images_per_prompt=plan["per_prompt"],
                              generator=generator)
        return self._expand_embeds(image_embeds, negative_image_embeds, plan)

    @staticmethod
    def _match_batch(name: str, tensor: torch.Tensor, count: int) -> torch.Tensor:
        if tensor.shape[0] == count:
            return tensor
        if tensor.shape[0] == 1:
            return tensor.expand(count, *tensor.shape[1:])
        raise ValueError(f"{name}: expected 1 or {count} (one per prompt), got {tensor.shape[0]}")

    def _decoder(self, plan, image_embeds, negative_image_embeds, generator, crop, sampler_options,
                 x: torch.Tensor | None = None, timesteps=None, condition: torch.Tensor | None = None,
                 unet_name: str = "unet", known: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Guided sampling of the UNet from ``x`` (unit noise by default) and MoVQ decoding. ``known``:
        (image latents, keep mask) of inpainting, for the original p_sampler's per-step blend."""
        per_prompt, guidance, dtype = plan["per_prompt"], plan["guidance"], self.dtype
        use_guidance = guidance > 1.0
        tokenizer, mclip = self.tokenizer("mclip_tokenizer"), self.module("mclip")

        def encode(texts: list[str]):
            embeds, hidden, _ = encode_multilingual(tokenizer, mclip, texts)
            return embeds.repeat_interleave(per_prompt, 0), hidden.repeat_interleave(per_prompt, 0)

        text_embeds, text_hidden_states = encode(plan["prompts"])
        if use_guidance:  # [unconditional, conditional]
            negatives = plan["negatives"] or [""] * len(plan["prompts"])
            uncond_embeds, uncond_hidden = encode(negatives)
            text_embeds = torch.cat([uncond_embeds, text_embeds])
            text_hidden_states = torch.cat([uncond_hidden, text_hidden_states])
            image_embeds = torch.cat([negative_image_embeds, image_embeds])
            if condition is not None:
                condition = torch.cat([condition, condition])
        text_embeds, text_hidden_states = text_embeds.to(dtype), text_hidden_states.to(dtype)
        image_embeds = image_embeds.to(self.device, dtype)
        unet = self._compiled(unet_name)

        def denoise(x: torch.Tensor, t) -> torch.Tensor:
            x_in = torch.cat([x, x]) if use_guidance else x
            if condition is not None:
                x_in = torch.cat([x_in, condition], dim=1)
            t = t.reshape(-1)[:1].expand(x_in.shape[0])  # the sampler's (B,) timesteps are all equal
            out = unet(x_in.to(dtype), t, text_hidden_states=text_hidden_states, text_embeds=text_embeds,
                       image_embeds=image_embeds).float()
            if use_guidance:
                eps, variance = out[:, :4], out[:, 4:]
                uncond_eps, cond_eps = eps.chunk(2)
                out = torch.cat([uncond_eps + guidance * (cond_eps - uncond_eps), variance.chunk(2)[1]], dim=1)
            return out

        if x is None:
            rows = len(plan["prompts"]) * per_prompt
            height, width = self._size(plan)
            factor = self.module("movq").config.downsample_factor
            x = schedulers.randn((rows, 4, height // factor, width // factor), generator, self.device)
        if timesteps is None:
            timesteps = schedulers.sampler_timesteps(plan["sampler"], self.decoder_schedule, plan["steps"])
        options = dict(sampler_options or {})
        if plan["sampler"] == "p_sampler":
            options.setdefault("x0_fn", _original_x0_fn(known))
        if len(timesteps) > 0:
            x = schedulers.sample(plan["sampler"], denoise, x, self.decoder_schedule, timesteps,
                                  generator=generator, progress=self.progress, **options)
        images = self.module("movq").decode(x.to(dtype)).float()
        if crop:
            height, width = plan["requested"]
            images = images[..., :height, :width]  # the original keeps the top-left corner
        return to_output(images, plan["output_type"])


def _original_x0_fn(known: tuple[torch.Tensor, torch.Tensor] | None) -> Callable:
    """The original's ``denoised_fn`` of its p_sampler path: x0 clamped to [-2, 2] at every step and, when
    inpainting, the kept region (``keep`` = 1) replaced by the image latents."""
    def x0_fn(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = x0.clamp(-2, 2)
        if known is None:
            return x0
        latents, keep = known
        return x0 * (1 - keep) + latents * keep

    return x0_fn


def _unit_range(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise ValueError(f"{name}: image tensors must be in [0, 1], got [{tensor.min().item():.3g}, "
                         f"{tensor.max().item():.3g}]")
    return tensor


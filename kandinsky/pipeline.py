"""Kandinsky 2.1 end to end: prompt -> prior -> CLIP image embedding -> decoder UNet -> MoVQ -> image.

:class:`Kandinsky21` holds the nine pieces (two tokenizers, three pretrained encoders, prior, UNet,
inpainting UNet, MoVQ) and runs the four tasks: :meth:`~Kandinsky21.text2img`, :meth:`~Kandinsky21.img2img`,
:meth:`~Kandinsky21.inpaint` and :meth:`~Kandinsky21.mix` (with :meth:`~Kandinsky21.prior` and
:meth:`~Kandinsky21.interpolate` for the image embeddings alone).

Arguments, defaults and random draws follow diffusers 0.42.1 (``KandinskyPriorPipeline`` +
``KandinskyPipeline`` / ``KandinskyImg2ImgPipeline`` / ``KandinskyInpaintPipeline``, i.e.
``KandinskyCombinedPipeline``): the same seed gives the same image. Where the original ai-forever code
differs, its behaviour is an explicit option (``crop=True``, ``mask_convention="legacy"``,
``prior_sampler="unclip_original"``).

Example::

    from kandinsky import Kandinsky21, save_png
    pipe = Kandinsky21.from_pretrained("kandinsky-community/kandinsky-2-1", device="cuda", dtype=torch.float16)
    image = pipe.text2img("red cat, 4k photo", generator=torch.Generator().manual_seed(0))[0]
    save_png(image, "cat.png")  # with the prompt, seed and settings in image.info

Conventions (the same in every task):

* classifier-free guidance batches are ``[unconditional, conditional]`` (diffusers' order; the original
  uses the reverse, which gives the same result); guidance is applied to the 4 noise channels, the 4
  variance channels come from the conditional half; ``guidance_scale <= 1`` skips the unconditional half;
* images go in as PIL images, ``uint8``/float ``[0, 1]`` arrays ``(H, W, 3)`` or float tensors
  ``(B, 3, H, W)`` in ``[0, 1]``; they come out as ``output_type`` ``"pil"`` (list of PIL images), ``"np"``
  (float32 ``(B, H, W, 3)`` in ``[0, 1]``) or ``"pt"`` (float32 ``(B, 3, H, W)`` in ``[0, 1]``); PIL images
  carry the PNG text chunks of :mod:`kandinsky.png` in their ``info`` (:func:`~kandinsky.png.save_png` writes them);
* masks: PIL images are read as grey levels / 255, arrays and tensors as they are (integer ones: not 0 =
  1), then binarised at 0.5 as diffusers does; NaN or infinite values in any input are refused;
* height and width are rounded up to multiples of 64 px (both references do); ``crop=True`` crops the
  result back to the requested size (the original's behaviour; diffusers returns the rounded size).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kandinsky import ops, schedulers
from kandinsky.hub import DECODER_STAGE, MODULES, PRIOR_STAGE, TOKENIZERS, Lazy, resolve
from kandinsky.png import png_text
from kandinsky.text_encoders import encode_clip_images, encode_clip_text, encode_multilingual, zero_image_embeds
from kandinsky.validation import (check_device, check_finite, check_image_side, check_in_range, check_number,
                                  check_positive_int, prompt_list)

# The prior's samplers: diffusers' UnCLIPScheduler, float32 arithmetic included (the default: diffusers'
# images), and the same steps with the original prior's float64 arithmetic (5e-4 of the embeddings' scale away).
PRIOR_SAMPLERS = {"unclip": {}, "unclip_original": {"arithmetic": "float64"}}
OUTPUT_TYPES = ("pil", "np", "pt")
MASK_CONVENTIONS = ("repaint", "legacy")
TRAIN_TIMESTEPS = 1000  # both diffusions (prior and decoder) were trained on 1000 steps
# Bounds on finite but absurd inputs, far beyond any useful value, that would overflow to inf / NaN:
MAX_GUIDANCE = 100.0  # guidance_scale, prior_guidance_scale: values <= 1 turn guidance off
MAX_WEIGHT = 100.0  # |weights| of interpolate / mix (the references use weights summing to 1)
MAX_EMBED = 1e4  # |image_embeds|, |negative_image_embeds| (CLIP image embeddings are of order 1)


class NonFiniteError(ValueError):
    """A generation produced NaN or infinite values from valid arguments: the weights hold NaN/inf, or the
    weight dtype overflowed (float16 above 65504)."""


# ------------------------------------------------------------------------------------------- validation


def _negative_list(negative_prompt: str | Sequence[str] | None, count: int) -> list[str] | None:
    """None, or one negative prompt per prompt (a single string applies to every prompt)."""
    if negative_prompt is None:
        return None
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != count:
        raise ValueError(f"negative_prompt: expected one negative prompt per prompt ({count}), got {len(negatives)}")
    return negatives


def rounded_size(height: int, width: int, factor: int = 8) -> tuple[int, int]:
    """(height, width) rounded up to multiples of ``factor ** 2`` px (64 for the MoVQ's factor 8), as both
    references do: the latents (size / factor) must survive the UNet's three halvings."""
    height, width = check_image_side("height", height), check_image_side("width", width)
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
        arrays = [np.asarray(_converted("image", i, "RGB").resize((width, height), resample=Image.BICUBIC,
                                                                  reducing_gap=1)) for i in image]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return pixels * 2 - 1, (h0, w0)
    if isinstance(image, (list, tuple)) and all(isinstance(i, np.ndarray) for i in image):
        image = _stacked("image", image)
    elif isinstance(image, (list, tuple)) and all(isinstance(i, torch.Tensor) for i in image):
        try:
            image = torch.stack(image) if image[0].ndim == 3 else torch.cat(image)
        except RuntimeError as error:  # different shapes, dtypes or devices
            raise ValueError(f"image: expected tensors of one shape, got {[tuple(i.shape) for i in image]} ({error})") \
                from None
    if isinstance(image, np.ndarray):
        if image.ndim != 4 or image.shape[-1] != 3 or image.dtype.kind not in "uf":
            raise ValueError(f"image: expected uint8 or float arrays of shape (H, W, 3) or (B, H, W, 3), got "
                             f"{image.shape} {image.dtype}")
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image: expected PIL images, arrays (H, W, 3) or tensors (B, 3, H, W), got {type(image).__name__}")
    if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point() or image.numel() == 0:
        raise ValueError(f"image: expected a float tensor (B, 3, H, W) in [0, 1], got {tuple(image.shape)} {image.dtype}")
    image = check_finite("image", image.detach().float().cpu())
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
    """A mask -> (B, 1, height, width) float32 in {0, 1}: 1 where the mask is >= 0.5 (diffusers' binarisation).

    PIL masks are read as 8-bit grey levels / 255; arrays and tensors as they are, so that an integer mask of
    {0, 1} or {0, 255} repaints where it is not 0 (as diffusers binarises arrays, without scaling them)."""
    from PIL import Image

    if isinstance(mask_image, Image.Image):
        mask_image = [mask_image]
    if isinstance(mask_image, (list, tuple)) and len(mask_image) == 0:
        raise ValueError("mask_image: expected a mask or a non-empty list of masks, got an empty list")
    if isinstance(mask_image, (list, tuple)) and all(isinstance(m, Image.Image) for m in mask_image):
        sizes = {m.size[::-1] for m in mask_image}
        if sizes != {image_size}:
            raise ValueError(f"mask_image: expected the size of image (H, W) = {image_size}, got {sorted(sizes)}")
        arrays = [np.asarray(_converted("mask_image", m, "L").resize((width, height), resample=Image.LANCZOS))
                  for m in mask_image]
        mask = torch.from_numpy(np.stack(arrays)[:, None].astype(np.float32) / 255.0)
    else:
        if isinstance(mask_image, (list, tuple)):
            mask_image = _stacked("mask_image", [np.asarray(m) for m in mask_image])
        integer = isinstance(mask_image, torch.Tensor) and not mask_image.is_floating_point()
        if isinstance(mask_image, np.ndarray):
            if mask_image.dtype.kind not in "biuf":
                raise ValueError(f"mask_image: expected a numeric array, got dtype {mask_image.dtype}")
            integer = mask_image.dtype.kind in "biu"
            mask_image = torch.from_numpy(np.ascontiguousarray(mask_image.astype(np.float32)))
        if not isinstance(mask_image, torch.Tensor):
            raise ValueError(f"mask_image: expected a PIL image, an array or a tensor, got {type(mask_image).__name__}")
        mask = check_finite("mask_image", mask_image.detach().float().cpu())
        if mask.ndim == 2:  # (H, W)
            mask = mask[None, None]
        elif mask.ndim == 3:  # (1, H, W) or (B, H, W)
            mask = mask[:, None]
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.numel() == 0:
            raise ValueError(f"mask_image: expected (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask_image.shape)}")
        if tuple(mask.shape[-2:]) != image_size:
            raise ValueError(f"mask_image: expected the size of image (H, W) = {image_size}, got {tuple(mask.shape[-2:])}")
        low, high = mask.min().item(), mask.max().item()
        if low < 0 or (high > 1 and not integer):
            raise ValueError(f"mask_image: expected values in [0, 1] (or integers >= 0), got [{low:.3g}, {high:.3g}]")
        if tuple(mask.shape[-2:]) != (height, width):
            mask = F.interpolate(mask, size=(height, width), mode="nearest")
    return (mask >= 0.5).float()


def _converted(name: str, image, mode: str):
    """A PIL image in ``mode``; PIL raises ValueError or OSError for modes it cannot convert."""
    try:
        return image.convert(mode)
    except (ValueError, OSError) as error:
        raise ValueError(f"{name}: cannot convert a PIL image of mode {image.mode!r} to {mode!r} ({error})") from None


def _stacked(name: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays of one image (or mask) each, or of a batch each, as one batch."""
    try:
        return np.stack(arrays) if arrays[0].ndim in (2, 3) else np.concatenate(arrays)
    except ValueError as error:  # different shapes
        raise ValueError(f"{name}: expected items of one shape, got {[a.shape for a in arrays]} ({error})") from None


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


def _initial_seeds(generator: torch.Generator | list[torch.Generator]) -> list[int | None]:
    """The seed of each generator when nothing was drawn from it since it was seeded (the seed then
    reproduces the call), else None."""
    seeds = []
    for g in generator if isinstance(generator, list) else [generator]:
        fresh = torch.Generator(g.device).manual_seed(g.initial_seed())
        seeds.append(g.initial_seed() if torch.equal(fresh.get_state(), g.get_state()) else None)
    return seeds


def _check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: expected one of {list(OUTPUT_TYPES)}, got {output_type!r}")
    return output_type


def _check_sampler(sampler: str) -> str:
    names = [s for s in schedulers.SAMPLERS if s != "unclip"]  # unclip is the prior's
    if not isinstance(sampler, str) or sampler not in names:
        raise ValueError(f"sampler: expected one of {names}, got {sampler!r}")
    return sampler


def _check_sampler_options(sampler: str, options: dict | None) -> None:
    if options is None:
        return
    if not isinstance(options, dict):
        raise ValueError(f"sampler_options: expected a dict or None, got {type(options).__name__}")
    accepted = schedulers.sampler_options(sampler)
    unknown = sorted(str(key) for key in options if key not in accepted)
    if unknown:
        raise ValueError(f"sampler_options: {unknown} not accepted by the {sampler!r} sampler; accepted: {sorted(accepted)}")


def _check_prior_sampler(name: str, sampler: str) -> str:
    if not isinstance(sampler, str) or sampler not in PRIOR_SAMPLERS:
        raise ValueError(f"{name}: expected one of {list(PRIOR_SAMPLERS)}, got {sampler!r}")
    return sampler


def _check_steps(name: str, steps: object, sampler: str) -> int:
    """A number of sampling steps that ``sampler``'s timesteps can take (1..1000, 1..999 for ddim, plms, dpmpp_2m)."""
    sampler = "unclip" if sampler in PRIOR_SAMPLERS else sampler
    most = schedulers.max_inference_steps(sampler, TRAIN_TIMESTEPS)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= most:
        raise ValueError(f"{name}: expected an integer in 1..{most} for the {sampler!r} sampler, got {steps!r}")
    return int(steps)


def _check_guidance(name: str, value: object) -> float:
    return check_in_range(name, value, 0.0, MAX_GUIDANCE)


# ------------------------------------------------------------------------------------------- guidance


def guide(output: torch.Tensor, guidance_scale: float, guided_channels: int | None = None) -> torch.Tensor:
    """Classifier-free guidance of a model output on the batch ``[unconditional, conditional]``:
    ``uncond + guidance_scale * (cond - uncond)``, (B, ...) from (2B, ...).

    Only the first ``guided_channels`` channels are guided (all by default); the rest come from the
    conditional half as they are (the decoder UNet's learned-variance channels, as both references do).
    """
    uncond, cond = output.chunk(2)
    if guided_channels is None:
        return uncond + guidance_scale * (cond - uncond)
    uncond, cond_guided, cond_rest = uncond[:, :guided_channels], cond[:, :guided_channels], cond[:, guided_channels:]
    return torch.cat([uncond + guidance_scale * (cond_guided - uncond), cond_rest], dim=1)


def guided_denoiser(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], guidance_scale: float,
                    guided_channels: int | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The samplers' ``denoise(x, t)`` from ``predict(x, timesteps)``, a model conditioned on a batch of
    ``[unconditional, conditional]`` rows when ``guidance_scale > 1`` (then ``x`` runs twice and the output
    is :func:`guide`-d), on the conditional rows alone otherwise. The output is float32."""
    use_guidance = guidance_scale > 1.0

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x, x]) if use_guidance else x
        timesteps = t.reshape(-1)[:1].expand(x_in.shape[0])  # the sampler's (B,) timesteps are all equal
        out = predict(x_in, timesteps).float()
        return guide(out, guidance_scale, guided_channels) if use_guidance else out

    return denoise


# ------------------------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class DecoderPlan:
    """The validated arguments of one task call: the decoder's, and the prior's (named ``prior_*`` in the
    task methods) that every task but :meth:`Kandinsky21.decode` takes."""

    prompts: tuple[str, ...]
    negatives: tuple[str, ...] | None  # one per prompt, or None: empty unconditional text
    steps: int
    guidance: float
    requested: tuple[int, int]  # (height, width) as asked, before rounding
    per_prompt: int
    sampler: str
    output_type: str
    prior_steps: int = 25
    prior_guidance: float = 4.0
    prior_sampler: str = "unclip"

    @classmethod
    def validated(cls, prompts: Sequence[str], negative_prompt, steps, guidance, height, width, per_prompt, sampler,
                  output_type, prior_steps=25, prior_guidance=4.0, prior_sampler="unclip",
                  sampler_options: dict | None = None) -> DecoderPlan:
        rounded_size(height, width)  # validates
        negatives = _negative_list(negative_prompt, len(prompts))
        sampler = _check_sampler(sampler)
        _check_sampler_options(sampler, sampler_options)
        return cls(tuple(prompts), None if negatives is None else tuple(negatives),
                   _check_steps("num_inference_steps", steps, sampler), _check_guidance("guidance_scale", guidance),
                   (int(height), int(width)), check_positive_int("num_images_per_prompt", per_prompt),
                   sampler, _check_output_type(output_type),
                   _check_steps("prior_num_inference_steps", prior_steps, "unclip"),
                   _check_guidance("prior_guidance_scale", prior_guidance),
                   _check_prior_sampler("prior_sampler", prior_sampler))

    @property
    def rows(self) -> int:
        """Images the call makes: prompts x images per prompt."""
        return len(self.prompts) * self.per_prompt


class Kandinsky21:
    """The Kandinsky 2.1 pipeline: prior (CLIP text -> CLIP image embedding) + decoder (UNet + MoVQ).

    Every module argument is an ``nn.Module``, a :class:`Lazy` (loaded on first use) or ``None`` (the
    tasks that need it then raise). Build it with :meth:`from_pretrained` (hub repos or local folders),
    :meth:`from_diffusers` (live diffusers pipelines), :meth:`from_config` (seeded random weights, e.g. the
    tiny pipeline), or directly from modules.

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
        self.device = check_device("device", device)
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
        ``"ai-forever/Kandinsky_2.1"``, original layout) or a local folder in either layout or ours (whose
        ``base.json`` may name where the components it lacks come from). ``sources`` may override ``prior_source``, ``inpaint_source`` and ``clip_source``.
        """
        parts = resolve(source, revision=revision, cache_dir=cache_dir, **sources)
        return cls(**parts, device=device, dtype=dtype, offload=offload, progress=progress)

    @classmethod
    def from_config(cls, name: str = "tiny", *, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, offload: str | None = None,
                    progress: bool = True) -> Kandinsky21:
        """A pipeline of seeded random weights at a named configuration, built in memory: no download, no
        file, no diffusers. ``"tiny"`` (the only name) is every component at a few hundred
        kB, with real tokenizers of tiny vocabularies (:mod:`kandinsky.tiny`), to try every task and
        command and to test code against; images are multiples of 64 px, as with the real weights.

        Example::

            pipe = Kandinsky21.from_config("tiny", seed=0)
            images = pipe.text2img("a cat", height=64, width=64, num_inference_steps=4)
        """
        if name != "tiny":
            raise ValueError(f"name: expected 'tiny', got {name!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        from kandinsky import tiny

        return cls(**tiny.components(seed), device=device, dtype=dtype, offload=offload, progress=progress)

    @classmethod
    def from_diffusers(cls, prior_pipeline, decoder_pipeline, *, inpaint_pipeline=None,
                       device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                       offload: str | None = None, progress: bool = True) -> Kandinsky21:
        """From live diffusers pipelines: a ``KandinskyPriorPipeline`` and a ``KandinskyPipeline`` /
        ``KandinskyImg2ImgPipeline`` (4-channel UNet) or ``KandinskyInpaintPipeline`` (9-channel UNet).

        The prior, UNet and MoVQ weights are converted into our modules; the tokenizers and the text and
        image encoders are reused as they are (M-CLIP is copied into our equivalent class), or copied when
        ``device`` or ``dtype`` differ from theirs, so that the diffusers pipelines stay as they were.
        """
        import copy

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
        dtype, device = dtype or first.dtype, check_device("device", device or first.device)

        def reused(encoder: nn.Module) -> nn.Module:
            weight = next(encoder.parameters())
            return (encoder if (weight.dtype, weight.device) == (dtype, device) else copy.deepcopy(encoder)).eval()

        return cls(
            clip_tokenizer=prior_pipeline.tokenizer, clip_text=reused(prior_pipeline.text_encoder),
            clip_vision=reused(prior_pipeline.image_encoder), prior=convert("prior", prior_pipeline.prior),
            mclip_tokenizer=decoder_pipeline.tokenizer,
            mclip=MultilingualCLIP.from_diffusers_module(decoder_pipeline.text_encoder),
            movq=convert("movq", decoder_pipeline.movq), **unets,
            device=device, dtype=dtype, offload=offload, progress=progress)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False, layout: str = "ours",
                        **export_options) -> None:
        """Write every component this pipeline has into ``folder`` in our layout (see :mod:`kandinsky.weights`),
        which :meth:`from_pretrained` then loads memory-mapped. Lazy components are loaded one at a time.
        Existing component folders are an error, or with ``overwrite`` replaced, each only once its new
        copy is complete and only if this package wrote it (:func:`kandinsky.weights.replaceable`).

        ``layout="diffusers"`` or ``"original"`` writes the official layouts instead, for diffusers' pipelines
        or the original code (:func:`kandinsky.layouts.export_pipeline`; ``export_options``: ``dtype``,
        ``lora``, ``provenance``)."""
        from kandinsky.weights import check_output, save_component

        def present(name: str):
            return self.tokenizers.get(name) if name in TOKENIZERS else self._modules.get(name, self._loaders.get(name))

        folder = Path(folder)
        names = [name for name in MODULES + TOKENIZERS if present(name) is not None]
        if layout != "ours":
            from kandinsky.layouts import export_pipeline

            def loader(name: str) -> Callable:
                if name in TOKENIZERS:
                    return lambda: self.tokenizer(name)
                return lambda: self._modules[name] if name in self._modules else self._loaders[name].load()

            export_pipeline({name: loader(name) for name in names}, folder, layout=layout, overwrite=overwrite,
                            **export_options)
            return
        existing = [str(folder / name) for name in names if (folder / name).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{', '.join(existing)} already exist (pass overwrite=True to replace them)")
        for name in names:  # every refusal (a folder this package did not write) before the first write
            check_output(folder / name, overwrite=overwrite, component=name)
        for name in names:
            if name in TOKENIZERS:
                component = self.tokenizer(name)
            else:
                component = self._modules[name] if name in self._modules else self._loaders[name].load()
            save_component(name, component, folder / name, overwrite=overwrite)

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
        return ops.optimize(module, self.device, self.dtype).eval()

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
        if isinstance(generator, (list, tuple)) and generator and all(isinstance(g, torch.Generator)
                                                                      for g in generator):
            return list(generator)  # one per image: see schedulers.randn
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator, a list of them (one per image) or None, "
                             f"got {type(generator).__name__}")
        return generator

    def _finite(self, stage: str, values: torch.Tensor) -> torch.Tensor:
        """``values`` if they are all finite, else :class:`NonFiniteError` naming the likely cause."""
        bad = int((~values.isfinite()).sum())
        if bad:
            overflow = " or float16 overflowed (try dtype=torch.bfloat16 or torch.float32)" \
                if self.dtype == torch.float16 else ""
            raise NonFiniteError(f"the {stage} produced {bad} NaN or infinite values of {values.numel()}: its weights "
                                 f"hold NaN or inf (check the checkpoint and its conversion){overflow}")
        return values

    # ---- prior ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prior(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
              num_inference_steps: int = 25, guidance_scale: float = 4.0, num_images_per_prompt: int = 1,
              generator: torch.Generator | None = None, sampler: str = "unclip") -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP image embeddings of the prompts: ``(image_embeds, negative_image_embeds)``, each
        (len(prompt) * num_images_per_prompt, 768) float32, rows ordered prompt-major.

        Without ``negative_prompt`` the negative embedding is the CLIP embedding of an all-zeros image; with
        it, the prior's output for the negative prompt (which is then also the prior's unconditional text).

        ``sampler``: ``"unclip"`` (default) is diffusers' ``UnCLIPScheduler`` with its float32 arithmetic, so
        that the images are diffusers'; ``"unclip_original"`` takes the same steps with the original prior
        sampler's float64 arithmetic (the embeddings move by about 5e-4 of their scale, which the decoder
        amplifies: see :func:`kandinsky.schedulers.unclip_float32_step`). ``guidance_scale`` lies in
        [0, 100] (at most 1: no guidance).
        """
        prompts = prompt_list(prompt)
        negatives = _negative_list(negative_prompt, len(prompts))
        steps = _check_steps("num_inference_steps", num_inference_steps, "unclip")
        guidance = _check_guidance("guidance_scale", guidance_scale)
        per_prompt = check_positive_int("num_images_per_prompt", num_images_per_prompt)
        options = PRIOR_SAMPLERS[_check_prior_sampler("sampler", sampler)]
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
        if guidance > 1.0:  # [unconditional, conditional]
            uncond = encode(uncond_prompts)
            text_embeds, text_hidden_states, text_mask = (torch.cat([u, c]) for u, c in
                                                          zip(uncond, (text_embeds, text_hidden_states, text_mask)))
        prior = self.module("prior")
        dtype = self.dtype
        text_embeds, text_hidden_states = text_embeds.to(dtype), text_hidden_states.to(dtype)

        def predict(x_in: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return prior(x_in.to(dtype), timesteps, text_embeds=text_embeds, text_hidden_states=text_hidden_states,
                         text_mask=text_mask)

        denoise = guided_denoiser(predict, guidance)
        rows = len(batch_prompts) * per_prompt
        x = schedulers.randn((rows, prior.config.clip_dim), generator, self.device)
        timesteps = schedulers.sampler_timesteps("unclip", self.prior_schedule, steps)
        x = schedulers.sample("unclip", denoise, x, self.prior_schedule, timesteps, generator=generator,
                              progress=self.progress, **options)
        image_embeds = self._finite("prior", prior.denormalize(x.float()))  # float32: the buffers are cast to x's dtype
        if negatives is not None:
            image_embeds, negative_embeds = image_embeds.chunk(2)
        else:
            negative_embeds = zero_image_embeds(self.module("clip_vision"), rows).float()
        return image_embeds, negative_embeds.to(image_embeds.device)

    @torch.no_grad()
    def interpolate(self, images_and_prompts: Sequence, weights: Sequence[float], num_inference_steps: int = 25,
                    guidance_scale: float = 4.0, negative_prior_prompt: str | None = None,
                    negative_prompt: str = "", generator: torch.Generator | None = None, sampler: str = "unclip"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A weighted sum of image embeddings of prompts (through the prior) and images (through CLIP):
        ``(image_embeds (1, 768), negative_image_embeds (1, 768))`` (original ``mix_images``, diffusers
        ``KandinskyPriorPipeline.interpolate``; no renormalisation).

        Each prompt runs the prior with the same ``generator`` in turn, as diffusers does. The negative
        embedding is the zero-image embedding, or the prior of ``negative_prompt`` when it is not empty.
        (diffusers also runs a discarded prior pass for an empty negative prompt; we skip it, so the
        generator's state afterwards differs, the returned embeddings do not.)

        ``weights`` lie in [-100, 100]; ``num_inference_steps``, ``guidance_scale`` and ``sampler`` are the
        prior's (see :meth:`prior`).
        """
        from PIL import Image

        if not isinstance(images_and_prompts, Sequence) or isinstance(images_and_prompts, str) or \
                len(images_and_prompts) == 0:
            raise ValueError("images_and_prompts: expected a non-empty list of prompts and images")
        for item in images_and_prompts:
            if isinstance(item, torch.Tensor):
                _unit_range("images_and_prompts", item)
            elif not isinstance(item, (str, Image.Image)):
                raise ValueError(f"images_and_prompts: expected prompts (str), PIL images or (B, 3, H, W) tensors "
                                 f"in [0, 1], got {type(item).__name__}")
        if not isinstance(weights, Sequence) or len(weights) != len(images_and_prompts):
            raise ValueError(f"weights: expected one weight per item of images_and_prompts "
                             f"({len(images_and_prompts)}), got {weights!r}")
        weights = [check_in_range("weights", w, -MAX_WEIGHT, MAX_WEIGHT) for w in weights]
        for name, text in (("negative_prior_prompt", negative_prior_prompt), ("negative_prompt", negative_prompt)):
            if not (isinstance(text, str) or (text is None and name == "negative_prior_prompt")):
                raise ValueError(f"{name}: expected a string, got {type(text).__name__}")
        _check_steps("num_inference_steps", num_inference_steps, "unclip")
        _check_guidance("guidance_scale", guidance_scale)
        _check_prior_sampler("sampler", sampler)
        if not any(weights):
            raise ValueError(f"weights: expected at least one non-zero weight, got {weights}")
        if abs(sum(weights)) < 1e-6 * max(abs(w) for w in weights):
            # Both references use the weights as given (no renormalisation): a zero sum is a pure difference.
            warnings.warn(f"weights {weights} sum to zero: the mix is a difference of embeddings, not an average",
                          UserWarning, stacklevel=2)
        generator = self._generator(generator)
        prior_args = dict(negative_prompt=negative_prior_prompt, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, generator=generator, sampler=sampler)
        total = None
        for item, weight in zip(images_and_prompts, weights):
            if isinstance(item, str):
                embeds = self.prior(item, **prior_args)[0]
            else:
                embeds = self._finite("CLIP image encoder", encode_clip_images(self.module("clip_vision"), item).float())
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
        prompts = prompt_list(prompt)
        generator = self._generator(generator)
        plan = DecoderPlan.validated(prompts, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                     num_images_per_prompt, sampler, output_type, sampler_options=sampler_options)
        record = self._record("decode", plan, generator, prior=False, crop=crop, sampler_options=sampler_options)
        image_embeds, negative_image_embeds = self._expand_embeds(image_embeds, negative_image_embeds, plan)
        return self._decoder(plan, image_embeds, negative_image_embeds, generator, crop, sampler_options,
                             record=record)

    @torch.no_grad()
    def text2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 prior_guidance_scale: float = 4.0, height: int = 512, width: int = 512,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None, sampler: str = "ddim",
                 output_type: str = "pil", crop: bool = False, sampler_options: dict | None = None,
                 prior_sampler: str = "unclip"):
        """Prompts -> images (diffusers ``KandinskyCombinedPipeline``, same seed -> same image).

        The prior's noise is drawn first, then the decoder's, from the one ``generator``. A negative prompt
        conditions both stages (prior: its embedding is the negative image embedding; decoder: it is the
        unconditional text), as the separate diffusers pipelines do it.

        Every task validates all its arguments before any model runs: ``num_inference_steps`` in 1..1000
        (1..999 for ddim, plms and dpmpp_2m), ``guidance_scale`` in [0, 100] (at most 1: no guidance), the
        prior's ``prior_num_inference_steps`` (1..1000), ``prior_guidance_scale`` and ``prior_sampler`` (see
        :meth:`prior`). A generation that yields NaN or infinite values raises :class:`NonFiniteError`.
        """
        prompts = prompt_list(prompt)
        plan = DecoderPlan.validated(prompts, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                     num_images_per_prompt, sampler, output_type, prior_num_inference_steps,
                                     prior_guidance_scale, prior_sampler, sampler_options)
        generator = self._generator(generator)
        record = self._record("text2img", plan, generator, crop=crop, sampler_options=sampler_options)
        image_embeds, negative_image_embeds = self.prior(
            prompts, negative_prompt=plan.negatives, num_inference_steps=plan.prior_steps,
            guidance_scale=plan.prior_guidance, num_images_per_prompt=plan.per_prompt, generator=generator,
            sampler=plan.prior_sampler)
        return self._decoder(plan, image_embeds, negative_image_embeds, generator, crop, sampler_options,
                             record=record)

    @torch.no_grad()
    def img2img(self, prompt: str | Sequence[str], image, strength: float = 0.3,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 100,
                guidance_scale: float = 7.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
                height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
                generator: torch.Generator | None = None, sampler: str = "ddim", output_type: str = "pil",
                crop: bool = False, image_embeds: torch.Tensor | None = None,
                negative_image_embeds: torch.Tensor | None = None, sampler_options: dict | None = None,
                prior_sampler: str = "unclip"):
        """Repaint ``image`` towards ``prompt`` (diffusers ``KandinskyImg2ImgPipeline``, its defaults:
        strength 0.3, guidance 7).

        The image is resized to the (rounded) size, MoVQ-encoded, noised at timestep
        ``int(1000 * strength) - 2`` with betas 1e-4..0.02, and the last ``int(steps * strength)`` steps
        are run. ``strength`` 1 starts from almost pure noise. Pass ``image_embeds`` /
        ``negative_image_embeds`` to skip the prior.
        """
        prompts = prompt_list(prompt)
        strength = check_number("strength", strength)
        if not 0 < strength <= 1:
            raise ValueError(f"strength: expected a number in (0, 1], got {strength}")
        plan = DecoderPlan.validated(prompts, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                     num_images_per_prompt, sampler, output_type, prior_num_inference_steps,
                                     prior_guidance_scale, prior_sampler, sampler_options)
        generator = self._generator(generator)
        record = self._record("img2img", plan, generator, prior=image_embeds is None, strength=strength, crop=crop,
                              sampler_options=sampler_options)
        generator, image_embeds, negative_image_embeds, latents, _ = self._image_start(
            plan, image, None, generator, image_embeds, negative_image_embeds)
        latents = latents.repeat_interleave(plan.per_prompt, 0)
        steps = plan.steps
        timesteps = schedulers.sampler_timesteps(plan.sampler, self.decoder_schedule, steps)
        start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[start:]
        # diffusers' (and the original's) noise level: 1000 * strength - 2 (strength 1 -> t = 998)
        noise_timestep = max(int(self.img2img_schedule.num_train_timesteps * strength) - 2, 0)
        noise = schedulers.randn(latents.shape, generator, self.device)
        x = schedulers.add_noise(latents, noise, noise_timestep, self.img2img_schedule)
        return self._decoder(plan, image_embeds, negative_image_embeds, generator, crop, sampler_options,
                             x=x, timesteps=timesteps, record=record)

    @torch.no_grad()
    def inpaint(self, prompt: str | Sequence[str], image, mask_image,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 100,
                guidance_scale: float = 4.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
                height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
                generator: torch.Generator | None = None, sampler: str = "ddim", output_type: str = "pil",
                crop: bool = False, mask_convention: str = "repaint", image_embeds: torch.Tensor | None = None,
                negative_image_embeds: torch.Tensor | None = None, sampler_options: dict | None = None,
                prior_sampler: str = "unclip"):
        """Repaint the masked part of ``image`` (diffusers ``KandinskyInpaintPipeline``, 9-channel UNet).

        ``mask_image`` (same size as ``image``; PIL, float array or tensor in [0, 1], integer or bool array or
        tensor) is binarised at 0.5 as diffusers does: a uint8 mask of {0, 1} or of {0, 255} repaints where it is
        not 0, a PIL mask where it is at least 128.
        ``mask_convention="repaint"`` (default, diffusers >= 0.19): 1 / white = repaint, 0 / black = keep.
        ``"legacy"`` (the original code, diffusers < 0.19): 1 / white = keep, 0 / black = repaint. In
        latent space the repaint area grows by one pixel, as in diffusers.

        With ``sampler="p_sampler"`` the kept region of the predicted x0 is replaced by the image latents at
        every step (and x0 clamped to [-2, 2]), as the original's p_sampler path does; diffusers' samplers
        never blend. ``sampler_options={"x0_fn": ...}`` replaces that step.
        """
        if mask_convention not in MASK_CONVENTIONS:
            raise ValueError(f"mask_convention: expected one of {list(MASK_CONVENTIONS)}, got {mask_convention!r}")
        prompts = prompt_list(prompt)
        plan = DecoderPlan.validated(prompts, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                     num_images_per_prompt, sampler, output_type, prior_num_inference_steps,
                                     prior_guidance_scale, prior_sampler, sampler_options)
        generator = self._generator(generator)
        record = self._record("inpaint", plan, generator, prior=image_embeds is None, mask_convention=mask_convention,
                              crop=crop, sampler_options=sampler_options)
        generator, image_embeds, negative_image_embeds, latents, mask = self._image_start(
            plan, image, mask_image, generator, image_embeds, negative_image_embeds)
        keep = 1 - mask if mask_convention == "repaint" else mask  # internally 1 = keep, as both references
        keep = F.interpolate(keep.to(self.device), size=latents.shape[-2:], mode="nearest")
        keep = dilate_repaint(keep)
        masked_latents = latents * keep
        condition = torch.cat([masked_latents, keep], dim=1).repeat_interleave(plan.per_prompt, 0)
        known = (latents.repeat_interleave(plan.per_prompt, 0), keep.repeat_interleave(plan.per_prompt, 0))
        return self._decoder(plan, image_embeds, negative_image_embeds, generator, crop, sampler_options,
                             condition=condition, unet_name="unet_inpaint", known=known, record=record)

    @torch.no_grad()
    def mix(self, images_and_prompts: Sequence, weights: Sequence[float], num_inference_steps: int = 100,
            guidance_scale: float = 4.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
            negative_prior_prompt: str | None = None, negative_prompt: str = "", height: int = 512,
            width: int = 512, num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
            sampler: str = "ddim", output_type: str = "pil", crop: bool = False,
            sampler_options: dict | None = None, prior_sampler: str = "unclip"):
        """Images from a weighted mix of prompts and images (:meth:`interpolate`, then the decoder with an
        empty prompt, as the original ``mix_images`` and diffusers' interpolate example do)."""
        plan = DecoderPlan.validated([""], None, num_inference_steps, guidance_scale, height, width,
                                     num_images_per_prompt, sampler, output_type, prior_num_inference_steps,
                                     prior_guidance_scale, prior_sampler, sampler_options)
        generator = self._generator(generator)
        items = images_and_prompts if isinstance(images_and_prompts, Sequence) else ()
        label = " | ".join(item if isinstance(item, str) else "<image>" for item in items)
        record = self._record("mix", plan, generator, prompts=(label,), weights=weights,
                              negative_prior_prompt=negative_prior_prompt, negative_prompt=negative_prompt, crop=crop,
                              sampler_options=sampler_options)
        image_embeds, negative_image_embeds = self.interpolate(
            images_and_prompts, weights, num_inference_steps=plan.prior_steps, guidance_scale=plan.prior_guidance,
            negative_prior_prompt=negative_prior_prompt, negative_prompt=negative_prompt, generator=generator,
            sampler=plan.prior_sampler)
        image_embeds, negative_image_embeds = self._expand_embeds(image_embeds, negative_image_embeds, plan)
        return self._decoder(plan, image_embeds, negative_image_embeds, generator, crop, sampler_options,
                             record=record)

    # ---- decoder internals ------------------------------------------------------------------------------

    def _size(self, plan: DecoderPlan) -> tuple[int, int]:
        """The requested size rounded up for the MoVQ (64 px multiples for the official one)."""
        return rounded_size(*plan.requested, self.module("movq").config.downsample_factor)

    def _expand_embeds(self, image_embeds, negative_image_embeds, plan: DecoderPlan):
        rows, count = plan.rows, len(plan.prompts)
        out = []
        for name, embeds in (("image_embeds", image_embeds), ("negative_image_embeds", negative_image_embeds)):
            if isinstance(embeds, (list, tuple)):
                embeds = torch.cat(list(embeds))
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or not embeds.is_floating_point():
                raise ValueError(f"{name}: expected a (B, D) float tensor, got "
                                 f"{getattr(embeds, 'shape', type(embeds))} {getattr(embeds, 'dtype', '')}")
            check_finite(name, embeds, MAX_EMBED)
            if embeds.shape[0] == count and rows != count:
                embeds = embeds.repeat_interleave(plan.per_prompt, 0)
            elif embeds.shape[0] == 1 and rows != 1:
                embeds = embeds.expand(rows, -1)
            if embeds.shape[0] != rows:
                raise ValueError(f"{name}: expected {count} or {rows} rows, got {embeds.shape[0]}")
            if out and embeds.shape[1] != out[0].shape[1]:
                raise ValueError(f"{name}: expected the width of image_embeds ({out[0].shape[1]}), got {embeds.shape[1]}")
            out.append(embeds.float().to(self.device))
        return out

    def _embeds_or_prior(self, plan: DecoderPlan, image_embeds, negative_image_embeds, generator):
        if (image_embeds is None) != (negative_image_embeds is None):
            raise ValueError("image_embeds, negative_image_embeds: pass both or neither")
        if image_embeds is None:
            return self.prior(plan.prompts, negative_prompt=plan.negatives, num_inference_steps=plan.prior_steps,
                              guidance_scale=plan.prior_guidance, num_images_per_prompt=plan.per_prompt,
                              generator=generator, sampler=plan.prior_sampler)
        return self._expand_embeds(image_embeds, negative_image_embeds, plan)

    def _image_start(self, plan: DecoderPlan, image, mask_image, generator, image_embeds, negative_image_embeds):
        """What img2img and inpaint begin with: ``image`` (and ``mask_image``, if not None) read at the rounded
        size, one per prompt; the image embeddings (the prior's, unless given); the image's MoVQ latents.
        Returns ``(generator, image_embeds, negative_image_embeds, latents, mask)``, latents (B, 4, h, w)
        float32 and mask (B, 1, H, W) with B = len(plan.prompts)."""
        height, width = self._size(plan)
        pixels, image_size = _images_to_tensor(image, height, width)
        mask = None if mask_image is None else _mask_to_tensor(mask_image, height, width, image_size)
        if mask is not None and mask.shape[0] not in (1, pixels.shape[0]) and pixels.shape[0] != 1:
            raise ValueError(f"mask_image: expected 1 or {pixels.shape[0]} masks (one per image), got {mask.shape[0]}")
        pixels = self._match_batch("image", pixels, len(plan.prompts))
        if mask is not None:
            mask = self._match_batch("mask_image", mask, len(plan.prompts))
        generator = self._generator(generator)
        image_embeds, negative_image_embeds = self._embeds_or_prior(
            plan, image_embeds, negative_image_embeds, generator)
        latents = self.module("movq").encode(pixels.to(self.device, self.dtype)).float()
        return generator, image_embeds, negative_image_embeds, latents, mask

    @staticmethod
    def _match_batch(name: str, tensor: torch.Tensor, count: int) -> torch.Tensor:
        if tensor.shape[0] == count:
            return tensor
        if tensor.shape[0] == 1:
            return tensor.expand(count, *tensor.shape[1:])
        raise ValueError(f"{name}: expected 1 or {count} (one per prompt), got {tensor.shape[0]}")

    def _decoder(self, plan: DecoderPlan, image_embeds, negative_image_embeds, generator, crop, sampler_options,
                 x: torch.Tensor | None = None, timesteps=None, condition: torch.Tensor | None = None,
                 unet_name: str = "unet", known: tuple[torch.Tensor, torch.Tensor] | None = None,
                 record: dict | None = None):
        """Guided sampling of the UNet from ``x`` (unit noise by default) and MoVQ decoding. ``known``:
        (image latents, keep mask) of inpainting, for the original p_sampler's per-step blend. ``record``
        (:meth:`_record`): what each PIL image's ``info`` then carries."""
        per_prompt, dtype = plan.per_prompt, self.dtype
        use_guidance = plan.guidance > 1.0
        tokenizer, mclip = self.tokenizer("mclip_tokenizer"), self.module("mclip")

        def encode(texts: list[str]):
            embeds, hidden, _ = encode_multilingual(tokenizer, mclip, texts)
            return embeds.repeat_interleave(per_prompt, 0), hidden.repeat_interleave(per_prompt, 0)

        text_embeds, text_hidden_states = encode(plan.prompts)
        if use_guidance:  # [unconditional, conditional]
            negatives = plan.negatives or [""] * len(plan.prompts)
            uncond_embeds, uncond_hidden = encode(negatives)
            text_embeds = torch.cat([uncond_embeds, text_embeds])
            text_hidden_states = torch.cat([uncond_hidden, text_hidden_states])
            image_embeds = torch.cat([negative_image_embeds, image_embeds])
            if condition is not None:
                condition = torch.cat([condition, condition])
        text_embeds, text_hidden_states = text_embeds.to(dtype), text_hidden_states.to(dtype)
        image_embeds = image_embeds.to(self.device, dtype)
        unet = self._compiled(unet_name)

        def predict(x_in: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            if condition is not None:
                x_in = torch.cat([x_in, condition], dim=1)
            return unet(x_in.to(dtype), timesteps, text_hidden_states=text_hidden_states, text_embeds=text_embeds,
                        image_embeds=image_embeds)

        # the 4 noise channels are guided; the 4 learned-variance channels come from the conditional half
        denoise = guided_denoiser(predict, plan.guidance, guided_channels=4)
        if x is None:
            height, width = self._size(plan)
            factor = self.module("movq").config.downsample_factor
            x = schedulers.randn((plan.rows, 4, height // factor, width // factor), generator, self.device)
        if timesteps is None:
            timesteps = schedulers.sampler_timesteps(plan.sampler, self.decoder_schedule, plan.steps)
        options = dict(sampler_options or {})
        if plan.sampler == "p_sampler":
            options.setdefault("x0_fn", _original_x0_fn(known))
        if len(timesteps) > 0:
            x = schedulers.sample(plan.sampler, denoise, x, self.decoder_schedule, timesteps,
                                  generator=generator, progress=self.progress, **options)
        self._finite("decoder UNet", x)
        images = self._finite("MoVQ decoder", self.module("movq").decode(x.to(dtype)).float())
        if crop:
            height, width = plan.requested
            images = images[..., :height, :width]  # the original keeps the top-left corner
        output = to_output(images, plan.output_type)
        if plan.output_type == "pil" and record is not None:
            prompts, seeds = record["prompts"], record["seeds"]
            for row, image in enumerate(output):
                prompt = row // plan.per_prompt
                negative = plan.negatives[prompt] if plan.negatives else None
                image.info.update(png_text(prompts[prompt], seeds[row % len(seeds)], row, record["settings"], negative))
        return output

    def _record(self, task: str, plan: DecoderPlan, generator, *, prior: bool = True,
                prompts: Sequence[str] | None = None, **settings) -> dict:
        """What the PIL images of a call carry in their ``info`` (:func:`png_text`): the call's settings, each
        image's prompt (``prompts``, one per prompt of the plan, by default its prompts) and seed (known if
        the generator had not drawn before the call)."""
        values = {"task": task, "num_inference_steps": plan.steps, "guidance_scale": plan.guidance,
                  "sampler": plan.sampler, "height": plan.requested[0], "width": plan.requested[1],
                  "num_images_per_prompt": plan.per_prompt, "dtype": str(self.dtype).removeprefix("torch.")}
        if prior:
            values.update(prior_num_inference_steps=plan.prior_steps, prior_guidance_scale=plan.prior_guidance,
                          prior_sampler=plan.prior_sampler)
        values.update({name: value for name, value in settings.items() if value is not None})
        return {"settings": values, "seeds": _initial_seeds(generator), "prompts": tuple(prompts or plan.prompts)}

    # ---- LoRA -------------------------------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> Kandinsky21:
        """Add LoRA adapters trained by ``kandinsky train --lora-rank`` (a ``lora.safetensors`` file, or the
        training's output folder) to the component they were trained for, their effect scaled by ``scale``
        (1 = as trained). Adapters loaded before are removed first. See :mod:`kandinsky.lora`."""
        from kandinsky import lora

        weights, meta = lora.read_lora(path)
        self.unload_lora()
        name = meta["component"]
        lora.load_lora_weights(self.module(name), weights, meta, check_number("scale", scale))
        self._loaders.pop(name, None)  # keep this module: offload must not drop it and reload it without adapters
        self._compiled_unets.pop(name, None)
        return self

    def unload_lora(self) -> Kandinsky21:
        """Remove every LoRA adapter (the base layers come back untouched: the base outputs, exactly)."""
        from kandinsky import lora

        for name, module in self._modules.items():
            if lora.has_lora(module):
                lora.remove_lora(module)
                self._compiled_unets.pop(name, None)
        return self


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
    if not tensor.is_floating_point() or tensor.ndim not in (3, 4) or tensor.shape[-3] != 3 or tensor.numel() == 0:
        raise ValueError(f"{name}: expected float image tensors (3, H, W) or (B, 3, H, W) in [0, 1], got "
                         f"{tuple(tensor.shape)} {tensor.dtype}")
    check_finite(name, tensor)
    if tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{name}: image tensors must be in [0, 1], got [{tensor.min().item():.3g}, "
                         f"{tensor.max().item():.3g}]")
    return tensor


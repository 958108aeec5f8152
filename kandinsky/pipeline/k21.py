"""Kandinsky 2.1 end to end: prompt -> prior -> CLIP image embedding -> decoder UNet -> MoVQ -> image.

:class:`Kandinsky21` runs the tasks :meth:`~Kandinsky21.text2img`, :meth:`~Kandinsky21.img2img`,
:meth:`~Kandinsky21.inpaint` and :meth:`~Kandinsky21.mix` (with :meth:`~Kandinsky21.prior`,
:meth:`~Kandinsky21.interpolate` and :meth:`~Kandinsky21.decode` for the stages alone) on the models of a
:class:`~kandinsky.components.Components` store (``pipe.components``).

Arguments, defaults and random draws follow diffusers 0.42.1 (``KandinskyCombinedPipeline`` and the separate
pipelines): the same seed gives the same image. Where the original ai-forever code differs, its behaviour is an
explicit option (``crop=True``, ``mask_convention="legacy"``, ``prior_sampler="unclip_original"``)::

    pipe = Kandinsky21.from_pretrained("kandinsky-community/kandinsky-2-1", device="cuda", dtype=torch.float16)
    save_png(pipe.text2img("red cat", generator=torch.Generator().manual_seed(0))[0], "cat.png")

Conventions (the same in every task): settings are validated by :mod:`kandinsky.settings` before any model runs;
guidance batches are ``[unconditional, conditional]`` (diffusers' order), the 4 noise channels guided and the 4
variance channels from the conditional half, ``guidance_scale <= 1`` skipping the unconditional half; images in
and out as :mod:`kandinsky.images` says, PIL outputs carrying :mod:`kandinsky.png`'s metadata in their ``info``;
sizes rounded up to multiples of 64 px (both references), ``crop=True`` cropping back (the original).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky import schedulers
from kandinsky.components import Components
from kandinsky.images import images_to_tensor, mask_to_tensor, unit_range
from kandinsky.pipeline.common import (DecoderStart, DecoderSteps, NonFiniteError, TaskCall, dilate_repaint,
                                       guided_denoiser, initial_seeds, match_batch, negative_list, scheduler_sampling)
from kandinsky.png import recorded_settings
from kandinsky.settings import (MAX_EMBED, MAX_WEIGHT, PRIOR_SAMPLERS, DecodeSettings, Img2ImgSettings,
                                InpaintSettings, MixSettings, Text2ImgSettings, check_guidance, check_prior_sampler,
                                check_steps, rounded_size)
from kandinsky.text_encoders import encode_clip_images, encode_clip_text, encode_multilingual, zero_image_embeds
from kandinsky.validation import check_finite, check_in_range, check_positive_int, prompt_list


class Kandinsky21(DecoderSteps):
    """The Kandinsky 2.1 pipeline: prior (CLIP text -> CLIP image embedding) + decoder (UNet + MoVQ).

    Build it with :meth:`from_pretrained` (hub repos or local folders), :meth:`from_diffusers` (live diffusers
    pipelines), :meth:`from_config` (seeded random weights, e.g. the tiny pipeline), from a
    :class:`~kandinsky.components.Components` store, or from modules: ``Kandinsky21(unet=..., movq=..., ...,
    device=..., dtype=..., offload=...)`` takes the arguments of :class:`~kandinsky.components.Components`.
    ``progress``: tqdm progress bars for the sampling loops. ``prior_sampling`` / ``decoder_sampling``
    (:class:`~kandinsky.schedulers.Sampling`): the stages' sampler, noise schedule, spacing and options, by default
    Kandinsky's (unCLIP; DDIM, "leading" spacing, offset 1); :meth:`from_diffusers` takes them from the pipelines'
    scheduler configs.
    """

    def __init__(self, components: Components | None = None, *, progress: bool = True,
                 prior_sampling: schedulers.Sampling | None = None, decoder_sampling: schedulers.Sampling | None = None,
                 **parts):
        if components is None:
            components = Components(**parts)
        elif parts:
            raise ValueError(f"{sorted(parts)}: pass either a Components store or its arguments, not both")
        if not isinstance(components, Components):
            raise ValueError(f"components: expected a kandinsky.components.Components, got {type(components).__name__}")
        self.components = components
        self.progress = progress
        self.prior_sampling = prior_sampling or schedulers.prior_sampling()
        self.decoder_sampling = decoder_sampling or schedulers.decoder_sampling()
        self.img2img_schedule = schedulers.img2img_schedule()

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
        ``base.json`` may name where the components it lacks come from). ``sources`` may override
        ``prior_source``, ``inpaint_source`` and ``clip_source``.
        """
        return cls(Components.from_pretrained(source, device=device, dtype=dtype, revision=revision,
                                              cache_dir=cache_dir, offload=offload, **sources), progress=progress)

    @classmethod
    def from_config(cls, name: str = "tiny", *, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, offload: str | None = None,
                    progress: bool = True) -> Kandinsky21:
        """A pipeline of seeded random weights at a named configuration, built in memory: no download, no
        file, no diffusers. ``"tiny"`` (the only name) is every component at a few hundred kB, with real
        tokenizers of tiny vocabularies (:mod:`kandinsky.tiny`), to try every task and command and to test
        code against; images are multiples of 64 px, as with the real weights.

        Example::

            pipe = Kandinsky21.from_config("tiny", seed=0)
            images = pipe.text2img("a cat", height=64, width=64, num_inference_steps=4)
        """
        return cls(Components.from_config(name, seed=seed, device=device, dtype=dtype, offload=offload),
                   progress=progress)

    @classmethod
    def from_diffusers(cls, prior_pipeline, decoder_pipeline, *, inpaint_pipeline=None,
                       device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                       offload: str | None = None, progress: bool = True) -> Kandinsky21:
        """From live diffusers pipelines: a ``KandinskyPriorPipeline`` and a ``KandinskyPipeline`` /
        ``KandinskyImg2ImgPipeline`` (4-channel UNet) or ``KandinskyInpaintPipeline`` (9-channel UNet); see
        :meth:`kandinsky.components.Components.from_diffusers`. The samplers follow the pipelines' scheduler configs
        (:func:`kandinsky.convert.scheduler.sampling_from_diffusers`): what the default samplers (``sampler="ddim"``
        or the decoder scheduler's, and the prior's unCLIP) then compute is what diffusers computes."""
        components = Components.from_diffusers(prior_pipeline, decoder_pipeline, inpaint_pipeline=inpaint_pipeline,
                                               device=device, dtype=dtype, offload=offload)
        return cls(components, progress=progress, prior_sampling=scheduler_sampling(prior_pipeline.scheduler),
                   decoder_sampling=scheduler_sampling(decoder_pipeline.scheduler))

    # ---- the store ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.dtype

    @property
    def offload(self) -> str | None:
        return self.components.offload

    def module(self, name: str) -> nn.Module:
        """The module ``name`` ready to run (:meth:`kandinsky.components.Components.module`)."""
        return self.components.module(name)

    def tokenizer(self, name: str):
        """The tokenizer ``name`` (``"clip_tokenizer"`` or ``"mclip_tokenizer"``), loading it if lazy."""
        return self.components.tokenizer(name)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False, layout: str = "ours",
                        **export_options) -> None:
        """Write every component into ``folder`` in our layout (``from_pretrained`` loads it back) or, with
        ``layout="diffusers"`` / ``"original"``, in the official layouts
        (:meth:`kandinsky.components.Components.save_pretrained`)."""
        self.components.save_pretrained(folder, overwrite=overwrite, layout=layout, **export_options)

    def compile_unet(self, **options) -> Kandinsky21:
        """Run the decoder UNets through ``torch.compile(unet, **options)`` from their next use on (e.g.
        ``mode="max-autotune"`` on CUDA); ``compile_unet(disable=True)`` turns it off again. The first call per
        input shape compiles (tens of seconds to minutes); results match the eager UNet to float rounding."""
        self.components.compile(**options)
        return self

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> Kandinsky21:
        """Add the LoRA adapter trained by ``kandinsky train --lora-rank`` (a ``lora.safetensors`` file, or the
        training's output folder) to the component it was trained for, its effect scaled by ``scale`` (1 = as
        trained). Adapters stack; see :mod:`kandinsky.lora`."""
        self.components.load_lora(path, scale)
        return self

    def unload_lora(self) -> Kandinsky21:
        """Remove every LoRA adapter (the base layers come back untouched: the base outputs, exactly)."""
        self.components.unload_lora()
        return self

    def fuse_lora(self) -> Kandinsky21:
        """Merge the adapters into their base weights (permanent)."""
        self.components.fuse_lora()
        return self

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
    def prior(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
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
        negatives = negative_list(negative_prompt, len(prompts))
        steps = check_steps("num_inference_steps", num_inference_steps, "unclip")
        guidance = check_guidance("guidance_scale", guidance_scale)
        per_prompt = check_positive_int("num_images_per_prompt", num_images_per_prompt)
        options = PRIOR_SAMPLERS[check_prior_sampler("sampler", sampler)]
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

        # the text positions are the same at every step: through the blocks once, not once per step
        text_prefix = prior.encode_text(text_embeds=text_embeds, text_hidden_states=text_hidden_states,
                                        text_mask=text_mask)

        def predict(x_in: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return prior(x_in.to(dtype), timesteps, text_prefix=text_prefix)

        denoise = guided_denoiser(predict, guidance)
        rows = len(batch_prompts) * per_prompt
        x = schedulers.randn((rows, prior.config.clip_dim), generator, self.device)
        sampling = self.prior_sampling
        x = schedulers.sample("unclip", denoise, x, sampling.schedule, sampling.timesteps("unclip", steps),
                              generator=generator, progress=self.progress,
                              **sampling.options_for("unclip", steps, options))
        image_embeds = self._finite("prior", prior.denormalize(x.float()))  # float32: the buffers are cast to x's dtype
        if negatives is not None:
            image_embeds, negative_embeds = image_embeds.chunk(2)
        else:
            negative_embeds = zero_image_embeds(self.module("clip_vision"), rows).float()
        return image_embeds, negative_embeds.to(image_embeds.device)

    @torch.no_grad()
    def interpolate(self, images_and_prompts: Sequence, weights: Sequence[float], *, num_inference_steps: int = 25,
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
                unit_range("images_and_prompts", item)
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
        check_steps("num_inference_steps", num_inference_steps, "unclip")
        check_guidance("guidance_scale", guidance_scale)
        check_prior_sampler("sampler", sampler)
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

    # ---- tasks ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, prompt: str | Sequence[str], image_embeds: torch.Tensor, negative_image_embeds: torch.Tensor,
               negative_prompt: str | Sequence[str] | None = None, *, num_inference_steps: int = 100,
               guidance_scale: float = 4.0, height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
               generator: torch.Generator | None = None, sampler: str | None = None, output_type: str = "pil",
               crop: bool = False, sampler_options: dict | None = None):
        """The decoder alone (diffusers ``KandinskyPipeline``): image embeddings (from :meth:`prior`) -> images.

        ``image_embeds`` / ``negative_image_embeds`` have one row per prompt, or one row per output image
        (len(prompt) * num_images_per_prompt).
        """
        call = TaskCall.of(prompt, negative_prompt, self._settings(DecodeSettings, locals()))
        generator = self._generator(generator)
        record = self._record(call, generator)
        image_embeds, negative_image_embeds = self._expand_embeds(image_embeds, negative_image_embeds, call)
        return self._decoder(call, image_embeds, negative_image_embeds, generator, DecoderStart(), record)

    @torch.no_grad()
    def text2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 prior_guidance_scale: float = 4.0, height: int = 512, width: int = 512,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None, sampler: str | None = None,
                 output_type: str = "pil", crop: bool = False, sampler_options: dict | None = None,
                 prior_sampler: str = "unclip"):
        """Prompts -> images (diffusers ``KandinskyCombinedPipeline``, same seed -> same image).

        The prior's noise is drawn first, then the decoder's, from the one ``generator``. A negative prompt
        conditions both stages (prior: its embedding is the negative image embedding; decoder: it is the
        unconditional text), as the separate diffusers pipelines do it.

        Every task validates all its arguments before any model runs (:mod:`kandinsky.settings`):
        ``num_inference_steps`` in 1..1000 (1..999 for ddim, plms and dpmpp_2m), ``guidance_scale`` in [0, 100]
        (at most 1: no guidance), the prior's ``prior_num_inference_steps`` (1..1000), ``prior_guidance_scale``
        and ``prior_sampler`` (see :meth:`prior`). ``sampler`` (default: the pipeline's, DDIM unless built from a
        diffusers pipeline with another scheduler) is any decoder sampler. A generation that yields NaN or infinite values raises
        :class:`NonFiniteError`.
        """
        call = TaskCall.of(prompt, negative_prompt, self._settings(Text2ImgSettings, locals()))
        generator = self._generator(generator)
        record = self._record(call, generator)
        embeds = self._prior_of(call, generator)
        return self._decoder(call, *embeds, generator, DecoderStart(), record)

    @torch.no_grad()
    def img2img(self, prompt: str | Sequence[str], image, strength: float = 0.3,
                negative_prompt: str | Sequence[str] | None = None, *, num_inference_steps: int = 100,
                guidance_scale: float = 7.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
                height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
                generator: torch.Generator | None = None, sampler: str | None = None, output_type: str = "pil",
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
        call = TaskCall.of(prompt, negative_prompt, self._settings(Img2ImgSettings, locals()))
        generator = self._generator(generator)
        record = self._record(call, generator, prior=image_embeds is None)
        latents, _ = self._image_start(call, image, None)
        embeds = self._embeds_or_prior(call, image_embeds, negative_image_embeds, generator)
        latents = latents.repeat_interleave(call.settings.num_images_per_prompt, 0)
        steps, strength = call.settings.num_inference_steps, call.settings.strength
        timesteps = self.decoder_sampling.timesteps(call.settings.sampler, steps)
        timesteps = timesteps[steps - min(int(steps * strength), steps):]
        # diffusers' (and the original's) noise level: 1000 * strength - 2 (strength 1 -> t = 998)
        noise_timestep = max(int(self.decoder_sampling.schedule.num_train_timesteps * strength) - 2, 0)
        noise = schedulers.randn(latents.shape, generator, self.device)
        x = schedulers.add_noise(latents, noise, noise_timestep, self.img2img_schedule)
        return self._decoder(call, *embeds, generator, DecoderStart(x=x, timesteps=timesteps), record)

    @torch.no_grad()
    def inpaint(self, prompt: str | Sequence[str], image, mask_image,
                negative_prompt: str | Sequence[str] | None = None, *, num_inference_steps: int = 100,
                guidance_scale: float = 4.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
                height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
                generator: torch.Generator | None = None, sampler: str | None = None, output_type: str = "pil",
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
        call = TaskCall.of(prompt, negative_prompt, self._settings(InpaintSettings, locals()))
        generator = self._generator(generator)
        record = self._record(call, generator, prior=image_embeds is None)
        latents, mask = self._image_start(call, image, mask_image)
        embeds = self._embeds_or_prior(call, image_embeds, negative_image_embeds, generator)
        # internally 1 = keep, as both references
        keep = 1 - mask if call.settings.mask_convention == "repaint" else mask
        keep = dilate_repaint(F.interpolate(keep.to(self.device), size=latents.shape[-2:], mode="nearest"))
        per_prompt = call.settings.num_images_per_prompt
        condition = torch.cat([latents * keep, keep], dim=1).repeat_interleave(per_prompt, 0)
        known = (latents.repeat_interleave(per_prompt, 0), keep.repeat_interleave(per_prompt, 0))
        start = DecoderStart(condition=condition, known=known, unet="unet_inpaint")
        return self._decoder(call, *embeds, generator, start, record)

    @torch.no_grad()
    def mix(self, images_and_prompts: Sequence, weights: Sequence[float], *, num_inference_steps: int = 100,
            guidance_scale: float = 4.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
            negative_prior_prompt: str | None = None, negative_prompt: str = "", height: int = 512,
            width: int = 512, num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
            sampler: str | None = None, output_type: str = "pil", crop: bool = False,
            sampler_options: dict | None = None, prior_sampler: str = "unclip"):
        """Images from a weighted mix of prompts and images (:meth:`interpolate`, then the decoder with an
        empty prompt, as the original ``mix_images`` and diffusers' interpolate example do)."""
        call = TaskCall.of([""], None, self._settings(MixSettings, locals()))
        generator = self._generator(generator)
        items = images_and_prompts if isinstance(images_and_prompts, Sequence) else ()
        label = " | ".join(item if isinstance(item, str) else "<image>" for item in items)
        record = self._record(call, generator, prompts=(label,), weights=weights,
                              negative_prior_prompt=negative_prior_prompt, negative_prompt=negative_prompt)
        settings = call.settings
        embeds = self.interpolate(images_and_prompts, weights, num_inference_steps=settings.prior_num_inference_steps,
                                  guidance_scale=settings.prior_guidance_scale,
                                  negative_prior_prompt=negative_prior_prompt, negative_prompt=negative_prompt,
                                  generator=generator, sampler=settings.prior_sampler)
        embeds = self._expand_embeds(*embeds, call)
        return self._decoder(call, *embeds, generator, DecoderStart(), record)

    # ---- task internals ---------------------------------------------------------------------------------

    def _settings(self, cls, values: dict):
        """A task's settings from its arguments; ``sampler=None`` is the decoder's own (DDIM, or the sampler of the
        diffusers scheduler the pipeline was built from)."""
        if values.get("sampler") is None:
            values = {**values, "sampler": self.decoder_sampling.sampler}
        return cls.from_values(values)

    def _size(self, call: TaskCall) -> tuple[int, int]:
        """The requested size rounded up for the MoVQ (64 px multiples for the official one)."""
        settings = call.settings
        return rounded_size(settings.height, settings.width, self.module("movq").config.downsample_factor)

    def _prior_of(self, call: TaskCall, generator):
        settings = call.settings
        return self.prior(call.prompts, negative_prompt=call.negatives,
                          num_inference_steps=settings.prior_num_inference_steps,
                          guidance_scale=settings.prior_guidance_scale,
                          num_images_per_prompt=settings.num_images_per_prompt, generator=generator,
                          sampler=settings.prior_sampler)

    def _expand_embeds(self, image_embeds, negative_image_embeds, call: TaskCall):
        rows, count = call.rows, len(call.prompts)
        out = []
        for name, embeds in (("image_embeds", image_embeds), ("negative_image_embeds", negative_image_embeds)):
            if isinstance(embeds, (list, tuple)):
                embeds = torch.cat(list(embeds))
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or not embeds.is_floating_point():
                raise ValueError(f"{name}: expected a (B, D) float tensor, got "
                                 f"{getattr(embeds, 'shape', type(embeds))} {getattr(embeds, 'dtype', '')}")
            check_finite(name, embeds, MAX_EMBED)
            if embeds.shape[0] == count and rows != count:
                embeds = embeds.repeat_interleave(call.settings.num_images_per_prompt, 0)
            elif embeds.shape[0] == 1 and rows != 1:
                embeds = embeds.expand(rows, -1)
            if embeds.shape[0] != rows:
                raise ValueError(f"{name}: expected {count} or {rows} rows, got {embeds.shape[0]}")
            if out and embeds.shape[1] != out[0].shape[1]:
                raise ValueError(f"{name}: expected the width of image_embeds ({out[0].shape[1]}), got {embeds.shape[1]}")
            out.append(embeds.float().to(self.device))
        return out

    def _embeds_or_prior(self, call: TaskCall, image_embeds, negative_image_embeds, generator):
        if (image_embeds is None) != (negative_image_embeds is None):
            raise ValueError("image_embeds, negative_image_embeds: pass both or neither")
        if image_embeds is None:
            return self._prior_of(call, generator)
        return self._expand_embeds(image_embeds, negative_image_embeds, call)

    def _image_start(self, call: TaskCall, image, mask_image) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``image`` (and ``mask_image``, if not None) read at the rounded size, one per prompt: the image's MoVQ
        latents (B, 4, h, w) float32 and the mask (B, 1, H, W), B = len(call.prompts)."""
        height, width = self._size(call)
        pixels, image_size = images_to_tensor(image, height, width)
        mask = None if mask_image is None else mask_to_tensor(mask_image, height, width, image_size)
        if mask is not None and mask.shape[0] not in (1, pixels.shape[0]) and pixels.shape[0] != 1:
            raise ValueError(f"mask_image: expected 1 or {pixels.shape[0]} masks (one per image), got {mask.shape[0]}")
        pixels = match_batch("image", pixels, len(call.prompts))
        if mask is not None:
            mask = match_batch("mask_image", mask, len(call.prompts))
        latents = self.module("movq").encode(pixels.to(self.device, self.dtype)).float()
        return latents, mask

    def _decoder(self, call: TaskCall, image_embeds, negative_image_embeds, generator, start: DecoderStart,
                 record: dict | None):
        """Guided sampling of the UNet from ``start`` (unit noise by default) and MoVQ decoding; ``record``
        (:meth:`_record`): what each PIL image's ``info`` then carries."""
        settings, dtype = call.settings, self.dtype
        per_prompt, condition = settings.num_images_per_prompt, start.condition
        tokenizer, mclip = self.tokenizer("mclip_tokenizer"), self.module("mclip")

        def encode(texts: list[str]):
            embeds, hidden, _ = encode_multilingual(tokenizer, mclip, texts)
            return embeds.repeat_interleave(per_prompt, 0), hidden.repeat_interleave(per_prompt, 0)

        text_embeds, text_hidden_states = encode(call.prompts)
        if settings.guidance_scale > 1.0:  # [unconditional, conditional]
            uncond_embeds, uncond_hidden = encode(call.negatives or [""] * len(call.prompts))
            text_embeds = torch.cat([uncond_embeds, text_embeds])
            text_hidden_states = torch.cat([uncond_hidden, text_hidden_states])
            image_embeds = torch.cat([negative_image_embeds, image_embeds])
            if condition is not None:
                condition = torch.cat([condition, condition])
        text_embeds, text_hidden_states = text_embeds.to(dtype), text_hidden_states.to(dtype)
        image_embeds = image_embeds.to(self.device, dtype)
        unet = self.components.runnable(start.unet)

        def predict(x_in: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            if condition is not None:
                x_in = torch.cat([x_in, condition], dim=1)
            return unet(x_in.to(dtype), timesteps, text_hidden_states=text_hidden_states, text_embeds=text_embeds,
                        image_embeds=image_embeds)

        # the 4 noise channels are guided; the 4 learned-variance channels come from the conditional half
        denoise = guided_denoiser(predict, settings.guidance_scale, guided_channels=4)
        return self._output(call, self._sample_latents(call, denoise, start, generator), record)

    def _record(self, call: TaskCall, generator, *, prior: bool = True, prompts: Sequence[str] | None = None,
                **inputs) -> dict:
        """What the PIL images of a call carry in their ``info`` (:func:`kandinsky.png.png_text`): the call's
        settings, where the weights came from, the adapters, each image's prompt (``prompts``, one per prompt of
        the call, by default its prompts) and seed (known if the generator had not drawn before the call)."""
        components = self.components
        values = recorded_settings(call.settings.recorded(), dtype=self.dtype, source=components.source,
                                   adapters=[adapter.describe() for adapter in components.adapters], **inputs)
        if not prior:  # the caller gave the image embeddings: no prior ran
            for name in ("prior_num_inference_steps", "prior_guidance_scale", "prior_sampler"):
                values.pop(name, None)
        return {"settings": values, "seeds": initial_seeds(generator), "prompts": tuple(prompts or call.prompts)}

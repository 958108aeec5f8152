"""Kandinsky 2.2 end to end: prompt -> prior -> CLIP (ViT-bigG) image embedding -> image-conditioned UNet -> MoVQ.

:class:`Kandinsky22` runs the tasks of :class:`~kandinsky.pipeline.Kandinsky21` with the same names and arguments
(:meth:`~Kandinsky22.text2img`, :meth:`~Kandinsky22.img2img`, :meth:`~Kandinsky22.inpaint`,
:meth:`~Kandinsky22.mix`, with :meth:`~Kandinsky22.prior`, :meth:`~Kandinsky22.interpolate` and
:meth:`~Kandinsky22.decode` for the stages alone), and the ControlNet tasks :meth:`~Kandinsky22.controlnet` and
:meth:`~Kandinsky22.controlnet_img2img` (a depth hint), on a :class:`~kandinsky.components.Components` store whose
UNets are Kandinsky 2.2's (``UNetConfig.conditioning`` ``"image"`` / ``"image_hint"``) and which needs no M-CLIP.

What differs from 2.1, as diffusers 0.42.1's ``KandinskyV22*Pipeline`` do it (same seed -> same image):

* the decoder reads no text: a prompt conditions the prior only (a negative prompt: the prior's negative image
  embedding); the prior stage is 2.1's, at ViT-bigG's widths (1280);
* img2img noises the image latents with the decoder's own schedule, at the first of its remaining timesteps
  (2.1: Ho et al.'s betas at ``1000 * strength - 2``); its guidance defaults to 4 (2.1: 7);
* inpainting puts the known region back after every step: the image latents noised to the next timestep with
  the initial noise (un-noised after the last step);
* the ControlNet UNet reads a hint image (a depth map, (B, 3, H, W) in [0, 1] at the image size).

Example::

    from kandinsky import Kandinsky22, save_png
    pipe = Kandinsky22.from_config("tiny", seed=0)
    image = pipe.text2img("red cat, 4k photo", height=64, width=64, num_inference_steps=4)[0]
    depth = pipe.controlnet("a robot", hint, height=64, width=64, num_inference_steps=4)[0]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from kandinsky import schedulers
from kandinsky.components import Components
from kandinsky.images import images_to_tensor
from kandinsky.pipeline.common import (DecoderStart, TaskCall, guided_denoiser, match_batch,
                                       scheduler_sampling)
from kandinsky.pipeline.k21 import Kandinsky21
from kandinsky.settings import ControlNetImg2ImgSettings, ControlNetSettings, Img2ImgSettings

MODEL = "2.2"  # what the store's ``source`` records (the PNG metadata's ``weights.model``)


class Kandinsky22(Kandinsky21):
    """The Kandinsky 2.2 pipeline: prior (CLIP text -> CLIP image embedding) + decoder (UNet + MoVQ).

    Build it with :meth:`from_config` (seeded random weights, e.g. the tiny pipeline), :meth:`from_diffusers`
    (live diffusers 2.2 pipelines), from a :class:`~kandinsky.components.Components` store holding 2.2 models, or
    from modules: ``Kandinsky22(unet=..., unet_controlnet=..., movq=..., ...)`` takes the arguments of
    :class:`~kandinsky.components.Components`. The store needs ``unet`` for text2img / img2img / mix / decode,
    ``unet_inpaint`` for inpaint, ``unet_controlnet`` for the ControlNet tasks; no M-CLIP. Everything else
    (devices, dtypes, offloading, ``compile_unet``, LoRA adapters, saving) is :class:`Kandinsky21`'s.
    """

    def __init__(self, components: Components | None = None, *, progress: bool = True, **options):
        super().__init__(components, progress=progress, **options)
        self.components.source.setdefault("model", MODEL)

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = "kandinsky-community/kandinsky-2-2-decoder", *,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        offload: str | None = None, progress: bool = True, **options) -> Kandinsky22:
        """Kandinsky 2.2 weights from the hub, a local folder or ``"tiny"`` / ``"tiny:SEED"`` (:meth:`from_config`),
        each component converted once into the cache and loaded memory-mapped when a task first needs it
        (:func:`kandinsky.hub.resolve` with ``model="2.2"``).

        ``source``: the decoder repository ``kandinsky-community/kandinsky-2-2-decoder`` (the default; its siblings
        ``-2-2-prior``, ``-2-2-decoder-inpaint`` and ``-2-2-controlnet-depth`` give the prior and CLIP ViT-bigG
        towers, the inpainting UNet and the ControlNet UNet), a local folder in diffusers' layout (its siblings
        named the same way beside it, or a ``save_pretrained(..., layout="diffusers")`` export) or in ours (what
        :meth:`save_pretrained` writes). ``options``: ``prior_source``, ``inpaint_source``, ``controlnet_source``
        (other repositories or folders for those), ``clip_source``, ``revision``, ``cache_dir``, as
        :meth:`kandinsky.components.Components.from_pretrained` takes them.

        The decoder samples as the source's decoder scheduler config says (``scheduler/scheduler_config.json``:
        kandinsky-2-2-decoder's ``DDPMScheduler``, :func:`kandinsky.convert.scheduler.sampling_from_diffusers`);
        without one, with Kandinsky's default (DDIM). That small file is read here, when the pipeline is built
        (downloaded once into the cache); the models are read when a task needs them."""
        from kandinsky.convert.scheduler import sampling_from_diffusers
        from kandinsky.hub import tiny_seed

        seed = tiny_seed(source)
        if seed is not None:
            return cls.from_config("tiny", seed=seed, device=device, dtype=dtype, offload=offload, progress=progress)
        if options.get("model", MODEL) != MODEL:
            raise ValueError(f"model: Kandinsky22 loads Kandinsky 2.2 weights, got model={options['model']!r}")
        components = Components.from_pretrained(source, device=device, dtype=dtype, offload=offload,
                                                **{**options, "model": MODEL})
        config = components.scheduler_config()
        return cls(components, progress=progress,
                   decoder_sampling=None if config is None else sampling_from_diffusers(config))

    @classmethod
    def from_config(cls, name: str = "tiny", *, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, offload: str | None = None,
                    progress: bool = True) -> Kandinsky22:
        """A pipeline of seeded random weights at a named configuration, built in memory: ``"tiny"`` (the only
        name) is every 2.2 component at a few hundred kB (:func:`kandinsky.tiny.components_22`), the three UNets
        included; images are multiples of 64 px, as with the real weights."""
        if name != "tiny":
            raise ValueError(f"name: expected 'tiny', got {name!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        from kandinsky import tiny

        return cls(Components(**tiny.components_22(seed), device=device, dtype=dtype, offload=offload,
                              source={"source": f"tiny:{seed}", "model": MODEL}), progress=progress)

    @classmethod
    def from_diffusers(cls, prior_pipeline, decoder_pipeline, *, inpaint_pipeline=None, controlnet_pipeline=None,
                       device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                       offload: str | None = None, progress: bool = True) -> Kandinsky22:
        """From live diffusers pipelines: a ``KandinskyV22PriorPipeline`` and a ``KandinskyV22Pipeline`` /
        ``KandinskyV22Img2ImgPipeline`` (4-channel UNet), optionally a ``KandinskyV22InpaintPipeline`` (9-channel
        UNet) and a ``KandinskyV22ControlnetPipeline`` / ``KandinskyV22ControlnetImg2ImgPipeline`` (hint UNet); see
        :meth:`kandinsky.components.Components.from_diffusers`. The MoVQ comes from ``decoder_pipeline``, and so do
        the decoder's sampler settings (its scheduler's config), the prior's from ``prior_pipeline``'s."""
        components = Components.from_diffusers(prior_pipeline, decoder_pipeline, inpaint_pipeline=inpaint_pipeline,
                                               controlnet_pipeline=controlnet_pipeline, device=device, dtype=dtype,
                                               offload=offload)
        return cls(components, progress=progress, prior_sampling=scheduler_sampling(prior_pipeline.scheduler),
                   decoder_sampling=scheduler_sampling(decoder_pipeline.scheduler))

    # ---- tasks ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def img2img(self, prompt: str | Sequence[str], image, strength: float = 0.3,
                negative_prompt: str | Sequence[str] | None = None, *, num_inference_steps: int = 100,
                guidance_scale: float = 4.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
                height: int = 512, width: int = 512, num_images_per_prompt: int = 1,
                generator: torch.Generator | None = None, sampler: str | None = None, output_type: str = "pil",
                crop: bool = False, image_embeds: torch.Tensor | None = None,
                negative_image_embeds: torch.Tensor | None = None, sampler_options: dict | None = None,
                prior_sampler: str = "unclip"):
        """Repaint ``image`` towards ``prompt`` (diffusers ``KandinskyV22Img2ImgPipeline``, its defaults: strength
        0.3, guidance 4).

        The image is resized to the (rounded) size, MoVQ-encoded, noised with the decoder's schedule at the first
        of the last ``int(steps * strength)`` sampler timesteps, which are then run. Pass ``image_embeds`` /
        ``negative_image_embeds`` to skip the prior.
        """
        call = TaskCall.of(prompt, negative_prompt, self._settings(Img2ImgSettings, locals()))
        return self._img2img(call, image, None, generator, image_embeds, negative_image_embeds)

    @torch.no_grad()
    def controlnet(self, prompt: str | Sequence[str], hint, negative_prompt: str | Sequence[str] | None = None, *,
                   num_inference_steps: int = 100, guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                   prior_guidance_scale: float = 4.0, height: int = 512, width: int = 512,
                   num_images_per_prompt: int = 1, generator: torch.Generator | None = None, sampler: str | None = None,
                   output_type: str = "pil", crop: bool = False, image_embeds: torch.Tensor | None = None,
                   negative_image_embeds: torch.Tensor | None = None, sampler_options: dict | None = None,
                   prior_sampler: str = "unclip"):
        """Prompts -> images that follow ``hint`` (diffusers ``KandinskyV22ControlnetPipeline``, the
        ``unet_controlnet`` of the store; kandinsky-2-2-controlnet-depth reads a depth map).

        ``hint``: one image per prompt or one for all, as PIL images, arrays (H, W, 3) or float tensors
        (B, 3, H, W) in [0, 1] (what diffusers takes); it is resized to the (rounded) image size. Every other
        argument is :meth:`text2img`'s; pass ``image_embeds`` / ``negative_image_embeds`` to skip the prior.
        """
        call = TaskCall.of(prompt, negative_prompt, self._settings(ControlNetSettings, locals()))
        generator = self._generator(generator)
        record = self._record(call, generator, prior=image_embeds is None)
        hints = self._hints(call, hint)
        embeds = self._embeds_or_prior(call, image_embeds, negative_image_embeds, generator)
        return self._decoder(call, *embeds, generator, DecoderStart(hint=hints, unet="unet_controlnet"), record)

    @torch.no_grad()
    def controlnet_img2img(self, prompt: str | Sequence[str], image, hint, strength: float = 0.3,
                           negative_prompt: str | Sequence[str] | None = None, *, num_inference_steps: int = 100,
                           guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                           prior_guidance_scale: float = 4.0, height: int = 512, width: int = 512,
                           num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
                           sampler: str | None = None, output_type: str = "pil", crop: bool = False,
                           image_embeds: torch.Tensor | None = None, negative_image_embeds: torch.Tensor | None = None,
                           sampler_options: dict | None = None, prior_sampler: str = "unclip"):
        """Repaint ``image`` towards ``prompt`` following ``hint`` (diffusers
        ``KandinskyV22ControlnetImg2ImgPipeline``): :meth:`img2img` with the ControlNet UNet; ``hint`` as in
        :meth:`controlnet`."""
        call = TaskCall.of(prompt, negative_prompt, self._settings(ControlNetImg2ImgSettings, locals()))
        return self._img2img(call, image, hint, generator, image_embeds, negative_image_embeds)

    # ---- task internals ---------------------------------------------------------------------------------

    def _img2img(self, call: TaskCall, image, hint, generator, image_embeds, negative_image_embeds):
        """img2img, with the ControlNet UNet when ``hint`` is given. Random draws in diffusers' order: the prior's
        noise, then the image latents' noise."""
        generator = self._generator(generator)
        record = self._record(call, generator, prior=image_embeds is None)
        latents, _ = self._image_start(call, image, None)
        hints = None if hint is None else self._hints(call, hint)
        embeds = self._embeds_or_prior(call, image_embeds, negative_image_embeds, generator)
        settings = call.settings
        latents = latents.repeat_interleave(settings.num_images_per_prompt, 0)
        steps, strength = settings.num_inference_steps, settings.strength
        timesteps = self.decoder_sampling.timesteps(settings.sampler, steps)
        timesteps = timesteps[steps - min(int(steps * strength), steps):]
        noise = schedulers.randn(latents.shape, generator, self.device)
        x = latents if len(timesteps) == 0 else self._noised(latents, noise, float(timesteps[0]))
        start = DecoderStart(x=x, timesteps=timesteps, hint=hints, unet="unet" if hint is None else "unet_controlnet")
        return self._decoder(call, *embeds, generator, start, record)

    def _noised(self, latents: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """``latents`` noised to timestep ``t`` of the decoder's schedule, in the samplers' (VP) convention; a
        fractional ``t`` (euler_a's timesteps) through its interpolated sigma."""
        schedule = self.decoder_sampling.schedule
        if t == int(t):
            return schedulers.add_noise(latents, noise, int(t), schedule)
        sigma = schedulers.sigma_at(schedule, t)
        return (latents + sigma * noise) / math.sqrt(1 + sigma ** 2)

    def _hints(self, call: TaskCall, hint) -> torch.Tensor:
        """``hint`` at the rounded size in [0, 1], one row per output image: (call.rows, 3, H, W) float32."""
        height, width = self._size(call)
        pixels, _ = images_to_tensor(hint, height, width)  # [-1, 1]
        hints = match_batch("hint", (pixels + 1) / 2, len(call.prompts))
        return hints.repeat_interleave(call.settings.num_images_per_prompt, 0).to(self.device)

    def _blend_known(self, known: tuple[torch.Tensor, torch.Tensor], sampler: str):
        """The step function of 2.2 inpainting: after each step the kept region (``keep`` = 1) becomes the image
        latents noised to the next timestep with the initial noise (after the last step: the latents)."""
        latents, keep = known
        schedule = self.decoder_sampling.schedule

        def step_fn(i: int, t, x: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> None:
            last = i + 1 >= len(timesteps)
            if sampler == "euler_a":  # its x is in sigma space: x0 + sigma * noise
                sigma = 0.0 if last else schedulers.sigma_at(schedule, float(timesteps[i + 1]))
                target = latents + sigma * noise
            else:
                target = latents if last else schedulers.add_noise(latents, noise, int(timesteps[i + 1]), schedule)
            x.copy_(keep * target + (1 - keep) * x)  # in place: the sampler goes on from it

        return step_fn

    def _decoder(self, call: TaskCall, image_embeds, negative_image_embeds, generator, start: DecoderStart,
                 record: dict | None):
        """Guided sampling of the image-conditioned UNet ``start.unet`` from ``start`` and MoVQ decoding; the
        inputs of every task (2.1's ``_decoder`` contract: the prompts condition nothing here)."""
        settings, dtype = call.settings, self.dtype
        condition, hint = start.condition, start.hint
        if settings.guidance_scale > 1.0:  # [unconditional, conditional]
            image_embeds = torch.cat([negative_image_embeds, image_embeds])
            condition = None if condition is None else torch.cat([condition, condition])
            hint = None if hint is None else torch.cat([hint, hint])
        image_embeds = image_embeds.to(self.device, dtype)
        hint = None if hint is None else hint.to(self.device, dtype)
        unet = self.components.runnable(start.unet)

        def predict(x_in: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            if condition is not None:
                x_in = torch.cat([x_in, condition], dim=1)
            return unet(x_in.to(dtype), timesteps, image_embeds=image_embeds, hint=hint)

        # the 4 noise channels are guided; the 4 learned-variance channels come from the conditional half
        denoise = guided_denoiser(predict, settings.guidance_scale, guided_channels=4)
        step_fn = None if start.known is None else self._blend_known(start.known, settings.sampler)
        x = self._sample_latents(call, denoise, start, generator, step_fn)
        return self._output(call, x, record)

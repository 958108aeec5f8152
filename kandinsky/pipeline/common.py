"""What every Kandinsky pipeline shares: classifier-free guidance, the inpainting mask's latent dilation, a task
call's prompts and settings, where the decoder starts from, the seeds a PIL image records, and the decoder's
sampling loop and output (:class:`DecoderSteps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kandinsky import schedulers
from kandinsky.images import to_output
from kandinsky.png import png_text
from kandinsky.settings import DecodeSettings
from kandinsky.validation import prompt_list


class NonFiniteError(ValueError):
    """A generation produced NaN or infinite values from valid arguments: the weights hold NaN/inf, or the
    weight dtype overflowed (float16 above 65504)."""


def negative_list(negative_prompt: str | Sequence[str] | None, count: int) -> list[str] | None:
    """None, or one negative prompt per prompt (a single string applies to every prompt)."""
    if negative_prompt is None:
        return None
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != count:
        raise ValueError(f"negative_prompt: expected one negative prompt per prompt ({count}), got {len(negatives)}")
    return negatives


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


def initial_seeds(generator: torch.Generator | list[torch.Generator]) -> list[int | None]:
    """The seed of each generator when nothing was drawn from it since it was seeded (the seed then
    reproduces the call), else None."""
    seeds = []
    for g in generator if isinstance(generator, list) else [generator]:
        fresh = torch.Generator(g.device).manual_seed(g.initial_seed())
        seeds.append(g.initial_seed() if torch.equal(fresh.get_state(), g.get_state()) else None)
    return seeds


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


def original_x0_fn(known: tuple[torch.Tensor, torch.Tensor] | None) -> Callable:
    """The original's ``denoised_fn`` of its p_sampler path: x0 clamped to [-2, 2] at every step and, when
    inpainting, the kept region (``keep`` = 1) replaced by the image latents."""
    def x0_fn(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = x0.clamp(-2, 2)
        if known is None:
            return x0
        latents, keep = known
        return x0 * (1 - keep) + latents * keep

    return x0_fn


@dataclass(frozen=True)
class TaskCall:
    """One task call: its prompts, a negative prompt per prompt (or None: empty unconditional text), settings."""

    prompts: tuple[str, ...]
    negatives: tuple[str, ...] | None
    settings: DecodeSettings

    @classmethod
    def of(cls, prompt, negative_prompt, settings: DecodeSettings) -> TaskCall:
        prompts = prompt_list(prompt)
        negatives = negative_list(negative_prompt, len(prompts))
        return cls(tuple(prompts), None if negatives is None else tuple(negatives), settings)

    @property
    def rows(self) -> int:
        """Images the call makes: prompts x images per prompt."""
        return len(self.prompts) * self.settings.num_images_per_prompt


@dataclass
class DecoderStart:
    """Where the decoder starts from: noised image latents and their timesteps (img2img), the UNet's extra input
    channels and the known latents (inpainting), the ControlNet hint (B, 3, H, W) in [0, 1] (Kandinsky 2.2)."""

    x: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    known: tuple[torch.Tensor, torch.Tensor] | None = None
    unet: str = "unet"
    hint: torch.Tensor | None = None



def scheduler_sampling(scheduler) -> schedulers.Sampling:
    """The :class:`~kandinsky.schedulers.Sampling` of a live diffusers scheduler (whose config lacks its class
    name), through :func:`kandinsky.convert.scheduler.sampling_from_diffusers`."""
    from kandinsky.convert.scheduler import sampling_from_diffusers

    return sampling_from_diffusers({**scheduler.config, "_class_name": type(scheduler).__name__})


def match_batch(name: str, tensor: torch.Tensor, count: int) -> torch.Tensor:
    if tensor.shape[0] == count:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(count, *tensor.shape[1:])
    raise ValueError(f"{name}: expected 1 or {count} (one per prompt), got {tensor.shape[0]}")


class DecoderSteps:
    """The decoder's sampling loop and its output, for a pipeline class that has ``_size(call)``, ``module(name)``,
    ``_finite(stage, values)``, ``decoder_sampling`` (a :class:`~kandinsky.schedulers.Sampling`), ``progress``,
    ``device`` and ``dtype`` (as :class:`~kandinsky.pipeline.Kandinsky21` has)."""

    def _sample_latents(self, call: TaskCall, denoise: Callable, start: DecoderStart, generator,
                        step_fn: Callable | None = None) -> torch.Tensor:
        """Guided sampling from ``start`` (unit noise at the rounded size by default, the decoder sampling's
        timesteps for the call's sampler and steps); ``step_fn(i, t, x, noise, timesteps)`` is called after each
        step (before the call's own ``sampler_options["callback"]``) with the initial noise and may change ``x``
        in place: the sampler goes on from it."""
        settings, sampling = call.settings, self.decoder_sampling
        x, timesteps = start.x, start.timesteps
        if x is None:
            height, width = self._size(call)
            factor = self.module("movq").config.downsample_factor
            x = schedulers.randn((call.rows, 4, height // factor, width // factor), generator, self.device)
        if timesteps is None:
            timesteps = sampling.timesteps(settings.sampler, settings.num_inference_steps)
        options = sampling.options_for(settings.sampler, settings.num_inference_steps, settings.sampler_options)
        if settings.sampler == "p_sampler":
            options.setdefault("x0_fn", original_x0_fn(start.known))
        if step_fn is not None:
            noise, given = x.clone(), options.get("callback")

            def callback(i, t, x_i, x0):
                step_fn(i, t, x_i, noise, timesteps)
                if given is not None:
                    given(i, t, x_i, x0)

            options["callback"] = callback
        if len(timesteps) > 0:
            x = schedulers.sample(settings.sampler, denoise, x, sampling.schedule, timesteps,
                                  generator=generator, progress=self.progress, **options)
        return self._finite("decoder UNet", x)

    def _output(self, call: TaskCall, x: torch.Tensor, record: dict | None):
        """MoVQ-decode the latents ``x``, crop (``crop=True``), convert to the output type; PIL images carry
        ``record`` (the pipeline's ``_record``) in their ``info``."""
        settings = call.settings
        images = self._finite("MoVQ decoder", self.module("movq").decode(x.to(self.dtype)).float())
        if settings.crop:
            images = images[..., :settings.height, :settings.width]  # the original keeps the top-left corner
        output = to_output(images, settings.output_type)
        if settings.output_type == "pil" and record is not None:
            prompts, seeds = record["prompts"], record["seeds"]
            for row, image in enumerate(output):
                prompt = row // settings.num_images_per_prompt
                negative = call.negatives[prompt] if call.negatives else None
                image.info.update(png_text(prompts[prompt], seeds[row % len(seeds)], row, record["settings"], negative))
        return output

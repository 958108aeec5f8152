"""Noise schedules and samplers (model-agnostic). See docs/samplers.md.

    from kandinsky.schedulers import NoiseSchedule, SAMPLERS, sampler_timesteps, sample, add_noise, randn
"""

from .samplers import (
    ARITHMETICS,
    DEFAULT_SPACING,
    SAMPLERS,
    ancestral_step,
    ddim_step,
    dpmpp_2m_step,
    dynamic_threshold,
    euler_ancestral_step,
    max_inference_steps,
    plms_eps,
    randn,
    sample,
    sampler_options,
    sampler_timesteps,
    sigma_at,
    unclip_float32_scalars,
    unclip_float32_step,
)
from .sampling import Sampling, decoder_sampling, prior_sampling
from .schedule import (NUM_TRAIN_TIMESTEPS, SPACINGS, NoiseSchedule, add_noise, decoder_schedule, img2img_schedule,
                       prior_schedule, space_timesteps, spaced_timesteps)

__all__ = [
    "Sampling",
    "prior_sampling",
    "decoder_sampling",
    "NUM_TRAIN_TIMESTEPS",
    "NoiseSchedule",
    "prior_schedule",
    "decoder_schedule",
    "img2img_schedule",
    "SAMPLERS",
    "SPACINGS",
    "DEFAULT_SPACING",
    "ARITHMETICS",
    "sampler_timesteps",
    "max_inference_steps",
    "sampler_options",
    "sample",
    "add_noise",
    "randn",
    "space_timesteps",
    "spaced_timesteps",
    "ancestral_step",
    "unclip_float32_step",
    "unclip_float32_scalars",
    "ddim_step",
    "dpmpp_2m_step",
    "euler_ancestral_step",
    "plms_eps",
    "dynamic_threshold",
    "sigma_at",
]

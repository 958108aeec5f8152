"""Noise schedules and samplers (model-agnostic). See the "Samplers" section of README.md.

    from kandinsky.schedulers import NoiseSchedule, SAMPLERS, sampler_timesteps, sample, add_noise, randn
"""

from .samplers import (
    DEFAULT_SPACING,
    SAMPLERS,
    ancestral_step,
    ddim_step,
    dpmpp_2m_step,
    dynamic_threshold,
    euler_ancestral_step,
    plms_eps,
    randn,
    sample,
    sampler_timesteps,
    sigma_at,
)
from .schedule import SPACINGS, NoiseSchedule, add_noise, space_timesteps, spaced_timesteps

__all__ = [
    "NoiseSchedule",
    "SAMPLERS",
    "SPACINGS",
    "DEFAULT_SPACING",
    "sampler_timesteps",
    "sample",
    "add_noise",
    "randn",
    "space_timesteps",
    "spaced_timesteps",
    "ancestral_step",
    "ddim_step",
    "dpmpp_2m_step",
    "euler_ancestral_step",
    "plms_eps",
    "dynamic_threshold",
    "sigma_at",
]

"""What a pipeline stage samples with, as one value: a sampler, the diffusion's noise schedule, the timestep
spacing and the sampler's options. The pipelines hold one for the prior and one for the decoder: Kandinsky's own by
default (:func:`prior_sampling`, :func:`decoder_sampling`), or what a diffusers scheduler config says
(:func:`kandinsky.convert.scheduler.sampling_from_diffusers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .samplers import SAMPLERS, sampler_timesteps
from .schedule import NoiseSchedule, decoder_schedule, prior_schedule


@dataclass(frozen=True)
class Sampling:
    """``sampler`` (a name of :data:`SAMPLERS`) on ``schedule``; ``spacing`` / ``offset`` of its timesteps (None:
    the sampler's default) and its ``options``. ``prev_stride``: the previous timestep of a step is ``t - T // n``
    (diffusers' DDIMScheduler, whatever the spacing), not the next one listed.

    The schedule is the model's diffusion and holds for every sampler; spacing, offset, options and prev_stride
    describe ``sampler`` only: another sampler asked for by a call takes its own defaults."""

    sampler: str
    schedule: NoiseSchedule
    spacing: str | None = None
    offset: int | None = None
    options: Mapping = field(default_factory=dict)
    prev_stride: bool = False

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {list(SAMPLERS)}, got {self.sampler!r}")

    def timesteps(self, sampler: str, steps: int) -> torch.Tensor:
        """The descending timesteps of ``steps`` steps of ``sampler``."""
        if sampler != self.sampler:
            return sampler_timesteps(sampler, self.schedule, steps)
        return sampler_timesteps(sampler, self.schedule, steps, spacing=self.spacing, offset=self.offset)

    def options_for(self, sampler: str, steps: int, given: Mapping | None = None) -> dict:
        """The options of ``steps`` steps of ``sampler``: this stage's (for its own sampler), then ``given``."""
        options = {}
        if sampler == self.sampler:
            options.update(self.options)
            if self.prev_stride:
                options["prev_stride"] = self.schedule.num_train_timesteps // steps
        options.update(given or {})
        return options


def prior_sampling() -> Sampling:
    """The prior's: unCLIP sampling on the squared-cosine schedule."""
    return Sampling("unclip", prior_schedule())


def decoder_sampling() -> Sampling:
    """The decoder's: DDIM ("leading" spacing, offset 1, as both references) on the linear 0.00085..0.012 schedule."""
    return Sampling("ddim", decoder_schedule())

"""The settings of each generation task, validated in one place.

One frozen dataclass per task: :class:`Text2ImgSettings`, :class:`Img2ImgSettings` (+ ``strength``),
:class:`InpaintSettings` (+ ``mask_convention``), :class:`MixSettings`, :class:`DecodeSettings` (the decoder
alone, no prior) and Kandinsky 2.2's :class:`ControlNetSettings` / :class:`ControlNetImg2ImgSettings`
(:func:`default_guidance`: 2.2's img2img guides at 4 by default, 2.1's at 7). Building one validates every field (a ``ValueError`` naming the field, what was expected and
what was given), so the Python API (:class:`~kandinsky.pipeline.Kandinsky21`'s task methods), the CLI, batch
generation and the web UI accept and refuse exactly the same values. The field names are the task methods'
keyword arguments; :meth:`~Text2ImgSettings.kwargs` gives them back for a call::

    settings = Text2ImgSettings(num_inference_steps=50, height=768, width=768)
    images = pipe.text2img("a cat", generator=generator, **settings.kwargs())

What an image's PNG metadata records of them is :meth:`~Text2ImgSettings.recorded` (see :mod:`kandinsky.png`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kandinsky import schedulers
from kandinsky.validation import check_image_side, check_in_range, check_number, check_positive_int

# The prior's samplers: diffusers' UnCLIPScheduler, float32 arithmetic included (the default: diffusers'
# images), and the same steps with the original prior's float64 arithmetic (5e-4 of the embeddings' scale away).
PRIOR_SAMPLERS = {"unclip": {}, "unclip_original": {"arithmetic": "float64"}}
DECODER_SAMPLERS = tuple(s for s in schedulers.SAMPLERS if s != "unclip")  # unclip is the prior's
OUTPUT_TYPES = ("pil", "np", "pt")
MASK_CONVENTIONS = ("repaint", "legacy")
# Bounds on finite but absurd inputs, far beyond any useful value, that would overflow to inf / NaN:
MAX_GUIDANCE = 100.0  # guidance_scale, prior_guidance_scale: values <= 1 turn guidance off
MAX_WEIGHT = 100.0  # |weights| of interpolate / mix (the references use weights summing to 1)
MAX_EMBED = 1e4  # |image_embeds|, |negative_image_embeds| (CLIP image embeddings are of order 1)


def check_sampler(name: str, sampler: object) -> str:
    if not isinstance(sampler, str) or sampler not in DECODER_SAMPLERS:
        raise ValueError(f"{name}: expected one of {list(DECODER_SAMPLERS)}, got {sampler!r}")
    return sampler


def check_prior_sampler(name: str, sampler: object) -> str:
    if not isinstance(sampler, str) or sampler not in PRIOR_SAMPLERS:
        raise ValueError(f"{name}: expected one of {list(PRIOR_SAMPLERS)}, got {sampler!r}")
    return sampler


def check_steps(name: str, steps: object, sampler: str) -> int:
    """A number of sampling steps that ``sampler``'s timesteps can take (1..1000, 1..999 for ddim, plms, dpmpp_2m)."""
    sampler = "unclip" if sampler in PRIOR_SAMPLERS else sampler
    most = schedulers.max_inference_steps(sampler, schedulers.NUM_TRAIN_TIMESTEPS)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= most:
        raise ValueError(f"{name}: expected an integer in 1..{most} for the {sampler!r} sampler, got {steps!r}")
    return int(steps)


def check_guidance(name: str, value: object) -> float:
    return check_in_range(name, value, 0.0, MAX_GUIDANCE)


def check_sampler_options(sampler: str, options: object) -> dict | None:
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ValueError(f"sampler_options: expected a dict or None, got {type(options).__name__}")
    accepted = schedulers.sampler_options(sampler)
    unknown = sorted(str(key) for key in options if key not in accepted)
    if unknown:
        raise ValueError(f"sampler_options: {unknown} not accepted by the {sampler!r} sampler; accepted: {sorted(accepted)}")
    return options


def check_choice(name: str, value: object, choices: tuple) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def rounded_size(height: int, width: int, factor: int = 8) -> tuple[int, int]:
    """(height, width) rounded up to multiples of ``factor ** 2`` px (64 for the MoVQ's factor 8), as both
    references do: the latents (size / factor) must survive the UNet's three halvings."""
    height, width = check_image_side("height", height), check_image_side("width", width)
    multiple = factor * factor
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


@dataclass(frozen=True)
class DecodeSettings:
    """The decoder's settings (:meth:`~kandinsky.pipeline.Kandinsky21.decode`: image embeddings -> images)."""

    task: ClassVar[str] = "decode"
    num_inference_steps: int = 100
    guidance_scale: float = 4.0
    height: int = 512
    width: int = 512
    num_images_per_prompt: int = 1
    sampler: str = "ddim"
    output_type: str = "pil"
    crop: bool = False
    sampler_options: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        sampler = check_sampler("sampler", self.sampler)
        rounded_size(self.height, self.width)
        checked = dict(num_inference_steps=check_steps("num_inference_steps", self.num_inference_steps, sampler),
                       guidance_scale=check_guidance("guidance_scale", self.guidance_scale),
                       height=int(self.height), width=int(self.width),
                       num_images_per_prompt=check_positive_int("num_images_per_prompt", self.num_images_per_prompt),
                       output_type=check_choice("output_type", self.output_type, OUTPUT_TYPES),
                       crop=_check_bool("crop", self.crop),
                       sampler_options=check_sampler_options(sampler, self.sampler_options))
        checked.update(self._checked())
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def _checked(self) -> dict:
        """The validated values of the fields a subclass adds."""
        return {}

    def kwargs(self) -> dict:
        """The fields as keyword arguments of the task method."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def recorded(self) -> dict:
        """What a PNG's metadata records: the task and every field but ``output_type`` and ``sampler_options``
        (a callable, in general, which no file can hold)."""
        values = {"task": self.task}
        values.update({k: v for k, v in self.kwargs().items() if k not in ("output_type", "sampler_options")})
        return values

    @classmethod
    def from_values(cls, values: dict) -> DecodeSettings:
        """The settings from a mapping holding (at least) their fields, e.g. a task method's ``locals()``;
        other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclass(frozen=True)
class Text2ImgSettings(DecodeSettings):
    """:meth:`~kandinsky.pipeline.Kandinsky21.text2img`: the decoder's settings and the prior's (``prior_*``)."""

    task: ClassVar[str] = "text2img"
    prior_num_inference_steps: int = 25
    prior_guidance_scale: float = 4.0
    prior_sampler: str = "unclip"

    def _checked(self) -> dict:
        return dict(prior_num_inference_steps=check_steps("prior_num_inference_steps",
                                                          self.prior_num_inference_steps, "unclip"),
                    prior_guidance_scale=check_guidance("prior_guidance_scale", self.prior_guidance_scale),
                    prior_sampler=check_prior_sampler("prior_sampler", self.prior_sampler))


@dataclass(frozen=True)
class Img2ImgSettings(Text2ImgSettings):
    """:meth:`~kandinsky.pipeline.Kandinsky21.img2img` (diffusers' defaults: strength 0.3, guidance 7)."""

    task: ClassVar[str] = "img2img"
    guidance_scale: float = 7.0
    strength: float = 0.3

    def _checked(self) -> dict:
        strength = check_number("strength", self.strength)
        if not 0 < strength <= 1:
            raise ValueError(f"strength: expected a number in (0, 1], got {strength}")
        return {**super()._checked(), "strength": strength}


@dataclass(frozen=True)
class InpaintSettings(Text2ImgSettings):
    """:meth:`~kandinsky.pipeline.Kandinsky21.inpaint`; ``mask_convention`` ``"repaint"`` (white = repaint) or
    ``"legacy"`` (the original code's: white = keep)."""

    task: ClassVar[str] = "inpaint"
    mask_convention: str = "repaint"

    def _checked(self) -> dict:
        return {**super()._checked(),
                "mask_convention": check_choice("mask_convention", self.mask_convention, MASK_CONVENTIONS)}


@dataclass(frozen=True)
class MixSettings(Text2ImgSettings):
    """:meth:`~kandinsky.pipeline.Kandinsky21.mix` (its items and weights are inputs, not settings)."""

    task: ClassVar[str] = "mix"


@dataclass(frozen=True)
class ControlNetSettings(Text2ImgSettings):
    """:meth:`~kandinsky.pipeline.Kandinsky22.controlnet` (Kandinsky 2.2): text2img's settings (the hint is an
    input, not a setting)."""

    task: ClassVar[str] = "controlnet"


@dataclass(frozen=True)
class ControlNetImg2ImgSettings(Img2ImgSettings):
    """:meth:`~kandinsky.pipeline.Kandinsky22.controlnet_img2img` (Kandinsky 2.2): img2img's settings (diffusers'
    defaults: strength 0.3, guidance 4)."""

    task: ClassVar[str] = "controlnet_img2img"
    guidance_scale: float = 4.0


TASK_SETTINGS = {cls.task: cls for cls in (Text2ImgSettings, Img2ImgSettings, InpaintSettings, MixSettings,
                                           DecodeSettings, ControlNetSettings, ControlNetImg2ImgSettings)}
# The decoder guidance a task uses when none is given, by model: 2.2's img2img (diffusers'
# KandinskyV22Img2ImgPipeline, and Kandinsky22.img2img) guides at 4, 2.1's at 7; every other task at 4.
MODELS = ("2.1", "2.2")
GUIDANCE_DEFAULTS = {("2.1", "img2img"): 7.0}


def default_guidance(task: str, model: str = "2.1") -> float:
    """The decoder guidance scale ``task`` uses by default with a Kandinsky ``model`` ("2.1" or "2.2")."""
    return GUIDANCE_DEFAULTS.get((model, task), 4.0)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return bool(value)

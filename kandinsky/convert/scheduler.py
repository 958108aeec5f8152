"""diffusers scheduler configs -> our :class:`~kandinsky.schedulers.Sampling`: the sampler, noise schedule,
timestep spacing and options that make our samplers take diffusers' steps. Every key is either mapped, without
effect on the result (``_class_name``, ``_diffusers_version``, ...), or refused with one line naming it when our
samplers have no equivalent: nothing is converted approximately. docs/conversion.md tabulates every key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from kandinsky.schedulers import NoiseSchedule, Sampling

# keys that never change what a Kandinsky pipeline computes
_IGNORED = {"_class_name", "_diffusers_version", "_use_default_values", "_name_or_path"}
_DDIM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
                  "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                  "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
                  "rescale_betas_zero_snr": False}
_DDPM_DEFAULTS = {**_DDIM_DEFAULTS, "variance_type": "fixed_small", "clip_sample": True}
_DDPM_DEFAULTS.pop("set_alpha_to_one")
_UNCLIP_DEFAULTS = {"num_train_timesteps": 1000, "variance_type": "fixed_small_log", "clip_sample": True,
                    "clip_sample_range": 1.0, "prediction_type": "epsilon", "beta_schedule": "squaredcos_cap_v2"}
# diffusers' DDIM / DDPM "timestep_spacing" -> ours (spacing name, whether steps_offset applies)
_SPACINGS = {"leading": ("leading", True), "trailing": ("trailing", False), "linspace": ("linspace_rounded", False)}


def sampling_from_diffusers(config: Mapping) -> Sampling:
    """The :class:`~kandinsky.schedulers.Sampling` of a diffusers ``DDIMScheduler``, ``DDPMScheduler`` or
    ``UnCLIPScheduler`` config (a scheduler's ``.config`` or its ``scheduler_config.json``); other schedulers and
    keys without an equivalent are a ``ValueError`` naming them."""
    config = dict(config)
    name = config.get("_class_name")
    readers = {"DDIMScheduler": _ddim, "DDPMScheduler": _ddpm, "UnCLIPScheduler": _unclip}
    if name not in readers:
        raise ValueError(f"scheduler _class_name: {name!r} has no equivalent here; expected one of {sorted(readers)}")
    return readers[name](config)


# keys of the other diffusers schedulers: a config copied between classes keeps them (kandinsky-community's DDPM
# configs carry DDIM's set_alpha_to_one), and diffusers ignores those its class does not take; so do we. A name
# no scheduler uses is refused as a probable typo.
_OTHER_SCHEDULERS_KEYS = (set(_DDIM_DEFAULTS) | set(_DDPM_DEFAULTS) | set(_UNCLIP_DEFAULTS)
                          | {"skip_prk_steps", "use_karras_sigmas", "interpolation_type", "timestep_type", "sigma_min",
                             "sigma_max", "algorithm_type", "solver_order", "lower_order_final"})


def _values(config: dict, defaults: dict, name: str) -> dict:
    unknown = sorted(set(config) - set(defaults) - _IGNORED - _OTHER_SCHEDULERS_KEYS)
    if unknown:
        raise ValueError(f"{name} config: unknown keys {unknown}")
    return {**defaults, **{k: v for k, v in config.items() if k in defaults}}


def _refuse(name: str, key: str, value, why: str) -> None:
    raise ValueError(f"{name} config[{key!r}] = {value!r}: {why}")


def _schedule(values: dict, name: str) -> NoiseSchedule:
    """The betas diffusers' ``betas_for_alpha_bar`` / ``linspace`` give for the config (in float64 here)."""
    steps = values["num_train_timesteps"]
    if values.get("rescale_betas_zero_snr"):
        _refuse(name, "rescale_betas_zero_snr", True, "zero-terminal-SNR betas have no equivalent here")
    if values.get("trained_betas") is not None:
        return NoiseSchedule(torch.tensor(values["trained_betas"], dtype=torch.float64))
    kind = values["beta_schedule"]
    if kind == "linear":
        return NoiseSchedule.linear(steps, values["beta_start"], values["beta_end"])
    if kind == "scaled_linear":
        start, end = math.sqrt(values["beta_start"]), math.sqrt(values["beta_end"])
        return NoiseSchedule(torch.linspace(start, end, steps, dtype=torch.float64) ** 2)
    if kind == "squaredcos_cap_v2":
        return NoiseSchedule.squared_cosine(steps)
    _refuse(name, "beta_schedule", kind, "expected linear, scaled_linear or squaredcos_cap_v2")


def _prediction(values: dict, name: str) -> str:
    if values["prediction_type"] not in ("epsilon", "sample"):
        _refuse(name, "prediction_type", values["prediction_type"], "expected epsilon or sample")
    return values["prediction_type"]


def _spacing(values: dict, name: str) -> tuple[str, int]:
    spacing = values["timestep_spacing"]
    if spacing not in _SPACINGS:
        _refuse(name, "timestep_spacing", spacing, f"expected one of {sorted(_SPACINGS)}")
    ours, offset_applies = _SPACINGS[spacing]
    return ours, values["steps_offset"] if offset_applies else 0


def _ddim(config: dict) -> Sampling:
    values = _values(config, _DDIM_DEFAULTS, "DDIMScheduler")
    if values["thresholding"]:
        _refuse("DDIMScheduler", "thresholding", True, "our DDIM has no dynamic thresholding")
    if values["clip_sample"]:
        _refuse("DDIMScheduler", "clip_sample", True, "our DDIM does not clip x0 (the Kandinsky configs do not)")
    spacing, offset = _spacing(values, "DDIMScheduler")
    options = {"prediction": _prediction(values, "DDIMScheduler"), "set_alpha_to_one": values["set_alpha_to_one"]}
    return Sampling("ddim", _schedule(values, "DDIMScheduler"), spacing, offset, options, prev_stride=True)


def _ddpm(config: dict) -> Sampling:
    values = _values(config, _DDPM_DEFAULTS, "DDPMScheduler")
    if values["variance_type"] not in ("learned_range", "fixed_small"):
        _refuse("DDPMScheduler", "variance_type", values["variance_type"],
                "expected learned_range (the UNet's predicted variance: kandinsky-2-1's ddpm_scheduler) or "
                "fixed_small (the posterior variance: kandinsky-2-2-decoder)")
    options = {"prediction": _prediction(values, "DDPMScheduler"), "variance": values["variance_type"],
               "thresholding": values["thresholding"],
               "dynamic_thresholding_ratio": values["dynamic_thresholding_ratio"],
               "sample_max_value": values["sample_max_value"]}
    if values["clip_sample"] and not values["thresholding"]:
        bound = float(values["clip_sample_range"])
        options["x0_fn"] = lambda x0, t: x0.clamp(-bound, bound)
    spacing, offset = _spacing(values, "DDPMScheduler")
    return Sampling("ddpm", _schedule(values, "DDPMScheduler"), spacing, offset, options)


def _unclip(config: dict) -> Sampling:
    values = _values(config, _UNCLIP_DEFAULTS, "UnCLIPScheduler")
    if values["variance_type"] != "fixed_small_log":
        _refuse("UnCLIPScheduler", "variance_type", values["variance_type"],
                "the prior predicts no variance (fixed_small_log)")
    if values["beta_schedule"] != "squaredcos_cap_v2":
        _refuse("UnCLIPScheduler", "beta_schedule", values["beta_schedule"], "diffusers accepts squaredcos_cap_v2 only")
    options = {"prediction": _prediction(values, "UnCLIPScheduler"),
               "clip_sample_range": float(values["clip_sample_range"]) if values["clip_sample"] else None}
    return Sampling("unclip", NoiseSchedule.squared_cosine(values["num_train_timesteps"]), options=options)

"""Samplers for the prior and the decoder, written as small update rules (k-diffusion style).

Conventions (shared by every sampler):
- `x` lives in the variance-preserving (VP) convention x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps. Samplers that work in
  another parametrisation (Euler ancestral in sigma space) convert on entry and exit.
- `denoise(x, t)` is the model (guidance included): x as the model sees it, t a (B,) tensor of ORIGINAL-scale timesteps.
  Its output has the channels of x, or twice as many when the model also predicts a learned-range variance value v in
  [-1, 1] (guided-diffusion LEARNED_RANGE); samplers that do not use the variance ignore the second half.
- Timesteps are a descending list; the step from t goes to the next entry, and the last entry goes to "t = -1"
  (ab = 1; DDIM/PLMS use ab_0 there, as both references do with set_alpha_to_one=False).
- Per-step scalars come from the float64 schedule as Python floats (unclip by default: diffusers' float32 ones, see
  `unclip_float32_step`); tensor math runs in float32 (or float64).
- Random draws: torch.randn(x.shape, generator=generator) at exactly the steps and in the order diffusers' step
  functions draw them, so one generator seed gives diffusers' result. `noise_fn(like)` replaces the draws (used to
  inject recorded noise).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .schedule import NoiseSchedule, spaced_timesteps

__all__ = [
    "SAMPLERS",
    "DEFAULT_SPACING",
    "sampler_timesteps",
    "max_inference_steps",
    "sampler_options",
    "sample",
    "randn",
    "ancestral_step",
    "unclip_float32_step",
    "unclip_float32_scalars",
    "ARITHMETICS",
    "DDPM_VARIANCES",
    "ddim_step",
    "dpmpp_2m_step",
    "euler_ancestral_step",
    "plms_eps",
    "dynamic_threshold",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("p_sampler", "ddim", "plms", "unclip", "ddpm", "dpmpp_2m", "euler_a")
# unclip's `arithmetic` option: diffusers' UnCLIPScheduler (float32) or the original prior sampler (float64)
ARITHMETICS = ("float32", "float64")
# ddpm's `variance` option: diffusers' DDPMScheduler variance_type values it reproduces
DDPM_VARIANCES = ("learned_range", "fixed_small")

# Each sampler's default timestep selection = its reference's: (spacing, offset).
DEFAULT_SPACING = {
    "p_sampler": ("respace", 0),  # original SpacedDiffusion(str(n)); keeps T-1
    "ddim": ("leading", 1),  # original DDIMSampler (range(0, T, T//n) + 1) = diffusers DDIM steps_offset=1
    "plms": ("leading", 1),  # original PLMSSampler, same timesteps as its DDIM
    "unclip": ("unclip", 0),  # diffusers UnCLIPScheduler = original prior respacing
    "ddpm": ("leading", 0),  # diffusers DDPMScheduler default spacing, steps_offset 0
    "dpmpp_2m": ("dpmsolver", 0),  # diffusers DPMSolverMultistepScheduler "linspace"
    "euler_a": ("linspace", 0),  # diffusers EulerAncestralDiscreteScheduler "linspace" (fractional timesteps)
}


def _wide(x: torch.Tensor) -> torch.Tensor:
    """The dtype the update math runs in: float32, or float64 when given float64."""
    return x if x.dtype == torch.float64 else x.float()


def _check_name(name: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"name: expected one of {SAMPLERS}, got {name!r}")


def sampler_timesteps(
    name: str,
    schedule: NoiseSchedule,
    num_inference_steps: int,
    *,
    spacing: str | None = None,
    offset: int | None = None,
) -> torch.Tensor:
    """Descending timesteps (original 0..T-1 scale) for `name`, with its reference's spacing unless `spacing` is given.

    LongTensor, except "linspace" spacing with fractional values (euler_a's default, as diffusers): float32.
    """
    _check_name(name)
    default_spacing, default_offset = DEFAULT_SPACING[name]
    if spacing is None:
        spacing = default_spacing
        offset = default_offset if offset is None else offset
    return spaced_timesteps(spacing, schedule.num_train_timesteps, num_inference_steps, offset=offset or 0)


def max_inference_steps(name: str, num_train_timesteps: int) -> int:
    """The most steps sampler `name`'s default timesteps can take: T, or fewer where more would repeat a timestep
    or leave 0..T-1 (ddim and plms, "leading" + 1, and dpmpp_2m take at most T - 1)."""
    _check_name(name)
    spacing, offset = DEFAULT_SPACING[name]
    for steps in range(num_train_timesteps, 0, -1):
        try:
            ts = spaced_timesteps(spacing, num_train_timesteps, steps, offset=offset).tolist()
        except ValueError:  # timesteps outside 0..T-1
            continue
        if all(b < a for a, b in zip(ts, ts[1:])):
            return steps
    raise ValueError(f"name: {name!r} has no valid number of steps on {num_train_timesteps} timesteps")


# =============================================================================================
# Update rules: pure tensor math on one step, scalars as Python floats.
# =============================================================================================


def split_output(model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, learned-range variance value or None). The variance half exists when the channels double."""
    c = x.shape[1]
    if model_output.shape[1] == 2 * c:
        return model_output[:, :c], model_output[:, c:]
    if model_output.shape[1] != c:
        raise ValueError(
            f"denoise: expected an output with {c} or {2 * c} channels (x has {c}), got {tuple(model_output.shape)}"
        )
    return model_output, None


def x0_and_eps(
    prediction: torch.Tensor, x: torch.Tensor, ab: float, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both parametrisations from a model prediction at noise level ab ("epsilon" or "sample")."""
    if kind == "epsilon":
        eps = prediction
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    else:
        x0 = prediction
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    return x0, eps


def dynamic_threshold(
    x0: torch.Tensor,
    ratio: float = 0.995,
    *,
    max_value: float | None = None,
    batch0: bool = False,
) -> torch.Tensor:
    """Imagen dynamic thresholding: s = quantile(|x0|, ratio) clamped to [1, max_value]; x0 -> clip(x0, -s, s) / s.

    `batch0=True` reproduces the original Kandinsky 2.1 `clip_denoised`: s is computed on the FIRST batch element only
    and applied to the whole batch. Otherwise each sample gets its own s (diffusers, and the corrected behaviour).
    """
    flat = _wide(x0.reshape(x0.shape[0], -1).abs())
    if batch0:
        s = torch.quantile(flat[0], ratio).clamp(min=1.0, max=max_value).expand(x0.shape[0])
    else:
        s = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value)
    s = s.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return torch.minimum(torch.maximum(x0, -s), s) / s


def posterior_update(
    x0: torch.Tensor,
    x: torch.Tensor,
    ab: float,
    ab_prev: float,
    variance_value: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """One ancestral step: the mean of q(x_prev | x_t, x0) plus noise with the posterior variance, or (learned range)
    exp(frac log beta + (1 - frac) log posterior_variance), frac = (v + 1) / 2."""
    beta = 1 - ab / ab_prev
    mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
    if noise is None:
        return mean
    min_log = math.log(max(beta * (1 - ab_prev) / (1 - ab), 1e-20))  # posterior variance is 0 when ab_prev = 1
    if variance_value is None:
        std = math.exp(0.5 * min_log)
    else:
        frac = (variance_value + 1) / 2
        std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * min_log))
    return mean + std * noise


def ddim_update(
    x0: torch.Tensor, eps: torch.Tensor, ab: float, ab_prev: float, eta: float, noise: torch.Tensor | None
) -> torch.Tensor:
    """DDIM: sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s noise,
    s = eta sqrt((1 - ab_prev) / (1 - ab) (1 - ab / ab_prev))."""
    s = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    out = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - s**2) * eps
    if noise is not None and s > 0:
        out = out + s * noise
    return out


def plms_eps(eps: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current and up to 3 previous raw model outputs (oldest first in `history`)."""
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def dpmpp_2m_update(
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: torch.Tensor | None,
    ab: float,
    ab_next: float,
    ab_prev_step: float | None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (midpoint) in VP variables: alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha/sigma).

    First order when `x0_prev` is None; `ab_next = 1` (sigma 0) gives x0.
    """
    if ab_next >= 1.0:
        return x0.clone()
    alpha_s, sigma_s = math.sqrt(ab), math.sqrt(1 - ab)
    alpha_t, sigma_t = math.sqrt(ab_next), math.sqrt(1 - ab_next)
    h = (math.log(alpha_t) - math.log(sigma_t)) - (math.log(alpha_s) - math.log(sigma_s))
    d = x0
    if x0_prev is not None:
        alpha_p, sigma_p = math.sqrt(ab_prev_step), math.sqrt(1 - ab_prev_step)
        h_prev = (math.log(alpha_s) - math.log(sigma_s)) - (math.log(alpha_p) - math.log(sigma_p))
        r = h_prev / h
        d = x0 + (0.5 / r) * (x0 - x0_prev)
    return (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d


def euler_ancestral_update(
    x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor
) -> torch.Tensor:
    """Euler ancestral in sigma space (x = x0 + sigma eps): Euler step to sigma_down, then noise of std sigma_up."""
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    x = x + (x - x0) / sigma * (sigma_down - sigma)
    return x + noise * sigma_up


# =============================================================================================
# Step functions: one model output -> next sample, with the schedule and (t, t_prev). Used by the loops below and
# by the step-level parity tests against diffusers' step().
# =============================================================================================


def _ab(schedule_ab: torch.Tensor, t: int, final: float = 1.0) -> float:
    return final if t < 0 else float(schedule_ab[t])


def ancestral_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    schedule: NoiseSchedule,
    *,
    prediction: str = "epsilon",
    x0_process: Callable[[torch.Tensor], torch.Tensor] | None = None,
    noise: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral (DDPM) step t -> t_prev (-1: the end) with learned-range variance when the output has 2C channels,
    else the fixed small posterior variance. Returns (x_prev, processed x0). Used by p_sampler, ddpm and unclip."""
    ac = schedule.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    ab, ab_prev = _ab(ac, t), _ab(ac, t_prev)
    pred, v = split_output(model_output, x)
    x32, pred = _wide(x), _wide(pred)
    x0, _ = x0_and_eps(pred, x32, ab, prediction)
    if x0_process is not None:
        x0 = x0_process(x0)
    v = None if v is None else _wide(v)
    out = posterior_update(x0, x32, ab, ab_prev, v, None if noise is None else _wide(noise))
    return out.to(x.dtype), x0


def unclip_float32_scalars(schedule: NoiseSchedule, t: int, t_prev: int) -> dict[str, float]:
    """The per-step scalars of diffusers' ``UnCLIPScheduler.step`` for t -> t_prev (-1: the end), computed as it
    computes them: from a float32 table (betas rounded to float32, alphas_cumprod = float32 cumprod of 1 - beta),
    every operation in float32, beta taken from the table when t_prev = t - 1. Returned as Python floats (exactly
    the float32 values: no device synchronisation in the loops).

    Keys: ``sqrt_ab``, ``sqrt_one_minus_ab`` (epsilon -> x0), ``coef_x0``, ``coef_x`` (posterior mean), ``std``
    (fixed small posterior standard deviation), ``log_var`` (its log variance, clamped at 1e-20 as diffusers'
    fixed_small_log) and ``log_beta`` (learned range)."""
    betas = schedule.betas.float()
    ac = torch.cumprod(1.0 - betas, dim=0)
    one = torch.tensor(1.0)
    ab, ab_prev = ac[t], (ac[t_prev] if t_prev >= 0 else one)
    if t_prev == t - 1:
        beta = betas[t]
        alpha = 1.0 - betas[t]
    else:
        beta = 1 - ab / ab_prev
        alpha = 1 - beta
    one_minus_ab, one_minus_ab_prev = 1 - ab, 1 - ab_prev
    variance = one_minus_ab_prev / one_minus_ab * beta
    scalars = {
        "sqrt_ab": ab ** 0.5, "sqrt_one_minus_ab": one_minus_ab ** 0.5,
        "coef_x0": ab_prev ** 0.5 * beta / one_minus_ab, "coef_x": alpha ** 0.5 * one_minus_ab_prev / one_minus_ab,
    }
    scalars["log_var"] = torch.log(torch.clamp(variance, min=1e-20))
    scalars["std"] = torch.exp(0.5 * scalars["log_var"])
    scalars["log_beta"] = torch.log(beta)
    return {name: float(value) for name, value in scalars.items()}


def unclip_float32_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    schedule: NoiseSchedule,
    *,
    prediction: str = "sample",
    x0_process: Callable[[torch.Tensor], torch.Tensor] | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ancestral_step` with diffusers' ``UnCLIPScheduler`` arithmetic (:func:`unclip_float32_scalars`)
    instead of float64 scalars. The two differ most near the ends of the cosine schedule, where float32 keeps
    few digits of 1 - alphas_cumprod (the x0 coefficient of the step to t = -1 is 0.99947 instead of 1).
    Returns (x_prev, processed x0)."""
    s = unclip_float32_scalars(schedule, t, t_prev)
    pred, v = split_output(model_output, x)
    x32, pred = _wide(x), _wide(pred)
    x0 = pred if prediction == "sample" else (x32 - s["sqrt_one_minus_ab"] * pred) / s["sqrt_ab"]
    if x0_process is not None:
        x0 = x0_process(x0)
    out = s["coef_x0"] * x0 + s["coef_x"] * x32
    if noise is not None:
        if v is None:
            std = s["std"]
        else:
            frac = (_wide(v) + 1) / 2
            std = torch.exp(0.5 * (frac * s["log_beta"] + (1 - frac) * s["log_var"]))
        out = out + std * _wide(noise)
    return out.to(x.dtype), x0


def ddim_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    schedule: NoiseSchedule,
    *,
    eta: float = 0.0,
    prediction: str = "epsilon",
    final_alpha_cumprod: float | None = None,
    noise: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM step t -> t_prev; at the end (t_prev < 0) ab_prev = `final_alpha_cumprod` (default ab_0, both references'
    set_alpha_to_one=False). Returns (x_prev, x0)."""
    ac = schedule.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    final = float(ac[0]) if final_alpha_cumprod is None else final_alpha_cumprod
    ab, ab_prev = _ab(ac, t), _ab(ac, t_prev, final)
    pred, _ = split_output(model_output, x)
    x32 = _wide(x)
    x0, eps = x0_and_eps(_wide(pred), x32, ab, prediction)
    out = ddim_update(x0, eps, ab, ab_prev, eta, None if noise is None else _wide(noise))
    return out.to(x.dtype), x0


def dpmpp_2m_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: int,
    t_next: int,
    schedule: NoiseSchedule,
    *,
    x0_prev: torch.Tensor | None = None,
    t_prev_step: int | None = None,
    prediction: str = "epsilon",
    alphas_cumprod: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) step t -> t_next (-1: sigma 0) using the x0 of the previous step (at `t_prev_step`) when given.
    Returns (x_next, x0)."""
    ac = schedule.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    ab, ab_next = _ab(ac, t), _ab(ac, t_next)
    pred, _ = split_output(model_output, x)
    x32 = _wide(x)
    x0, _ = x0_and_eps(_wide(pred), x32, ab, prediction)
    ab_p = None if t_prev_step is None else _ab(ac, t_prev_step)
    return dpmpp_2m_update(x32, x0, x0_prev, ab, ab_next, ab_p).to(x.dtype), x0


def euler_ancestral_step(
    model_output: torch.Tensor,
    x_sigma: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise: torch.Tensor,
    *,
    prediction: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler ancestral step in sigma space (x_sigma = x_VP / sqrt(ab)); the model saw x_sigma / sqrt(sigma^2 + 1).
    Returns (x_sigma_next, x0)."""
    pred, _ = split_output(model_output, x_sigma)
    xs = _wide(x_sigma)
    x0 = xs - sigma * _wide(pred) if prediction == "epsilon" else _wide(pred)
    return euler_ancestral_update(xs, x0, sigma, sigma_next, _wide(noise)).to(x_sigma.dtype), x0


# =============================================================================================
# Loops
# =============================================================================================

_COMMON = {"prediction", "noise_fn", "callback"}
_OPTIONS = {
    "p_sampler": _COMMON | {"x0_fn", "threshold"},
    "ddim": _COMMON | {"eta", "set_alpha_to_one", "prev_stride"},
    "plms": _COMMON | {"set_alpha_to_one"},
    "unclip": _COMMON | {"clip_sample_range", "x0_fn", "arithmetic"},
    "ddpm": _COMMON | {"thresholding", "dynamic_thresholding_ratio", "sample_max_value", "x0_fn", "variance"},
    "dpmpp_2m": _COMMON,
    "euler_a": _COMMON,
}
_DEFAULT_PREDICTION = {"unclip": "sample"}


def sampler_options(name: str) -> frozenset[str]:
    """The keyword options :func:`sample` takes for sampler ``name``."""
    _check_name(name)
    return frozenset(_OPTIONS[name])


def sample(
    name: str,
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **options,
) -> torch.Tensor:
    """Run sampler `name` from `x` (VP convention, at timesteps[0]) down through `timesteps` (descending) and return
    the final sample.

    Options (all samplers): `prediction` ("epsilon" default, "sample" = x0; unclip defaults to "sample"),
    `noise_fn(like) -> noise` (replaces the generator draws), `callback(i, t, x, x0)` after each step.
    - p_sampler: `x0_fn(x0, t) -> x0` (the original `denoised_fn`: clamp, inpainting blend), applied before
      `threshold`: "batch0" (default, the original Kandinsky 2.1 `clip_denoised`), "per_sample" (corrected) or None.
    - ddim: `eta` in [0, 1] (default 0), `set_alpha_to_one` (default False), `prev_stride` (diffusers: the previous
      timestep is t - prev_stride, not the next listed one; None). plms: `set_alpha_to_one`.
    - unclip: `clip_sample_range` (default 10.0; None disables), `x0_fn`, `arithmetic`: "float32" (default,
      diffusers' UnCLIPScheduler: float32 table and scalars, see `unclip_float32_step`) or "float64" (the original
      prior's numpy float64 scalars).
    - ddpm: `thresholding` (default True), `dynamic_thresholding_ratio` (0.995), `sample_max_value` (2.0), `x0_fn`,
      `variance`: "learned_range" (default: the model's variance channels when its output has them) or "fixed_small"
      (diffusers' DDPMScheduler variance_type: variance channels dropped, the posterior variance).
    """
    _check_name(name)
    unknown = set(options) - _OPTIONS[name]
    if unknown:
        raise ValueError(f"options: {sorted(unknown)} not accepted by {name!r}; accepted: {sorted(_OPTIONS[name])}")
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"x: expected a (B, C, ...) tensor, got {type(x).__name__} {getattr(x, 'shape', '')}")
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps: expected a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
    ts = timesteps.tolist()
    repeats = [(a, b) for a, b in zip(ts, ts[1:]) if b >= a]
    if repeats:
        raise ValueError(f"timesteps: expected strictly descending values, got {len(repeats)} steps that are not "
                         f"(first: {repeats[0][0]} -> {repeats[0][1]})")
    if ts[-1] < 0 or ts[0] > schedule.num_train_timesteps - 1:
        raise ValueError(f"timesteps: expected values in 0..{schedule.num_train_timesteps - 1}, got {ts[0]}..{ts[-1]}")
    if name != "euler_a" and timesteps.is_floating_point() and any(v != round(v) for v in ts):
        raise ValueError(f"timesteps: {name!r} needs integer timesteps, got {[v for v in ts if v != round(v)][:5]}")
    prediction = options.pop("prediction", _DEFAULT_PREDICTION.get(name, "epsilon"))
    if prediction not in ("epsilon", "sample"):
        raise ValueError(f"prediction: expected 'epsilon' or 'sample', got {prediction!r}")
    noise_fn = options.pop("noise_fn", None) or _randn_like(generator)
    callback = options.pop("callback", None)

    loop = {
        "p_sampler": _p_sampler,
        "ddim": _ddim,
        "plms": _plms,
        "unclip": _unclip,
        "ddpm": _ddpm,
        "dpmpp_2m": _dpmpp_2m,
        "euler_a": _euler_a,
    }[name]
    steps = tqdm(range(len(ts)), desc=name, disable=not progress, leave=False)
    with torch.no_grad():
        return loop(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback, **options)


def randn(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None,
          device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit Gaussian noise drawn on the generator's device and moved to ``device``, as diffusers'
    ``randn_tensor`` does: a CPU generator gives the same numbers whatever ``device`` is.

    A list of generators (one per image, as diffusers takes them) draws row ``r`` from
    ``generator[r % len(generator)]``, so that an image's noise depends on its own generator only, not on
    the batch it is drawn in; the cycle gives the prior's negative-prompt rows, which follow all the
    prompts' rows, their prompt's generator.

    A CPU draw for a CUDA ``device`` is copied through pinned memory asynchronously, so that a sampling
    loop drawing noise at every step never waits for the GPU.
    """
    device = torch.device(device)
    if isinstance(generator, (list, tuple)):
        if shape[0] % len(generator):
            raise ValueError(f"generator: expected one generator per image ({shape[0]} rows), got {len(generator)}")
        rows = [generator[r % len(generator)] for r in range(shape[0])]
        out = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in rows])
    else:
        source = device if generator is None else generator.device
        out = torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype)
    if out.device.type == "cpu" and device.type == "cuda":
        return out.pin_memory().to(device, non_blocking=True)
    return out.to(device)


def _randn_like(generator: torch.Generator | None) -> NoiseFn:
    return lambda like: randn(like.shape, generator, like.device, like.dtype)


def _t_batch(t, x: torch.Tensor) -> torch.Tensor:
    dtype = torch.int64 if float(t) == int(t) else torch.float32
    return torch.full((x.shape[0],), t if dtype is torch.float32 else int(t), dtype=dtype, device=x.device)


def _ancestral_loop(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback, *, x0_process, x0_fn,
                    noise_if_t_positive: bool, float32: bool = False):
    ac = schedule.alphas_cumprod
    ts = [int(t) for t in timesteps.tolist()]
    for i in steps:
        t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        tb = _t_batch(t, x)
        out = denoise(x, tb)

        def process(x0, tb=tb):
            if x0_fn is not None:
                x0 = x0_fn(x0, tb)
            return x0 if x0_process is None else x0_process(x0)

        draw = t > 0 if noise_if_t_positive else t_prev >= 0
        noise = noise_fn(x) if draw else None
        if float32:
            x, x0 = unclip_float32_step(out, x, t, t_prev, schedule, prediction=prediction, x0_process=process,
                                        noise=noise)
        else:
            x, x0 = ancestral_step(out, x, t, t_prev, schedule, prediction=prediction, x0_process=process,
                                   noise=noise, alphas_cumprod=ac)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _p_sampler(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback, *, x0_fn=None,
               threshold="batch0"):
    if threshold not in ("batch0", "per_sample", None):
        raise ValueError(f"threshold: expected 'batch0', 'per_sample' or None, got {threshold!r}")
    process = None if threshold is None else (lambda x0: dynamic_threshold(x0, 0.995, batch0=threshold == "batch0"))
    # The original draws noise at every step but multiplies the last one by 0: no draw at the last step here.
    return _ancestral_loop(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback,
                           x0_process=process, x0_fn=x0_fn, noise_if_t_positive=False)


def _ddpm(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback, *, thresholding=True,
          dynamic_thresholding_ratio=0.995, sample_max_value=2.0, x0_fn=None, variance="learned_range"):
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"variance: expected one of {list(DDPM_VARIANCES)}, got {variance!r}")
    if variance == "fixed_small":  # the posterior variance whatever the model predicts: drop its variance channels
        model = denoise
        denoise = lambda x_in, t: split_output(model(x_in, t), x_in)[0]  # noqa: E731
    process = None
    if thresholding:
        process = lambda x0: dynamic_threshold(x0, dynamic_thresholding_ratio, max_value=sample_max_value)  # noqa: E731
    # diffusers DDPMScheduler draws noise when t > 0.
    return _ancestral_loop(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback,
                           x0_process=process, x0_fn=x0_fn, noise_if_t_positive=True)


def _unclip(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback, *, clip_sample_range=10.0,
            x0_fn=None, arithmetic="float32"):
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic: expected one of {list(ARITHMETICS)}, got {arithmetic!r}")
    process = None
    if clip_sample_range is not None:
        process = lambda x0: x0.clamp(-clip_sample_range, clip_sample_range)  # noqa: E731
    # diffusers UnCLIPScheduler draws noise when t > 0.
    return _ancestral_loop(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback,
                           x0_process=process, x0_fn=x0_fn, noise_if_t_positive=True, float32=arithmetic == "float32")


def _check_eta(eta) -> float:
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: expected a float in [0, 1], got {eta!r}")
    return float(eta)


def _ddim(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback, *, eta=0.0,
          set_alpha_to_one=False, prev_stride=None):
    eta = _check_eta(eta)
    ac = schedule.alphas_cumprod
    final = 1.0 if set_alpha_to_one else float(ac[0])
    ts = [int(t) for t in timesteps.tolist()]
    for i in steps:
        t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        if prev_stride is not None:  # diffusers' DDIMScheduler: t - T // steps, whatever the spacing
            t_prev = max(t - prev_stride, -1)
        out = denoise(x, _t_batch(t, x))
        noise = noise_fn(x) if eta > 0 else None  # diffusers draws only when eta > 0
        x, x0 = ddim_step(out, x, t, t_prev, schedule, eta=eta, prediction=prediction, final_alpha_cumprod=final,
                          noise=noise, alphas_cumprod=ac)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _plms(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback, *, set_alpha_to_one=False):
    ac = schedule.alphas_cumprod
    final = 1.0 if set_alpha_to_one else float(ac[0])
    ts = [int(t) for t in timesteps.tolist()]
    history: list[torch.Tensor] = []  # raw eps of previous steps, oldest first

    def eps_of(out, x_in, t):
        pred, _ = split_output(out, x_in)
        return x0_and_eps(_wide(pred), _wide(x_in), float(ac[t]), prediction)[1]

    for i in steps:
        t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        ab, ab_prev = float(ac[t]), _ab(ac, t_prev, final)
        x32 = _wide(x)
        eps = eps_of(denoise(x, _t_batch(t, x)), x, t)
        if not history:
            # Pseudo improved Euler: DDIM step with eps, evaluate again at the next timestep, average.
            x0 = (x32 - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
            x_mid = ddim_update(x0, eps, ab, ab_prev, 0.0, None).to(x.dtype)
            t_next = ts[min(i + 1, len(ts) - 1)]  # the original re-uses the last timestep at the final step
            eps_prime = (eps + eps_of(denoise(x_mid, _t_batch(t_next, x)), x_mid, t_next)) / 2
        else:
            eps_prime = plms_eps(eps, history)
        x0 = (x32 - math.sqrt(1 - ab) * eps_prime) / math.sqrt(ab)
        x = ddim_update(x0, eps_prime, ab, ab_prev, 0.0, None).to(x.dtype)
        history = (history + [eps])[-3:]
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _dpmpp_2m(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback):
    ac = schedule.alphas_cumprod
    ts = [int(t) for t in timesteps.tolist()]
    x0_prev = None
    for i in steps:
        t, t_next = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        out = denoise(x, _t_batch(t, x))
        # Second order except the first step and the last (diffusers: lower_order_final with final sigma 0).
        use_prev = x0_prev if t_next >= 0 else None
        x, x0 = dpmpp_2m_step(out, x, t, t_next, schedule, x0_prev=use_prev,
                              t_prev_step=ts[i - 1] if i > 0 else None, prediction=prediction, alphas_cumprod=ac)
        x0_prev = x0
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sigma_at(schedule: NoiseSchedule, t: float) -> float:
    """sigma_t = sqrt((1 - ab_t) / ab_t), linearly interpolated at fractional t (as diffusers' Euler schedulers)."""
    sig = schedule.sigmas
    lo = int(math.floor(t))
    if lo >= len(sig) - 1:
        return float(sig[-1])
    w = t - lo
    return float(sig[lo]) * (1 - w) + float(sig[lo + 1]) * w


def _euler_a(denoise, x, schedule, timesteps, steps, prediction, noise_fn, callback):
    ts = [float(t) for t in timesteps.tolist()]
    sigmas = [sigma_at(schedule, t) for t in ts] + [0.0]
    # VP -> sigma space: x_sigma = x_VP / sqrt(ab) = x_VP * sqrt(1 + sigma^2).
    x_sigma = (_wide(x) * math.sqrt(1 + sigmas[0] ** 2)).to(x.dtype)
    for i in steps:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        model_in = (_wide(x_sigma) / math.sqrt(sigma**2 + 1)).to(x.dtype)  # diffusers' scale_model_input
        out = denoise(model_in, _t_batch(timesteps[i].item(), x))
        noise = noise_fn(x_sigma)  # diffusers draws at every step, the last one included (sigma_up = 0 there)
        x_sigma, x0 = euler_ancestral_step(out, x_sigma, sigma, sigma_next, noise, prediction=prediction)
        if callback is not None:
            callback(i, timesteps[i].item(), x_sigma, x0)
    return x_sigma  # sigma 0: the VP and sigma conventions coincide

"""Noise schedules (betas -> cumulative alphas) and timestep selection, independent of any model.

Everything is computed in float64, as the original (numpy float64) does; samplers turn the per-step
scalars into Python floats and apply them to float32 (or wider) tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kandinsky.validation import check_positive_int

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "NoiseSchedule",
    "prior_schedule",
    "decoder_schedule",
    "img2img_schedule",
    "add_noise",
    "space_timesteps",
    "spaced_timesteps",
    "SPACINGS",
]


NUM_TRAIN_TIMESTEPS = 1000  # both of Kandinsky's diffusions (prior and decoder) were trained on 1000 steps


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving diffusion: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps,
    ab_t = prod_{s<=t} (1 - beta_s).

    `betas` is a float64 (T,) tensor with values in (0, 1]. Timesteps are indices 0..T-1 into it.
    """

    betas: torch.Tensor

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas).detach().to("cpu", torch.float64)
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas: expected a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(
                f"betas: expected every value in (0, 1], got min {betas.min().item()} max {betas.max().item()}"
            )
        object.__setattr__(self, "betas", betas)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> "NoiseSchedule":
        """Betas evenly spaced from `beta_start` to `beta_end` (the decoder: 0.00085..0.012; Ho et al.: 1e-4..0.02)."""
        check_positive_int("num_train_timesteps", num_train_timesteps)
        return cls(torch.from_numpy(np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)))

    @classmethod
    def squared_cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal cosine schedule (the prior): ab(s) = cos((s + 0.008) / 1.008 * pi / 2)^2,
        betas capped at `max_beta`."""
        check_positive_int("num_train_timesteps", num_train_timesteps)

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        # Python floats, exactly as both references compute it.
        betas = [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
            for i in range(num_train_timesteps)
        ]
        return cls(torch.tensor(betas, dtype=torch.float64))

    # ---- derived arrays (float64, (T,)) -------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([self.betas.new_ones(1), self.alphas_cumprod[:-1]])

    @property
    def sigmas(self) -> torch.Tensor:
        """Noise level in the variance-exploding parametrisation x_t / sqrt(ab_t) = x0 + sigma_t eps."""
        ab = self.alphas_cumprod
        return ((1 - ab) / ab).sqrt()

    @property
    def posterior_variance(self) -> torch.Tensor:
        """Variance of q(x_{t-1} | x_t, x0) (0 at t = 0)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        # The variance is 0 at t = 0; like the original, reuse the t = 1 value there.
        var = self.posterior_variance
        return torch.cat([var[1:2], var[1:]]).log()

    @property
    def posterior_mean_coef1(self) -> torch.Tensor:
        return self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> torch.Tensor:
        return (1.0 - self.alphas_cumprod_prev) * (1.0 - self.betas).sqrt() / (1.0 - self.alphas_cumprod)

    def respaced(self, kept_timesteps: Sequence[int] | torch.Tensor) -> "NoiseSchedule":
        """The schedule that jumps between `kept_timesteps` (any order; duplicates dropped), as the original
        SpacedDiffusion builds it: beta_i = 1 - ab[t_i] / ab[t_{i-1}], ab[t_{-1}] = 1."""
        kept = sorted({int(t) for t in torch.as_tensor(kept_timesteps).reshape(-1).tolist()})
        _check_timestep_range("kept_timesteps", kept, self.num_train_timesteps)
        ab = self.alphas_cumprod[kept]
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return NoiseSchedule(1.0 - ab / prev)

    def __repr__(self) -> str:
        first, last = self.betas[0].item(), self.betas[-1].item()
        return f"NoiseSchedule(T={self.num_train_timesteps}, beta {first:.3g}..{last:.3g})"


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """Forward process q(x_t | x0): sqrt(ab_t) x0 + sqrt(1 - ab_t) noise. `t` is an int or a (B,) integer tensor."""
    if x0.shape != noise.shape:
        raise ValueError(f"noise: expected the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    t = torch.as_tensor(t)
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise ValueError(f"t: expected integer timesteps, got {t.tolist()}")
        t = t.long()
    if t.ndim > 1 or (t.ndim == 1 and t.numel() not in (1, x0.shape[0])):
        raise ValueError(f"t: expected an int or a ({x0.shape[0]},) tensor, got shape {tuple(t.shape)}")
    _check_timestep_range("t", t.reshape(-1).tolist(), schedule.num_train_timesteps)
    ab = schedule.alphas_cumprod[t.cpu()]  # float64
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a = ab.sqrt().reshape(shape).to(x0.device, torch.float32)
    s = (1 - ab).sqrt().reshape(shape).to(x0.device, torch.float32)
    return (a * x0.float() + s * noise.float()).to(x0.dtype)


# ---- timestep selection -------------------------------------------------------------------------

SPACINGS = ("respace", "leading", "trailing", "linspace", "linspace_rounded", "unclip", "dpmsolver")


def space_timesteps(num_train_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The original respacing (guided-diffusion `space_timesteps`), ascending.

    `section_counts` is "ddimN" (range(0, T, T // N) + 1: the +1 is the original's), a comma-separated string or a list
    of step counts per equal section; each section is strided with round() of a running float index (so T - 1 is kept).
    """
    check_positive_int("num_train_timesteps", num_train_timesteps)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            n = _parse_int("section_counts", section_counts[len("ddim"):], section_counts)
            if not 0 < n <= num_train_timesteps:
                raise ValueError(
                    f"section_counts: expected ddimN with 0 < N <= {num_train_timesteps}, got {section_counts!r}"
                )
            # range(0, T, T // N) + 1: the original DDIM striding, +1 included (so 1, 21, ..., 981 for ddim50)
            return [t + 1 for t in range(0, num_train_timesteps, num_train_timesteps // n)]
        section_counts = [_parse_int("section_counts", s, section_counts) for s in section_counts.split(",")]
    section_counts = list(section_counts)
    if not section_counts or any(int(c) <= 0 for c in section_counts):
        raise ValueError(f"section_counts: expected positive step counts, got {section_counts!r}")
    size_per, extra = divmod(num_train_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"section_counts: cannot take {count} steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        index = 0.0
        for _ in range(count):
            steps.append(start + round(index))  # Python round: banker's rounding, as the original
            index += stride
        start += size
    return sorted(set(steps))


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, num_inference_steps: int, *, offset: int = 0
) -> torch.Tensor:
    """Descending timesteps for a named spacing (LongTensor; float32 for fractional "linspace" values, see below).

    - "respace": the original `space_timesteps(T, str(n))` (kept in the original's p_sampler and prior; includes T-1).
    - "leading": arange(n) * (T // n) + offset (original DDIM/PLMS with offset 1 = diffusers DDIM steps_offset=1;
      diffusers DDPM with offset 0).
    - "trailing": round(arange(T, 0, -T / n)) - 1.
    - "linspace": linspace(0, T - 1, n) WITHOUT rounding: the float timesteps of diffusers' Euler schedulers
      (returned as float32 when not all integers).
    - "linspace_rounded": round(linspace(0, T - 1, n)) (diffusers' DDIM / DDPM "linspace").
    - "unclip": round(i * (T - 1) / (n - 1)) (diffusers UnCLIPScheduler; equals the original prior respacing).
    - "dpmsolver": round(linspace(0, T - 1, n + 1))[::-1][:-1] (diffusers DPMSolverMultistep "linspace").
    """
    check_positive_int("num_train_timesteps", num_train_timesteps)
    if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool) or not (
        0 < num_inference_steps <= num_train_timesteps
    ):
        raise ValueError(
            f"num_inference_steps: expected an int in 1..{num_train_timesteps}, got {num_inference_steps!r}"
        )
    T, n = num_train_timesteps, int(num_inference_steps)
    if spacing == "respace":
        ts = np.array(space_timesteps(T, str(n)))[::-1]
    elif spacing == "leading":
        ts = np.arange(0, n) * (T // n) + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
        if np.all(ts == np.round(ts)):
            ts = ts.astype(np.int64)
        return torch.from_numpy(ts.copy())
    elif spacing == "linspace_rounded":
        ts = np.linspace(0, T - 1, n).round()
    elif spacing == "unclip":
        ratio = (T - 1) / (n - 1) if n > 1 else 0.0
        ts = (np.arange(0, n) * ratio).round()
    elif spacing == "dpmsolver":
        ts = np.linspace(0, T - 1, n + 1).round()[1:]
    else:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    ts = np.sort(np.asarray(ts, dtype=np.int64))[::-1].copy()
    if ts.min() < 0 or ts.max() >= T:
        raise ValueError(f"offset: timesteps {ts.min()}..{ts.max()} fall outside 0..{T - 1}")
    return torch.from_numpy(ts)


# ---- validation helpers ---------------------------------------------------------------------------

def _parse_int(name: str, text: str, whole: object) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: expected 'ddimN' or comma-separated ints, got {whole!r}") from None


def _check_timestep_range(name: str, values: Sequence[int], T: int) -> None:
    bad = [v for v in values if not 0 <= v < T]
    if bad:
        raise ValueError(f"{name}: expected timesteps in 0..{T - 1}, got {bad[:5]}")


# ---- Kandinsky's schedules ----------------------------------------------------------------------


def prior_schedule() -> NoiseSchedule:
    """The prior's diffusion: squared-cosine betas over 1000 steps."""
    return NoiseSchedule.squared_cosine(NUM_TRAIN_TIMESTEPS)


def decoder_schedule() -> NoiseSchedule:
    """The decoder's diffusion: linear betas 0.00085..0.012 over 1000 steps."""
    return NoiseSchedule.linear(NUM_TRAIN_TIMESTEPS, 0.00085, 0.012)


def img2img_schedule() -> NoiseSchedule:
    """What img2img noises its start image with: Ho et al.'s linear betas 1e-4..0.02, not the decoder's (both
    references do)."""
    return NoiseSchedule.linear(NUM_TRAIN_TIMESTEPS, 0.0001, 0.02)

"""Schedules and samplers: original fixtures, diffusers 0.42.1 schedulers, bad input.

The comparisons themselves live in kandinsky/parity/schedulers.py (shared with the parity report); tolerances and
their reasons are documented there.
"""

import math
import warnings

import pytest
import torch

from kandinsky.parity import schedulers as P
from kandinsky.schedulers import (
    SAMPLERS,
    NoiseSchedule,
    add_noise,
    dynamic_threshold,
    sample,
    sampler_timesteps,
    space_timesteps,
    spaced_timesteps,
)

warnings.filterwarnings("ignore", message=".*scale_model_input.*")


def _error(case) -> tuple[float, float, str]:
    ours, ref, tol, metric = case()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = (ours.double() - ref.double()).abs().max().item()
    err = diff if metric == "abs" else diff / max(ref.double().abs().max().item(), 1e-12)
    return err, tol, metric


def _check_group(cases: dict, prefix: str) -> None:
    """Every case whose name starts with `prefix` (one test per group keeps the suite fast)."""
    names = [n for n in cases if n.startswith(prefix) or n == prefix.rstrip(".")]
    assert names, prefix
    failures = []
    for name in names:
        err, tol, metric = _error(cases[name])
        if not err <= tol:
            failures.append(f"{name}: {metric} error {err:.3e} > {tol:.0e}")
    assert not failures, "\n".join(failures)


def _groups(cases: dict, depth: int) -> list[str]:
    return sorted({".".join(n.split(".")[:depth]) + "." for n in cases})


SCHEDULE_CASES = P.schedule_cases()
ORIGINAL_CASES = P.original_cases()
DIFFUSERS_CASES = P.diffusers_cases()


@pytest.mark.parametrize("group", _groups(SCHEDULE_CASES, 2))
def test_schedule_matches_original(group):
    _check_group(SCHEDULE_CASES, group)


@pytest.mark.parametrize("group", _groups(ORIGINAL_CASES, 2))
def test_sampler_matches_original(group):
    _check_group(ORIGINAL_CASES, group)


@pytest.mark.parametrize("group", _groups(DIFFUSERS_CASES, 1))
def test_sampler_matches_diffusers(group):
    _check_group(DIFFUSERS_CASES, group)


def test_prior_transformer_run_matches_original():
    """sampler_prior's run with the real tiny PriorTransformer, through our Prior model and the unclip sampler."""
    _check_group(P.prior_model_cases(), "prior.transformer")


# ---- behaviour ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_runs_from_a_partial_list_and_is_seeded(name):
    schedule = P.prior_schedule() if name == "unclip" else P.decoder_schedule()
    ts = sampler_timesteps(name, schedule, 12)[5:]
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    model = P.standin_learned if name in ("p_sampler", "ddpm") else P.standin_eps
    runs = [sample(name, model, x, schedule, ts, generator=torch.Generator().manual_seed(3), progress=False)
            for _ in range(2)]
    assert runs[0].shape == x.shape and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])


def test_model_sees_original_timesteps_and_the_variance_half_is_optional():
    schedule = P.decoder_schedule()
    ts = sampler_timesteps("ddim", schedule, 5)
    seen = []
    x = torch.randn(1, 4, 4, 4)
    a = sample("ddim", lambda x, t: (seen.append(t), P.standin_eps(x, t))[1], x, schedule, ts, progress=False)
    b = sample("ddim", P.standin_learned, x, schedule, ts, progress=False)
    assert [t.tolist() for t in seen] == [[int(v)] for v in ts]
    assert all(t.dtype == torch.int64 for t in seen)
    assert torch.equal(a, b)


def test_p_sampler_threshold_batch0_differs_from_per_sample():
    """The original's clip_denoised uses the first sample's 99.5th percentile (at least 1) for the whole batch."""
    x0 = torch.cat([torch.full((1, 4, 8, 8), 2.0), torch.full((1, 4, 8, 8), 0.5)])
    x0[0, 0, 0, 0] = 7.0  # above the percentile: clipped
    batch0 = dynamic_threshold(x0, batch0=True)  # s = 2 for both samples
    per_sample = dynamic_threshold(x0)  # s = 2, then s = max(0.5, 1) = 1
    assert batch0[0, 0, 0, 0] == 1.0 and batch0[0, 1].eq(1.0).all()
    assert batch0[1].eq(0.25).all() and per_sample[1].eq(0.5).all()
    assert dynamic_threshold(3 * x0, max_value=2.0)[0, 1].eq(1.0).all()  # s = 6 capped at 2 (diffusers DDPM)


def test_p_sampler_x0_fn_is_applied_before_the_threshold():
    """x0_fn's output goes through the batch-0 threshold: 4 and 0.5 become 4 / 4 and 0.5 / 4 (the first
    sample's percentile, 4, for both); thresholding first would leave x0_fn's values as they are."""
    schedule = P.decoder_schedule()
    ts = sampler_timesteps("p_sampler", schedule, 4)
    calls, processed = [], []

    def x0_fn(x0, t):
        calls.append(t)
        return torch.cat([torch.full_like(x0[:1], 4.0), torch.full_like(x0[1:], 0.5)])

    x = 3 * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    sample("p_sampler", P.standin_learned, x, schedule, ts, generator=torch.Generator().manual_seed(0),
           progress=False, x0_fn=x0_fn, callback=lambda i, t, x, x0: processed.append(x0))
    assert [t.tolist() for t in calls] == [[int(t)] * 2 for t in ts]  # (B,) original-scale timesteps
    for x0 in processed:
        assert torch.equal(x0[0], torch.ones_like(x0[0])) and torch.equal(x0[1], torch.full_like(x0[1], 0.125))


def test_add_noise_matches_formula_and_diffusers_img2img_noising():
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)  # the plain linear betas both references noise img2img with
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([698, 3])
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    assert torch.allclose(add_noise(x0, noise, t, schedule).double(), expected, rtol=1e-6, atol=1e-6)
    ref = DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear").add_noise(x0, noise, t)
    # diffusers: float32 cumprod (ab differs by ~1e-7 relative), float32 products of values up to ~4
    assert torch.allclose(add_noise(x0, noise, t, schedule), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(add_noise(x0, noise, 698, schedule)[0], add_noise(x0, noise, t, schedule)[0])


def test_timestep_spacings():
    assert space_timesteps(1000, "ddim50")[:3] == [1, 21, 41] and space_timesteps(1000, "ddim50")[-1] == 981
    assert space_timesteps(1000, "5") == [0, 250, 500, 749, 999]
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    assert spaced_timesteps("leading", 1000, 4, offset=1).tolist() == [751, 501, 251, 1]
    assert spaced_timesteps("trailing", 1000, 4).tolist() == [999, 749, 499, 249]
    assert spaced_timesteps("unclip", 1000, 1).tolist() == [0]
    assert sampler_timesteps("p_sampler", P.decoder_schedule(), 10)[0] == 999  # the original respacing keeps 999
    assert sampler_timesteps("euler_a", P.decoder_schedule(), 3).dtype == torch.float32  # 999, 499.5, 0


def test_noise_schedules():
    cos = NoiseSchedule.squared_cosine(1000)
    assert cos.betas.dtype == torch.float64 and cos.betas.max().item() == pytest.approx(0.999)
    custom = NoiseSchedule(betas=torch.full((10,), 0.1, dtype=torch.float64))
    assert custom.num_train_timesteps == 10
    assert custom.alphas_cumprod[-1].item() == pytest.approx(0.9**10)
    assert custom.respaced([0, 9]).alphas_cumprod[-1].item() == pytest.approx(0.9**10)
    assert math.isclose(custom.sigmas[0].item(), math.sqrt(0.1 / 0.9))


def test_bfloat16_inputs_keep_their_dtype():
    schedule = P.decoder_schedule()
    x = torch.randn(1, 4, 4, 4).to(torch.bfloat16)
    for name in ("ddim", "dpmpp_2m", "euler_a"):
        out = sample(name, P.standin_eps, x, schedule, sampler_timesteps(name, schedule, 4),
                     generator=torch.Generator().manual_seed(0), progress=False)
        assert out.dtype == torch.bfloat16


# ---- bad input --------------------------------------------------------------------------------------

BAD = [
    (lambda: sampler_timesteps("heun", P.decoder_schedule(), 10), "name"),
    (lambda: sampler_timesteps("ddim", P.decoder_schedule(), 0), "num_inference_steps"),
    (lambda: sampler_timesteps("ddim", P.decoder_schedule(), 1001), "num_inference_steps"),
    (lambda: sampler_timesteps("ddim", P.decoder_schedule(), 10, spacing="cubic"), "spacing"),
    (lambda: sample("nope", P.standin_eps, torch.zeros(1, 4, 2, 2), P.decoder_schedule(), torch.tensor([5])), "name"),
    (lambda: sample("ddim", P.standin_eps, torch.zeros(1, 4, 2, 2), P.decoder_schedule(), torch.tensor([5]),
                    eta=1.5), "eta"),
    (lambda: sample("ddim", P.standin_eps, torch.zeros(1, 4, 2, 2), P.decoder_schedule(), torch.tensor([5]),
                    eta=-0.1), "eta"),
    (lambda: sample("ddim", P.standin_eps, torch.zeros(1, 4, 2, 2), P.decoder_schedule(), torch.tensor([5]),
                    threshold="batch0"), "options"),
    (lambda: sample("p_sampler", P.standin_learned, torch.zeros(1, 4, 2, 2), P.decoder_schedule(),
                    torch.tensor([5]), threshold="global"), "threshold"),
    (lambda: sample("ddim", P.standin_eps, torch.zeros(1, 4, 2, 2), P.decoder_schedule(), torch.tensor([5, 9])),
     "timesteps"),
    (lambda: sample("ddim", P.standin_eps, torch.zeros(1, 4, 2, 2), P.decoder_schedule(), torch.tensor([1000])),
     "timesteps"),
    (lambda: sample("ddim", P.standin_eps, torch.zeros(1, 4, 2, 2), P.decoder_schedule(), torch.tensor([5]),
                    prediction="v"), "prediction"),
    (lambda: sample("ddim", lambda x, t: torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 2, 2), P.decoder_schedule(),
                    torch.tensor([5])), "denoise"),
    (lambda: NoiseSchedule(betas=torch.tensor([0.1, 0.0])), "betas"),
    (lambda: NoiseSchedule(betas=torch.ones(2, 2) * 0.1), "betas"),
    (lambda: NoiseSchedule.linear(0), "num_train_timesteps"),
    (lambda: add_noise(torch.zeros(2, 4), torch.zeros(2, 3), 5, P.decoder_schedule()), "noise"),
    (lambda: add_noise(torch.zeros(2, 4), torch.zeros(2, 4), 1000, P.decoder_schedule()), "t"),
    (lambda: add_noise(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([1, 2, 3]), P.decoder_schedule()), "t"),
    (lambda: space_timesteps(1000, "ddimx"), "section_counts"),
    (lambda: space_timesteps(10, "20"), "section_counts"),
]


@pytest.mark.parametrize("call,argument", BAD, ids=[f"{i}-{a}" for i, (_, a) in enumerate(BAD)])
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_randn_draws_what_torch_randn_draws_with_the_generator():
    from kandinsky.schedulers import randn

    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    drawn = randn([2, 3], torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(drawn, expected)
    assert randn((4,), torch.Generator().manual_seed(5), torch.device("cpu"), torch.float64).dtype == torch.float64

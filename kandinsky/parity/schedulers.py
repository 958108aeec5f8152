"""Sampler parity: our schedules and samplers against the original fixtures and diffusers 0.42.1 schedulers.

Every check is a small function returning (ours, reference, tolerance, metric); `checks()` turns them into rows and
tests/test_schedulers.py runs the same functions. Cheap: analytic stand-in models only.

Tolerances: schedules are float64 on both sides (rel 1e-12). Original trajectories are float32 with float64-derived
scalars on both sides; the analytic stand-ins are not denoisers and grow to |x| ~ 30-60, so they use the fixtures'
`suggested_atol` 1e-4 (measured: about 1e-6 relative to max |x|). diffusers computes its schedule in float32
(alphas_cumprod differs from float64 by up to 6e-7 relative), so diffusers rows allow rel 1e-5. The unCLIP
scheduler's float32 coefficients are themselves off near the ends of the cosine schedule (at t = 0 its x0
coefficient beta_0 / (1 - f32(1 - beta_0)) is 0.99947 instead of 1; at t = 999 the x coefficient
sqrt(1 - beta) (1 - ab_prev) / (1 - ab) is 2.37e-4 instead of 2.78e-4): our unclip sampler repeats that arithmetic
by default (measured: identical to diffusers), and with ``arithmetic="float64"`` matches the original prior sampler
to 1e-6 (the float32 default is 3.7e-3 away from it on the fixtures' runs, |x| ~ 7).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch

from kandinsky.parity import Row, compare
from kandinsky.schedulers import (
    NoiseSchedule,
    ancestral_step,
    ddim_step,
    dpmpp_2m_step,
    dynamic_threshold,
    euler_ancestral_step,
    sample,
    sampler_timesteps,
    sigma_at,
    space_timesteps,
    unclip_float32_step,
)
from kandinsky.testing import diffusers_reference_config, load_original_fixture as _load_fixture

Case = tuple[torch.Tensor, torch.Tensor, float, str]

ORIGINAL_ATOL = 1e-4  # float32 trajectories up to |x| ~ 50: the fixtures' suggested_atol
SCHEDULE_REL = 1e-12  # float64 on both sides
DIFFUSERS_REL = 1e-5  # diffusers' float32 schedule vs our float64 one
UNCLIP_DIFFUSERS_REL = 1e-6  # the same float32 operations as diffusers' UnCLIPScheduler: measured 0


@functools.cache
def load_original_fixture(name: str):
    return _load_fixture(name)


def decoder_schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(1000, 0.00085, 0.012)


def prior_schedule() -> NoiseSchedule:
    return NoiseSchedule.squared_cosine(1000)


# ---- analytic stand-ins of the fixtures (their `call` fields) -------------------------------------


def standin_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """0.5 tanh(x) cos(t / 1000 * 1.3) + 0.1 x, the decoder stand-in of sampler_ddim/plms/p_sample."""
    return 0.5 * torch.tanh(x) * torch.cos(t.float().view(-1, *([1] * (x.ndim - 1))) / 1000 * 1.3) + 0.1 * x


def standin_learned(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The stand-in plus a learned-range variance half 0.3 tanh(x)."""
    return torch.cat([standin_eps(x, t), 0.3 * torch.tanh(x)], dim=1)


class Recorder:
    """Wraps a denoiser and records every (x, t) it is called with."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn, self.x, self.t = fn, [], []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.x.append(x.clone())
        self.t.append(t.clone())
        return self.fn(x, t)


def queue_noise(tensors: dict[str, torch.Tensor], prefix: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A noise_fn returning the recorded `<prefix>.<k>` tensors in order."""
    k = iter(range(10_000))

    def next_noise(like: torch.Tensor) -> torch.Tensor:
        return tensors[f"{prefix}.{next(k)}"].to(like)

    return next_noise


# ---- original fixtures ---------------------------------------------------------------------------


def schedule_cases() -> dict[str, Callable[[], Case]]:
    """output.<decoder|prior>[.respaced_<r>].<attr> of schedule.safetensors vs NoiseSchedule (.respaced)."""
    tensors, meta = load_original_fixture("schedule")
    cases = {}
    attrs = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
             "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]
    for name, make, respacings in (("decoder", decoder_schedule, meta["original_config"]["decoder_respacings"]),
                                   ("prior", prior_schedule, meta["original_config"]["prior_respacings"])):
        def raw(name=name, make=make) -> Case:
            return make().betas, tensors[f"output.{name}.raw_betas"], SCHEDULE_REL, "rel"

        cases[f"{name}.raw_betas"] = raw
        for r in [""] + list(respacings):
            key = f"output.{name}" + (f".respaced_{r.replace(',', '_')}" if r else "")

            def timestep_map(r=r, key=key) -> Case:
                ours = torch.tensor(space_timesteps(1000, r) if r else list(range(1000)))
                return ours, tensors[f"{key}.timestep_map"], 0.0, "abs"

            cases[f"{name}.{r or 'full'}.timestep_map"] = timestep_map
            for attr in attrs:
                def arr(attr=attr, r=r, key=key, make=make) -> Case:
                    s = make()
                    s = s.respaced(space_timesteps(1000, r) if r else range(1000))
                    return getattr(s, attr), tensors[f"{key}.{attr}"], SCHEDULE_REL, "rel"

                cases[f"{name}.{r or 'full'}.{attr}"] = arr
    return cases


def ddim_plms_case(sampler: str, steps: int, what: str) -> Case:
    """sampler_ddim / sampler_plms: `what` in sample, pred_x0, model_call_x, model_call_t, ddim_timesteps,
    ddim_alphas, ddim_alphas_prev."""
    tensors, _ = load_original_fixture(f"sampler_{sampler}")
    out = f"output.steps_{steps}"
    schedule = decoder_schedule()
    ts = sampler_timesteps(sampler, schedule, steps)
    if what == "ddim_timesteps":
        return ts.flip(0), tensors[f"{out}.ddim_timesteps"], 0.0, "abs"
    if what in ("ddim_alphas", "ddim_alphas_prev"):
        ab = schedule.alphas_cumprod
        asc = ts.flip(0)
        ours = ab[asc] if what == "ddim_alphas" else torch.cat([ab[:1], ab[asc[:-1]]])
        return ours, tensors[f"{out}.{what}"], SCHEDULE_REL, "rel"
    ours = _ddim_plms_run(sampler, steps)[what]
    return ours, tensors[f"{out}.{what}"], (0.0 if what == "model_call_t" else ORIGINAL_ATOL), "abs"


@functools.cache
def _ddim_plms_run(sampler: str, steps: int) -> dict[str, torch.Tensor]:
    tensors, _ = load_original_fixture(f"sampler_{sampler}")
    schedule = decoder_schedule()
    model = Recorder(standin_eps)
    x0s = []
    final = sample(sampler, model, tensors["input.x_T"], schedule, sampler_timesteps(sampler, schedule, steps),
                   progress=False, callback=lambda i, t, x, x0: x0s.append(x0))
    return {"sample": final, "pred_x0": torch.stack(x0s), "model_call_x": torch.stack(model.x),
            "model_call_t": torch.stack(model.t)}


def p_sample_case(variant: str, what: str) -> Case:
    """sampler_p_sample (respacing "10", learned range, recorded noise): variant plain | kandinsky; `what` in sample,
    x_per_step, pred_xstart_per_step, model_call_t, timestep_map."""
    tensors, _ = load_original_fixture("sampler_p_sample")
    schedule = decoder_schedule()
    ts = sampler_timesteps("p_sampler", schedule, 10)
    if what == "timestep_map":
        return ts.flip(0), tensors["output.timestep_map"], 0.0, "abs"
    options = {"threshold": None} if variant == "plain" else {
        "threshold": "batch0", "x0_fn": lambda x0, t: x0.clamp(-2, 2)}
    model = Recorder(standin_learned)
    xs, x0s = [], []

    def record(i, t, x, x0):
        xs.append(x)
        x0s.append(x0)

    final = sample("p_sampler", model, tensors["input.x_T"], schedule, ts, progress=False,
                   noise_fn=queue_noise(tensors, "input.noise"), callback=record, **options)
    ours = {"sample": final, "x_per_step": torch.stack(xs), "pred_xstart_per_step": torch.stack(x0s),
            "model_call_t": torch.stack(model.t).float()}[what]
    exact = what == "model_call_t"
    return ours, tensors[f"output.{variant}.{what}"], 0.0 if exact else ORIGINAL_ATOL, "abs"


def prior_guided(model: Callable, text_emb: torch.Tensor, scales: torch.Tensor, bsz: int) -> Callable:
    """The original PriorDiffusionModel guidance wrapper (guidance belongs to the pipeline, so it lives here):
    rows 0..bsz-1 conditional, bsz.. unconditional; guidance on the x0 prediction; only x_t[:bsz] is fed."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = x[:bsz]
        out = model(torch.cat([half, half]), t, text_emb)
        cond, uncond = out[:bsz], out[bsz:]
        g = uncond + scales.view(-1, 1).to(out) * (cond - uncond)
        return torch.cat([g, g])

    return guided


def prior_standin(x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    return 2 * torch.tanh(x) + 0.1 * t.float()[:, None] / 1000 + 0.5 * torch.tanh(text_emb)


def prior_case(run: str, what: str, sampler: str = "unclip", model: Callable | None = None) -> Case:
    """sampler_prior run `<mode>_respaced_<r>`: `what` in sample, model_call_x, model_call_t. The prior diffusion is
    cosine / x0 prediction / fixed small variance / x0 clamped to +-10; both "unclip" and "p_sampler" (threshold None,
    x0_fn clamp) reproduce it."""
    tensors, meta = load_original_fixture("sampler_prior")
    bsz = meta["original_config"]["bsz"]
    steps = int(run.rsplit("_", 1)[1])
    schedule = prior_schedule()
    ts = sampler_timesteps(sampler, schedule, steps)
    inner = Recorder(lambda x, t: (model or prior_standin)(x, t, tensors["input.txt_feat"]))
    guided = prior_guided(lambda x, t, _: inner(x, t), tensors["input.txt_feat"],
                          tensors["input.cf_guidance_scales"], bsz)
    # the original prior's float64 arithmetic (the unclip default is diffusers' float32 one)
    options = {"arithmetic": "float64"} if sampler == "unclip" else {
        "prediction": "sample", "threshold": None, "x0_fn": lambda x0, t: x0.clamp(-10, 10)}
    x = sample(sampler, guided, tensors[f"input.{run}.x_T"], schedule, ts, progress=False,
               noise_fn=queue_noise(tensors, f"input.{run}.noise"), **options)
    x = (x * tensors["input.clip_std"][None] + tensors["input.clip_mean"][None])[:bsz]
    ours = {"sample": x, "model_call_x": torch.stack(inner.x), "model_call_t": torch.stack(inner.t)}[what]
    exact = what == "model_call_t"
    return ours, tensors[f"output.{run}.{what}"], 0.0 if exact else ORIGINAL_ATOL, "abs"


@functools.cache
def tiny_prior_model() -> Callable:
    """The sampler_prior fixture's tiny PriorTransformer as our Prior."""
    from kandinsky.convert import from_original
    from kandinsky.testing import prefixed

    tensors, meta = load_original_fixture("sampler_prior")
    prior = from_original("prior", meta["original_config"]["prior_params"], prefixed(tensors, "state_dict."),
                          clip_stats=(tensors["input.clip_mean"], tensors["input.clip_std"])).eval()

    def model(x: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return prior(x, t, text_embeds=text_embeds, text_hidden_states=tensors["input.txt_feat_seq"],
                     text_mask=tensors["input.mask"])

    return model


def original_cases() -> dict[str, Callable[[], Case]]:
    cases: dict[str, Callable[[], Case]] = {}
    for sampler in ("ddim", "plms"):
        for steps in (10, 50):
            for what in ("ddim_timesteps", "ddim_alphas", "ddim_alphas_prev", "model_call_t", "model_call_x",
                         "pred_x0", "sample"):
                cases[f"{sampler}.{steps}.{what}"] = lambda s=sampler, n=steps, w=what: ddim_plms_case(s, n, w)
    cases["p_sample.timestep_map"] = lambda: p_sample_case("plain", "timestep_map")
    for variant in ("plain", "kandinsky"):
        for what in ("model_call_t", "pred_xstart_per_step", "x_per_step", "sample"):
            cases[f"p_sample.{variant}.{what}"] = lambda v=variant, w=what: p_sample_case(v, w)
    for run in ("standin_respaced_5", "standin_respaced_25"):
        for sampler in ("unclip", "p_sampler"):
            for what in ("model_call_t", "model_call_x", "sample"):
                cases[f"prior.{run}.{sampler}.{what}"] = lambda r=run, s=sampler, w=what: prior_case(r, w, s)
    return cases


def prior_model_cases() -> dict[str, Callable[[], Case]]:
    """The sampler_prior run with the real tiny PriorTransformer (needs kandinsky.models.prior)."""
    return {f"prior.transformer_respaced_5.unclip.{what}":
            lambda w=what: prior_case("transformer_respaced_5", w, "unclip", tiny_prior_model())
            for what in ("model_call_t", "model_call_x", "sample")}


# ---- diffusers -------------------------------------------------------------------------------------


def diffusers_scheduler(kind: str):
    """diffusers 0.42.1 scheduler with the Kandinsky 2.1 configs (hub repos' scheduler configs; DPM-Solver++ and
    Euler ancestral: their defaults with the decoder betas)."""
    import diffusers

    if kind == "ddim":
        return diffusers.DDIMScheduler.from_config(diffusers_reference_config("kandinsky-2-1.scheduler_config.json"))
    if kind == "ddpm":
        return diffusers.DDPMScheduler.from_config(diffusers_reference_config("kandinsky-2-1.ddpm_scheduler_config.json"))
    if kind == "unclip":
        return diffusers.UnCLIPScheduler.from_config(diffusers_reference_config("kandinsky-2-1-prior.scheduler_config.json"))
    betas = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    if kind == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**betas)
    if kind == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**betas)
    raise ValueError(f"kind: unknown {kind!r}")


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def diffusers_timesteps_case(kind: str, steps: int) -> Case:
    sched = diffusers_scheduler(kind)
    sched.set_timesteps(steps)
    schedule = prior_schedule() if kind == "unclip" else decoder_schedule()
    return sampler_timesteps(kind, schedule, steps).double(), sched.timesteps.double(), 0.0, "abs"


def _float64_(sched, schedule: NoiseSchedule) -> None:
    """Give a diffusers DDIM/DDPM/unCLIP scheduler our float64 schedule, to compare the update rules alone."""
    sched.betas = schedule.betas.clone()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = schedule.alphas_cumprod
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = schedule.alphas_cumprod[0]


def diffusers_step_case(kind: str, steps: int, seed: int = 0, float64: bool = False) -> Case:
    """Every step of a `steps`-step schedule with random model outputs and samples (fresh per step, so errors do not
    compound); stochastic steps draw from generators with the same seed. Returns all stacked prev_samples.

    float64=True (ddim, ddpm, unclip): the scheduler gets our float64 schedule and float64 inputs, so only the update
    rules are compared (rel 1e-12)."""
    sched = diffusers_scheduler(kind)
    sched.set_timesteps(steps)
    schedule = prior_schedule() if kind == "unclip" else decoder_schedule()
    if float64:
        _float64_(sched, schedule)
    ts = [t.item() for t in sched.timesteps]
    shape = (2, 32) if kind == "unclip" else (2, 4, 8, 8)
    ours_all, ref_all = [], []
    x0_prev = None
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        x = _randn(shape, seed + 3 * i) * 3
        out = _randn((shape[0], 2 * shape[1], *shape[2:]) if kind == "ddpm" else shape, seed + 3 * i + 1)
        if float64:
            x, out = x.double(), out.double()
        if kind == "ddpm":
            out[:, 4:] = out[:, 4:].tanh()  # variance value in [-1, 1]
        g_ref, g_ours = (torch.Generator().manual_seed(seed + 3 * i + 2) for _ in range(2))
        if kind == "ddim":
            ref = sched.step(out, ts[i], x, eta=0.5, generator=g_ref).prev_sample
            noise = torch.randn(x.shape, generator=g_ours, dtype=x.dtype)
            ours = ddim_step(out, x, int(t), int(t_next), schedule, eta=0.5, noise=noise)[0]
        elif kind in ("ddpm", "unclip"):
            if kind == "ddpm":
                ref = sched.step(out, ts[i], x, generator=g_ref).prev_sample
                process = lambda x0: dynamic_threshold(x0, 0.995, max_value=2.0)  # noqa: E731
            else:
                prev = None if i + 1 == len(ts) else ts[i + 1]
                ref = sched.step(out, ts[i], x, prev_timestep=prev, generator=g_ref).prev_sample
                process = lambda x0: x0.clamp(-10, 10)  # noqa: E731
            noise = torch.randn(x.shape, generator=g_ours, dtype=x.dtype) if t > 0 else None
            # unclip: diffusers' float32 arithmetic, or with its table made float64 the original's float64 one
            step = unclip_float32_step if kind == "unclip" and not float64 else ancestral_step
            ours = step(out, x, int(t), int(t_next), schedule, prediction="sample" if kind == "unclip" else "epsilon",
                        x0_process=process, noise=noise)[0]
        elif kind == "dpmpp_2m":
            # Multistep: the scheduler keeps the previous x0, so feed both sides the same sequence.
            ref = sched.step(out, ts[i], x).prev_sample
            ours, x0 = dpmpp_2m_step(out, x, int(t), int(t_next), schedule,
                                     x0_prev=x0_prev if (i > 0 and t_next >= 0) else None,
                                     t_prev_step=int(ts[i - 1]) if i > 0 else None)
            x0_prev = x0
        elif kind == "euler_a":
            ref = sched.step(out, sched.timesteps[i], x, generator=g_ref).prev_sample
            sigma = sigma_at(schedule, float(t))
            sigma_next = sigma_at(schedule, float(ts[i + 1])) if i + 1 < len(ts) else 0.0
            ours = euler_ancestral_step(out, x, sigma, sigma_next, torch.randn(x.shape, generator=g_ours))[0]
        else:
            raise ValueError(kind)
        ours_all.append(ours)
        ref_all.append(ref)
    return torch.stack(ours_all), torch.stack(ref_all), 1e-12 if float64 else _diffusers_tol(kind), "rel"


def diffusers_loop_case(kind: str, steps: int, start: int = 0, seed: int = 0) -> Case:
    """A whole diffusers sampling loop (scheduler.step, with scale_model_input and init_noise_sigma for Euler) vs
    `sample()`, over an analytic denoiser, from timesteps[start:] (img2img-style partial lists when start > 0)."""
    sched = diffusers_scheduler(kind)
    sched.set_timesteps(steps)
    schedule = prior_schedule() if kind == "unclip" else decoder_schedule()
    ts = sampler_timesteps(kind, schedule, steps)[start:]
    shape = (2, 32) if kind == "unclip" else (2, 4, 8, 8)
    x_init = _randn(shape, seed)
    if kind == "unclip":
        model = lambda x, t: 2 * torch.tanh(x) + 0.1 * t.float()[:, None] / 1000  # noqa: E731
    elif kind == "ddpm":
        model = standin_learned
    else:
        model = standin_eps
    options = {"eta": 0.5} if kind == "ddim" else {}
    ours = sample(kind, model, x_init, schedule, ts, generator=torch.Generator().manual_seed(seed + 1),
                  progress=False, **options)

    g = torch.Generator().manual_seed(seed + 1)
    ref_ts = sched.timesteps[start:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    x = x_init.clone()
    if kind == "euler_a":
        # VP -> sigma space for the first timestep (docs/samplers.md: diffusers' init_noise_sigma is sigma_max itself).
        x = x * (sigma_at(schedule, float(ref_ts[0])) ** 2 + 1) ** 0.5
    for i, t in enumerate(ref_ts):
        model_in = sched.scale_model_input(x, t)
        out = model(model_in, t.reshape(1).expand(shape[0]))
        if kind == "unclip":
            prev = None if i + 1 == len(ref_ts) else ref_ts[i + 1]
            x = sched.step(out, t, x, prev_timestep=prev, generator=g).prev_sample
        elif kind == "ddim":
            x = sched.step(out, t, x, eta=0.5, generator=g).prev_sample
        else:
            x = sched.step(out, t, x, generator=g).prev_sample
    return ours, x, _diffusers_tol(kind), "rel"


def _diffusers_tol(kind: str) -> float:
    return UNCLIP_DIFFUSERS_REL if kind == "unclip" else DIFFUSERS_REL


DIFFUSERS_KINDS = ("ddim", "ddpm", "unclip", "dpmpp_2m", "euler_a")


def diffusers_cases() -> dict[str, Callable[[], Case]]:
    cases: dict[str, Callable[[], Case]] = {}
    for kind in DIFFUSERS_KINDS:
        for steps in (1, 10, 25, 100) if kind != "unclip" else (2, 5, 25):
            cases[f"{kind}.{steps}.timesteps"] = lambda k=kind, n=steps: diffusers_timesteps_case(k, n)
        cases[f"{kind}.10.steps"] = lambda k=kind: diffusers_step_case(k, 10)
        if kind in ("ddim", "ddpm", "unclip"):
            cases[f"{kind}.10.steps_float64"] = lambda k=kind: diffusers_step_case(k, 10, float64=True)
        cases[f"{kind}.25.loop"] = lambda k=kind: diffusers_loop_case(k, 25)
        if kind != "unclip":
            cases[f"{kind}.20.loop_from_7"] = lambda k=kind: diffusers_loop_case(k, 20, start=7)
    return cases


def checks() -> Iterator[Row]:
    """Rows for `python scripts/parity_report.py schedulers`."""
    with_model = prior_model_cases()
    for prefix, cases in (("original/schedule", schedule_cases()), ("original", original_cases()),
                          ("original", with_model), ("diffusers", diffusers_cases())):
        for name, case in cases.items():
            ours, ref, tol, metric = case()
            yield compare("schedulers", f"{prefix}/{name}", ours, ref, tol, metric)

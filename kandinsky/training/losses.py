"""Training losses of the decoder UNet and the prior, exact to the original trainers.

Decoder (:func:`decoder_loss`), on MoVQ latents ``x0`` with the 1000-step linear schedule (beta 0.00085..0.012)::

    x_t  = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise                        ab_t = prod_{s<=t} (1 - beta_s)
    eps, v = unet(x_t, t) split into the noise channels and the variance channels
    mse  = mean_{c,h,w} (noise - eps)^2
    vb   = KL( q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t) ) / ln 2                  t > 0  (bits per dimension)
         = -log p(x0 | x_1) / ln 2, a Gaussian integrated over bins of width 2/255     t = 0
           p's mean from eps.detach(), its log-variance  frac log(beta_t) + (1 - frac) log(beta~_t),  frac = (v + 1) / 2

* ``objective="original"``: ``loss = mse + vb``, the improved-DDPM hybrid objective as the original weights it
  (its RESCALED_MSE factor T / 1000 is 1 for T = 1000). The vb term sees the noise prediction detached, so it
  trains only the variance channels.
* ``objective="eps"``: ``loss = mse`` (diffusers' Kandinsky decoder examples); with ``snr_gamma`` Min-SNR weighted
  for epsilon prediction: ``loss = min(snr_t, gamma) / snr_t * mse``, ``snr_t = ab_t / (1 - ab_t)``.

Kandinsky 2.2's decoder UNet (``conditioning="image"``) is trained with the same function and
``objective="eps"``, given the CLIP image embedding alone (no text): the noise channels of its output against
the noise, its variance channels dropped, on the same linear schedule (diffusers' 2.2 decoder example:
``DDPMScheduler`` linear 0.00085..0.012 over 1000 steps, ``unet(...).sample[:, :4]``, ``F.mse_loss``).

Prior (:func:`prior_loss`), on CLIP image embeddings normalised with the prior's statistics, ``x0 = (e - mean) / std``,
with the 1000-step squared-cosine schedule: ``loss = mse = mean_d (x0 - prior(x_t, t))^2`` (the prior predicts x0).

Every loss is per sample, shape (B,), in float32; the trainer minimises its mean. Schedule coefficients are
float64, indexed by t and only then cast to float32, as the original does. The coefficient tables are computed
once on the CPU and kept on each device the losses run on, and indexed there: no step waits for the device.
Timesteps given on the CPU (as the trainer draws them) are range-checked there; on an accelerator they are
checked by the device itself (an asynchronous assertion), without a round trip to the host.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from kandinsky import schedulers
from kandinsky.schedulers import NUM_TRAIN_TIMESTEPS, NoiseSchedule
from kandinsky.validation import check_number

__all__ = ["NUM_TRAIN_TIMESTEPS", "OBJECTIVES", "decoder_loss", "decoder_schedule", "prior_loss", "prior_schedule"]

OBJECTIVES = ("original", "eps")


# The original trains through SpacedDiffusion, which re-derives every beta from the cumulative products even when
# it keeps all steps: respacing the inference schedules onto every timestep reproduces its float64 values.

@functools.cache
def decoder_schedule() -> NoiseSchedule:
    """The decoder's training diffusion: :func:`kandinsky.schedulers.decoder_schedule` (linear betas
    0.00085..0.012 over 1000 steps) as the original's trainer computes it."""
    return schedulers.decoder_schedule().respaced(range(NUM_TRAIN_TIMESTEPS))


@functools.cache
def prior_schedule() -> NoiseSchedule:
    """The prior's training diffusion: :func:`kandinsky.schedulers.prior_schedule` (squared-cosine betas over 1000
    steps) as the original's trainer computes it."""
    return schedulers.prior_schedule().respaced(range(NUM_TRAIN_TIMESTEPS))


def decoder_loss(unet: nn.Module, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, *,
                 image_embeds: torch.Tensor, text_hidden_states: torch.Tensor | None = None,
                 text_embeds: torch.Tensor | None = None,
                 inpaint_image: torch.Tensor | None = None, inpaint_mask: torch.Tensor | None = None,
                 objective: str = "original", snr_gamma: float | None = None) -> dict[str, torch.Tensor]:
    """Per-sample decoder losses (see the module docstring for the formulas).

    Args:
        unet: our :class:`~kandinsky.models.unet.UNet` (or a DistributedDataParallel / torch.compile wrapper of it);
            4 input channels, or 9 for inpainting.
        x0: (B, 4, h, w) clean MoVQ latents.
        timesteps: (B,) integer steps in 0..999 of the training schedule.
        noise: (B, 4, h, w) the Gaussian noise added to ``x0``.
        image_embeds, text_hidden_states, text_embeds: the UNet's conditioning (see ``UNet.forward``): all three
            for Kandinsky 2.1's UNet, ``image_embeds`` alone for 2.2's (``conditioning="image"``).
        inpaint_image: (B, 4, h, w) latents of the known region; inpainting UNet only.
        inpaint_mask: (B, 1, h, w), 1 = known latent pixel given to the model, 0 = to generate; inpainting UNet
            only. The loss itself is not masked (as in the original).
        objective: ``"original"`` (mse + vb) or ``"eps"`` (mse only).
        snr_gamma: Min-SNR gamma for ``objective="eps"``; ``None`` = unweighted.

    Returns:
        ``{"loss", "mse", "vb"}`` (original) or ``{"loss", "mse"}`` (eps), each (B,) float32; ``"mse"`` is never
        SNR-weighted.
    """
    _check_objective(objective, snr_gamma)
    _check_float("x0", x0, "(B, 4, h, w) latents", ndim=4)
    _check_like("noise", noise, x0)
    timesteps = _check_timesteps(timesteps, x0)
    inpainting = _check_decoder(unet, x0, inpaint_image, inpaint_mask, objective)
    channels = x0.shape[1]

    tables = _tables("decoder", x0.device)
    x0, noise = x0.float(), noise.float()
    x_t = _add_noise(x0, noise, timesteps, tables)  # (B, 4, h, w)
    model_input = x_t
    if inpainting:
        # what the original InpaintText2ImUNet feeds its first conv: it masks the known latents once more itself
        mask = inpaint_mask.to(x_t.dtype)
        model_input = torch.cat([x_t, inpaint_image.float() * mask, mask], dim=1)  # (B, 9, h, w)
    # The original gives the model float32 t (rescale_timesteps); our timestep embedding casts the integer steps
    # to float32 itself, so the model sees the same values.
    out = unet(model_input, timesteps, text_hidden_states=text_hidden_states, text_embeds=text_embeds,
               image_embeds=image_embeds).float()  # (B, 8, h, w); float32 losses for half-precision weights too
    eps, variance = out[:, :channels], out[:, channels:]
    mse = (noise - eps).square().mean(dim=(1, 2, 3))  # (B,)
    if objective == "original":
        # the bound trains only the variance: its mean comes from the detached noise prediction
        vb = _variational_bound(x0, x_t, eps.detach(), variance, timesteps, tables)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
    loss = mse
    if snr_gamma is not None:
        snr = tables["snr"]
        loss = mse * _at(snr.clamp(max=snr_gamma) / snr, timesteps, mse)
    return {"loss": loss, "mse": mse}


def prior_loss(prior: nn.Module, image_embeds: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, *,
               text_embeds: torch.Tensor, text_hidden_states: torch.Tensor,
               text_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-sample prior loss: x0-prediction MSE on the cosine schedule (see the module docstring).

    Args:
        prior: our :class:`~kandinsky.models.prior.Prior` (or a DistributedDataParallel / torch.compile wrapper).
        image_embeds: (B, clip_dim) raw CLIP image embeddings; normalised here with the prior's
            ``clip_mean`` / ``clip_std``.
        timesteps: (B,) integer steps in 0..999 of the training schedule.
        noise: (B, clip_dim) the Gaussian noise added to the normalised embeddings.
        text_embeds, text_hidden_states, text_mask: the prior's conditioning (see ``Prior.forward``).

    Returns:
        ``{"loss", "mse"}``, the same (B,) float32 tensor under both names.
    """
    _check_float("image_embeds", image_embeds, "(B, clip_dim) CLIP image embeddings", ndim=2)
    _check_like("noise", noise, image_embeds)
    timesteps = _check_timesteps(timesteps, image_embeds)
    x0 = _unwrapped(prior, "prior").normalize(image_embeds.float())  # (B, clip_dim)
    x_t = _add_noise(x0, noise.float(), timesteps, _tables("prior", x0.device))
    # the original's prior diffusion does not rescale timesteps: the model gets the integer steps
    predicted_x0 = prior(x_t, timesteps, text_embeds=text_embeds, text_hidden_states=text_hidden_states,
                         text_mask=text_mask).float()
    mse = (x0 - predicted_x0).square().mean(dim=1)  # (B,)
    return {"loss": mse, "mse": mse}


# ---- the variational-bound term -----------------------------------------------------------------------------

def _variational_bound(x0: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, variance: torch.Tensor,
                       timesteps: torch.Tensor, tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """The single-step term L_t of the bound in bits per dimension, (B,): the KL between the true posterior
    q(x_{t-1} | x_t, x0) and the model's Gaussian for t > 0, the discretized decoder NLL of x0 at t = 0."""
    coef_x0 = _at(tables["posterior_mean_coef1"], timesteps, x0)
    coef_xt = _at(tables["posterior_mean_coef2"], timesteps, x0)
    posterior_log_variance = _at(tables["posterior_log_variance"], timesteps, x0)  # log beta~_t
    true_mean = coef_x0 * x0 + coef_xt * x_t

    # the model's mean: the posterior mean around its x0 estimate (x_t - sqrt(1 - ab) eps) / sqrt(ab)
    predicted_x0 = (_at(tables["sqrt_recip_ab"], timesteps, x0) * x_t
                    - _at(tables["sqrt_recipm1_ab"], timesteps, x0) * eps)
    model_mean = coef_x0 * predicted_x0 + coef_xt * x_t
    # learned range: v in [-1, 1] interpolates the log-variance between beta~_t (the posterior's) and beta_t
    frac = (variance + 1) / 2
    model_log_variance = frac * _at(tables["log_betas"], timesteps, x0) + (1 - frac) * posterior_log_variance

    kl = _normal_kl(true_mean, posterior_log_variance, model_mean, model_log_variance)
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(timesteps == 0, nll, kl)


def _normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor,
               log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2).square() * torch.exp(-log_var2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # the tanh approximation of Phi (as in GELU) that the original uses, kept so that values and gradients match it
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise, for N(mean, exp(log_scale)^2) integrated over x's bin [x - 1/255, x + 1/255].

    The bins are those of 8-bit data scaled to [-1, 1]: the outermost ones (x beyond +-0.999) reach to infinity.
    The original applies this to the latents as they are, outside that range included.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_upper = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_lower = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # clamped away from 0 so that a bin the Gaussian misses costs log(1e-12) instead of -inf
    log_cdf_upper = cdf_upper.clamp(min=1e-12).log()
    log_one_minus_cdf_lower = (1.0 - cdf_lower).clamp(min=1e-12).log()
    log_bin = (cdf_upper - cdf_lower).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin))


# ---- helpers ----------------------------------------------------------------------------------------------------

@functools.cache
def _tables(schedule: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The float64 coefficient tables (T,) of the ``"decoder"`` or ``"prior"`` training schedule on ``device``,
    computed on the CPU (the same values on every device) and moved there once."""
    noise_schedule = decoder_schedule() if schedule == "decoder" else prior_schedule()
    ab = noise_schedule.alphas_cumprod
    tables = {"sqrt_ab": ab.sqrt(), "sqrt_one_minus_ab": (1 - ab).sqrt()}
    if schedule == "decoder":
        tables.update(posterior_mean_coef1=noise_schedule.posterior_mean_coef1,
                      posterior_mean_coef2=noise_schedule.posterior_mean_coef2,
                      posterior_log_variance=noise_schedule.posterior_log_variance_clipped,
                      sqrt_recip_ab=(1 / ab).sqrt(), sqrt_recipm1_ab=(1 / ab - 1).sqrt(),
                      log_betas=noise_schedule.betas.log(), snr=ab / (1 - ab))
    return {name: table.to(device) for name, table in tables.items()}


def _at(table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table[timesteps]`` as float32 of shape (B, 1, ..., 1), broadcastable against ``like``; ``table`` and
    ``timesteps`` on ``like``'s device.

    The float64 table is indexed first and cast afterwards, as the original's ``_extract_into_tensor``.
    """
    values = table.index_select(0, timesteps.long()).to(torch.float32)
    return values.view(-1, *([1] * (like.ndim - 1)))


def _add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """The forward process q(x_t | x0) = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise of float32 ``x0`` and ``noise``:
    the arithmetic of :func:`kandinsky.schedulers.add_noise`, on the device."""
    return _at(tables["sqrt_ab"], timesteps, x0) * x0 + _at(tables["sqrt_one_minus_ab"], timesteps, x0) * noise


def _unwrapped(model: nn.Module, name: str) -> nn.Module:
    """The model under DistributedDataParallel (``.module``) or torch.compile (``._orig_mod``) wrappers, for its
    config and statistics; the forward still goes through the wrapper (DDP synchronises gradients there)."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(f"{name}: expected our model (with a .config) or a wrapper of it, got {type(model).__name__}")
        model = inner
    return model


def _check_decoder(unet: nn.Module, x0: torch.Tensor, inpaint_image: torch.Tensor | None,
                   inpaint_mask: torch.Tensor | None, objective: str) -> bool:
    """Check the UNet's channels against the latents, the objective and the inpainting inputs; True for the
    inpainting UNet (input ``[x_t ; known latents ; mask]``)."""
    channels = x0.shape[1]
    config = _unwrapped(unet, "unet").config
    in_channels = config.in_channels
    inpainting = in_channels == 2 * channels + 1
    if not inpainting and in_channels != channels:
        raise ValueError(f"x0: the UNet takes {in_channels} input channels, which fits neither {channels}-channel "
                         f"latents nor their inpainting input ({2 * channels + 1}); got shape {tuple(x0.shape)}")
    if objective == "original" and config.out_channels != 2 * channels:
        raise ValueError(f"unet: objective='original' needs {2 * channels} output channels (noise prediction and "
                         f"variance interpolation), got {config.out_channels}")
    if config.out_channels < channels:
        raise ValueError(f"unet: expected at least {channels} output channels (the noise prediction), "
                         f"got {config.out_channels}")
    if not inpainting and (inpaint_image is not None or inpaint_mask is not None):
        raise ValueError(f"inpaint_image, inpaint_mask: the UNet has {in_channels} input channels, not the "
                         f"{2 * channels + 1} of an inpainting UNet; pass neither")
    if inpainting:
        if inpaint_image is None or inpaint_mask is None:
            raise ValueError(f"inpaint_image, inpaint_mask: the inpainting UNet ({in_channels} input channels) "
                             "needs both the known latents and their mask")
        _check_like("inpaint_image", inpaint_image, x0)
        batch, _, height, width = x0.shape
        if not isinstance(inpaint_mask, torch.Tensor) or tuple(inpaint_mask.shape) != (batch, 1, height, width):
            got = tuple(inpaint_mask.shape) if isinstance(inpaint_mask, torch.Tensor) else type(inpaint_mask).__name__
            raise ValueError(f"inpaint_mask: expected shape ({batch}, 1, {height}, {width}), 1 = known, got {got}")
    return inpainting


def _check_objective(objective: str, snr_gamma: float | None) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {list(OBJECTIVES)}, got {objective!r}")
    if snr_gamma is None:
        return
    if objective != "eps":
        raise ValueError(f"snr_gamma: Min-SNR weighting applies to objective='eps' only, got objective={objective!r}")
    if check_number("snr_gamma", snr_gamma) <= 0:
        raise ValueError(f"snr_gamma: expected a positive number (5.0 is usual) or None, got {snr_gamma!r}")


def _check_float(name: str, tensor: torch.Tensor, what: str, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim or not tensor.is_floating_point():
        got = f"shape {tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name}: expected a float tensor {what}, got {got}")


def _check_like(name: str, tensor: torch.Tensor, reference: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.shape != reference.shape or not tensor.is_floating_point():
        got = f"shape {tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name}: expected a float tensor of shape {tuple(reference.shape)}, got {got}")


def _check_timesteps(timesteps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    if (not isinstance(timesteps, torch.Tensor) or timesteps.is_floating_point() or timesteps.is_complex()
            or timesteps.dtype == torch.bool or tuple(timesteps.shape) != (batch,)):
        got = f"shape {tuple(timesteps.shape)} {timesteps.dtype}" if isinstance(timesteps, torch.Tensor) \
            else type(timesteps).__name__
        raise ValueError(f"timesteps: expected an integer tensor of shape ({batch},), got {got}")
    expected = f"timesteps: expected steps in 0..{NUM_TRAIN_TIMESTEPS - 1}"
    if timesteps.device.type == "cpu":  # on the host already: checked here, then copied without waiting
        if not torch.compiler.is_compiling():  # (compiled, the indexing of the tables checks them)
            low, high = int(timesteps.min()), int(timesteps.max())
            if low < 0 or high >= NUM_TRAIN_TIMESTEPS:
                raise ValueError(f"{expected}, got values in {low}..{high}")
        return timesteps.to(x.device, non_blocking=True)
    # on an accelerator: reading them back would stall the step, so the device checks them itself
    torch._assert_async(((timesteps >= 0) & (timesteps < NUM_TRAIN_TIMESTEPS)).all(), expected)
    return timesteps.to(x.device)

"""Training losses (kandinsky.training.losses): the original trainers' losses, x_t, model inputs, the gradient
w.r.t. the model output and of every parameter (original fixtures train_unet, train_unet_inpaint, train_prior,
train_schedule); the eps objective and Min-SNR weighting; bad input."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kandinsky.convert import from_original
from kandinsky.models import config_from_dict
from kandinsky.models.prior import Prior
from kandinsky.models.unet import UNet
from kandinsky.schedulers import add_noise
from kandinsky.testing import prefixed
from kandinsky.training import decoder_loss, prior_loss
from kandinsky.training.losses import decoder_schedule, prior_schedule

ROOT = Path(__file__).resolve().parent.parent
DECODERS = ["unet", "unet_inpaint"]
# The original trainers' per-sample losses through our converted models: float32, same math, other summation
# order. Measured max relative error 2.7e-7 (decoders) and under 1e-7 (prior).
LOSS_RTOL = 1e-5


def _tensors(original_fixture, name: str) -> tuple[dict, dict]:
    tensors, meta = original_fixture(name)
    # aligned copies: the fixture notes that unaligned safetensors storage alone moves CPU float32 results by an ulp
    return {k: v.clone() for k, v in tensors.items()}, meta


class _Recorder:
    """Records a module's forward inputs and output under autograd, and keeps the output's gradient."""

    def __init__(self, module: nn.Module):
        self.args, self.output = None, None
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not output.requires_grad:  # a check run under no_grad
            return
        self.args, self.output = args, output
        output.retain_grad()


class _FixedOutput(nn.Module):
    """A stand-in decoder that returns the original's recorded model output, so the loss math is checked alone."""

    def __init__(self, output: torch.Tensor, in_channels: int):
        super().__init__()
        self.output = nn.Parameter(output.clone())
        self.config = SimpleNamespace(in_channels=in_channels, out_channels=output.shape[1])

    def forward(self, x, timesteps, **conditioning):
        return self.output * 1.0


def _decoder_kwargs(tensors: dict, component: str) -> dict:
    kwargs = dict(text_hidden_states=tensors["input.full_emb"], text_embeds=tensors["input.pooled_emb"],
                  image_embeds=tensors["input.image_emb"])
    if component == "unet_inpaint":
        kwargs.update(inpaint_image=tensors["input.inpaint_image"], inpaint_mask=tensors["input.inpaint_mask"])
    return kwargs


def _run_decoder(unet, tensors: dict, component: str, **options) -> dict:
    return decoder_loss(unet, tensors["input.x_start"], tensors["input.t"], tensors["input.noise"],
                        **_decoder_kwargs(tensors, component), **options)


def _grads_in_our_layout(component: str, config: dict, tensors: dict, **extra) -> dict[str, torch.Tensor]:
    """The fixture's parameter gradients, named and laid out like our parameters.

    Only the converter knows the original key names and layouts, so the gradients go through it like weights:
    every transform it applies (renames, the head-major -> q|k|v row permutation of fused attention projections,
    dropping a 1x1 kernel dimension) moves entries without combining them, which maps the gradient of an original
    parameter onto the gradient of the converted one.
    """
    converted = from_original(component, config, prefixed(tensors, "grad."), **extra)
    return {name: param.detach() for name, param in converted.named_parameters()}


def _assert_grads_match(model: nn.Module, reference: dict, hint: dict) -> None:
    """The fixture's check: |ours - original| <= atol + rtol_per_tensor * max|original tensor|, per parameter.
    Analytically zero gradients (max < 1e-8, rounding noise only) fall under the absolute part alone."""
    atol, rtol = hint["suggested_atol"], hint["suggested_rtol_per_tensor"]
    params = dict(model.named_parameters())
    assert params.keys() == reference.keys()
    for name, param in params.items():
        assert param.grad is not None, name
        error = (param.grad - reference[name]).abs().max().item()
        bound = atol + rtol * reference[name].abs().max().item()
        assert error <= bound, (name, error, bound)


# ---- q_sample ---------------------------------------------------------------------------------------------------

def test_q_sample_matches_original(original_fixture):
    tensors, meta = _tensors(original_fixture, "train_schedule")
    atol = meta["tolerance_hint"]["suggested_atol"]  # 1e-6; measured 0 (bit-exact) everywhere
    for name, schedule in (("decoder", decoder_schedule()), ("prior", prior_schedule())):
        ab = schedule.alphas_cumprod
        torch.testing.assert_close(ab.sqrt(), tensors[f"output.{name}.sqrt_alphas_cumprod"], rtol=0, atol=1e-15)
        torch.testing.assert_close((1 - ab).sqrt(), tensors[f"output.{name}.sqrt_one_minus_alphas_cumprod"],
                                   rtol=0, atol=1e-15)  # float64; measured 1.1e-16
        x_t = add_noise(tensors["input.sweep.x_start"], tensors["input.sweep.noise"], tensors["input.sweep.t"], schedule)
        torch.testing.assert_close(x_t, tensors[f"output.sweep.{name}.x_t"], rtol=0, atol=atol)
    for fixture, schedule in (("unet", decoder_schedule()), ("unet_inpaint", decoder_schedule()),
                              ("prior", prior_schedule())):
        x_t = add_noise(tensors[f"input.{fixture}.x_start"], tensors[f"input.{fixture}.noise"],
                        tensors[f"input.{fixture}.t"], schedule)
        torch.testing.assert_close(x_t, tensors[f"output.{fixture}.x_t"], rtol=0, atol=atol)


# ---- decoder, objective="original" ------------------------------------------------------------------------------

@pytest.mark.parametrize("component", DECODERS)
def test_decoder_loss_math_is_the_originals(original_fixture, component):
    """Fed the original's own model output, the loss and its gradient w.r.t. that output are the original's.
    Measured bit-identical on an AMD Zen 4; on an Intel Xeon with AVX-512 one gradient element of 12,288 moved by
    1.4e-9 (the vb term's float32 exp / log / tanh differ in their last bits between SIMD widths). The gradient's
    bound is 1e-5 of its largest element (10x the difference seen): float32 rounding through a few transcendentals."""
    tensors, _ = _tensors(original_fixture, f"train_{component}")
    model = _FixedOutput(tensors["output.model_output"], in_channels=9 if component == "unet_inpaint" else 4)
    recorder = _Recorder(model)
    losses = _run_decoder(model, tensors, component)
    losses["loss"].mean().backward()
    assert losses.keys() == {"loss", "mse", "vb"}
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(losses[key], tensors[f"output.{key}"], rtol=1e-6, atol=0)
    expected_grad = tensors["output.grad_model_output"]
    torch.testing.assert_close(model.output.grad, expected_grad, rtol=0, atol=1e-5 * float(expected_grad.abs().max()))
    x = recorder.args[0]
    torch.testing.assert_close(x[:, :4], tensors["output.x_t"], rtol=0, atol=0)
    if component == "unet_inpaint":  # [x_t ; known latents * mask ; mask], as the original's first conv gets them
        mask = tensors["input.inpaint_mask"]
        assert x.shape[1] == 9
        torch.testing.assert_close(x[:, 4:8], tensors["input.inpaint_image"] * mask, rtol=0, atol=0)
        torch.testing.assert_close(x[:, 8:], mask, rtol=0, atol=0)
    # the vb term really is in play: t = 0 takes the decoder NLL, the other steps the KL
    t = tensors["input.t"]
    expected_vb = torch.where(t == 0, tensors["output.vb_terms.decoder_nll_bits"], tensors["output.vb_terms.kl_bits"])
    torch.testing.assert_close(losses["vb"], expected_vb, rtol=1e-6, atol=0)
    assert (t == 0).any() and (t > 0).any()


@pytest.mark.parametrize("component", DECODERS)
def test_decoder_loss_and_gradients_match_original(original_fixture, component):
    tensors, meta = _tensors(original_fixture, f"train_{component}")
    hint = meta["tolerance_hint"]
    config = meta["original_config"]["model_config"]
    unet = from_original(component, config, prefixed(tensors, "state_dict."))
    recorder = _Recorder(unet)
    losses = _run_decoder(unet, tensors, component)
    losses["loss"].mean().backward()

    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(losses[key], tensors[f"output.{key}"], rtol=LOSS_RTOL, atol=0)
    x, timesteps = recorder.args
    torch.testing.assert_close(x[:, :4], tensors["output.x_t"], rtol=0, atol=hint["x_t"]["suggested_atol"])  # measured 0
    # The original feeds float32 t (rescale_timesteps); ours gets the integer steps and its timestep embedding casts
    # them to float32: the same values, hence the same output.
    assert timesteps.dtype == torch.int64
    torch.testing.assert_close(timesteps.float(), tensors["output.model_t"], rtol=0, atol=0)
    with torch.no_grad():
        by_float_t = unet(x, tensors["output.model_t"], **{k: v for k, v in _decoder_kwargs(tensors, component).items()
                                                             if not k.startswith("inpaint")})
    assert torch.equal(by_float_t, recorder.output.detach())
    # measured max abs: model output 4.8e-6 / 5.0e-6 (|out| <= 3); grad w.r.t. it 3.8e-7 / 8.8e-9 (|grad| <= 1.7e-3,
    # the larger one at t = 0, where the discretized NLL magnifies the output's float noise)
    torch.testing.assert_close(recorder.output, tensors["output.model_output"], rtol=0,
                               atol=hint["model_output"]["suggested_atol"])
    torch.testing.assert_close(recorder.output.grad, tensors["output.grad_model_output"], rtol=0,
                               atol=hint["grad_model_output"]["suggested_atol"])
    # measured: max abs error 9.1e-7 / 1.2e-7, max per-tensor error / max|grad| 3.3e-5 / 1.1e-5
    _assert_grads_match(unet, _grads_in_our_layout(component, config, tensors), hint["grads"])


# ---- decoder, objective="eps" -----------------------------------------------------------------------------------

@pytest.mark.parametrize("component", DECODERS)
def test_eps_objective_is_the_original_without_the_bound(original_fixture, component):
    tensors, meta = _tensors(original_fixture, f"train_{component}")
    hint = meta["tolerance_hint"]
    config = meta["original_config"]["model_config"]
    unet = from_original(component, config, prefixed(tensors, "state_dict."))
    recorder = _Recorder(unet)

    # the bound's own gradient, from the original objective
    _run_decoder(unet, tensors, component)["vb"].mean().backward()
    vb_grads = {name: param.grad.clone() for name, param in unet.named_parameters()}
    unet.zero_grad()

    losses = _run_decoder(unet, tensors, component, objective="eps")
    losses["loss"].mean().backward()
    assert losses.keys() == {"loss", "mse"}
    assert torch.equal(losses["loss"], losses["mse"])
    torch.testing.assert_close(losses["mse"], tensors["output.mse"], rtol=LOSS_RTOL, atol=0)  # measured 2.4e-7
    # the noise channels get the original's gradient, the variance channels none
    torch.testing.assert_close(recorder.output.grad[:, :4], tensors["output.grad_model_output"][:, :4], rtol=0,
                               atol=hint["grad_model_output"]["suggested_atol"])
    assert not recorder.output.grad[:, 4:].any()
    assert tensors["output.grad_model_output"][:, 4:].abs().max() > 1e-4
    # eps gradient + vb gradient = the original objective's gradient
    for name, param in unet.named_parameters():
        param.grad += vb_grads[name]
    _assert_grads_match(unet, _grads_in_our_layout(component, config, tensors), hint["grads"])


def test_min_snr_weighting(original_fixture):
    """Min-SNR-gamma for epsilon prediction (diffusers' train_text_to_image): weight = min(snr, gamma) / snr."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    tensors, _ = _tensors(original_fixture, "train_unet")
    model = _FixedOutput(tensors["output.model_output"], in_channels=4)
    t = tensors["input.t"]  # [0, 17, 500, 999]: snr 1175, 58, 0.19, 0.0016
    gamma = 5.0
    plain = _run_decoder(model, tensors, "unet", objective="eps")
    weighted = _run_decoder(model, tensors, "unet", objective="eps", snr_gamma=gamma)
    torch.testing.assert_close(weighted["mse"], plain["mse"], rtol=0, atol=0)

    # directly from the schedule's definition, in float64
    alphas_cumprod = np.cumprod(1 - np.linspace(0.00085, 0.012, 1000, dtype=np.float64))
    snr = torch.from_numpy(alphas_cumprod / (1 - alphas_cumprod))[t]
    expected = plain["mse"].double() * snr.clamp(max=gamma) / snr
    torch.testing.assert_close(weighted["loss"].double(), expected, rtol=1e-6, atol=0)  # measured 1.8e-8
    assert torch.equal(weighted["loss"][2:], plain["mse"][2:])  # snr < gamma: weight 1
    assert (weighted["loss"][:2] < 0.1 * plain["mse"][:2]).all()

    # and as diffusers computes it, from its scheduler with the Kandinsky 2.1 decoder's betas (float32 there)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    theirs = compute_snr(scheduler, t)
    weights = torch.stack([theirs, gamma * torch.ones_like(theirs)], dim=1).min(dim=1)[0] / theirs
    # diffusers' float32 alphas_cumprod: 1 - ab at t = 0 (8.5e-4) keeps ~7e-5 relative precision; measured 2.6e-5
    torch.testing.assert_close(weighted["loss"], plain["mse"] * weights, rtol=1e-4, atol=0)


# ---- Kandinsky 2.2 ------------------------------------------------------------------------------------------------

def test_k22_decoder_loss_is_diffusers_epsilon_mse_on_the_noise_channels():
    """The 2.2 decoder's loss (objective eps, the image embedding alone), against diffusers' 2.2 decoder example
    built by hand: DDPMScheduler(linear 0.00085..0.012, 1000 steps).add_noise, the UNet output's first 4
    channels, F.mse_loss; Min-SNR weights min(snr, gamma) / snr with snr = ab / (1 - ab) from the betas in float64.
    The variance channels get no gradient."""
    from diffusers import DDPMScheduler

    from kandinsky import tiny

    unet = tiny.randomize_(UNet(tiny.UNET_22), seed=3)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    image_embeds = torch.randn(4, tiny.WIDTH_22, generator=generator)
    t = torch.tensor([0, 17, 500, 999])  # snr 1175, 58, 0.19, 0.0016

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    noisy = scheduler.add_noise(x0, noise, t)
    predicted = unet(noisy, t, image_embeds=image_embeds)[:, :4]
    expected = torch.nn.functional.mse_loss(predicted, noise, reduction="none").mean(dim=(1, 2, 3))
    expected.sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in unet.named_parameters()}
    unet.zero_grad()

    ours = decoder_loss(unet, x0, t, noise, image_embeds=image_embeds, objective="eps")
    assert set(ours) == {"loss", "mse"}
    # diffusers' float32 schedule against our float64 one indexed then cast: measured 8.9e-8 relative
    torch.testing.assert_close(ours["loss"], expected.detach(), rtol=1e-5, atol=0)
    ours["loss"].sum().backward()
    for name, param in unet.named_parameters():
        # float32 rounding of the two computations: measured at most 1.3e-6 apart
        torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not unet.conv_out.weight.grad[4:].any() and unet.conv_out.weight.grad[:4].abs().max() > 0

    gamma = 5.0
    weighted = decoder_loss(unet, x0, t, noise, image_embeds=image_embeds, objective="eps", snr_gamma=gamma)
    alphas_cumprod = np.cumprod(1 - np.linspace(0.00085, 0.012, 1000, dtype=np.float64))
    snr = torch.from_numpy(alphas_cumprod / (1 - alphas_cumprod))[t]
    torch.testing.assert_close(weighted["loss"].double(), ours["mse"].detach().double() * snr.clamp(max=gamma) / snr,
                               rtol=1e-6, atol=0)
    assert torch.equal(weighted["loss"][2:], ours["mse"][2:]) and (weighted["loss"][:2] < 0.1 * ours["mse"][:2]).all()
    with pytest.raises(ValueError, match="text_embeds: this UNet .*'image'.* takes no such input"):
        decoder_loss(unet, x0, t, noise, image_embeds=image_embeds, text_embeds=torch.randn(4, 32), objective="eps")


# ---- prior ------------------------------------------------------------------------------------------------------

def test_prior_loss_and_gradients_match_original(original_fixture):
    tensors, meta = _tensors(original_fixture, "train_prior")
    hint = meta["tolerance_hint"]
    stats = (tensors["input.clip_mean"], tensors["input.clip_std"])
    prior = from_original("prior", meta["original_config"], prefixed(tensors, "state_dict."), clip_stats=stats)
    recorder = _Recorder(prior)
    losses = prior_loss(prior, tensors["input.image_emb"], tensors["input.t"], tensors["input.noise"],
                        text_embeds=tensors["input.text_emb"], text_hidden_states=tensors["input.text_enc"],
                        text_mask=tensors["input.mask"])
    losses["loss"].mean().backward()

    assert losses.keys() == {"loss", "mse"}
    assert torch.equal(losses["loss"], losses["mse"])
    torch.testing.assert_close(losses["loss"], tensors["output.loss"], rtol=LOSS_RTOL, atol=0)
    x_t, timesteps = recorder.args
    torch.testing.assert_close(x_t, tensors["output.x_t"], rtol=0, atol=hint["x_t"]["suggested_atol"])  # measured 0
    assert timesteps.dtype == tensors["output.model_t"].dtype == torch.int64  # no float rescaling for the prior
    assert torch.equal(timesteps, tensors["output.model_t"])
    # measured max abs: model output 9.5e-7, its gradient 1.5e-8; parameter gradients 1.2e-7 (per tensor 9.7e-7
    # of max|grad|)
    torch.testing.assert_close(recorder.output, tensors["output.model_output"], rtol=0,
                               atol=hint["model_output"]["suggested_atol"])
    torch.testing.assert_close(recorder.output.grad, tensors["output.grad_model_output"], rtol=0,
                               atol=hint["grad_model_output"]["suggested_atol"])
    _assert_grads_match(prior, _grads_in_our_layout("prior", meta["original_config"], tensors, clip_stats=stats),
                        hint["grads"])


# ---- wrappers and bad input -------------------------------------------------------------------------------------

def test_wrapped_model_gives_the_same_losses(original_fixture):
    """A DistributedDataParallel-style wrapper (the model under ``.module``) is called, its model's config read."""
    tensors, _ = _tensors(original_fixture, "train_unet")
    model = _FixedOutput(tensors["output.model_output"], in_channels=4)
    direct = _run_decoder(model, tensors, "unet")
    wrapped = _run_decoder(nn.DataParallel(model), tensors, "unet")  # no GPU: DataParallel calls .module as is
    for key in direct:
        assert torch.equal(direct[key], wrapped[key])


def _tiny_unet(in_channels: int = 4, out_channels: int = 8) -> UNet:
    values = json.loads((ROOT / "configs" / "unet_tiny.json").read_text())
    return UNet(config_from_dict("unet", {**values, "in_channels": in_channels, "out_channels": out_channels})).eval()


def _decoder_batch(batch: int = 2, size: int = 8) -> dict:
    config = _tiny_unet().config
    generator = torch.Generator().manual_seed(0)
    return dict(x0=torch.randn(batch, 4, size, size, generator=generator),
                timesteps=torch.tensor([3, 999])[:batch],
                noise=torch.randn(batch, 4, size, size, generator=generator),
                text_hidden_states=torch.randn(batch, 77, config.text_hidden_dim, generator=generator),
                text_embeds=torch.randn(batch, config.text_embed_dim, generator=generator),
                image_embeds=torch.randn(batch, config.image_embed_dim, generator=generator))


def _call_decoder(unet, batch: dict, **options) -> dict:
    batch = {**batch, **options}
    return decoder_loss(unet, batch.pop("x0"), batch.pop("timesteps"), batch.pop("noise"), **batch)


MASK = torch.ones(2, 1, 8, 8)
BAD_DECODER_INPUT = [
    ("text2img", {"x0": torch.randn(2, 4, 8)}, r"x0: expected a float tensor \(B, 4, h, w\)"),
    ("text2img", {"x0": torch.zeros(2, 4, 8, 8, dtype=torch.int64)}, "x0: expected a float tensor"),
    ("text2img", {"x0": torch.randn(2, 3, 8, 8), "noise": torch.randn(2, 3, 8, 8)},
     "x0: the UNet takes 4 input channels"),
    ("text2img", {"noise": torch.randn(2, 4, 8, 16)}, r"noise: expected a float tensor of shape \(2, 4, 8, 8\)"),
    ("text2img", {"timesteps": torch.tensor([3.0, 5.0])}, r"timesteps: expected an integer tensor of shape \(2,\)"),
    ("text2img", {"timesteps": torch.tensor([3])}, r"timesteps: expected an integer tensor of shape \(2,\)"),
    ("text2img", {"timesteps": 3}, "timesteps: expected an integer tensor"),
    ("text2img", {"timesteps": torch.tensor([3, 1000])}, r"timesteps: expected steps in 0..999, got values in 3..1000"),
    ("text2img", {"timesteps": torch.tensor([-1, 5])}, "timesteps: expected steps in 0..999"),
    ("text2img", {"inpaint_image": torch.randn(2, 4, 8, 8), "inpaint_mask": MASK},
     "inpaint_image, inpaint_mask: the UNet has 4 input channels, not the 9 of an inpainting UNet"),
    ("text2img", {"inpaint_mask": MASK}, "the UNet has 4 input channels"),
    ("text2img", {"objective": "v"}, r"objective: expected one of \['original', 'eps'\], got 'v'"),
    ("text2img", {"snr_gamma": 5.0}, "snr_gamma: Min-SNR weighting applies to objective='eps' only"),
    ("text2img", {"objective": "eps", "snr_gamma": 0.0}, "snr_gamma: expected a positive number"),
    ("text2img", {"objective": "eps", "snr_gamma": "5"}, "snr_gamma: expected a finite number, got '5'"),
    ("text2img", {"objective": "eps", "snr_gamma": float("nan")}, "snr_gamma: expected a finite number"),
    ("text2img-4-out", {}, r"unet: objective='original' needs 8 output channels"),
    ("inpaint", {}, "inpaint_image, inpaint_mask: the inpainting UNet .* needs both"),
    ("inpaint", {"inpaint_image": torch.randn(2, 4, 8, 8)}, "needs both"),
    ("inpaint", {"inpaint_image": torch.randn(2, 4, 8, 8), "inpaint_mask": torch.ones(2, 4, 8, 8)},
     r"inpaint_mask: expected shape \(2, 1, 8, 8\)"),
    ("inpaint", {"inpaint_image": torch.randn(2, 4, 4, 4), "inpaint_mask": MASK},
     r"inpaint_image: expected a float tensor of shape \(2, 4, 8, 8\)"),
]


@pytest.mark.parametrize("kind, changes, match", BAD_DECODER_INPUT)
def test_decoder_loss_bad_input(kind, changes, match):
    unet = {"text2img": lambda: _tiny_unet(), "text2img-4-out": lambda: _tiny_unet(out_channels=4),
            "inpaint": lambda: _tiny_unet(in_channels=9)}[kind]()
    with pytest.raises(ValueError, match=match):
        _call_decoder(unet, _decoder_batch(), **changes)


def test_eps_objective_accepts_a_unet_without_variance_channels():
    losses = _call_decoder(_tiny_unet(out_channels=4), _decoder_batch(), objective="eps")
    assert losses["loss"].shape == (2,) and torch.isfinite(losses["loss"]).all()


def test_decoder_loss_rejects_a_foreign_model():
    with pytest.raises(ValueError, match="unet: expected our model"):
        _call_decoder(nn.Linear(4, 4), _decoder_batch())


def _tiny_prior() -> Prior:
    return Prior(config_from_dict("prior", json.loads((ROOT / "configs" / "prior_tiny.json").read_text()))).eval()


@pytest.mark.parametrize("changes, match", [
    ({"image_embeds": torch.randn(2, 1, 32)}, r"image_embeds: expected a float tensor \(B, clip_dim\)"),
    ({"noise": torch.randn(2, 16)}, r"noise: expected a float tensor of shape \(2, 32\)"),
    ({"timesteps": torch.tensor([0, 1000])}, "timesteps: expected steps in 0..999"),
    ({"timesteps": torch.tensor([0.0, 1.0])}, "timesteps: expected an integer tensor"),
])
def test_prior_loss_bad_input(changes, match):
    batch = dict(image_embeds=torch.randn(2, 32), timesteps=torch.tensor([0, 999]), noise=torch.randn(2, 32),
                 text_embeds=torch.randn(2, 32), text_hidden_states=torch.randn(2, 77, 32), text_mask=None)
    batch.update(changes)
    with pytest.raises(ValueError, match=match):
        prior_loss(_tiny_prior(), batch.pop("image_embeds"), batch.pop("timesteps"), batch.pop("noise"), **batch)

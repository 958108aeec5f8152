"""``Kandinsky21.from_diffusers`` with the unusual but valid configurations diffusers accepts: scheduler configs
(kandinsky/convert/scheduler.py), a MoVQ of 8 norm groups, an inpainting mask of another size than the image.
Each case runs diffusers and us with the same seed; the bounds are the pipeline tests' (one step 2e-4, several 2e-3
in [0, 1])."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky.convert.scheduler import sampling_from_diffusers
from kandinsky.pipeline import Kandinsky21
from kandinsky.testing import diffusers_reference_config, randomize_

diffusers = pytest.importorskip("diffusers")
from test_pipeline import (EMBED_DIM, SIZE, build_reference, decoder_pipeline, max_abs, random_image,  # noqa: E402
                           seed, seed_example_mask)

OFFICIAL_DDIM = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


@pytest.fixture(scope="module")
def reference():
    return build_reference()


def _decode_both(reference, scheduler, steps: int, seed_value: int = 8):
    """(ours, diffusers', diffusers' own rounding floor): the floor is diffusers against itself with the UNet's
    weights perturbed by 1e-6 relative, what float32 rounding alone moves the image by on this path."""
    import copy

    pipe = decoder_pipeline(reference, scheduler)
    ours = Kandinsky21.from_diffusers(reference["prior"], pipe, progress=False)
    embeds = torch.randn(1, EMBED_DIM, generator=seed(6))
    negative = torch.randn(1, EMBED_DIM, generator=seed(7))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=steps, output_type="np")
    theirs = pipe("a dog", embeds, negative, generator=seed(seed_value), **args).images
    perturbed = copy.deepcopy(pipe.unet)
    generator = seed(99)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.mul_(1 + 1e-6 * torch.randn(parameter.shape, generator=generator))
    shaken = diffusers.KandinskyPipeline(**{**pipe.components, "unet": perturbed})
    shaken.set_progress_bar_config(disable=True)
    floor = max_abs(shaken("a dog", embeds, negative, generator=seed(seed_value), **args).images, theirs)
    return ours.decode("a dog", embeds, negative, generator=seed(seed_value), **args), theirs, floor


DDIM_CASES = {
    "steps_offset=0": dict(OFFICIAL_DDIM, steps_offset=0),
    "trailing": dict(OFFICIAL_DDIM, timestep_spacing="trailing"),
    "linspace": dict(OFFICIAL_DDIM, timestep_spacing="linspace"),
    "Ho et al. betas": dict(OFFICIAL_DDIM, beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(OFFICIAL_DDIM, beta_schedule="scaled_linear"),
    "set_alpha_to_one": dict(OFFICIAL_DDIM, set_alpha_to_one=True),
}


@pytest.mark.parametrize("case", list(DDIM_CASES))
def test_ddim_configs_give_diffusers_images(reference, case):
    """One step 2e-4, three 2e-3, or 3x diffusers' own floor where that is larger: a single step from t = 999
    ("trailing") divides x0 by sqrt(alphas_cumprod[999]) = 0.07, which multiplies rounding by 15."""
    for steps, bound in ((1, 2e-4), (3, 2e-3)):
        ours, theirs, floor = _decode_both(reference, diffusers.DDIMScheduler(**DDIM_CASES[case]), steps)
        assert max_abs(ours, theirs) < max(bound, 3 * floor), (case, steps, floor)


def test_steps_offset_is_honoured_not_assumed(reference):
    """The issue's case: with steps_offset=0 the official offset of 1 would miss diffusers' image by ~0.1."""
    pipe = decoder_pipeline(reference, diffusers.DDIMScheduler(**dict(OFFICIAL_DDIM, steps_offset=0)))
    assumed = Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], progress=False)
    honoured = Kandinsky21.from_diffusers(reference["prior"], pipe, progress=False)
    assert honoured.decoder_sampling.timesteps("ddim", 4).tolist() == [750, 500, 250, 0]
    assert assumed.decoder_sampling.timesteps("ddim", 4).tolist() == [751, 501, 251, 1]


def test_the_ddpm_scheduler_of_the_hub_repo(reference):
    config = diffusers_reference_config("kandinsky-2-1.ddpm_scheduler_config.json")
    for thresholding in (True, False):
        scheduler = diffusers.DDPMScheduler.from_config(dict(config, thresholding=thresholding))
        for steps, bound in ((1, 2e-4), (3, 2e-3)):
            ours, theirs, floor = _decode_both(reference, scheduler, steps)
            assert max_abs(ours, theirs) < max(bound, 3 * floor), (thresholding, steps, floor)


def test_prior_scheduler_config_is_honoured(reference):
    scheduler = diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                          num_train_timesteps=1000, clip_sample=True, clip_sample_range=0.5)
    prior = diffusers.KandinskyPriorPipeline(**{**reference["prior"].components, "scheduler": scheduler})
    prior.set_progress_bar_config(disable=True)
    ours = Kandinsky21.from_diffusers(prior, reference["text2img"], progress=False)
    assert ours.prior_sampling.options["clip_sample_range"] == 0.5
    theirs = prior("the cat", num_inference_steps=4, generator=seed(1)).image_embeds
    embeds, _ = ours.prior("the cat", num_inference_steps=4, generator=seed(1))
    assert float((embeds - theirs).abs().max() / theirs.abs().max()) < 1e-3  # as test_prior_matches_diffusers


@pytest.mark.parametrize("config, key", [
    (dict(OFFICIAL_DDIM, _class_name="DDIMScheduler", thresholding=True), "thresholding"),
    (dict(OFFICIAL_DDIM, _class_name="DDIMScheduler", clip_sample=True), "clip_sample"),
    (dict(OFFICIAL_DDIM, _class_name="DDIMScheduler", prediction_type="v_prediction"), "prediction_type"),
    (dict(OFFICIAL_DDIM, _class_name="DDIMScheduler", rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(OFFICIAL_DDIM, _class_name="DDIMScheduler", beta_schedule="sigmoid"), "beta_schedule"),
    (dict(OFFICIAL_DDIM, _class_name="DDIMScheduler", timestep_spacing="karras"), "timestep_spacing"),
    (dict(OFFICIAL_DDIM, _class_name="DDIMScheduler", magic=1), "magic"),
    ({"_class_name": "LMSDiscreteScheduler"}, "LMSDiscreteScheduler"),
    ({"_class_name": "UnCLIPScheduler", "variance_type": "learned_range"}, "variance_type"),
    ({"_class_name": "DDPMScheduler", "variance_type": "fixed_large"}, "variance_type"),
])
def test_configs_without_an_equivalent_are_refused_in_one_line(config, key):
    with pytest.raises(ValueError, match=key) as error:
        sampling_from_diffusers(config)
    assert "\n" not in str(error.value)


# kandinsky-community/kandinsky-2-2-decoder's scheduler/scheduler_config.json (as far as we know it)
OFFICIAL_22_DECODER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                           clip_sample=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
                           variance_type="fixed_small", thresholding=False)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_ddpm_fixed_small_steps_as_diffusers(steps):
    """Kandinsky 2.2's decoder scheduler: diffusers' DDPMScheduler.step and our ddpm sampler on the same model output
    function (whose 4 variance channels are garbage: fixed_small drops them, as KandinskyV22Pipeline does) with the
    same generator give the same x_prev at every step. float32 both; diffusers' alphas_cumprod are float32, ours
    float64: measured up to 3.1e-7 of max|x| (1.9e-5 at |x| 60 after 10 steps), bound 2e-6 of it."""
    from kandinsky.schedulers import sample

    def model(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return torch.cat([0.5 * torch.tanh(x) + 0.1 * torch.cos(t / 100), 5 + 0 * x + t], dim=1)

    scheduler = diffusers.DDPMScheduler(**OFFICIAL_22_DECODER)
    scheduler.set_timesteps(steps)
    start = torch.randn(2, 4, 8, 8, generator=seed(0))
    x, generator, theirs = start.clone(), seed(1), []
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t)[:, :4], t, x, generator=generator).prev_sample
        theirs.append(x)
    sampling = sampling_from_diffusers({**scheduler.config, "_class_name": "DDPMScheduler"})
    timesteps = sampling.timesteps(sampling.sampler, steps)
    assert sampling.sampler == "ddpm" and timesteps.tolist() == scheduler.timesteps.tolist()
    mine = []
    sample("ddpm", model, start.clone(), sampling.schedule, timesteps, generator=seed(1), progress=False,
           callback=lambda i, t, x, x0: mine.append(x.clone()), **sampling.options_for("ddpm", steps))
    assert len(mine) == len(theirs) == steps
    for step, (a, b) in enumerate(zip(mine, theirs)):
        assert float((a - b).abs().max()) <= 2e-6 * float(b.abs().max()), step


def test_keys_of_other_schedulers_are_ignored_as_diffusers_ignores_them():
    """A DDPM config that carries DDIM's set_alpha_to_one (as kandinsky-community's DDPM configs do) or a PNDM key:
    diffusers' DDPMScheduler ignores both, so the same sampling; a name no scheduler takes is still refused."""
    plain = sampling_from_diffusers({**OFFICIAL_22_DECODER, "_class_name": "DDPMScheduler"})
    carried = {**OFFICIAL_22_DECODER, "_class_name": "DDPMScheduler", "set_alpha_to_one": False, "skip_prk_steps": True}
    taken = inspect.signature(diffusers.DDPMScheduler.__init__).parameters  # what from_config passes on
    assert "set_alpha_to_one" not in taken and "skip_prk_steps" not in taken
    mapped = sampling_from_diffusers(carried)
    assert torch.equal(mapped.schedule.betas, plain.schedule.betas)
    assert mapped.timesteps("ddpm", 25).tolist() == plain.timesteps("ddpm", 25).tolist()
    assert mapped.options_for("ddpm", 25).keys() == plain.options_for("ddpm", 25).keys()
    with pytest.raises(ValueError, match="beta_shedule"):
        sampling_from_diffusers({**carried, "beta_shedule": "linear"})


def test_official_configs_map_to_our_defaults():
    from kandinsky.schedulers import decoder_sampling, prior_sampling

    for name, ours in (("kandinsky-2-1.scheduler_config.json", decoder_sampling()),
                       ("kandinsky-2-1-prior.scheduler_config.json", prior_sampling())):
        mapped = sampling_from_diffusers(json.loads(json.dumps(diffusers_reference_config(name))))
        for steps in (1, 25, 100):
            assert torch.equal(mapped.timesteps(mapped.sampler, steps), ours.timesteps(ours.sampler, steps))
        assert torch.equal(mapped.schedule.betas, ours.schedule.betas)


def test_eight_norm_group_movq_and_a_mask_of_another_size(reference):
    """diffusers' own small test MoVQs use norm_num_groups=8; a 16x16 PIL mask serves a 32x32 image (diffusers
    resizes both to the output size)."""
    movq = diffusers.VQModel(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
        num_vq_embeddings=12, out_channels=3, up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        vq_embed_dim=4)
    randomize_(movq, 5)
    with torch.no_grad():
        movq.decoder.conv_out.weight.mul_(0.05)
    inpaint = diffusers.KandinskyInpaintPipeline(**{**reference["inpaint"].components, "movq": movq.eval()})
    inpaint.set_progress_bar_config(disable=True)
    text2img = diffusers.KandinskyPipeline(**{**reference["text2img"].components, "movq": movq})
    ours = Kandinsky21.from_diffusers(reference["prior"], text2img, inpaint_pipeline=inpaint, progress=False)
    image = random_image(2)
    mask = Image.fromarray((seed_example_mask(SIZE // 2) * 255).astype(np.uint8))  # 16 x 16
    embeds = torch.randn(1, EMBED_DIM, generator=seed(13))
    negative = torch.randn(1, EMBED_DIM, generator=seed(14))
    args = dict(height=SIZE, width=SIZE, output_type="np")
    for steps, bound in ((1, 2e-4), (3, 2e-3)):
        theirs = inpaint("a hat", image=image, mask_image=mask, image_embeds=embeds, negative_image_embeds=negative,
                         generator=seed(15), num_inference_steps=steps, **args).images
        images = ours.inpaint("a hat", image, mask, image_embeds=embeds, negative_image_embeds=negative,
                              generator=seed(15), num_inference_steps=steps, **args)
        assert max_abs(images, theirs) < bound, steps
    embeds_theirs = text2img("a dog", embeds, negative, generator=seed(8), num_inference_steps=2, **args).images
    assert max_abs(ours.decode("a dog", embeds, negative, generator=seed(8), num_inference_steps=2, **args),
                   embeds_theirs) < 2e-3

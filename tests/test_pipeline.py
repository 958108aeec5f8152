"""The Kandinsky21 pipeline against diffusers 0.42.1, on tiny random components (no hub, tokenizers built
in code): same seed and arguments -> same embeddings and images.

Tolerances: float32 throughout, so the two sides differ only by operation order. Each comparison's bound
is a few times the difference measured for it (written beside it). DDIM carries the rounding of its
first, high-noise steps to the image (x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) multiplies eps differences
by ~14 at t = 999; diffusers' float32 schedule adds as much), so its images differ by 1e-7 to 1e-4,
and the difference moves by up to 7x from one torch version to another ("a / b": measured with torch
2.13 / 2.14; the bounds are about 5x the larger). DDPM's dynamic thresholding keeps x0 bounded and agrees
to ~2e-7. Images are compared in [0, 1].
scripts/mutation_check.py plants bugs in a copy of the package and checks that these tests catch them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky.pipeline import Kandinsky21, dilate_repaint, rounded_size
from kandinsky.testing import randomize_
from tiny_components import tiny_clip_tokenizer, tiny_clip_vision_model, tiny_diffusers_mclip, tiny_xlmr_tokenizer

diffusers = pytest.importorskip("diffusers")

EMBED_DIM = 24  # CLIP projection = prior width = UNet cross-attention width in these tiny models
SIZE = 32  # px; the tiny MoVQ downsamples by 2, so latents are 16 x 16
STEPS = dict(num_inference_steps=2, prior_num_inference_steps=2)



def tiny_clip_text(seed: int = 1):
    """CLIP text tower whose hidden width equals the projection (diffusers' prior feeds hidden states
    through a Linear(embedding_dim, ...))."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab = len(tiny_clip_tokenizer())
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=EMBED_DIM, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=EMBED_DIM,
                            hidden_act="quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                            pad_token_id=vocab - 1)
    return randomize_(CLIPTextModelWithProjection(config), seed).eval()


def tiny_diffusers_unet(in_channels: int, seed: int):
    unet = diffusers.UNet2DConditionModel(
        in_channels=in_channels, out_channels=8, addition_embed_type="text_image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        encoder_hid_dim=32, encoder_hid_dim_type="text_image_proj", cross_attention_dim=EMBED_DIM,
        attention_head_dim=8, resnet_time_scale_shift="scale_shift", class_embed_type=None)
    randomize_(unet, seed)
    with torch.no_grad():  # a small noise prediction keeps the DDIM latents near unit scale (else |x| ~ 40)
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    return unet.eval()


def tiny_diffusers_movq(seed: int = 5):
    movq = diffusers.VQModel(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32, norm_type="spatial",
        num_vq_embeddings=12, out_channels=3, up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        vq_embed_dim=4)
    randomize_(movq, seed)
    with torch.no_grad():  # random weights decode to |x| ~ 50; scale down so that few pixels clip at 0 or 1
        movq.decoder.conv_out.weight.mul_(0.05)
    return movq.eval()


def tiny_diffusers_prior(seed: int = 3):
    prior = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED_DIM,
                                       num_layers=1)

    def positive(param, generator):
        param.copy_(0.5 + torch.rand(param.shape, generator=generator))

    return randomize_(prior, seed, overrides={"clip_std": positive}).eval()


def prior_scheduler(float64: bool = False):
    """diffusers' UnCLIPScheduler (the official prior's scheduler_config.json).

    diffusers keeps the squared-cosine alphas_cumprod in float32, where 1 - alphas_cumprod[0] (~4e-5)
    loses ~3 significant digits; its last step then differs from the exact (float64, the original's
    numpy) update by up to ~5e-4 * clip_std. Our default prior sampler repeats that float32 arithmetic.
    ``float64=True`` gives it the float64 table of the original's arithmetic (``prior_sampler=
    "unclip_original"``; the step formulas are unchanged).
    """
    scheduler = diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                          num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0)
    if float64:
        from kandinsky.schedulers import NoiseSchedule

        schedule = NoiseSchedule.squared_cosine(1000)
        scheduler.betas, scheduler.alphas = schedule.betas.clone(), 1 - schedule.betas
        scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def decoder_scheduler():
    # the official kandinsky-2-1 scheduler_config.json
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                   beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   prediction_type="epsilon", thresholding=False)


def ddpm_scheduler(timesteps: list[int] | None = None):
    """diffusers' DDPMScheduler with the official kandinsky-2-1 ddpm_scheduler_config.json (learned-range
    variance, dynamic thresholding: 99.5th percentile of |x0|, at most 2), on ``timesteps`` when given
    (the pipelines ask for a number of steps)."""
    from kandinsky.testing import diffusers_reference_config

    scheduler = diffusers.DDPMScheduler.from_config(
        diffusers_reference_config("kandinsky-2-1.ddpm_scheduler_config.json"))
    if timesteps is not None:
        def set_timesteps(num_inference_steps=None, device=None):
            diffusers.DDPMScheduler.set_timesteps(scheduler, device=device, timesteps=timesteps)

        scheduler.set_timesteps = set_timesteps
    return scheduler


def decoder_pipeline(reference: dict, scheduler):
    """diffusers' KandinskyPipeline of ``reference`` with another scheduler."""
    pipe = diffusers.KandinskyPipeline(**{**reference["text2img"].components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference():
    return build_reference()


def build_reference() -> dict:
    """diffusers pipelines (prior, text2img, img2img, inpaint, combined) sharing tiny random components."""
    from transformers import CLIPImageProcessorPil

    torch.manual_seed(0)
    prior = dict(prior=tiny_diffusers_prior(), image_encoder=tiny_clip_vision_model(seed=2),
                 text_encoder=tiny_clip_text(), tokenizer=tiny_clip_tokenizer(),
                 scheduler=prior_scheduler(),
                 # the PIL backend, which our preprocessing follows (CLIPImageProcessor switches to
                 # torchvision's resize when it is installed: pixel values move by up to 0.015)
                 image_processor=CLIPImageProcessorPil(crop_size=224, size=224, resample=3))
    decoder = dict(text_encoder=tiny_diffusers_mclip(seed=4), tokenizer=tiny_xlmr_tokenizer(),
                   unet=tiny_diffusers_unet(4, seed=6), scheduler=decoder_scheduler(), movq=tiny_diffusers_movq())
    inpaint = dict(decoder, unet=tiny_diffusers_unet(9, seed=7))
    pipes = dict(
        prior=diffusers.KandinskyPriorPipeline(**prior),
        text2img=diffusers.KandinskyPipeline(**decoder),
        img2img=diffusers.KandinskyImg2ImgPipeline(**decoder),
        inpaint=diffusers.KandinskyInpaintPipeline(**inpaint),
        combined=diffusers.KandinskyCombinedPipeline(**decoder, **{f"prior_{k}": v for k, v in prior.items()}),
    )
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def save_reference_weights(folder):
    """The reference pipeline converted and saved in our layout at ``folder`` (for the command-line tests)."""
    reference = build_reference()
    Kandinsky21.from_diffusers(reference["prior"], reference["text2img"],
                               inpaint_pipeline=reference["inpaint"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(reference):
    return Kandinsky21.from_diffusers(reference["prior"], reference["text2img"],
                                      inpaint_pipeline=reference["inpaint"], progress=False)


def seed(value: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def random_image(value: int = 0, size: int = SIZE) -> Image.Image:
    pixels = np.random.default_rng(value).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------------------------------------ prior


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_prior_matches_diffusers(ours, reference, negative_prompt, guidance_scale):
    args = dict(negative_prompt=negative_prompt, num_inference_steps=5, guidance_scale=guidance_scale,
                num_images_per_prompt=2)
    theirs = reference["prior"]("the cat", generator=seed(1), **args)
    embeds, negative = ours.prior("the cat", generator=seed(1), **args)
    assert embeds.shape == negative.shape == (2, EMBED_DIM)
    assert max_abs(embeds, theirs.image_embeds) < 3e-5  # measured 7e-7 to 6.2e-6 (|embeds| up to 5.7)
    assert max_abs(negative, theirs.negative_image_embeds) < 5e-6  # measured 0 (zero image) and 8e-7


def test_prior_runs_the_text_through_the_blocks_once(ours, monkeypatch):
    """The sampling loop reuses one encode_text: each step's forward gets the prefix (3 positions per block)."""
    from kandinsky.models.prior import Prior

    calls = {"encode_text": 0, "forward": []}
    encode_text, forward = Prior.encode_text, Prior.forward

    def count_encode(self, **kwargs):
        calls["encode_text"] += 1
        return encode_text(self, **kwargs)

    def record_forward(self, x, timesteps, **kwargs):
        calls["forward"].append(sorted(kwargs))
        return forward(self, x, timesteps, **kwargs)

    monkeypatch.setattr(Prior, "encode_text", count_encode)
    monkeypatch.setattr(Prior, "forward", record_forward)
    ours.prior("the cat", num_inference_steps=4, generator=seed(1))
    assert calls["encode_text"] == 1
    assert calls["forward"] == [["text_prefix"]] * 4


def test_prior_unclip_original_is_diffusers_with_a_float64_table(ours, reference):
    """sampler="unclip_original" takes diffusers' steps with the original's float64 scalars: diffusers given a
    float64 table gives the same embeddings, which differ from the float32 default by the float32 rounding
    of 1 - alphas_cumprod near t = 0 (see prior_scheduler), ~5e-4 relative to the embeddings' scale."""
    table64 = diffusers.KandinskyPriorPipeline(**{**reference["prior"].components, "scheduler": prior_scheduler(True)})
    table64.set_progress_bar_config(disable=True)
    theirs = table64("the cat", num_inference_steps=5, generator=seed(1)).image_embeds
    original, _ = ours.prior("the cat", num_inference_steps=5, generator=seed(1), sampler="unclip_original")
    default, _ = ours.prior("the cat", num_inference_steps=5, generator=seed(1))
    assert max_abs(original, theirs) < 2e-5  # measured 3.6e-6 (|embeds| up to 5.3)
    assert 2e-4 < max_abs(original, default) / float(theirs.abs().max()) < 2e-3  # measured 5.2e-4


def test_prior_list_of_prompts_with_negatives(ours, reference):
    args = dict(negative_prompt=["ugly", "dark"], num_inference_steps=3)
    theirs = reference["prior"](["the cat", "a dog"], generator=seed(2), **args)
    embeds, negative = ours.prior(["the cat", "a dog"], generator=seed(2), **args)
    assert max_abs(embeds, theirs.image_embeds) < 3e-5  # measured 7.3e-6
    assert max_abs(negative, theirs.negative_image_embeds) < 5e-6  # measured 8e-7


# ------------------------------------------------------------------------------------------------ text2img


@pytest.mark.parametrize("num_images_per_prompt", [1, 2])
def test_text2img_matches_combined_pipeline(ours, reference, num_images_per_prompt):
    args = dict(height=SIZE, width=SIZE, num_images_per_prompt=num_images_per_prompt, **STEPS)
    theirs = reference["combined"]("the cat", generator=seed(3), output_type="np", **args).images
    images = ours.text2img("the cat", generator=seed(3), output_type="np", **args)
    assert images.shape == (num_images_per_prompt, SIZE, SIZE, 3)
    assert max_abs(images, theirs) < 1e-4  # measured 3.3e-6 / 4.4e-6 (one image), 1.7e-5 / 1.5e-5 (two)


def test_text2img_negative_prompt_matches_separate_pipelines(ours, reference):
    """With a negative prompt, the separate diffusers pipelines feed it to both stages (the combined
    pipeline drops it for the decoder); we follow the separate pipelines."""
    generator = seed(4)
    embeds, negative = reference["prior"]("the cat", negative_prompt="dark", num_inference_steps=2,
                                          generator=generator, return_dict=False)
    theirs = reference["text2img"]("the cat", embeds, negative, negative_prompt="dark", height=SIZE, width=SIZE,
                                   num_inference_steps=2, generator=generator, output_type="np").images
    images = ours.text2img("the cat", negative_prompt="dark", height=SIZE, width=SIZE, generator=seed(4),
                           output_type="np", **STEPS)
    assert max_abs(images, theirs) < 5e-5  # measured 4.1e-6 / 8.4e-6


def test_text2img_without_guidance_and_list_of_prompts(ours, reference):
    args = dict(height=SIZE, width=SIZE, guidance_scale=1.0, prior_guidance_scale=1.0, **STEPS)
    theirs = reference["combined"](["the cat", "a dog"], generator=seed(5), output_type="np", **args).images
    images = ours.text2img(["the cat", "a dog"], generator=seed(5), output_type="np", **args)
    assert max_abs(images, theirs) < 5e-5  # measured 1.2e-5 / 7e-6


def test_decode_matches_decoder_pipeline(ours, reference):
    embeds = torch.randn(1, EMBED_DIM, generator=seed(6))
    negative = torch.randn(1, EMBED_DIM, generator=seed(7))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=4, output_type="np")
    theirs = reference["text2img"]("a dog", embeds, negative, generator=seed(8), **args).images
    images = ours.decode("a dog", embeds, negative, generator=seed(8), **args)
    assert max_abs(images, theirs) < 3e-4  # measured 2.7e-5 / 5.4e-5


def test_output_types_agree(ours):
    embeds = torch.randn(1, EMBED_DIM, generator=seed(9))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=1)
    as_np = ours.decode("the cat", embeds, -embeds, generator=seed(9), output_type="np", **args)
    as_pt = ours.decode("the cat", embeds, -embeds, generator=seed(9), output_type="pt", **args)
    as_pil = ours.decode("the cat", embeds, -embeds, generator=seed(9), output_type="pil", **args)
    assert as_pt.shape == (1, 3, SIZE, SIZE) and 0 <= as_pt.min() and as_pt.max() <= 1
    assert np.array_equal(as_np, as_pt.permute(0, 2, 3, 1).numpy())
    assert isinstance(as_pil[0], Image.Image) and as_pil[0].size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(as_pil[0]), (as_np[0] * 255).round().astype(np.uint8))


def test_sizes_round_up_and_crop(ours):
    assert rounded_size(500, 513) == (512, 576)
    assert rounded_size(5, 6, factor=2) == (8, 8)  # the tiny MoVQ: multiples of 2 ** 2
    embeds = torch.randn(1, EMBED_DIM, generator=seed(10))
    args = dict(num_inference_steps=1, output_type="pt")
    full = ours.decode("the cat", embeds, -embeds, height=30, width=41, generator=seed(10), **args)
    cropped = ours.decode("the cat", embeds, -embeds, height=30, width=41, generator=seed(10), crop=True, **args)
    assert full.shape[-2:] == (32, 44)
    assert cropped.shape[-2:] == (30, 41)
    assert torch.equal(cropped, full[..., :30, :41])  # the original keeps the top-left corner


def _unet_calls(unet: torch.nn.Module, call) -> list[dict]:
    """Run ``call()`` and return every UNet call: its arguments by name and its output."""
    import inspect

    signature, calls = inspect.signature(unet.forward), []

    def record(module, args, kwargs, output):
        bound = signature.bind(*args, **kwargs).arguments
        calls.append({**{k: v.clone() for k, v in bound.items()}, "output": output.clone()})

    handle = unet.register_forward_hook(record, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return calls


def test_guidance_batch_order_is_uncond_then_cond(ours):
    """The guided UNet batch is [unconditional, conditional] in every conditioning input, and the sampler
    gets uncond + scale * (cond - uncond) of the 4 noise channels."""
    from kandinsky.schedulers import NoiseSchedule

    embeds = torch.randn(1, EMBED_DIM, generator=seed(22))
    negative = torch.randn(1, EMBED_DIM, generator=seed(23))
    unet, steps = ours.module("unet"), []
    args = dict(num_inference_steps=1, height=SIZE, width=SIZE, output_type="pt")

    def guided():
        ours.decode("a cat", embeds, negative, negative_prompt="dark", guidance_scale=4.0, generator=seed(24),
                    sampler_options={"callback": lambda i, t, x, x0: steps.append(x0)}, **args)

    (call,) = _unet_calls(unet, guided)
    # unguided runs (guidance 1) see one row: the conditional one, then the unconditional one
    (cond,) = _unet_calls(unet, lambda: ours.decode("a cat", embeds, negative, guidance_scale=1.0, **args))
    (uncond,) = _unet_calls(unet, lambda: ours.decode("dark", negative, embeds, guidance_scale=1.0, **args))
    for name in ("text_hidden_states", "text_embeds", "image_embeds"):
        assert call[name].shape[0] == 2, name
        torch.testing.assert_close(call[name][:1], uncond[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(call[name][1:], cond[name], rtol=0, atol=0, msg=name)

    uncond_eps, cond_eps = call["output"][:, :4].chunk(2)
    eps = uncond_eps + 4.0 * (cond_eps - uncond_eps)
    ab = float(NoiseSchedule.linear(1000, 0.00085, 0.012).alphas_cumprod[int(call["timesteps"][0])])
    x0 = (call["x"][:1] - (1 - ab) ** 0.5 * eps) / ab ** 0.5  # the DDIM step's x0
    # float32, the same formula: measured 0; swapping the roles of uncond and cond moves x0 by 6e-2
    assert max_abs(steps[0], x0) < 1e-5


# ------------------------------------------------------------------------------------------------ img2img


# measured 1.8e-7 / 2.4e-7 (strength 0.3: one low-noise step); strength 1 runs DDIM from t = 999, whose x0
# multiplies float32 rounding by ~14 per step: 8.4e-5 with MKL's GEMMs in the small-map convolutions, 8.6e-4 with
# oneDNN's (another summation order; kandinsky.ops)
@pytest.mark.parametrize("strength, tolerance", [(0.3, 2e-6), (1.0, 2e-3)], ids=["strength0.3", "strength1"])
def test_img2img_matches_diffusers(ours, reference, strength, tolerance):
    image = random_image(1)
    generator = seed(11)
    embeds, negative = reference["prior"]("the cat", num_inference_steps=2, generator=generator, return_dict=False)
    theirs = reference["img2img"]("the cat", image, embeds, negative, height=SIZE, width=SIZE, strength=strength,
                                  num_inference_steps=4, generator=generator, output_type="np").images
    images = ours.img2img("the cat", image, strength=strength, height=SIZE, width=SIZE, num_inference_steps=4,
                          prior_num_inference_steps=2, generator=seed(11), output_type="np")
    assert max_abs(images, theirs) < tolerance


# ------------------------------------------------------------------------------------------------ inpaint


def seed_example_mask(size: int = SIZE) -> np.ndarray:
    """The diffusers docs' example, mask[:250, 250:-250] = 1 on 768 x 768, scaled to ``size``."""
    mask = np.zeros((size, size), dtype=np.float32)
    mask[: round(250 * size / 768), round(250 * size / 768): -round(250 * size / 768)] = 1
    return mask


def test_inpaint_seed_example_matches_diffusers(ours, reference):
    image, mask = random_image(2), seed_example_mask()
    generator = seed(12)
    embeds, negative = reference["prior"]("a hat", num_inference_steps=3, generator=generator, return_dict=False)
    theirs = reference["inpaint"]("a hat", image=image, mask_image=mask.copy(), image_embeds=embeds,
                                  negative_image_embeds=negative, height=SIZE, width=SIZE, num_inference_steps=3,
                                  generator=generator, output_type="np").images
    images = ours.inpaint("a hat", image, mask, height=SIZE, width=SIZE, num_inference_steps=3,
                          prior_num_inference_steps=3, generator=seed(12), output_type="np")
    assert max_abs(images, theirs) < 2e-4  # measured 4.9e-5 / 4.4e-5


def test_inpaint_legacy_mask_equals_diffusers_with_inverted_mask(ours, reference):
    image, mask = random_image(3), seed_example_mask()
    embeds = torch.randn(1, EMBED_DIM, generator=seed(13))
    negative = torch.randn(1, EMBED_DIM, generator=seed(14))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="np")
    theirs = reference["inpaint"]("a hat", image=image, mask_image=1 - mask, image_embeds=embeds,
                                  negative_image_embeds=negative, generator=seed(15), **args).images
    legacy = ours.inpaint("a hat", image, mask, mask_convention="legacy", image_embeds=embeds,
                          negative_image_embeds=negative, generator=seed(15), **args)
    repaint = ours.inpaint("a hat", image, 1 - mask, image_embeds=embeds, negative_image_embeds=negative,
                           generator=seed(15), **args)
    assert max_abs(legacy, theirs) < 2e-5  # measured 2.9e-6 / 3.6e-6
    assert np.array_equal(legacy, repaint)


def test_inpaint_pil_mask_matches_diffusers(ours, reference):
    image = random_image(4)
    mask = Image.fromarray((seed_example_mask() * 255).astype(np.uint8))
    embeds = torch.randn(2, EMBED_DIM, generator=seed(16))
    negative = torch.randn(2, EMBED_DIM, generator=seed(17))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="np", num_images_per_prompt=2)
    theirs = reference["inpaint"]("a hat", image=image, mask_image=mask, image_embeds=embeds[:1],
                                  negative_image_embeds=negative[:1], generator=seed(18), **args).images
    images = ours.inpaint("a hat", image, mask, image_embeds=embeds[:1], negative_image_embeds=negative[:1],
                          generator=seed(18), **args)
    assert max_abs(images, theirs) < 6e-5  # measured 7.6e-6 / 1.2e-5


def test_mask_dilation_equals_diffusers_prepare_mask():
    from diffusers.pipelines.kandinsky.pipeline_kandinsky_inpaint import prepare_mask

    keep = (torch.rand(3, 1, 9, 11, generator=seed(19)) > 0.2).float()
    assert torch.equal(dilate_repaint(keep), prepare_mask(keep.clone()))


# ------------------------------------------------------------------------------------------------ interpolate


def test_interpolate_and_mix_match_diffusers(ours, reference):
    items, weights = ["the cat", random_image(5, size=80), "a dog"], [0.3, 0.3, 0.4]
    theirs = reference["prior"].interpolate(items, weights, num_inference_steps=3, generator=seed(20))
    embeds, negative = ours.interpolate(items, weights, num_inference_steps=3, generator=seed(20))
    assert max_abs(embeds, theirs.image_embeds) < 1e-5  # measured 2e-6 (|embeds| up to 3.5)
    assert max_abs(negative, theirs.negative_image_embeds) < 1e-6  # the zero-image embedding: measured 0
    args = dict(height=SIZE, width=SIZE, num_inference_steps=3, output_type="np")
    images_theirs = reference["text2img"]("", theirs.image_embeds, theirs.negative_image_embeds,
                                          generator=seed(21), **args).images
    images = ours.decode("", embeds, negative, generator=seed(21), **args)
    assert max_abs(images, images_theirs) < 3e-4  # measured 1.1e-5 / 7.2e-5


def test_mix_is_interpolate_then_the_decoder_as_in_diffusers(ours, reference):
    """mix = diffusers' interpolate, then its decoder with an empty prompt, one generator throughout.
    diffusers' interpolate also draws a discarded prior run for the empty negative prompt: the decoder's
    generator is advanced by our interpolate instead (the embeddings are the same either way)."""
    items, weights = ["the cat", random_image(6, size=80)], [0.4, 0.6]
    theirs = reference["prior"].interpolate(items, weights, num_inference_steps=3, generator=seed(25))
    generator = seed(25)
    ours.interpolate(items, weights, num_inference_steps=3, generator=generator)
    images_theirs = reference["text2img"]("", theirs.image_embeds, theirs.negative_image_embeds, height=SIZE,
                                          width=SIZE, num_inference_steps=2, generator=generator,
                                          output_type="np").images
    images = ours.mix(items, weights, prior_num_inference_steps=3, num_inference_steps=2, height=SIZE, width=SIZE,
                      generator=seed(25), output_type="np")
    assert images.shape == (1, SIZE, SIZE, 3)
    assert max_abs(images, images_theirs) < 1e-4  # measured 1.8e-5 / 8.9e-6


def test_interpolate_weights(ours):
    with pytest.raises(ValueError, match="weights"):
        ours.interpolate(["a cat", "a dog"], [0.5])
    with pytest.raises(ValueError, match="weights"):
        ours.interpolate(["a cat", "a dog"], [0.0, 0.0])
    with pytest.raises(ValueError, match="images_and_prompts"):
        ours.interpolate([], [])
    # a zero sum is allowed (no renormalisation, as in both references) but warned about: a - b
    with pytest.warns(UserWarning, match="sum to zero"):
        difference, _ = ours.interpolate(["a cat", "a dog"], [1.0, -1.0], num_inference_steps=2, generator=seed(3))
    generator = seed(3)  # interpolate runs the prior on each prompt in turn with one generator
    cat, _ = ours.prior("a cat", num_inference_steps=2, generator=generator)
    dog, _ = ours.prior("a dog", num_inference_steps=2, generator=generator)
    assert max_abs(difference, cat - dog) < 1e-6


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompt=[]), "prompt"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(prior_num_inference_steps=0), "num_inference_steps"),
    (dict(output_type="latent"), "output_type"),
    (dict(sampler="nope"), "sampler"),
    (dict(height=0), "height"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
])
def test_text2img_bad_input(ours, kwargs, name):
    args = dict(prompt="the cat", height=SIZE, width=SIZE, num_inference_steps=1, prior_num_inference_steps=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ours.text2img(**args)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_img2img_bad_strength(ours, strength):
    with pytest.raises(ValueError, match="strength"):
        ours.img2img("the cat", random_image(), strength=strength, height=SIZE, width=SIZE)


def test_image_and_mask_bad_input(ours):
    image = random_image()
    args = dict(height=SIZE, width=SIZE, num_inference_steps=1, prior_num_inference_steps=1)
    with pytest.raises(ValueError, match="mask_image"):  # different size
        ours.inpaint("a", image, np.zeros((SIZE // 2, SIZE // 2), np.float32), **args)
    with pytest.raises(ValueError, match="mask_image"):  # outside [0, 1]
        ours.inpaint("a", image, np.full((SIZE, SIZE), 2.0, np.float32), **args)
    with pytest.raises(ValueError, match="mask_convention"):
        ours.inpaint("a", image, seed_example_mask(), mask_convention="black", **args)
    with pytest.raises(ValueError, match="image"):  # a [-1, 1] tensor
        ours.img2img("a", torch.rand(1, 3, SIZE, SIZE) * 2 - 1, **args)
    with pytest.raises(ValueError, match="image"):
        ours.img2img("a", "cat.png", **args)


def test_constructor_bad_input():
    with pytest.raises(ValueError, match="offload"):
        Kandinsky21(offload="everything")
    with pytest.raises(ValueError, match="dtype"):
        Kandinsky21(dtype=torch.int8)
    with pytest.raises(ValueError, match="unet"):
        Kandinsky21().module("unet")


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("sampler", ["plms", "euler_a"])
def test_decoder_samplers_without_a_diffusers_pipeline_equivalent_run(ours, sampler):
    """plms is the original's PLMS sampler, compared with its fixtures in test_schedulers.py. euler_a:
    KandinskyPipeline does not call the scheduler's scale_model_input, which Euler needs; test_schedulers.py
    compares it with diffusers' own sampling loop."""
    embeds = torch.randn(1, EMBED_DIM, generator=seed(30))
    images = ours.decode("the cat", embeds, -embeds, num_inference_steps=3, height=SIZE, width=SIZE,
                         sampler=sampler, generator=seed(30), output_type="pt")
    assert images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(images).all()


# measured 2.1e-7 / 1.8e-7 (ddpm: thresholded x0, see the module docstring), 1.3e-4 / 2e-4 (dpmpp_2m: no
# thresholding, diffusers' float32 sigmas)
@pytest.mark.parametrize("sampler, tolerance", [("ddpm", 1e-6), ("dpmpp_2m", 1e-3)], ids=["ddpm", "dpmpp_2m"])
def test_decoder_sampler_matches_diffusers_pipeline(ours, reference, sampler, tolerance):
    """ddpm: diffusers' DDPMScheduler with the official config, whose learned-range variance takes the 4
    variance channels of the conditional half. dpmpp_2m: DPMSolverMultistepScheduler, decoder betas."""
    scheduler = ddpm_scheduler() if sampler == "ddpm" else diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    prompts = ["a dog", "the cat"]
    embeds = torch.randn(2, EMBED_DIM, generator=seed(50))
    negative = torch.randn(2, EMBED_DIM, generator=seed(51))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=5, output_type="np")
    theirs = decoder_pipeline(reference, scheduler)(prompts, embeds, negative, generator=seed(52), **args).images
    images = ours.decode(prompts, embeds, negative, sampler=sampler, generator=seed(52), **args)
    assert max_abs(images, theirs) < tolerance


def test_p_sampler_is_diffusers_ddpm_on_the_respaced_timesteps(ours, reference):
    """The original's p_sampler for one image: the learned-range ancestral step of diffusers' DDPMScheduler
    (official config) on the original's respaced timesteps (999, ..., 0). The original clamps x0 to
    [-2, 2], then divides by the first image's 99.5th percentile of |x0| (at least 1): for one image that
    is diffusers' threshold capped at sample_max_value = 2."""
    from kandinsky.schedulers import space_timesteps

    timesteps = space_timesteps(1000, "6")[::-1]  # the original's SpacedDiffusion(timestep_respacing="6")
    assert timesteps[0] == 999 and timesteps[-1] == 0
    embeds = torch.randn(1, EMBED_DIM, generator=seed(53))
    negative = torch.randn(1, EMBED_DIM, generator=seed(54))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=6, output_type="np")
    theirs = decoder_pipeline(reference, ddpm_scheduler(timesteps))("a dog", embeds, negative, generator=seed(55),
                                                                     **args).images
    seen = []
    images = ours.decode("a dog", embeds, negative, sampler="p_sampler", generator=seed(55), **args,
                         sampler_options={"callback": lambda i, t, x, x0: seen.append(int(t))})
    assert seen == timesteps
    assert max_abs(images, theirs) < 1e-6  # measured 1.8e-7 / 1.8e-7


def test_sequential_offload_keeps_one_stage(ours):
    from kandinsky.hub import DECODER_STAGE, MODULES, PRIOR_STAGE, Lazy

    loads = []

    def lazy(name):
        module = ours.module(name)
        return Lazy(lambda: loads.append(name) or module, name)

    pipe = Kandinsky21(clip_tokenizer=ours.tokenizer("clip_tokenizer"), mclip_tokenizer=ours.tokenizer("mclip_tokenizer"),
                       **{name: lazy(name) for name in MODULES}, offload="sequential", progress=False)
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, prior_num_inference_steps=2, output_type="pt")
    images = pipe.text2img("the cat", generator=seed(31), **args)
    assert set(pipe.components.loaded()) <= set(DECODER_STAGE)  # the prior stage was dropped before the decoder ran
    pipe.prior("the cat", num_inference_steps=2)
    assert set(pipe.components.loaded()) <= set(PRIOR_STAGE)
    assert loads.count("prior") == 2 and "unet_inpaint" not in loads  # text2img never loads the inpainting UNet
    assert torch.equal(images, ours.text2img("the cat", generator=seed(31), **args))


def _compiled_run(ours, pipe, backend):
    embeds, negative = ours.prior("the cat", num_inference_steps=2, generator=seed(33))
    args = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt")
    eager = ours.decode("the cat", embeds, negative, generator=seed(34), **args)
    pipe.compile_unet(backend=backend)
    compiled = pipe.decode("the cat", embeds, negative, generator=seed(34), **args)
    assert isinstance(pipe.components.compiled("unet"), torch._dynamo.eval_frame.OptimizedModule)
    return eager, compiled


def test_compile_unet_routes_the_decoder_through_torch_compile(reference, ours):
    pipe = Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], progress=False)
    eager, compiled = _compiled_run(ours, pipe, "eager")  # dynamo's graph capture, no code generation
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    pipe.compile_unet(disable=True)
    assert pipe.components.compile_options is None and pipe.components.compiled("unet") is None


@pytest.mark.slow
def test_compile_unet_with_inductor_matches_eager(reference, ours):
    pipe = Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], progress=False)
    eager, compiled = _compiled_run(ours, pipe, "inductor")
    # inductor fuses and reorders float32 arithmetic: rounding-level differences through 2 steps and the MoVQ
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)


def test_bfloat16_pipeline_is_close_to_float32(reference, ours):
    pipe = Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], dtype=torch.bfloat16, progress=False)
    for name in ("prior", "unet", "movq"):
        assert {p.dtype for p in pipe.module(name).parameters()} == {torch.bfloat16}, name
    embeds32, _ = ours.prior("the cat", num_inference_steps=2, generator=seed(32))
    embeds16, _ = pipe.prior("the cat", num_inference_steps=2, generator=seed(32))
    assert embeds16.dtype == torch.float32  # the sampler state stays float32
    # bf16 keeps 8 bits of mantissa (2^-9 ~ 2e-3 relative per rounding); guidance 4 multiplies the
    # difference of the two prior outputs by 4: measured 2.3% to 3.6% of the embeddings' largest magnitude
    assert max_abs(embeds16, embeds32) < 0.1 * float(embeds32.abs().max())
    # The decoder alone, from the same embeddings, with ddpm: its thresholded x0 keeps the roundings from
    # growing from step to step (DDIM's x0 at t = 999 multiplies them by ~14 per step). Measured over
    # six seeds: mean 1.2e-4 to 1.3e-4, max 6.7e-4 to 9.8e-4 (in [0, 1]); another seed's image differs by
    # 1.1e-2 on average.
    args = dict(height=SIZE, width=SIZE, num_inference_steps=3, sampler="ddpm", output_type="np")
    images32 = ours.decode("the cat", embeds32, -embeds32, generator=seed(33), **args)
    images16 = pipe.decode("the cat", embeds32, -embeds32, generator=seed(33), **args)
    assert images16.dtype == np.float32
    assert np.abs(images16 - images32).mean() < 5e-4
    assert max_abs(images16, images32) < 4e-3


# ------------------------------------------------------------------------------------------------ p_sampler


def _recorded_x0(call, **options) -> list[torch.Tensor]:
    """The processed x0 of every decoder step of ``call(sampler_options=...)``."""
    steps = []
    call(sampler_options={"callback": lambda i, t, x, x0: steps.append(x0.clone()), **options})
    return steps


def test_p_sampler_clamps_x0_as_the_original(ours):
    embeds = torch.randn(1, EMBED_DIM, generator=seed(40))

    def decode(sampler_options):
        ours.decode("the cat", embeds, -embeds, num_inference_steps=3, height=SIZE, width=SIZE, sampler="p_sampler",
                    generator=seed(41), output_type="pt", sampler_options=sampler_options)

    clamped = _recorded_x0(decode, threshold=None)
    assert max(float(x0.abs().max()) for x0 in clamped) <= 2
    # a user x0_fn replaces the clamp: at t = 999 the unclamped x0 of random weights is far outside [-2, 2]
    free = _recorded_x0(decode, threshold=None, x0_fn=lambda x0, t: x0)
    assert float(free[0].abs().max()) > 2


def test_p_sampler_inpainting_keeps_the_image_latents_every_step(ours):
    from kandinsky.images import images_to_tensor
    from kandinsky.pipeline import dilate_repaint

    image, mask = random_image(5), seed_example_mask()
    embeds = torch.randn(1, EMBED_DIM, generator=seed(42))

    def inpaint(sampler_options):
        ours.inpaint("a hat", image, mask, height=SIZE, width=SIZE, num_inference_steps=3, sampler="p_sampler",
                     image_embeds=embeds, negative_image_embeds=-embeds, generator=seed(43), output_type="pt",
                     sampler_options=sampler_options)

    steps = _recorded_x0(inpaint, threshold=None)
    with torch.no_grad():
        latents = ours.module("movq").encode(images_to_tensor(image, SIZE, SIZE)[0]).float()
    keep = 1 - torch.from_numpy(mask)[None, None]
    keep = dilate_repaint(torch.nn.functional.interpolate(keep, size=latents.shape[-2:], mode="nearest"))
    assert 0 < keep.mean() < 1
    for x0 in steps:
        torch.testing.assert_close(x0 * keep, latents * keep, rtol=0, atol=1e-6)
        assert float(x0.abs().max()) <= max(2.0, float(latents.abs().max()))
    assert not torch.allclose(steps[0] * (1 - keep), steps[-1] * (1 - keep))  # the repaint area is sampled


# ------------------------------------------------------------------------------------------------ whole pipeline


def inpaint_combined_pipeline(reference: dict):
    """diffusers' KandinskyInpaintCombinedPipeline on the reference's components."""
    components = {**reference["inpaint"].components,
                  **{f"prior_{name}": value for name, value in reference["prior"].components.items()}}
    pipe = diffusers.KandinskyInpaintCombinedPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The prior at its default 25 steps, then 4 DDIM steps. Our prior repeats diffusers' float32 unCLIP
# arithmetic, so the embeddings agree to float32 rounding (4.5e-6 of |embeds| ~ 5); the random tiny decoder's DDIM
# from t = 999 amplifies such roundings to 2e-4 even within diffusers (its own decoder fed embeddings 4.5e-6
# apart). Measured over seeds 60-62: text2img 1.3e-3 / 9.8e-5 / 4.2e-5; over seeds 63-65: inpaint 1.3e-4 /
# 4.2e-5 / 9.2e-5. The original's float64 arithmetic (prior_sampler="unclip_original") is 0.017 to 0.16 away
# (text2img) and 4.6e-3 to 5.4e-2 (inpaint).
WHOLE = dict(height=SIZE, width=SIZE, num_inference_steps=4, output_type="np")


def test_text2img_with_the_prior_matches_the_combined_pipeline(ours, reference):
    theirs = reference["combined"]("the cat", generator=seed(61), **WHOLE).images
    images = ours.text2img("the cat", generator=seed(61), **WHOLE)
    original = ours.text2img("the cat", generator=seed(61), prior_sampler="unclip_original", **WHOLE)
    assert max_abs(images, theirs) < 2e-3  # measured 9.8e-5
    assert max_abs(original, theirs) > 2e-2  # measured 0.11


def test_inpaint_with_the_prior_matches_the_inpaint_combined_pipeline(ours, reference):
    image, mask = random_image(7), seed_example_mask()
    theirs = inpaint_combined_pipeline(reference)("a hat", image=image, mask_image=mask.copy(), generator=seed(65),
                                                  **WHOLE).images
    images = ours.inpaint("a hat", image, mask, generator=seed(65), **WHOLE)
    original = ours.inpaint("a hat", image, mask, generator=seed(65), prior_sampler="unclip_original", **WHOLE)
    assert max_abs(images, theirs) < 1e-3  # measured 9.2e-5
    assert max_abs(original, theirs) > 1e-2  # measured 5.4e-2


# ------------------------------------------------------------------------------------------------ hardening


def test_integer_masks_are_binarised_as_diffusers_does(ours, reference):
    """diffusers binarises arrays as they are (>= 0.5), without scaling: a uint8 mask of {0, 1} repaints
    where it is 1, as does one of {0, 255}; a PIL mask is read as grey levels / 255."""
    image, mask = random_image(8), seed_example_mask().astype(np.uint8)
    embeds = torch.randn(1, EMBED_DIM, generator=seed(70))
    negative = torch.randn(1, EMBED_DIM, generator=seed(71))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="np", image_embeds=embeds,
                negative_image_embeds=negative)
    theirs = reference["inpaint"]("a hat", image=image, mask_image=mask.copy(), generator=seed(72), **args).images
    images = ours.inpaint("a hat", image, mask, generator=seed(72), **args)
    assert max_abs(images, theirs) < 5e-5  # measured 7.3e-6 (read as / 255, nothing is repainted: 0.14 away)
    as_float = ours.inpaint("a hat", image, mask.astype(np.float32), generator=seed(72), **args)
    as_255 = ours.inpaint("a hat", image, mask * 255, generator=seed(72), **args)
    assert np.array_equal(images, as_float) and np.array_equal(images, as_255)


def _nan_image() -> torch.Tensor:
    pixels = torch.rand(1, 3, SIZE, SIZE, generator=seed(73))
    pixels[0, 1, 3, 4] = float("nan")
    return pixels


# small sizes and step counts everywhere: were a check missing, the call would run, not take minutes
FEW = dict(height=SIZE, width=SIZE, num_inference_steps=1)
TASK = dict(FEW, prior_num_inference_steps=1)


@pytest.mark.parametrize("call, name", [
    (lambda p: p.img2img("a", _nan_image(), **TASK), "image"),
    (lambda p: p.img2img("a", _nan_image()[0].permute(1, 2, 0).numpy(), **TASK), "image"),
    (lambda p: p.img2img("a", torch.full((1, 3, SIZE, SIZE), float("inf")), **TASK), "image"),
    (lambda p: p.inpaint("a", random_image(), np.full((SIZE, SIZE), np.nan, np.float32), **TASK), "mask_image"),
    (lambda p: p.decode("a", torch.full((1, EMBED_DIM), float("nan")), torch.zeros(1, EMBED_DIM), **FEW),
     "image_embeds"),
    (lambda p: p.decode("a", torch.zeros(1, EMBED_DIM), torch.full((1, EMBED_DIM), float("-inf")), **FEW),
     "negative_image_embeds"),
    (lambda p: p.decode("a", torch.full((1, EMBED_DIM), 1e30), torch.zeros(1, EMBED_DIM), **FEW), "image_embeds"),
    (lambda p: p.img2img("a", random_image(), image_embeds=torch.full((1, EMBED_DIM), float("nan")),
                         negative_image_embeds=torch.zeros(1, EMBED_DIM), **TASK), "image_embeds"),
    (lambda p: p.interpolate(["a", _nan_image()], [0.5, 0.5], num_inference_steps=1), "images_and_prompts"),
    (lambda p: p.interpolate(["a", "b"], [0.5, float("nan")], num_inference_steps=1), "weights"),
    (lambda p: p.interpolate(["a", "b"], [1e308, 1.0], num_inference_steps=1), "weights"),
    (lambda p: p.mix(["a", "b"], [0.5, float("inf")], **TASK), "weights"),
    (lambda p: p.text2img("a", guidance_scale=1e38, **TASK), "guidance_scale"),
    (lambda p: p.text2img("a", guidance_scale=float("nan"), **TASK), "guidance_scale"),
    (lambda p: p.text2img("a", prior_guidance_scale=float("nan"), **TASK), "prior_guidance_scale"),
    (lambda p: p.text2img("a", **{**TASK, "prior_num_inference_steps": 0}), "prior_num_inference_steps"),
    (lambda p: p.mix(["a"], [1.0], **{**TASK, "prior_num_inference_steps": 1001}), "prior_num_inference_steps"),
    (lambda p: p.text2img("a", prior_sampler="ddim", **TASK), "prior_sampler"),
    (lambda p: p.prior("a", guidance_scale=101, num_inference_steps=1), "guidance_scale"),
    (lambda p: p.prior("a", sampler="p_sampler", num_inference_steps=1), "sampler"),
], ids=["image-nan", "array-nan", "image-inf", "mask-nan", "embeds-nan", "negative-inf", "embeds-huge",
        "img2img-embeds-nan", "item-nan", "weight-nan", "weight-huge", "mix-weight-inf", "guidance-huge",
        "guidance-nan", "prior-guidance-nan", "prior-steps-0", "prior-steps-1001", "prior-sampler", "prior-guidance",
        "prior-sampler-name"])
def test_bad_values_name_their_argument(ours, call, name):
    """Non-finite inputs (NaN passes any range check), absurd finite ones and the prior's arguments of a task
    are refused before any model runs, in one line that starts with the argument's name."""
    with pytest.raises(ValueError) as info:
        call(ours)
    assert str(info.value).startswith(f"{name}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("sampler, most", [("ddim", 999), ("plms", 999), ("dpmpp_2m", 999), ("ddpm", 1000)])
def test_too_many_steps_name_the_argument_and_the_range(ours, sampler, most):
    with pytest.raises(ValueError) as info:
        ours.text2img("a", num_inference_steps=most + 1, sampler=sampler, prior_num_inference_steps=1, height=SIZE,
                      width=SIZE)
    message = str(info.value)
    assert message == f"num_inference_steps: expected an integer in 1..{most} for the {sampler!r} sampler, got {most + 1}"


def test_non_finite_generations_are_an_error_naming_the_weights(ours):
    """NaN weights (or a float16 overflow) must not become a black image."""
    import copy

    from kandinsky.pipeline import NonFiniteError

    unet = copy.deepcopy(ours.module("unet"))
    with torch.no_grad():
        next(unet.parameters()).view(-1)[0] = float("nan")
    pipe = Kandinsky21(mclip_tokenizer=ours.tokenizer("mclip_tokenizer"), mclip=ours.module("mclip"), unet=unet,
                       movq=ours.module("movq"), progress=False)
    embeds = torch.randn(1, EMBED_DIM, generator=seed(74))
    with pytest.raises(NonFiniteError, match="decoder UNet .* weights hold NaN or inf"):
        pipe.decode("a", embeds, -embeds, height=SIZE, width=SIZE, num_inference_steps=2)

"""The Kandinsky21 pipeline against diffusers 0.42.1, on tiny random components (no hub, tokenizers built
in code): same seed and arguments -> same embeddings and images.

Tolerances: float32 throughout; the prior embeddings differ only by float32 operation order (1e-4);
images pass through two different float32 networks (UNet, MoVQ) for a few steps, compared in [0, 1]
(2e-3, the brief's bound; observed errors are ~1e-6).
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


def prior_scheduler(float64: bool = True):
    """diffusers' UnCLIPScheduler (the official prior's scheduler_config.json).

    diffusers keeps the squared-cosine alphas_cumprod in float32, where 1 - alphas_cumprod[0] (~4e-5)
    loses ~3 significant digits; its last step then differs from the exact (float64, the original's
    numpy) update by up to ~5e-4 * clip_std. ``float64=True`` gives it the float64 table our sampler
    uses (the step arithmetic is unchanged), so that the comparison isolates the pipeline wiring.
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


@pytest.fixture(scope="module")
def reference():
    return build_reference()


def build_reference() -> dict:
    """diffusers pipelines (prior, text2img, img2img, inpaint, combined) sharing tiny random components."""
    from transformers import CLIPImageProcessor

    torch.manual_seed(0)
    prior = dict(prior=tiny_diffusers_prior(), image_encoder=tiny_clip_vision_model(seed=2),
                 text_encoder=tiny_clip_text(), tokenizer=tiny_clip_tokenizer(),
                 scheduler=prior_scheduler(),
                 image_processor=CLIPImageProcessor(crop_size=224, size=224, resample=3))
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
    assert max_abs(embeds, theirs.image_embeds) < 1e-4
    assert max_abs(negative, theirs.negative_image_embeds) < 1e-4


def test_prior_against_stock_float32_scheduler(ours, reference):
    """Against diffusers' own float32 UnCLIPScheduler table: the difference is its float32 rounding of
    1 - alphas_cumprod near t = 0 (see prior_scheduler), ~5e-4 relative to the embeddings' scale."""
    stock = diffusers.KandinskyPriorPipeline(**{**reference["prior"].components, "scheduler": prior_scheduler(False)})
    stock.set_progress_bar_config(disable=True)
    theirs = stock("the cat", num_inference_steps=5, generator=seed(1)).image_embeds
    embeds, _ = ours.prior("the cat", num_inference_steps=5, generator=seed(1))
    assert max_abs(embeds, theirs) < 2e-3 * float(theirs.abs().max())


def test_prior_list_of_prompts_with_negatives(ours, reference):
    args = dict(negative_prompt=["ugly", "dark"], num_inference_steps=3)
    theirs = reference["prior"](["the cat", "a dog"], generator=seed(2), **args)
    embeds, negative = ours.prior(["the cat", "a dog"], generator=seed(2), **args)
    assert max_abs(embeds, theirs.image_embeds) < 1e-4
    assert max_abs(negative, theirs.negative_image_embeds) < 1e-4


# ------------------------------------------------------------------------------------------------ text2img


@pytest.mark.parametrize("num_images_per_prompt", [1, 2])
def test_text2img_matches_combined_pipeline(ours, reference, num_images_per_prompt):
    args = dict(height=SIZE, width=SIZE, num_images_per_prompt=num_images_per_prompt, **STEPS)
    theirs = reference["combined"]("the cat", generator=seed(3), output_type="np", **args).images
    images = ours.text2img("the cat", generator=seed(3), output_type="np", **args)
    assert images.shape == (num_images_per_prompt, SIZE, SIZE, 3)
    assert max_abs(images, theirs) < 2e-3


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
    assert max_abs(images, theirs) < 2e-3


def test_text2img_without_guidance_and_list_of_prompts(ours, reference):
    args = dict(height=SIZE, width=SIZE, guidance_scale=1.0, prior_guidance_scale=1.0, **STEPS)
    theirs = reference["combined"](["the cat", "a dog"], generator=seed(5), output_type="np", **args).images
    images = ours.text2img(["the cat", "a dog"], generator=seed(5), output_type="np", **args)
    assert max_abs(images, theirs) < 2e-3


def test_decode_matches_decoder_pipeline(ours, reference):
    embeds = torch.randn(1, EMBED_DIM, generator=seed(6))
    negative = torch.randn(1, EMBED_DIM, generator=seed(7))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=4, output_type="np")
    theirs = reference["text2img"]("a dog", embeds, negative, generator=seed(8), **args).images
    images = ours.decode("a dog", embeds, negative, generator=seed(8), **args)
    assert max_abs(images, theirs) < 2e-3


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


def test_guidance_batch_order_is_uncond_then_cond(ours):
    """Swapping image_embeds and negative_image_embeds at guidance 1 + epsilon is not symmetric: check the
    guided output equals the formula with [uncond, cond] = [negative, positive]."""
    unet = ours.module("unet")
    calls = []
    original_forward = unet.forward

    def spy(x, t, **kwargs):
        calls.append(kwargs["image_embeds"].clone())
        return original_forward(x, t, **kwargs)

    unet.forward = spy
    try:
        embeds, negative = torch.ones(1, EMBED_DIM), -torch.ones(1, EMBED_DIM)
        ours.decode("a", embeds, negative, num_inference_steps=1, height=SIZE, width=SIZE, output_type="pt")
    finally:
        del unet.forward
    assert torch.equal(calls[0][0], negative[0]) and torch.equal(calls[0][1], embeds[0])


# ------------------------------------------------------------------------------------------------ img2img


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_img2img_matches_diffusers(ours, reference, strength):
    image = random_image(1)
    generator = seed(11)
    embeds, negative = reference["prior"]("the cat", num_inference_steps=2, generator=generator, return_dict=False)
    theirs = reference["img2img"]("the cat", image, embeds, negative, height=SIZE, width=SIZE, strength=strength,
                                  num_inference_steps=4, generator=generator, output_type="np").images
    images = ours.img2img("the cat", image, strength=strength, height=SIZE, width=SIZE, num_inference_steps=4,
                          prior_num_inference_steps=2, generator=seed(11), output_type="np")
    assert max_abs(images, theirs) < 2e-3


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
    assert max_abs(images, theirs) < 2e-3


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
    assert max_abs(legacy, theirs) < 2e-3
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
    assert max_abs(images, theirs) < 2e-3


def test_mask_dilation_equals_diffusers_prepare_mask():
    from diffusers.pipelines.kandinsky.pipeline_kandinsky_inpaint import prepare_mask

    keep = (torch.rand(3, 1, 9, 11, generator=seed(19)) > 0.2).float()
    assert torch.equal(dilate_repaint(keep), prepare_mask(keep.clone()))


# ------------------------------------------------------------------------------------------------ interpolate


def test_interpolate_and_mix_match_diffusers(ours, reference):
    items, weights = ["the cat", random_image(5, size=80), "a dog"], [0.3, 0.3, 0.4]
    theirs = reference["prior"].interpolate(items, weights, num_inference_steps=3, generator=seed(20))
    embeds, negative = ours.interpolate(items, weights, num_inference_steps=3, generator=seed(20))
    assert max_abs(embeds, theirs.image_embeds) < 1e-4
    assert max_abs(negative, theirs.negative_image_embeds) < 1e-4
    args = dict(height=SIZE, width=SIZE, num_inference_steps=3, output_type="np")
    images_theirs = reference["text2img"]("", theirs.image_embeds, theirs.negative_image_embeds,
                                          generator=seed(21), **args).images
    images = ours.decode("", embeds, negative, generator=seed(21), **args)
    assert max_abs(images, images_theirs) < 2e-3
    mixed = ours.mix(items, weights, prior_num_inference_steps=3, num_inference_steps=2, height=SIZE, width=SIZE,
                     generator=seed(20), output_type="pt")
    assert mixed.shape == (1, 3, SIZE, SIZE)


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


@pytest.mark.parametrize("sampler", ["p_sampler", "plms", "ddpm", "dpmpp_2m", "euler_a"])
def test_every_decoder_sampler_runs(ours, sampler):
    embeds = torch.randn(1, EMBED_DIM, generator=seed(30))
    images = ours.decode("the cat", embeds, -embeds, num_inference_steps=3, height=SIZE, width=SIZE,
                         sampler=sampler, generator=seed(30), output_type="pt")
    assert images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(images).all()


def test_sequential_offload_keeps_one_stage(ours):
    from kandinsky.pipeline import DECODER_STAGE, MODULES, PRIOR_STAGE, Lazy

    loads = []

    def lazy(name):
        module = ours.module(name)
        return Lazy(lambda: loads.append(name) or module, name)

    pipe = Kandinsky21(clip_tokenizer=ours.tokenizer("clip_tokenizer"), mclip_tokenizer=ours.tokenizer("mclip_tokenizer"),
                       **{name: lazy(name) for name in MODULES}, offload="sequential", progress=False)
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, prior_num_inference_steps=2, output_type="pt")
    images = pipe.text2img("the cat", generator=seed(31), **args)
    assert set(pipe._modules) <= set(DECODER_STAGE)  # the prior stage was dropped before the decoder ran
    pipe.prior("the cat", num_inference_steps=2)
    assert set(pipe._modules) <= set(PRIOR_STAGE)
    assert loads.count("prior") == 2 and "unet_inpaint" not in loads  # text2img never loads the inpainting UNet
    assert torch.equal(images, ours.text2img("the cat", generator=seed(31), **args))


def _compiled_run(ours, pipe, backend):
    embeds, negative = ours.prior("the cat", num_inference_steps=2, generator=seed(33))
    args = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt")
    eager = ours.decode("the cat", embeds, negative, generator=seed(34), **args)
    pipe.compile_unet(backend=backend)
    compiled = pipe.decode("the cat", embeds, negative, generator=seed(34), **args)
    assert isinstance(pipe._compiled_unets["unet"][1], torch._dynamo.eval_frame.OptimizedModule)
    return eager, compiled


def test_compile_unet_routes_the_decoder_through_torch_compile(reference, ours):
    pipe = Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], progress=False)
    eager, compiled = _compiled_run(ours, pipe, "eager")  # dynamo's graph capture, no code generation
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    pipe.compile_unet(disable=True)
    assert pipe._compile_options is None and not pipe._compiled_unets


@pytest.mark.slow
def test_compile_unet_with_inductor_matches_eager(reference, ours):
    pipe = Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], progress=False)
    eager, compiled = _compiled_run(ours, pipe, "inductor")
    # inductor fuses and reorders float32 arithmetic: rounding-level differences through 2 steps and the MoVQ
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)


def test_bfloat16_pipeline_runs_close_to_float32(reference):
    pipe = Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], dtype=torch.bfloat16, progress=False)
    assert pipe.module("unet").conv_in.weight.dtype == torch.bfloat16
    embeds32, _ = Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], progress=False).prior(
        "the cat", num_inference_steps=2, generator=seed(32))
    embeds16, _ = pipe.prior("the cat", num_inference_steps=2, generator=seed(32))
    assert embeds16.dtype == torch.float32  # the sampler state stays float32
    # bf16 keeps 8 bits of mantissa (~4e-3 relative per operation), a few layers deep
    assert max_abs(embeds16, embeds32) < 0.1 * float(embeds32.abs().max())
    images = pipe.text2img("the cat", height=SIZE, width=SIZE, num_inference_steps=2, prior_num_inference_steps=2,
                           generator=seed(32), output_type="pt")
    assert torch.isfinite(images).all()


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
    from kandinsky.pipeline import _images_to_tensor, dilate_repaint

    image, mask = random_image(5), seed_example_mask()
    embeds = torch.randn(1, EMBED_DIM, generator=seed(42))

    def inpaint(sampler_options):
        ours.inpaint("a hat", image, mask, height=SIZE, width=SIZE, num_inference_steps=3, sampler="p_sampler",
                     image_embeds=embeds, negative_image_embeds=-embeds, generator=seed(43), output_type="pt",
                     sampler_options=sampler_options)

    steps = _recorded_x0(inpaint, threshold=None)
    with torch.no_grad():
        latents = ours.module("movq").encode(_images_to_tensor(image, SIZE, SIZE)[0]).float()
    keep = 1 - torch.from_numpy(mask)[None, None]
    keep = dilate_repaint(torch.nn.functional.interpolate(keep, size=latents.shape[-2:], mode="nearest"))
    assert 0 < keep.mean() < 1
    for x0 in steps:
        torch.testing.assert_close(x0 * keep, latents * keep, rtol=0, atol=1e-6)
        assert float(x0.abs().max()) <= max(2.0, float(latents.abs().max()))
    assert not torch.allclose(steps[0] * (1 - keep), steps[-1] * (1 - keep))  # the repaint area is sampled

"""The Kandinsky22 pipeline against diffusers 0.42.1's Kandinsky 2.2 pipelines, on tiny random components (no hub,
tokenizers built in code): same seed and arguments -> same embeddings and images. Also the tiny 2.2 pipeline
(``Kandinsky22.from_config("tiny")``) and the tasks' 2.2-specific behaviour (no text in the decoder, the
inpainting blend, the hint).

Tolerances: float32 throughout, so the two sides differ only by operation order. Images are compared in [0, 1]:
a single decoder step within 2e-4, several within 2e-3 (each bound is written beside what was measured).
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky import tiny
from kandinsky.pipeline import Kandinsky21, Kandinsky22
from kandinsky.testing import randomize_

diffusers = pytest.importorskip("diffusers")

WIDTH = 40  # CLIP hidden = projection = prior embedding_dim = UNet encoder_hid_dim (ViT-bigG: 1280)
SIZE = 64  # px; the MoVQ downsamples by 8 (as the real one), so latents are 8 x 8 and the hint is 64 x 64
STEPS = dict(num_inference_steps=3, prior_num_inference_steps=2)
UNET_22 = dict(out_channels=8, addition_embed_type="image", encoder_hid_dim_type="image_proj", encoder_hid_dim=WIDTH,
               down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
               up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
               cross_attention_dim=24, attention_head_dim=16, resnet_time_scale_shift="scale_shift")


def diffusers_unet(seed: int, **change):
    unet = randomize_(diffusers.UNet2DConditionModel(**{**UNET_22, "in_channels": 4, **change}), seed)
    with torch.no_grad():  # a small noise prediction keeps the DDIM latents near unit scale
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    return unet.eval()


def diffusers_movq(seed: int = 5):
    movq = diffusers.VQModel(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3, in_channels=3, latent_channels=4,
        layers_per_block=1, norm_num_groups=32, norm_type="spatial", num_vq_embeddings=12, out_channels=3,
        vq_embed_dim=4)
    randomize_(movq, seed)
    with torch.no_grad():  # random weights decode to |x| ~ 50: scale down so that few pixels clip at 0 or 1
        movq.decoder.conv_out.weight.mul_(0.05)
    return movq.eval()


def diffusers_prior(seed: int = 3):
    """A PriorTransformer 64 wide over 40-wide CLIP embeddings (the real one: 2048 over 1280)."""
    prior = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=32, embedding_dim=WIDTH, num_layers=1)

    def positive(param, generator):
        param.copy_(0.5 + torch.rand(param.shape, generator=generator))

    return randomize_(prior, seed, overrides={"clip_std": positive}).eval()


def seed(value: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def random_image(value: int = 0, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(value).integers(0, 256, (size, size, 3), dtype=np.uint8))


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def reference() -> dict:
    """diffusers' 2.2 pipelines sharing tiny random components."""
    from transformers import CLIPImageProcessorPil

    torch.manual_seed(0)
    tokenizer = tiny.clip_tokenizer()
    prior = dict(prior=diffusers_prior(), tokenizer=tokenizer,
                 text_encoder=tiny.clip_text_model(1, len(tokenizer), projection_dim=WIDTH, width=WIDTH),
                 image_encoder=tiny.clip_vision_model(2, projection_dim=WIDTH, width=WIDTH),
                 scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                                     num_train_timesteps=1000, clip_sample=True,
                                                     clip_sample_range=10.0),
                 image_processor=CLIPImageProcessorPil(crop_size=224, size=224, resample=3))
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type="epsilon", thresholding=False)
    decoder = dict(unet=diffusers_unet(6), scheduler=scheduler, movq=diffusers_movq())
    inpaint = dict(decoder, unet=diffusers_unet(7, in_channels=9))
    controlnet = dict(decoder, unet=diffusers_unet(8, in_channels=8, addition_embed_type="image_hint"))
    prefixed = {f"prior_{k}": v for k, v in prior.items()}
    pipes = dict(
        prior=diffusers.KandinskyV22PriorPipeline(**prior),
        text2img=diffusers.KandinskyV22Pipeline(**decoder),
        combined=diffusers.KandinskyV22CombinedPipeline(**decoder, **prefixed),
        img2img=diffusers.KandinskyV22Img2ImgCombinedPipeline(**decoder, **prefixed),
        inpaint=diffusers.KandinskyV22InpaintCombinedPipeline(**inpaint, **prefixed),
        controlnet=diffusers.KandinskyV22ControlnetPipeline(**controlnet),
        controlnet_img2img=diffusers.KandinskyV22ControlnetImg2ImgPipeline(**controlnet),
        inpaint_decoder=diffusers.KandinskyV22InpaintPipeline(**inpaint),
    )
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def ours(reference) -> Kandinsky22:
    return Kandinsky22.from_diffusers(reference["prior"], reference["text2img"],
                                      inpaint_pipeline=reference["inpaint_decoder"],
                                      controlnet_pipeline=reference["controlnet"], progress=False)


def hint_tensor(value: int = 11) -> torch.Tensor:
    return torch.rand(1, 3, SIZE, SIZE, generator=seed(value))


# ------------------------------------------------------------------------------------------------ against diffusers


def test_store_has_no_text_encoder_and_three_unets(ours):
    assert ours.components.names() == ["clip_text", "clip_vision", "prior", "unet", "unet_inpaint", "movq",
                                       "unet_controlnet", "clip_tokenizer"]
    conditioning = {name: ours.module(name).config.conditioning for name in ("unet", "unet_inpaint", "unet_controlnet")}
    assert conditioning == {"unet": "image", "unet_inpaint": "image", "unet_controlnet": "image_hint"}
    assert ours.module("prior").config.clip_dim == WIDTH and ours.module("prior").config.width == 64
    assert ours.components.source == {"source": "diffusers pipelines", "model": "2.2"}


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_prior_matches_diffusers(ours, reference, negative_prompt):
    args = dict(negative_prompt=negative_prompt, num_inference_steps=5, num_images_per_prompt=2)
    theirs = reference["prior"]("the cat", generator=seed(1), **args)
    embeds, negative = ours.prior("the cat", generator=seed(1), **args)
    assert embeds.shape == negative.shape == (2, WIDTH)
    assert max_abs(embeds, theirs.image_embeds) < 3e-5  # measured 7.6e-6 / 6e-6 (|embeds| up to 6.2)
    assert max_abs(negative, theirs.negative_image_embeds) < 5e-6  # measured 0 (zero image) / 9.5e-7


def test_interpolate_matches_diffusers(ours, reference):
    items, weights = ["the cat", random_image(12, 96)], [0.3, 0.7]
    theirs = reference["prior"].interpolate(items, weights, num_inference_steps=3, generator=seed(13))
    embeds, negative = ours.interpolate(items, weights, num_inference_steps=3, generator=seed(13))
    assert max_abs(embeds, theirs.image_embeds) < 3e-5  # measured 1.2e-6
    assert max_abs(negative, theirs.negative_image_embeds) < 5e-6  # measured 0


def test_decode_two_steps_matches_decoder_pipeline(ours, reference):
    """DDIM's first step of two is at t = 501 (one step alone would be at t = 1: "leading" spacing, offset 1)."""
    embeds, negative = torch.randn(1, WIDTH, generator=seed(6)), torch.randn(1, WIDTH, generator=seed(7))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="np")
    theirs = reference["text2img"](embeds, negative, generator=seed(8), **args).images
    images = ours.decode("a dog", embeds, negative, generator=seed(8), **args)
    assert images.shape == (1, SIZE, SIZE, 3)
    assert max_abs(images, theirs) < 2e-4  # measured 2.1e-6


def _their_latents(pipe, *args, **kwargs) -> list[torch.Tensor]:
    """The latents after each step of a diffusers 2.2 decoder pipeline call."""
    steps = []

    def on_step(pipeline, i, t, values):
        steps.append(values["latents"].clone())
        return {}

    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        pipe(*args, callback_on_step_end=on_step, output_type="np", **kwargs)
    else:  # the ControlNet pipelines take the older callback(i, t, latents)
        pipe(*args, callback=lambda i, t, latents: steps.append(latents.clone()), output_type="np", **kwargs)
    return steps


@pytest.mark.parametrize("task", ["decode", "inpaint", "controlnet"])
def test_decoder_latents_match_step_by_step(ours, reference, task):
    """The UNet path alone, every step (inpainting: after the known region is put back): the latents within 3e-6
    of their scale (measured 2.5e-7 to 3e-7). The images then differ by what the random MoVQ makes of that: its
    output moves by up to 40x a latent change of that size (1.9e-4 for 4.6e-6 at |latents| 14)."""
    embeds, negative = torch.randn(1, WIDTH, generator=seed(30)), torch.randn(1, WIDTH, generator=seed(31))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=4)
    image, mask, hint = random_image(33), np.zeros((SIZE, SIZE), dtype=np.float32), hint_tensor(34)
    mask[8:40, 24:56] = 1
    mine = []
    options = {"sampler_options": {"callback": lambda i, t, x, x0: mine.append(x.clone())}}
    if task == "decode":
        theirs = _their_latents(reference["text2img"], embeds, negative, generator=seed(32), **args)
        ours.decode("a cat", embeds, negative, generator=seed(32), **args, **options, output_type="np")
    elif task == "inpaint":
        theirs = _their_latents(reference["inpaint_decoder"], embeds, image, mask, negative, generator=seed(32), **args)
        ours.inpaint("a cat", image, mask, image_embeds=embeds, negative_image_embeds=negative, generator=seed(32),
                     **args, **options, output_type="np")
    else:
        theirs = _their_latents(reference["controlnet"], embeds, negative, hint, generator=seed(32), **args)
        ours.controlnet("a cat", hint, image_embeds=embeds, negative_image_embeds=negative, generator=seed(32),
                        **args, **options, output_type="np")
    assert len(mine) == len(theirs) == 4
    for step, (a, b) in enumerate(zip(mine, theirs)):
        assert float((a - b).abs().max()) < 3e-6 * float(b.abs().max()), step


@pytest.mark.parametrize("num_images_per_prompt", [1, 2])
def test_text2img_matches_combined_pipeline(ours, reference, num_images_per_prompt):
    args = dict(height=SIZE, width=SIZE, num_images_per_prompt=num_images_per_prompt, **STEPS)
    theirs = reference["combined"]("the cat", generator=seed(3), output_type="np", **args).images
    images = ours.text2img("the cat", generator=seed(3), output_type="np", **args)
    assert images.shape == (num_images_per_prompt, SIZE, SIZE, 3)
    assert max_abs(images, theirs) < 2e-3  # measured 5.8e-4 (the MoVQ, see test_decoder_latents_...) / 1.5e-5


def test_text2img_negative_prompt_and_no_guidance(ours, reference):
    args = dict(height=SIZE, width=SIZE, **STEPS)
    theirs = reference["combined"](["the cat", "a dog"], negative_prompt=["dark", "ugly"], generator=seed(4),
                                   output_type="np", **args).images
    images = ours.text2img(["the cat", "a dog"], negative_prompt=["dark", "ugly"], generator=seed(4),
                           output_type="np", **args)
    assert max_abs(images, theirs) < 2e-3  # measured 3.9e-5
    args.update(guidance_scale=1.0, prior_guidance_scale=1.0)
    theirs = reference["combined"]("the cat", generator=seed(5), output_type="np", **args).images
    images = ours.text2img("the cat", generator=seed(5), output_type="np", **args)
    assert max_abs(images, theirs) < 2e-3  # measured 9.8e-6


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_combined_pipeline(ours, reference, strength):
    """2.2 noises the image latents with the decoder's schedule at the first remaining timestep."""
    args = dict(height=SIZE, width=SIZE, strength=strength, num_inference_steps=4, prior_num_inference_steps=2)
    image = random_image(14)
    theirs = reference["img2img"]("the cat", image, generator=seed(15), output_type="np", **args).images
    images = ours.img2img("the cat", image, generator=seed(15), output_type="np", **args)
    assert max_abs(images, theirs) < 2e-3  # measured 1.2e-6 (0.5) / 3.8e-4 (1.0)


def test_inpaint_matches_combined_pipeline(ours, reference):
    """2.2 puts the known region back after every step (the image latents noised to the next timestep)."""
    mask = np.zeros((SIZE, SIZE), dtype=np.float32)
    mask[:24, 16:48] = 1  # white = repaint
    args = dict(height=SIZE, width=SIZE, **STEPS)
    image = random_image(16)
    theirs = reference["inpaint"]("the cat", image, mask, generator=seed(17), output_type="np", **args).images
    images = ours.inpaint("the cat", image, mask, generator=seed(17), output_type="np", **args)
    assert max_abs(images, theirs) < 2e-3  # measured 1.6e-6


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_controlnet_matches_diffusers(ours, reference, guidance_scale):
    generator, hint = seed(18), hint_tensor()
    embeds, negative = reference["prior"]("the cat", num_inference_steps=2, generator=generator, return_dict=False)
    theirs = reference["controlnet"](embeds, negative, hint, height=SIZE, width=SIZE, num_inference_steps=3,
                                     guidance_scale=guidance_scale, generator=generator, output_type="np").images
    images = ours.controlnet("the cat", hint, height=SIZE, width=SIZE, guidance_scale=guidance_scale,
                             generator=seed(18), output_type="np", **STEPS)
    assert max_abs(images, theirs) < 2e-3  # measured 2.3e-5 (guided) / 1.6e-5


def test_controlnet_two_steps_with_given_embeddings(ours, reference):
    embeds, negative = torch.randn(1, WIDTH, generator=seed(19)), torch.randn(1, WIDTH, generator=seed(20))
    hint = hint_tensor(21)
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="np")
    theirs = reference["controlnet"](embeds, negative, hint, generator=seed(22), **args).images
    images = ours.controlnet("a robot", hint, image_embeds=embeds, negative_image_embeds=negative,
                             generator=seed(22), **args)
    assert max_abs(images, theirs) < 2e-4  # measured 1.1e-6


def test_controlnet_img2img_matches_diffusers(ours, reference):
    generator, hint, image = seed(23), hint_tensor(24), random_image(25)
    embeds, negative = reference["prior"]("the cat", num_inference_steps=2, generator=generator, return_dict=False)
    theirs = reference["controlnet_img2img"](embeds, image, negative, hint, height=SIZE, width=SIZE, strength=0.5,
                                             num_inference_steps=4, generator=generator, output_type="np").images
    images = ours.controlnet_img2img("the cat", image, hint, strength=0.5, height=SIZE, width=SIZE,
                                     num_inference_steps=4, prior_num_inference_steps=2, generator=seed(23),
                                     output_type="np")
    assert max_abs(images, theirs) < 2e-3  # measured 9.2e-7


# ------------------------------------------------------------------------------------------------ the tiny 2.2 pipeline


@pytest.fixture(scope="module")
def tiny_22() -> Kandinsky22:
    return Kandinsky22.from_config("tiny", seed=0, progress=False)


def test_tiny_runs_every_task(tiny_22):
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, prior_num_inference_steps=2)
    image, mask = random_image(40), np.zeros((SIZE, SIZE), dtype=np.float32)
    mask[:32] = 1
    outputs = {
        "text2img": tiny_22.text2img("a cat", generator=seed(41), **args),
        "img2img": tiny_22.img2img("a cat", image, strength=0.6, generator=seed(42), **args),
        "inpaint": tiny_22.inpaint("a cat", image, mask, generator=seed(43), **args),
        "mix": tiny_22.mix(["a cat", image], [0.5, 0.5], generator=seed(44), **args),
        "controlnet": tiny_22.controlnet("a cat", image, generator=seed(45), **args),
        "controlnet_img2img": tiny_22.controlnet_img2img("a cat", image, image, generator=seed(46), **args),
    }
    for task, (output,) in outputs.items():
        assert output.size == (SIZE, SIZE), task
        settings = json.loads(output.info["settings"])
        assert settings["task"] == task and settings["weights"] == {"source": "tiny:0", "model": "2.2"}, task
    embeds, negative = tiny_22.prior("a cat", num_inference_steps=2, generator=seed(47))
    assert embeds.shape == negative.shape == (1, tiny.WIDTH_22)
    assert "mclip" not in tiny_22.components.names()


def test_tiny_store_and_configs(tiny_22):
    for name in ("unet", "unet_inpaint", "unet_controlnet"):
        assert tiny_22.module(name).config == tiny.CONFIGS_22[name]
    assert tiny_22.module("prior").config == tiny.PRIOR_22
    assert Kandinsky21.from_config("tiny").components.names() == [  # 2.1's tiny store is as it was
        "clip_text", "clip_vision", "prior", "mclip", "unet", "unet_inpaint", "movq", "clip_tokenizer",
        "mclip_tokenizer"]


def test_decoder_reads_the_image_embedding_only(tiny_22):
    """No text reaches the 2.2 UNet: the prompt conditions the prior only (the same embeddings with another prompt
    give the same image), and the guided batch is [negative, positive] image embeddings."""
    embeds = torch.randn(1, tiny.WIDTH_22, generator=seed(50))
    negative = torch.randn(1, tiny.WIDTH_22, generator=seed(51))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="pt")
    unet, calls = tiny_22.module("unet"), []
    handle = unet.register_forward_hook(lambda m, a, kw, out: calls.append(kw), with_kwargs=True)
    try:
        first = tiny_22.decode("a cat", embeds, negative, generator=seed(52), **args)
    finally:
        handle.remove()
    second = tiny_22.decode("a dog", embeds, negative, negative_prompt="dark", generator=seed(52), **args)
    assert torch.equal(first, second)
    assert set(calls[0]) == {"image_embeds", "hint"} and calls[0]["hint"] is None
    assert torch.equal(calls[0]["image_embeds"], torch.cat([negative, embeds]))


def test_inpaint_keeps_the_known_latents_exactly(tiny_22):
    """After the last step the kept region (dilated by one latent pixel) is the image's latents, whatever the
    sampler (euler_a's steps are in sigma space)."""
    image, mask = random_image(53), np.zeros((SIZE, SIZE), dtype=np.float32)
    mask[:, :32] = 1  # repaint the left half: latent columns 0..3, dilated to 0..4
    from kandinsky.images import images_to_tensor

    pixels, _ = images_to_tensor(image, SIZE, SIZE)
    latents = tiny_22.module("movq").encode(pixels)
    for sampler in ("ddim", "ddpm", "euler_a", "dpmpp_2m"):
        steps = []
        tiny_22.inpaint("a cat", image, mask, height=SIZE, width=SIZE, num_inference_steps=3,
                        prior_num_inference_steps=2, generator=seed(54), sampler=sampler, output_type="pt",
                        sampler_options={"callback": lambda i, t, x, x0: steps.append(x.clone())})
        final = steps[-1]
        assert torch.allclose(final[..., 5:], latents[..., 5:], atol=1e-6), sampler
        assert not torch.allclose(final[..., :5], latents[..., :5], atol=1e-2), sampler


def test_controlnet_hint_is_resized_and_broadcast(tiny_22):
    embeds = torch.randn(2, tiny.WIDTH_22, generator=seed(55))
    args = dict(image_embeds=embeds, negative_image_embeds=-embeds, height=SIZE, width=SIZE, num_inference_steps=2,
                output_type="pt")
    hint = hint_tensor(56)
    one = tiny_22.controlnet(["a", "b"], hint, generator=seed(57), **args)
    each = tiny_22.controlnet(["a", "b"], torch.cat([hint, hint]), generator=seed(57), **args)
    assert torch.equal(one, each)
    other = tiny_22.controlnet(["a", "b"], hint_tensor(58), generator=seed(57), **args)
    assert not torch.allclose(one, other)  # the hint matters
    bigger = torch.nn.functional.interpolate(hint, size=(2 * SIZE, 2 * SIZE), mode="nearest")
    assert tiny_22.controlnet(["a", "b"], bigger, generator=seed(57), **args).shape == one.shape
    with pytest.raises(ValueError, match=r"hint: expected 1 or 2 \(one per prompt\), got 3"):
        tiny_22.controlnet(["a", "b"], torch.cat([hint] * 3), **args)
    with pytest.raises(ValueError, match=r"image: expected values in \[0, 1\]"):
        tiny_22.controlnet("a", hint * 2 - 1, **{**args, "image_embeds": embeds[:1],
                                                 "negative_image_embeds": embeds[:1]})


def test_missing_unets_and_the_original_layout_are_one_line_errors(tmp_path):
    parts = tiny.components_22(1)
    parts.pop("unet_controlnet")
    pipe = Kandinsky22(**parts, progress=False)
    embeds = torch.randn(1, tiny.WIDTH_22)
    with pytest.raises(ValueError, match="these components have no 'unet_controlnet'"):
        pipe.controlnet("a", hint_tensor(), image_embeds=embeds, negative_image_embeds=embeds, height=SIZE,
                        width=SIZE, num_inference_steps=1)
    with pytest.raises(ValueError, match="Kandinsky 2.2 has no original layout .* use layout='diffusers'") as error:
        Kandinsky22(**tiny.components_22(1)).save_pretrained(tmp_path / "never-written", layout="original")
    assert "\n" not in str(error.value) and not (tmp_path / "never-written").exists()
    with pytest.raises(ValueError, match="model: Kandinsky22 loads Kandinsky 2.2 weights"):
        Kandinsky22.from_pretrained(tmp_path, model="2.1")


def test_saved_store_loads_back(tmp_path):
    """A full 2.2 store (the three UNets, and the decoder's scheduler config when it has one) saved in our layout loads
    back with from_pretrained, bit for bit, and samples as the scheduler config says (without one: our default)."""
    from kandinsky.components import Components
    from test_convert_scheduler import OFFICIAL_22_DECODER

    pipe = Kandinsky22.from_config("tiny", seed=2, progress=False)
    pipe.save_pretrained(tmp_path / "k22")
    again = Kandinsky22.from_pretrained(tmp_path / "k22", progress=False)
    assert again.components.names() == pipe.components.names()
    for name in ("clip_text", "clip_vision", "prior", "unet", "unet_inpaint", "unet_controlnet", "movq"):
        ours, theirs = pipe.module(name).state_dict(), again.module(name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, prior_num_inference_steps=2, output_type="pt")
    # the same weights, not always the same bits: MKL's float32 GEMMs on AVX2 CPUs round by the operands' alignment,
    # 64 bytes in memory, that of the tensor's offset in the file once mapped (measured 2.4e-7 at the CLIP text
    # projection, 0 on AVX-512 CPUs)
    torch.testing.assert_close(pipe.text2img("a cat", generator=seed(60), **args),
                               again.text2img("a cat", generator=seed(60), **args), rtol=0, atol=1e-5)
    assert again.decoder_sampling.sampler == "ddim" and again.components.scheduler_config() is None
    assert Kandinsky22.from_pretrained("tiny:3").components.source == {"source": "tiny:3", "model": "2.2"}
    scheduler = {"_class_name": "DDPMScheduler", **OFFICIAL_22_DECODER}
    Kandinsky22(Components(**tiny.components_22(2), scheduler=scheduler)).save_pretrained(tmp_path / "ddpm")
    ddpm = Kandinsky22.from_pretrained(tmp_path / "ddpm", progress=False)
    assert ddpm.components.scheduler_config() == scheduler
    assert (ddpm.decoder_sampling.sampler, ddpm.decoder_sampling.options["variance"]) == ("ddpm", "fixed_small")


def test_public_name():
    import kandinsky

    assert kandinsky.Kandinsky22 is Kandinsky22 and "Kandinsky22" in kandinsky.__all__

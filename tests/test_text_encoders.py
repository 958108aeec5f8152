"""Text and image encoder wrappers against diffusers / transformers, with tiny hub-free components."""

import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky.text_encoders import (
    MultilingualCLIP,
    encode_clip_images,
    encode_clip_text,
    encode_multilingual,
    preprocess_clip_images,
    tokenize,
    zero_image_embeds,
)
from tiny_components import (
    tiny_clip_text_model,
    tiny_clip_tokenizer,
    tiny_clip_vision_model,
    tiny_diffusers_mclip,
    tiny_mclip,
    tiny_xlmr_tokenizer,
)

# kandinsky-community/kandinsky-2-1-prior image_processor/preprocessor_config.json (diffusers' pipeline input)
PREPROCESSOR_CONFIG = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": 224,
}


def _mclip_inputs():
    tokenizer = tiny_xlmr_tokenizer()
    return tokenize(tokenizer, ["the cat", "a cat sat on the mat, the end!"])


def test_mclip_matches_diffusers():
    ours, theirs = tiny_mclip(seed=3), tiny_diffusers_mclip(seed=3)
    input_ids, attention_mask = _mclip_inputs()
    assert attention_mask.sum(1).tolist()[0] < attention_mask.sum(1).tolist()[1]  # padding really present
    with torch.no_grad():
        embeds, hidden = ours(input_ids, attention_mask)
        ref_embeds, ref_hidden = theirs(input_ids=input_ids, attention_mask=attention_mask)
    assert embeds.shape == (2, 24) and hidden.shape == (2, 77, 32)
    # float32; ours runs transformers' SDPA attention, diffusers' M-CLIP the eager one: rounding only -> 1e-5
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=0)


def test_mclip_from_diffusers_module_shares_the_weights():
    theirs = tiny_diffusers_mclip(seed=1)
    input_ids, attention_mask = _mclip_inputs()
    with torch.no_grad():
        reference = theirs(input_ids=input_ids, attention_mask=attention_mask)[0]
        ours = MultilingualCLIP.from_diffusers_module(theirs)
        copied = ours(input_ids, attention_mask)[0]
    torch.testing.assert_close(copied, reference, atol=1e-6, rtol=0)  # measured 0: the same weights and operations
    # the weights are shared with diffusers' module, not copied (2.1 GiB at the full size)
    theirs_ptrs = {t.data_ptr() for t in theirs.parameters()}
    assert all(p.data_ptr() in theirs_ptrs for p in ours.parameters())


def test_mclip_config_round_trip_and_state_dict_check():
    model = tiny_mclip(seed=2)
    config = model.to_config()
    assert config["transformerDimensions"] == 32 and config["numDims"] == 24
    again = MultilingualCLIP.from_state_dict(config, model.state_dict())
    assert again.config.to_dict() == model.config.to_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    # the original folder's checkpoint may carry the position_ids buffer: accepted
    MultilingualCLIP.from_state_dict(config, {**model.state_dict(),
                                              "transformer.embeddings.position_ids": torch.arange(80)[None]})
    incomplete = {k: v for k, v in model.state_dict().items() if not k.startswith("LinearTransformation")}
    with pytest.raises(ValueError, match="LinearTransformation"):
        MultilingualCLIP.from_state_dict(config, incomplete)


def test_encode_multilingual_pads_to_77_and_pools_real_tokens():
    model, tokenizer = tiny_mclip(seed=0), tiny_xlmr_tokenizer()
    embeds, hidden, mask = encode_multilingual(tokenizer, model, ["the cat", "the cat"])
    assert embeds.shape == (2, 24) and hidden.shape == (2, 77, 32) and mask.shape == (2, 77)
    assert mask[0].sum() == 4  # <s> ▁the ▁cat </s>
    single, _, _ = encode_multilingual(tokenizer, model, "the cat")
    torch.testing.assert_close(single[0], embeds[0], atol=1e-6, rtol=0)


def test_clip_text_encoding_matches_diffusers_convention():
    tokenizer, model = tiny_clip_tokenizer(), tiny_clip_text_model(seed=2)
    embeds, hidden, mask = encode_clip_text(tokenizer, model, ["the cat", "a"])
    assert embeds.shape == (2, 24) and hidden.shape == (2, 77, 32)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [4, 3]
    # diffusers' prior pipeline: tokenizer padding max_length 77, tower called without a mask
    ids = tokenizer(["the cat", "a"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(ids.input_ids)
    torch.testing.assert_close(embeds, reference.text_embeds, atol=0, rtol=0)
    torch.testing.assert_close(hidden, reference.last_hidden_state, atol=0, rtol=0)


def test_long_prompt_is_truncated_with_warning():
    tokenizer, model = tiny_clip_tokenizer(), tiny_clip_text_model(seed=2)
    long_prompt = " ".join(["cat"] * 100)
    with pytest.warns(UserWarning, match="truncated"):
        embeds, hidden, mask = encode_clip_text(tokenizer, model, [long_prompt])
    assert mask.all() and hidden.shape == (1, 77, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_clip_text(tokenizer, model, ["the cat"])  # short prompt: no warning


@pytest.mark.parametrize("bad", [[], [1, 2], ["ok", None]])
def test_bad_prompts(bad):
    with pytest.raises(ValueError, match="prompts"):
        encode_clip_text(tiny_clip_tokenizer(), tiny_clip_text_model(), bad)


def test_mclip_bad_inputs():
    model = tiny_mclip()
    ids = torch.ones(2, 77, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.ones(2, 76, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float(), torch.ones(2, 77, dtype=torch.long))


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(300, 401), (257, 199), (224, 224)]] \
        + [Image.fromarray(rng.integers(0, 256, (120, 90), dtype=np.uint8), mode="L"),
           Image.fromarray(rng.integers(0, 256, (230, 260, 4), dtype=np.uint8), mode="RGBA")]


def test_preprocessing_matches_clip_image_processor():
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(**PREPROCESSOR_CONFIG)
    for image in _images():
        ours = preprocess_clip_images(image)
        reference = processor(image, return_tensors="pt").pixel_values
        assert ours.shape == reference.shape == (1, 3, 224, 224)
        # float32 vs float64 intermediate arithmetic on identical uint8 pixels: ~1 ulp of |x| <= 2.2
        torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=0)
    batch = preprocess_clip_images(_images()[:2])
    assert batch.shape == (2, 3, 224, 224)


def test_tensor_images_close_to_pil_path():
    image = _images()[0]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    from_tensor, from_pil = preprocess_clip_images(pixels), preprocess_clip_images(image)
    assert from_tensor.shape == (1, 3, 224, 224)
    # different resampling kernels' implementations (torch antialiased bicubic vs PIL) on noise: small mean gap
    assert (from_tensor - from_pil).abs().mean() < 0.05
    exact = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(preprocess_clip_images(exact), (exact - mean[:, None, None]) / std[:, None, None])


@pytest.mark.parametrize("bad", ["image.png", [], torch.rand(2, 4, 32, 32), torch.rand(1, 3, 32, 32) * 3])
def test_bad_images(bad):
    with pytest.raises(ValueError, match="images"):
        preprocess_clip_images(bad)


def test_unconvertible_image_gives_clear_error():
    image = Image.new("RGB", (8, 8))
    # every real PIL mode converts to RGB; a failing conversion (e.g. a plugin's custom mode) is simulated
    with mock.patch.object(image, "convert", side_effect=ValueError("conversion not supported")):
        with pytest.raises(ValueError, match="images: cannot convert a PIL image of mode 'RGB' to RGB"):
            preprocess_clip_images(image)


def test_image_embeds_and_zero_embeds():
    model = tiny_clip_vision_model(seed=4)
    embeds = encode_clip_images(model, _images()[:2])
    with torch.no_grad():
        reference = model(preprocess_clip_images(_images()[:2])).image_embeds
    assert embeds.shape == (2, 24)
    torch.testing.assert_close(embeds, reference, atol=0, rtol=0)
    zeros = zero_image_embeds(model, batch=3)
    with torch.no_grad():
        reference = model(torch.zeros(1, 3, 224, 224)).image_embeds
    assert zeros.shape == (3, 24)
    torch.testing.assert_close(zeros, reference.expand(3, -1), atol=0, rtol=0)
    assert zero_image_embeds(model, 1, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="batch"):
        zero_image_embeds(model, 0)

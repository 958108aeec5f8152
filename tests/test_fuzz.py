"""Hypothesis over the public arguments of every task, on the tiny random pipeline (``Kandinsky21.from_config``):
each call returns finite images of the expected number and size, or raises a one-line ``ValueError`` that starts
with the name of one of the call's arguments. Never another exception, never NaN (a NaN image would be a
``NonFiniteError``, whose message names no argument).

Bounded for the default tier: derandomized (the same examples every run), 40 examples per task, and
step counts, sizes and batch sizes drawn from small sets (valid ones cheap, invalid ones of every kind).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky.pipeline import Kandinsky21, rounded_size

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EMBED_DIM = 32  # the tiny pipeline's CLIP image embedding width
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def pipe():
    return Kandinsky21.from_config("tiny", seed=0, progress=False)


# ------------------------------------------------------------------------------------------------ strategies
# Each argument has a strategy of valid values and one of values to refuse. An example breaks at most one
# argument (about half of them none), so that most calls get past validation and generate.

NAN, INF = float("nan"), float("inf")
SEED = st.integers(0, 2**31 - 1)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


STEPS = (st.sampled_from([1, 2]), st.sampled_from([0, -1, 1001, 10**12, 2.0, True, "2", None]))
GUIDANCE = (st.one_of(st.sampled_from([1.0, 4.0, 0.0, 100.0]), st.floats(0, 100)),
            st.one_of(st.sampled_from([-1.0, 100.5, 1e38, NAN, INF, -INF, True, "4", None]),
                      st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 <= v <= 100)))
SIDES = (st.sampled_from([64, 65, 128]), st.sampled_from([0, -64, 4097, 10**9, 64.0, True, "64", None]))
PER_PROMPT = (st.sampled_from([1, 2]), st.sampled_from([0, -1, 1.0, True, None]))
SAMPLER = (st.sampled_from(["ddim", "ddpm", "p_sampler", "plms", "dpmpp_2m", "euler_a"]),
           st.sampled_from(["unclip", "nope", None, 3]))
PRIOR_SAMPLER = (st.sampled_from(["unclip", "unclip_original"]), st.sampled_from(["ddim", None]))
OUTPUT_TYPE = (st.sampled_from(["pil", "np", "pt"]), st.sampled_from(["latent", None]))
CROP = (st.booleans(), st.booleans())
SAMPLER_OPTIONS = (st.sampled_from([None, {}]), st.sampled_from([{"eta": 0.5}, {"bogus": 1}, 5]))  # eta: ddim's only
GENERATOR = (st.one_of(st.none(), st.builds(seeded, SEED), st.lists(st.builds(seeded, SEED), min_size=1, max_size=1)),
             st.one_of(st.sampled_from([3, "seed", []]), st.lists(st.builds(seeded, SEED), min_size=3, max_size=3)))
PROMPT = (st.one_of(st.text(max_size=30), st.lists(st.text(max_size=12), min_size=1, max_size=3)),
          st.sampled_from([None, 3, b"a cat", ["a", 3], []]))
NEGATIVE = (st.one_of(st.none(), st.text(max_size=12)), st.sampled_from([5, ["a", "b", "c", "d"], [3]]))
STRENGTH = (st.floats(0.01, 1), st.sampled_from([0.0, 1.5, -0.5, NAN, "0.3", None]))
MASK_CONVENTION = (st.sampled_from(["repaint", "legacy"]), st.sampled_from(["black", None]))
BAD_VALUE = st.sampled_from([NAN, INF, -INF, -0.5, 1.5, 1e30])


def arguments(data, spec: dict[str, tuple]) -> dict:
    """One value per argument of ``spec`` (name -> (valid, invalid) strategies), breaking at most one."""
    broken = data.draw(st.one_of(st.none(), st.sampled_from(sorted(spec))), label="broken")
    return {name: data.draw(strategies[name == broken], label=name) for name, strategies in spec.items()}


def common() -> dict:
    """Arguments every task takes (always given: the defaults would run 100 steps at 512 px)."""
    return dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIDES, width=SIDES,
                num_images_per_prompt=PER_PROMPT, generator=GENERATOR, sampler=SAMPLER, output_type=OUTPUT_TYPE,
                crop=CROP, sampler_options=SAMPLER_OPTIONS)


def with_prior() -> dict:
    return dict(common(), prior_num_inference_steps=STEPS, prior_guidance_scale=GUIDANCE, prior_sampler=PRIOR_SAMPLER)


@st.composite
def valid_images(draw, size: tuple[int, int]):
    """An image as a PIL image of a convertible mode, a uint8 or [0, 1] float array, or a [0, 1] tensor."""
    height, width = size
    rng = np.random.default_rng(draw(SEED))
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    kind = draw(st.sampled_from(["pil", "uint8", "float", "tensor", "tensor3"]))
    if kind == "pil":
        return Image.fromarray(pixels).convert(draw(st.sampled_from(["RGB", "RGBA", "L", "P", "1"])))
    if kind == "uint8":
        return pixels
    floats = pixels.astype(np.float32) / 255
    tensor = torch.from_numpy(floats).permute(2, 0, 1)
    return {"float": floats, "tensor": tensor[None], "tensor3": tensor}[kind]


@st.composite
def invalid_images(draw, size: tuple[int, int]):
    """An image with a NaN, inf or out-of-range value, of a mode PIL cannot make RGB, of an integer dtype, or no
    image at all."""
    height, width = size
    kind = draw(st.sampled_from(["value", "value_tensor", "mode", "int_tensor", "int_array", "other"]))
    floats = np.random.default_rng(draw(SEED)).random((height, width, 3), dtype=np.float32)
    if kind.startswith("value"):
        floats[draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1)), 1] = draw(BAD_VALUE)
        return floats if kind == "value" else torch.from_numpy(floats).permute(2, 0, 1)[None]
    if kind == "mode":
        return Image.new(draw(st.sampled_from(["I;16", "F", "I"])), (width, height))
    if kind == "int_tensor":
        return torch.from_numpy(floats).permute(2, 0, 1)[None].mul(255).to(torch.int64)
    if kind == "int_array":
        return (floats * 255).astype(np.int64)
    return draw(st.sampled_from(["cat.png", None, 3, [], [None]]))


@st.composite
def valid_masks(draw, size: tuple[int, int]):
    """A mask of ``size``: integer {0, 1} or {0, 255}, bool, [0, 1] float array or tensor, or a PIL image."""
    binary = np.random.default_rng(draw(SEED)).integers(0, 2, size)
    kind = draw(st.sampled_from(["uint8", "uint8_255", "bool", "float", "tensor", "pil"]))
    return {"uint8": lambda: binary.astype(np.uint8), "uint8_255": lambda: (binary * 255).astype(np.uint8),
            "bool": lambda: binary.astype(bool), "float": lambda: binary.astype(np.float32) * 0.9,
            "tensor": lambda: torch.from_numpy(binary.astype(np.float32)),
            "pil": lambda: Image.fromarray((binary * 255).astype(np.uint8))}[kind]()


@st.composite
def invalid_masks(draw, size: tuple[int, int]):
    height, width = size
    kind = draw(st.sampled_from(["size", "value", "negative", "other"]))
    values = np.random.default_rng(draw(SEED)).random(size, dtype=np.float32)
    if kind == "size":
        return values[:, :-1] if width > 1 else np.zeros((height + 1, width), np.float32)
    if kind == "value":
        values[draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))] = draw(BAD_VALUE)
        return values
    if kind == "negative":
        return -np.ones(size, np.int64)
    return draw(st.sampled_from([None, "mask.png", [], 0.5]))


def image_sizes():
    return st.sampled_from([(64, 64), (30, 50), (1, 1), (64, 80)])


@st.composite
def embeds(draw, rows: int, valid: bool):
    values = torch.randn(rows, EMBED_DIM, generator=seeded(draw(SEED)))
    if valid:
        return values
    kind = draw(st.sampled_from(["value", "width", "rows", "int", "numpy", "none"]))
    if kind == "value":
        values[0, 0] = draw(st.sampled_from([NAN, INF, -INF, 1e30]))
        return values
    return {"width": values[:, :24], "rows": torch.cat([values, values, values]), "int": values.long(),
            "numpy": values.numpy(), "none": None}[kind]


# ------------------------------------------------------------------------------------------------ the contract


def check(method, rows, **kwargs) -> None:
    """Call ``method(**kwargs)``: either a ValueError naming one of its arguments, or ``rows(kwargs)`` finite images
    of the requested size (rounded up to 64 px multiples, or cropped to it)."""
    names = set(inspect.signature(method).parameters)
    try:
        output = method(**kwargs)
    except ValueError as error:
        message = str(error)
        assert message.split(":", 1)[0] in names and "\n" not in message, message
        return
    height, width = rounded_size(kwargs["height"], kwargs["width"], 8)
    if kwargs["crop"]:
        height, width = kwargs["height"], kwargs["width"]
    count = rows(kwargs)
    if kwargs["output_type"] == "pil":
        assert len(output) == count and all(image.size == (width, height) and image.mode == "RGB" for image in output)
        return
    output = torch.as_tensor(output)
    expected = (count, 3, height, width) if kwargs["output_type"] == "pt" else (count, height, width, 3)
    assert tuple(output.shape) == expected and output.dtype == torch.float32
    assert bool(torch.isfinite(output).all()) and 0 <= float(output.min()) and float(output.max()) <= 1


def per_prompt_rows(kwargs) -> int:
    prompt = kwargs["prompt"]
    return (1 if isinstance(prompt, str) else len(prompt)) * kwargs["num_images_per_prompt"]


@FUZZ
@given(data=st.data())
def test_text2img(pipe, data):
    check(pipe.text2img, per_prompt_rows, **arguments(data, dict(with_prior(), prompt=PROMPT, negative_prompt=NEGATIVE)))


def image_arguments(data, spec: dict, rows: int = 1) -> dict:
    """``arguments`` plus ``image`` (and ``mask_image`` when ``spec`` names it), sized together."""
    size = data.draw(image_sizes())
    spec = dict(spec, image=(valid_images(size), invalid_images(size)))
    if "mask_image" in spec:
        spec["mask_image"] = (valid_masks(size), invalid_masks(size))
    if "image_embeds" in spec:
        spec["image_embeds"] = (embeds(rows, True), embeds(rows, False))
        spec["negative_image_embeds"] = (embeds(rows, True), embeds(rows, False))
    return arguments(data, spec)


@FUZZ
@given(data=st.data())
def test_img2img(pipe, data):
    spec = dict(with_prior(), prompt=PROMPT, negative_prompt=NEGATIVE, strength=STRENGTH)
    if data.draw(st.booleans(), label="embeds"):  # the prior skipped: one row of embeddings for every prompt
        spec["image_embeds"] = None
    check(pipe.img2img, per_prompt_rows, **image_arguments(data, spec))


@FUZZ
@given(data=st.data())
def test_inpaint(pipe, data):
    spec = dict(with_prior(), prompt=PROMPT, negative_prompt=NEGATIVE, mask_image=None, mask_convention=MASK_CONVENTION)
    check(pipe.inpaint, per_prompt_rows, **image_arguments(data, spec))


@FUZZ
@given(data=st.data())
def test_mix(pipe, data):
    item = st.one_of(st.text(max_size=12), valid_images((48, 40)))
    count = data.draw(st.integers(1, 3), label="items")
    weight = st.floats(-2, 2).filter(lambda w: abs(w) > 1e-3)
    spec = dict(with_prior(),
                images_and_prompts=(st.lists(item, min_size=count, max_size=count),
                                    st.one_of(st.sampled_from([[], "a cat", None, [None]]),
                                              st.lists(invalid_images((48, 40)), min_size=1, max_size=1))),
                weights=(st.lists(weight, min_size=count, max_size=count),
                         st.one_of(st.lists(st.sampled_from([NAN, INF, -INF, 1e308, -101.0, "0.5"]), min_size=count,
                                            max_size=count),
                                   st.lists(weight, min_size=count + 1, max_size=count + 1), st.just([0.0] * count))),
                negative_prompt=(st.one_of(st.just(""), st.text(max_size=8)), st.sampled_from([None, 4])),
                negative_prior_prompt=(st.one_of(st.none(), st.text(max_size=8)), st.sampled_from([4, ["a"]])))
    check(pipe.mix, lambda kwargs: kwargs["num_images_per_prompt"], **arguments(data, spec))


@FUZZ
@given(data=st.data())
def test_decode(pipe, data):
    rows = data.draw(st.integers(1, 3), label="rows")
    prompts = st.lists(st.text(max_size=12), min_size=rows, max_size=rows) if rows > 1 else st.text(max_size=30)
    spec = dict(common(), prompt=(prompts, PROMPT[1]), negative_prompt=NEGATIVE,
                image_embeds=(embeds(rows, True), embeds(rows, False)),
                negative_image_embeds=(embeds(rows, True), embeds(rows, False)))
    check(pipe.decode, per_prompt_rows, **arguments(data, spec))


def test_the_contract_catches_nan_images(pipe, monkeypatch):
    """A guard for the test itself: a pipeline that produced NaN latents would fail it (as NonFiniteError)."""
    monkeypatch.setattr(pipe, "_finite", lambda stage, values: values)  # without the check: a NaN image
    embeds_ = torch.full((1, EMBED_DIM), 1.0)
    unet = pipe.module("unet")
    with torch.no_grad():
        saved = unet.conv_out.bias.clone()
        unet.conv_out.bias.fill_(math.nan)
    try:
        with pytest.raises(AssertionError):
            check(pipe.decode, per_prompt_rows, prompt="a", image_embeds=embeds_, negative_image_embeds=embeds_,
                  num_inference_steps=1, guidance_scale=1.0, height=64, width=64, num_images_per_prompt=1,
                  generator=None, sampler="ddim", output_type="pt", crop=False, sampler_options=None)
        monkeypatch.undo()
        with pytest.raises(AssertionError):  # NonFiniteError: a ValueError that names no argument
            check(pipe.decode, per_prompt_rows, prompt="a", image_embeds=embeds_, negative_image_embeds=embeds_,
                  num_inference_steps=1, guidance_scale=1.0, height=64, width=64, num_images_per_prompt=1,
                  generator=None, sampler="ddim", output_type="pt", crop=False, sampler_options=None)
    finally:
        with torch.no_grad():
            unet.conv_out.bias.copy_(saved)

"""The tiny random pipeline (``Kandinsky21.from_config("tiny")``), the package root's public names and the PNG
metadata of the pipeline's images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import kandinsky
from kandinsky import tiny
from kandinsky.models import config_to_dict
from kandinsky.pipeline import Kandinsky21
from kandinsky.png import PNG_TEXT_KEYS, png_text

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64  # px: the tiny MoVQ downsamples by 8, the UNet then twice
FAST = dict(height=SIZE, width=SIZE, num_inference_steps=2, prior_num_inference_steps=2)


@pytest.fixture(scope="module")
def pipe():
    return Kandinsky21.from_config("tiny", seed=0, progress=False)


def seed(value: int) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def test_the_package_root_names_the_pipeline_without_importing_torch():
    assert kandinsky.Kandinsky21 is Kandinsky21
    from kandinsky import NonFiniteError, save_png  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kandinsky.nope  # noqa: B018
    code = "import sys, kandinsky; assert 'torch' not in sys.modules, 'torch imported'; print(kandinsky.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == kandinsky.__version__, done.stderr


@pytest.mark.parametrize("name", ["prior", "unet", "movq"])
def test_the_tiny_configs_are_the_json_files(name):
    assert json.loads((ROOT / "configs" / f"{name}_tiny.json").read_text()) == config_to_dict(tiny.CONFIGS[name])


def test_the_tiny_components_fit_together(pipe):
    """The widths every real component shares, tied the same way (they used to disagree: prior clip_dim 32
    against the towers' 24, UNet text width 40 against M-CLIP's 32)."""
    prior, unet, inpaint, movq = (pipe.module(name).config for name in ("prior", "unet", "unet_inpaint", "movq"))
    clip_text, clip_vision, mclip = (pipe.module(name) for name in ("clip_text", "clip_vision", "mclip"))
    assert clip_text.config.projection_dim == clip_vision.config.projection_dim == prior.clip_dim == unet.image_embed_dim
    assert clip_text.config.hidden_size == prior.text_width
    assert mclip.config.hidden_size == unet.text_hidden_dim and mclip.LinearTransformation.out_features == unet.text_embed_dim
    assert unet.in_channels == movq.embed_dim and inpaint.in_channels == 2 * movq.embed_dim + 1
    assert len(pipe.tokenizer("clip_tokenizer")) == clip_text.config.vocab_size
    assert len(pipe.tokenizer("mclip_tokenizer")) == mclip.config.vocab_size


def test_from_config_is_seeded():
    first, again, other = (Kandinsky21.from_config("tiny", seed=s).module("unet").state_dict() for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv_in.weight"], other["conv_in.weight"])
    with pytest.raises(ValueError, match="^name: expected 'tiny'"):
        Kandinsky21.from_config("official")


def test_the_tiny_pipeline_needs_no_diffusers(tmp_path):
    """In a fresh interpreter where importing diffusers fails: build the tiny pipeline, generate, save."""
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import torch; from kandinsky import Kandinsky21, save_png\n"
        "pipe = Kandinsky21.from_config('tiny', seed=0, progress=False)\n"
        "image = pipe.text2img('a cat', height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2,\n"
        "                      generator=torch.Generator().manual_seed(0))[0]\n"
        f"save_png(image, {str(tmp_path / 'cat.png')!r}); print(image.size)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "(64, 64)", done.stderr[-2000:]
    with Image.open(tmp_path / "cat.png") as image:
        assert image.text["prompt"] == "a cat" and image.text["seed"] == "0"


def test_every_task_runs(pipe):
    image = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    mask = torch.zeros(SIZE, SIZE)
    mask[:32] = 1
    for images in (pipe.text2img("a cat", output_type="pt", **FAST),
                   pipe.img2img("a cat", image, strength=0.5, output_type="pt", **FAST),
                   pipe.inpaint("a cat", image, mask, output_type="pt", **FAST),
                   pipe.mix(["a cat", image], [0.5, 0.5], output_type="pt", **FAST)):
        assert images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(images).all()
        assert images.std() > 0.01  # the scaled random weights do not saturate every pixel


# ------------------------------------------------------------------------------------------------ PNG metadata


def test_pil_images_carry_what_the_cli_writes_and_save_png_writes_it(pipe, tmp_path):
    images = pipe.text2img(["a cat", "the sea"], negative_prompt="dark", num_images_per_prompt=2,
                           generator=seed(7), **FAST)
    info = images[3].info
    assert set(info) == set(PNG_TEXT_KEYS)  # the CLI's chunks (png_text), all of them here
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["image_index"]) == ("the sea", "dark", "7", "3")
    settings = json.loads(info["settings"])
    assert settings["task"] == "text2img" and settings["num_inference_steps"] == 2
    assert settings["prior_sampler"] == "unclip" and settings["num_images_per_prompt"] == 2
    assert settings["height"] == SIZE and settings["dtype"] == "float32"
    assert set(info) == set(png_text("p", 7, 3, {}, "dark"))

    path = tmp_path / "out.png"
    kandinsky.save_png(images[3], path)
    with Image.open(path) as saved:
        assert dict(saved.text) == {key: info[key] for key in PNG_TEXT_KEYS}
        assert list(saved.getdata()) == list(images[3].getdata())
    # the file's own metadata survives a copy through save_png
    with Image.open(path) as saved:
        kandinsky.save_png(saved, tmp_path / "copy.png")
    with Image.open(tmp_path / "copy.png") as copy:
        assert dict(copy.text) == {key: info[key] for key in PNG_TEXT_KEYS}


def test_the_seed_is_left_out_when_the_generator_had_drawn(pipe):
    generator = seed(8)
    torch.randn(1, generator=generator)
    (image,) = pipe.text2img("a cat", generator=generator, **FAST)
    assert "seed" not in image.info and image.info["prompt"] == "a cat"
    (image,) = pipe.text2img("a cat", **FAST)  # a fresh random seed is recorded: it reproduces the image
    again = pipe.text2img("a cat", generator=seed(int(image.info["seed"])), **FAST)[0]
    assert list(again.getdata()) == list(image.getdata())


def test_save_png_keeps_the_previous_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4), "red").save(path)
    before = path.read_bytes()

    def interrupted(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kandinsky.save_png(Image.new("RGB", (4, 4), "blue"), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.png"]

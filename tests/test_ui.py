"""The web UI's handlers (kandinsky.ui.handlers) on the tiny weights: the CLI's settings checks in the page's words,
seeds, adapters, the painted mask, Stop between steps, PNG metadata; the Gradio app's API in process; the CLI's
``ui`` command. The browser tests are tests/test_ui_browser.py (marker ``browser``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky.cli import main, task_settings as cli_task_settings
from kandinsky.pipeline import Kandinsky21
from kandinsky.png import read_png_metadata
from kandinsky.settings import Img2ImgSettings, Text2ImgSettings
from kandinsky.ui.handlers import (MAX_HISTORY, MAX_IMAGES, Stopped, Studio, add_to_history, available_tasks,
                                   defaults_for, describe, editor_inputs, format_adapters, mix_inputs, parse_adapters,
                                   parse_seed, size_note, task_settings)

SIZE = 64
FAST = dict(steps=2, prior_steps=2, width=SIZE, height=SIZE)


@pytest.fixture(scope="module")
def pipe():
    return Kandinsky21.from_pretrained("tiny", progress=False)


@pytest.fixture
def studio(pipe, tmp_path):
    studio = Studio(pipe, output_dir=tmp_path / "out")
    yield studio
    pipe.unload_lora()


def direct(method, *args, seed, **kwargs):
    """The pipeline called directly, with the settings of FAST."""
    settings = dict(num_inference_steps=2, prior_num_inference_steps=2, height=SIZE, width=SIZE)
    return method(*args, generator=torch.Generator().manual_seed(seed), **{**settings, **kwargs})


def pixels(image) -> np.ndarray:
    """The RGB pixels of a PIL image or an image file."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"))
    return np.asarray(image.convert("RGB"))


def random_picture(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---- settings, seeds, adapters, sizes: the page's words ----------------------------------------------------------


def test_settings_are_the_clis_with_the_pages_names():
    settings = task_settings("text2img", steps=20.0, guidance=5, prior_steps=3, prior_guidance=2.5, width=128,
                             height=192, sampler="plms", num_images=2)
    assert settings == Text2ImgSettings(num_inference_steps=20, guidance_scale=5.0, prior_num_inference_steps=3,
                                        prior_guidance_scale=2.5, width=128, height=192, sampler="plms",
                                        num_images_per_prompt=2)
    assert isinstance(settings.num_inference_steps, int)  # 20.0 from a number field is the integer 20
    assert task_settings("img2img", strength=0.5) == Img2ImgSettings(strength=0.5)


@pytest.mark.parametrize("control, value, label", [
    ("steps", 0, "Steps"), ("steps", 2.5, "Steps"), ("steps", 1000, "Steps"), ("guidance", 101, "Guidance"),
    ("prior_steps", -1, "Prior steps"), ("prior_guidance", float("nan"), "Prior guidance"), ("width", 5000, "Width"),
    ("height", 0, "Height"), ("sampler", "nope", "Sampler"), ("num_images", 0, "Images"),
    ("num_images", MAX_IMAGES + 1, "Images"), ("strength", 0, "Strength"), ("strength", 1.5, "Strength"),
])
def test_a_bad_value_names_its_control(control, value, label):
    with pytest.raises(ValueError, match=f"^{label}: expected"):
        task_settings("img2img", **{control: value})


def test_the_checks_are_the_clis():
    """The same bad value, the same words after the name: one validation (kandinsky.settings)."""
    class Args:
        command, steps, guidance, height, width, num_images = "generate", 0, 4.0, 64, 64, 1
        sampler, crop, prior_steps, prior_guidance = "ddim", False, 2, 4.0

    with pytest.raises(Exception) as from_cli:
        cli_task_settings(Args())
    with pytest.raises(ValueError) as from_page:
        task_settings("text2img", steps=0)
    assert str(from_cli.value).removeprefix("--steps: ") == str(from_page.value).removeprefix("Steps: ")


def test_unknown_controls_and_tasks_are_refused():
    with pytest.raises(ValueError, match="not controls of the page"):
        task_settings("text2img", num_inference_steps=3)
    with pytest.raises(ValueError, match="task: expected one of"):
        task_settings("controlnet")


def test_seeds():
    for random in (-1, -1.0, None):
        assert 0 <= parse_seed(random) < 2**31
    assert parse_seed(5) == 5 and parse_seed(5.0) == 5 and parse_seed(" 7 ") == 7 and parse_seed(2**64 - 1) == 2**64 - 1
    for bad in (-2, 2**64, 1.5, True, "seven", float("inf")):
        with pytest.raises(ValueError, match=r"^Seed: expected -1 \(random\)"):
            parse_seed(bad)


def test_adapters_field(tmp_path):
    assert parse_adapters("") == [] and parse_adapters(None) == []
    assert parse_adapters("a.safetensors:0.5\n\n  runs/cats  \nb:-1") == [("a.safetensors", 0.5), ("runs/cats", 1.0),
                                                                          ("b", -1.0)]
    odd = tmp_path / "with:colon"
    odd.mkdir()
    assert parse_adapters(str(odd)) == [(str(odd), 1.0)]  # an existing path is a path, colon included
    assert parse_adapters(format_adapters([("x.safetensors", 0.25), ("y", 2.0)])) == [("x.safetensors", 0.25),
                                                                                     ("y", 2.0)]
    with pytest.raises(ValueError, match="Adapters: line 2: expected PATH or PATH:SCALE"):
        parse_adapters("a\nb:big")
    with pytest.raises(ValueError, match="Adapters: line 1: expected a finite SCALE"):
        parse_adapters("a:nan")


def test_size_note():
    assert size_note(128, 192) == "192 × 128 px (sizes are multiples of 64 px; others are rounded up)"
    assert size_note(100, 64.0) == "64 × 100 px is made as 64 × 128 px (rounded up to multiples of 64 px)"
    assert size_note(5000, 64).startswith("Height: expected at most 4096 px")


def test_defaults():
    assert defaults_for("tiny:3")["width"] == 128
    assert defaults_for("kandinsky-community/kandinsky-2-1") == {"steps": 100, "prior_steps": 25, "width": 512,
                                                                 "height": 512}


def test_history():
    history = add_to_history([], ["a", ("b", "caption")])
    assert history == ["a", "b"]
    assert add_to_history(history, ["c", "a"]) == ["c", "a", "b"]  # a result shown again is not added twice
    assert len(add_to_history([], [str(i) for i in range(MAX_HISTORY + 5)])) == MAX_HISTORY


# ---- the painted mask, mix slots ---------------------------------------------------------------------------------


def test_the_painted_layer_is_the_mask():
    background = random_picture(0).convert("RGBA")
    layer = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    layer[10:20, 30:50] = (255, 255, 255, 191)  # a translucent brush: painted
    layer[40:44, 0:4, 3] = 100  # anti-aliased edges below half: not painted (the pipeline binarises at 0.5)
    image, mask = editor_inputs({"background": background, "layers": [Image.fromarray(layer, "RGBA")],
                                 "composite": None})
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(background.convert("RGB")))
    expected = np.zeros((SIZE, SIZE), dtype=np.uint8)
    expected[10:20, 30:50] = 255
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), expected)
    with pytest.raises(ValueError, match="^Mask: nothing painted"):
        editor_inputs({"background": background, "layers": [], "composite": None})
    with pytest.raises(ValueError, match="^Image: expected an image to paint the mask on"):
        editor_inputs({"background": None, "layers": [], "composite": None})


def test_mix_slots():
    picture = random_picture(1)
    items, weights = mix_inputs(["a cat", "ignored: the slot has an image", "  ", ""], [None, picture, None, None],
                                [0.25, 0.75, 1.0, 2.0])
    assert items[0] == "a cat" and isinstance(items[1], Image.Image) and weights == [0.25, 0.75]
    with pytest.raises(ValueError, match="^Mix: expected at least one"):
        mix_inputs(["", None], [None, None], [1, 1])
    with pytest.raises(ValueError, match="^Weight 1: expected a number"):
        mix_inputs(["a"], [None], [None])


# ---- the studio: one pipeline, PNG files, Stop -------------------------------------------------------------------


def test_text2img_writes_the_pipelines_images_with_their_metadata(studio, pipe):
    steps = []
    result = studio.generate("text2img", prompt="a red cat", negative_prompt="blurry", seed=7, num_images=2,
                             on_step=lambda step, total: steps.append((step, total)), **FAST)
    assert steps == [(1, 2), (2, 2)]
    assert result.seed == 7 and [p.parent for p in result.paths] == [studio.output_dir] * 2
    expected = direct(pipe.text2img, "a red cat", "blurry", seed=7, num_images_per_prompt=2)
    for index, path in enumerate(result.paths):
        metadata = read_png_metadata(path)
        assert metadata["seed"] == 7 and metadata["prompt"] == "a red cat" and metadata["image_index"] == index
        assert metadata["negative_prompt"] == "blurry"
        assert metadata["settings"]["task"] == "text2img" and metadata["settings"]["num_inference_steps"] == 2
        assert metadata["settings"]["weights"] == {"source": "tiny:0"}
        assert "sampler_options" not in metadata["settings"]
        assert np.array_equal(pixels(path), pixels(expected[index]))  # the files hold the images, as made


def test_a_random_seed_is_recorded(studio):
    result = studio.generate("text2img", prompt="a cat", seed=-1, **FAST)
    assert 0 <= result.seed < 2**31 and read_png_metadata(result.paths[0])["seed"] == result.seed
    seed, summary = describe(result.paths[0])
    assert seed == str(result.seed) and summary.startswith(f"seed {result.seed} · 64 × 64 px · ddim, 2 steps")


def test_the_size_is_rounded_up_and_said(studio):
    result = studio.generate("text2img", prompt="a cat", seed=1, **{**FAST, "height": 100})
    assert Image.open(result.paths[0]).size == (64, 128)
    assert "(asked 64 × 100: rounded up to multiples of 64)" in describe(result.paths[0])[1]


def test_bad_input_is_refused_before_any_work_and_the_next_request_runs(studio):
    for bad in (dict(steps=0), dict(seed=-3), dict(guidance="4"), dict(width=5000), dict(prompt=3)):
        with pytest.raises(ValueError):
            studio.generate("text2img", **{**dict(prompt="a cat", seed=1, **FAST), **bad})
    assert not list(studio.output_dir.iterdir())
    assert studio.generate("text2img", prompt="a cat", seed=1, **FAST).paths[0].is_file()


def test_stop_ends_the_generation_between_steps(studio):
    steps = []

    def on_step(step, total):
        steps.append(step)
        if step == 2:
            assert studio.stop("session-a") is True

    with pytest.raises(Stopped, match="stopped after decoder step 2 of 6"):
        studio.generate("text2img", prompt="a cat", seed=1, session="session-a", on_step=on_step,
                        **{**FAST, "steps": 6})
    assert steps == [1, 2] and not list(studio.output_dir.iterdir())
    assert studio.stop("session-a") is False  # nothing running: nothing to stop
    assert not studio.running("session-a")
    assert len(studio.generate("text2img", prompt="a cat", seed=1, session="session-a", **FAST).paths) == 1


def test_stop_of_another_session_does_not_stop_this_one(studio):
    steps = []
    studio.generate("text2img", prompt="a cat", seed=1, session="a", **FAST,
                    on_step=lambda step, total: steps.append(studio.stop("b")))
    assert steps == [False, False]


def test_inpaint_uses_exactly_the_painted_mask(studio, pipe):
    picture = random_picture(2)
    layer = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    layer[16:40, 8:56, 3] = 255
    editor = {"background": picture, "layers": [Image.fromarray(layer, "RGBA")], "composite": None}
    result = studio.generate("inpaint", prompt="a hat", seed=3, editor=editor, **FAST)
    mask = Image.open(result.mask)
    assert np.array_equal(np.asarray(mask) > 0, layer[..., 3] > 0)
    expected = direct(pipe.inpaint, "a hat", picture, mask, seed=3)[0]
    assert np.array_equal(pixels(result.paths[0]), pixels(expected))
    assert read_png_metadata(result.paths[0])["settings"]["mask_convention"] == "repaint"
    with pytest.raises(ValueError, match="^Mask: nothing painted"):
        studio.generate("inpaint", prompt="a hat", seed=3, editor={**editor, "layers": []}, **FAST)


def test_img2img_steps_follow_the_strength(studio, pipe):
    picture = random_picture(3)
    steps = []
    result = studio.generate("img2img", prompt="a frog", image=picture, seed=4, strength=0.5,
                             on_step=lambda step, total: steps.append((step, total)), **{**FAST, "steps": 8})
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    expected = direct(pipe.img2img, "a frog", picture, 0.5, seed=4, num_inference_steps=8)[0]
    assert np.array_equal(pixels(result.paths[0]), pixels(expected))
    assert read_png_metadata(result.paths[0])["settings"]["strength"] == 0.5
    with pytest.raises(ValueError, match="^Image: expected an input image"):
        studio.generate("img2img", prompt="a frog", image=None, seed=4, **FAST)


def test_mix(studio, pipe):
    picture = random_picture(4)
    items, weights = mix_inputs(["a cat", ""], [None, picture], [0.3, 0.7])
    result = studio.generate("mix", items=items, weights=weights, seed=5, **FAST)
    expected = direct(pipe.mix, ["a cat", picture], [0.3, 0.7], seed=5)[0]
    assert np.array_equal(pixels(result.paths[0]), pixels(expected))
    metadata = read_png_metadata(result.paths[0])
    assert metadata["prompt"] == "a cat | <image>" and metadata["settings"]["mix_weights"] == [0.3, 0.7]
    with pytest.raises(ValueError, match="^Weights: expected"):
        studio.generate("mix", items=items, weights=[0.3, 1000.0], seed=5, **FAST)


def test_adapters_load_change_and_are_recorded(studio, tmp_path):
    from test_components import write_adapter

    first, _ = write_adapter(tmp_path / "first.safetensors")
    result = studio.generate("text2img", prompt="a cat", seed=1, adapters=f"{first}:0.5", **FAST)
    [adapter] = read_png_metadata(result.paths[0])["settings"]["adapters"]
    assert adapter["scale"] == 0.5 and adapter["path"].endswith("first.safetensors")
    assert studio.adapters == [(str(first), 0.5)]
    with pytest.raises(ValueError, match="^Adapters: .*missing"):
        studio.generate("text2img", prompt="a cat", seed=1, adapters=str(tmp_path / "missing.safetensors"), **FAST)
    assert studio.adapters == [(str(first), 0.5)]  # a file that does not load leaves the adapters as they were
    plain = studio.generate("text2img", prompt="a cat", seed=1, adapters="", **FAST)
    assert read_png_metadata(plain.paths[0])["settings"]["adapters"] == [] and studio.adapters == []


def test_a_shared_page_takes_only_the_servers_adapters(pipe, tmp_path):
    from test_components import write_adapter

    first, _ = write_adapter(tmp_path / "first.safetensors")
    shared = Studio(pipe, output_dir=tmp_path / "out", adapters=[(str(first), 1.0)], adapter_paths=False)
    try:
        shared.set_adapters(f"{first}:0.25")  # another scale: fine
        assert shared.adapters == [(str(first), 0.25)]
        with pytest.raises(ValueError, match="only takes the adapters it was started with"):
            shared.set_adapters("/etc/some.safetensors")
        shared.set_adapters("")  # none: fine
    finally:
        pipe.unload_lora()


def test_every_task_has_a_tab(pipe):
    assert available_tasks(pipe) == ["text2img", "img2img", "inpaint", "mix"]

    class TextOnly:
        def text2img(self):
            pass

    assert available_tasks(TextOnly()) == ["text2img"]


def test_file_numbers_continue_after_the_files_there(pipe, tmp_path):
    (tmp_path / "00041-text2img-1-0.png").write_bytes(b"")
    studio = Studio(pipe, output_dir=tmp_path)
    assert studio.generate("text2img", prompt="a", seed=1, **FAST).paths[0].name == "00042-text2img-1-0.png"


# ---- the Gradio app, in process ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_api(studio, tmp_path):
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    from kandinsky.ui.app import build_app

    demo = build_app(studio)
    info = demo.get_api_info()["named_endpoints"]
    assert {"/text2img", "/img2img", "/inpaint", "/mix"} <= set(info)
    names = [p["parameter_name"] for p in info["/text2img"]["parameters"]]
    assert {"prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height"} <= set(names)
    port = free_port()
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                                                   quiet=True, ssr_mode=False, share=False,
                                                   allowed_paths=[str(studio.output_dir)])
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        images = client.predict(prompt="a cat", negative_prompt="", seed=11, steps=2, guidance=4.0, width=64,
                                height=100, prior_steps=2, api_name="/text2img")
        [image] = images
        metadata = read_png_metadata(image["image"])  # the file the client downloaded: metadata kept
        assert metadata["seed"] == 11 and metadata["settings"]["height"] == 100
        assert Image.open(image["image"]).size == (64, 128)
        with pytest.raises(Exception, match="Steps: expected an integer"):
            client.predict(prompt="a cat", negative_prompt="", seed=11, steps=0, guidance=4.0, width=64, height=64,
                           api_name="/text2img")
        again = client.predict(prompt="a cat", negative_prompt="", seed=11, steps=2, guidance=4.0, width=64,
                               height=64, prior_steps=2, api_name="/text2img")  # the server stays up
        assert read_png_metadata(again[0]["image"])["seed"] == 11
        picture, layer = tmp_path / "picture.png", tmp_path / "layer.png"
        random_picture(6).save(picture)
        painted = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
        painted[8:24, 8:24, 3] = 255
        Image.fromarray(painted, "RGBA").save(layer)
        small = dict(seed=3, steps=2, prior_steps=2, width=64, height=64)
        images, mask = client.predict(image={"background": gradio_client.handle_file(str(picture)),
                                             "layers": [gradio_client.handle_file(str(layer))], "composite": None},
                                      prompt="a hat", **small, api_name="/inpaint")
        assert read_png_metadata(images[0]["image"])["settings"]["task"] == "inpaint"
        assert np.array_equal(np.asarray(Image.open(mask)) > 0, painted[..., 3] > 0)
        images = client.predict(prompt1="a cat", image2=gradio_client.handle_file(str(picture)), weight2=0.5, **small,
                                api_name="/mix")
        assert read_png_metadata(images[0]["image"])["prompt"] == "a cat | <image>"
        images = client.predict(image=gradio_client.handle_file(str(picture)), prompt="a frog", strength=0.5,
                                **small, api_name="/img2img")
        assert read_png_metadata(images[0]["image"])["settings"]["strength"] == 0.5
    finally:
        demo.close(verbose=False)


# ---- the CLI ------------------------------------------------------------------------------------------------------


def test_kandinsky_help_imports_neither_gradio_nor_torch():
    code = ("import sys\nfrom kandinsky.cli import build_parser\nparser = build_parser()\n"
            "args = parser.parse_args(['ui', '--weights', 'tiny'])\n"
            "assert args.host == '127.0.0.1' and args.port == 7860 and not args.share, args\n"
            "print(sorted(m for m in ('gradio', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_ui_command_launches_with_its_options(monkeypatch, capsys, tmp_path):
    pytest.importorskip("gradio")
    import kandinsky.ui.app as app
    from test_components import write_adapter

    adapter, _ = write_adapter(tmp_path / "cats.safetensors")
    calls = []
    monkeypatch.setattr(app, "launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert main(["ui", "--weights", "tiny:2", "--lora", f"{adapter}:0.5", "--port", "8123"]) == 0
    [(args, kwargs)] = calls
    assert args == ("tiny:2",) and kwargs["adapters"] == [(str(adapter), 0.5)]
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8123 and kwargs["share"] is False
    assert main(["ui", "--port", "70000"]) == 2
    assert "--port: expected a port in 1..65535" in capsys.readouterr().err
    assert main(["ui", "--lora", str(tmp_path / "missing.safetensors")]) == 1  # before any loading
    assert "kandinsky: error: --lora:" in capsys.readouterr().err
    assert main(["ui", "--share"]) == 0 and calls[-1][1]["share"] is True
    assert len(calls) == 2


def test_the_metadata_reads_back_with_kandinsky_info(studio, capsys):
    result = studio.generate("text2img", prompt="a cat", seed=9, **FAST)
    assert main(["info", str(result.paths[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 9


# ---- Kandinsky 2.2: the ControlNet tab -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe22():
    from kandinsky.pipeline import Kandinsky22

    return Kandinsky22.from_config("tiny", seed=0, progress=False)


def test_the_controlnet_tasks_are_22s_with_the_same_settings_classes():
    from kandinsky.settings import ControlNetImg2ImgSettings, ControlNetSettings

    assert task_settings("controlnet", model="2.2", **FAST) == cli_task_settings(type("Args", (), dict(
        command="controlnet", image=None, steps=2, guidance=None, height=SIZE, width=SIZE, num_images=1,
        sampler="ddim", crop=False, prior_steps=2, prior_guidance=4.0, model="2.2", weights="tiny"))())
    assert isinstance(task_settings("controlnet", model="2.2"), ControlNetSettings)
    assert task_settings("controlnet_img2img", model="2.2", strength=0.5) == ControlNetImg2ImgSettings(strength=0.5)
    assert task_settings("img2img", model="2.2").guidance_scale == 4.0  # 2.2's img2img default (2.1: 7)
    with pytest.raises(ValueError, match="task: expected one of"):
        task_settings("controlnet", model="2.1")


def test_the_controlnet_handler_gives_the_pipelines_images(pipe22, tmp_path):
    studio = Studio(pipe22, output_dir=tmp_path / "out")
    assert studio.model == "2.2" and available_tasks(pipe22)[-2:] == ["controlnet", "controlnet_img2img"]
    hint, image = random_picture(1), random_picture(2)
    result = studio.generate("controlnet", prompt="a robot", hint=hint, seed=5, **FAST)
    expected = direct(pipe22.controlnet, "a robot", hint, seed=5)
    assert np.array_equal(pixels(result.paths[0]), pixels(expected[0]))
    settings = read_png_metadata(result.paths[0])["settings"]
    assert settings["task"] == "controlnet" and settings["weights"]["model"] == "2.2"
    result = studio.generate("controlnet_img2img", prompt="a robot", hint=hint, image=image, strength=0.5, seed=5,
                             **FAST)
    expected = direct(pipe22.controlnet_img2img, "a robot", image, hint, 0.5, seed=5)
    assert np.array_equal(pixels(result.paths[0]), pixels(expected[0]))
    assert read_png_metadata(result.paths[0])["settings"]["guidance_scale"] == 4.0
    with pytest.raises(ValueError, match="^Hint: expected a hint image"):
        studio.generate("controlnet", prompt="a robot", seed=5, **FAST)
    with pytest.raises(ValueError, match="^Image: expected an input image"):
        studio.generate("controlnet_img2img", prompt="a robot", hint=hint, seed=5, **FAST)


def test_the_page_has_a_controlnet_tab_only_with_22_weights(pipe, pipe22, tmp_path):
    pytest.importorskip("gradio")
    from kandinsky.ui.app import _controlnet_inputs, build_app

    demo = build_app(Studio(pipe22, output_dir=tmp_path / "a"))
    info = demo.get_api_info()["named_endpoints"]
    assert {"/text2img", "/img2img", "/inpaint", "/mix", "/controlnet"} <= set(info)
    names = {p["parameter_name"] for p in info["/controlnet"]["parameters"]}
    assert {"hint", "image", "strength", "prompt", "seed", "steps"} <= names
    assert "/controlnet" not in build_app(Studio(pipe, output_dir=tmp_path / "b")).get_api_info()["named_endpoints"]

    # the tab's handler: a start image makes it controlnet_img2img
    import gradio as gr

    studio = Studio(pipe22, output_dir=tmp_path / "c")

    class Page:
        def generate(self, task, request, progress, *, inputs, controls):
            return studio.generate(task, **inputs, **controls)

    with gr.Blocks():
        _, handler = _controlnet_inputs(Page())
    small = dict(seed=4, steps=2, prior_steps=2, width=SIZE, height=SIZE)
    hint, image = random_picture(1), random_picture(2)
    first = handler(None, hint=hint, prompt="a robot", **small)
    second = handler(None, hint=hint, image=image, prompt="a robot", strength=0.4, **small)
    assert read_png_metadata(first.paths[0])["settings"]["task"] == "controlnet"
    assert read_png_metadata(second.paths[0])["settings"]["strength"] == 0.4


def test_the_ui_command_takes_the_model(monkeypatch):
    pytest.importorskip("gradio")
    import kandinsky.ui.app as app

    calls = []
    monkeypatch.setattr(app, "launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert main(["ui", "--weights", "tiny", "--model", "2.2"]) == 0
    assert calls[-1][1]["model"] == "2.2"

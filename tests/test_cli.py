"""The ``kandinsky`` command on tiny weights the test writes to a folder (our layout), in process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import kandinsky.hub as hub
from kandinsky.cli import main
from kandinsky.pipeline import Kandinsky21

pytest.importorskip("diffusers")
from test_hub import FakeSnapshots  # noqa: E402
from test_pipeline import SIZE, build_reference, random_image, seed, seed_example_mask  # noqa: E402

FAST = ["--height", str(SIZE), "--width", str(SIZE), "--steps", "2", "--prior-steps", "2", "--no-progress",
        "--device", "cpu"]



@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "tiny"
    reference = build_reference()
    Kandinsky21.from_diffusers(reference["prior"], reference["text2img"],
                               inpaint_pipeline=reference["inpaint"]).save_pretrained(folder)
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_png_with_metadata_and_matches_the_api(weights, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, stdout, stderr = run(capsys, "generate", "the cat", "-o", out, "--weights", weights, "--seed", 7,
                               "--negative-prompt", "dark", *FAST)
    assert code == 0, stderr
    assert str(out) in stdout
    with Image.open(out) as image:
        assert image.size == (SIZE, SIZE)
        text = dict(image.text)
        pixels = np.asarray(image)
    assert text["prompt"] == "the cat" and text["seed"] == "7" and text["negative_prompt"] == "dark"
    settings = json.loads(text["settings"])
    assert settings["steps"] == 2 and settings["weights"] == str(weights) and settings["sampler"] == "ddim"
    pipe = Kandinsky21.from_pretrained(str(weights), progress=False)
    expected = pipe.text2img("the cat", negative_prompt="dark", height=SIZE, width=SIZE, num_inference_steps=2,
                             prior_num_inference_steps=2, generator=seed(7))[0]
    assert np.array_equal(pixels, np.asarray(expected))


def test_never_overwrites_without_flag(weights, tmp_path, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"precious")
    code, _, stderr = run(capsys, "generate", "the cat", "-o", out, "--weights", weights, "--seed", 1, *FAST)
    assert code == 1 and "--overwrite" in stderr and "Traceback" not in stderr
    assert out.read_bytes() == b"precious"
    code, _, stderr = run(capsys, "generate", "the cat", "-o", out, "--weights", weights, "--seed", 1, "--overwrite",
                          *FAST)
    assert code == 0, stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_images_and_random_seed_is_reported(weights, tmp_path, capsys):
    code, _, stderr = run(capsys, "generate", "the cat", "-o", tmp_path / "many.png", "--weights", weights,
                          "--num-images", 2, *FAST)
    assert code == 0, stderr
    assert "seed:" in stderr
    seeds = set()
    for i in range(2):
        with Image.open(tmp_path / f"many-{i}.png") as image:
            seeds.add(image.text["seed"])
            assert image.text["image_index"] == str(i)
    assert len(seeds) == 1 and f"seed: {seeds.pop()}" in stderr


def test_img2img_inpaint_and_mix(weights, tmp_path, capsys):
    random_image(1).save(tmp_path / "in.png")
    Image.fromarray((seed_example_mask() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    code, _, stderr = run(capsys, "img2img", "a frog", "--image", tmp_path / "in.png", "--strength", 0.5,
                          "-o", tmp_path / "frog.png", "--weights", weights, "--seed", 0, *FAST)
    assert code == 0, stderr
    args = ["--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--weights", weights, "--seed", 0, *FAST]
    assert run(capsys, "inpaint", "a hat", "-o", tmp_path / "hat.png", *args)[0] == 0
    assert run(capsys, "inpaint", "a hat", "-o", tmp_path / "legacy.png", "--legacy-mask", *args)[0] == 0
    with Image.open(tmp_path / "hat.png") as a, Image.open(tmp_path / "legacy.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    code, _, stderr = run(capsys, "mix", "the cat", tmp_path / "in.png", "--ratios", 0.4, 0.6, "-o",
                          tmp_path / "mix.png", "--grid", tmp_path / "grid.png", "--weights", weights, "--seed", 0,
                          *FAST)
    assert code == 0, stderr
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * SIZE, SIZE)  # the input image, then the result


def test_runtime_errors_are_one_line_without_traceback(weights, tmp_path, capsys, monkeypatch):
    code, _, stderr = run(capsys, "generate", "x", "-o", tmp_path / "a.png", "--weights", tmp_path / "nowhere" / "w",
                          *FAST)
    assert code == 1 and "no such folder" in stderr and "Traceback" not in stderr
    code, _, stderr = run(capsys, "img2img", "x", "--image", tmp_path / "missing.png", "-o", tmp_path / "b.png",
                          "--weights", weights, *FAST)
    assert code == 1 and "--image" in stderr
    code, _, stderr = run(capsys, "img2img", "x", "--image", tmp_path / "missing.png", "--strength", 2, "-o",
                          tmp_path / "b.png", "--weights", weights, *FAST)
    assert code == 1
    random_image(1).save(tmp_path / "in.png")
    code, _, stderr = run(capsys, "img2img", "x", "--image", tmp_path / "in.png", "--strength", 2, "-o",
                          tmp_path / "b.png", "--weights", weights, *FAST)
    assert code == 1 and "strength" in stderr and not (tmp_path / "b.png").exists()
    # the hub unreachable: the message says what failed and how to use local files
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(tmp_path, tmp_path / "s", fail=True))
    code, _, stderr = run(capsys, "generate", "x", "-o", tmp_path / "c.png", "--cache-dir", tmp_path / "cache",
                          "--seed", 0, *FAST)
    assert code == 1 and "kandinsky-community/kandinsky-2-1" in stderr and "--weights" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["generate"], ["generate", "x", "--steps", "0"], ["nope"],
                                  ["generate", "x", "--dtype", "int8"], ["mix", "a", "b", "--ratios", "1"]])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_console_entry_point_usage_error():
    result = subprocess.run([sys.executable, "-m", "kandinsky.cli", "generate"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: kandinsky generate" in result.stderr


def test_default_weights_is_the_hub_default():
    from kandinsky.cli import DEFAULT_WEIGHTS

    assert DEFAULT_WEIGHTS == hub.DEFAULT_SOURCE


def test_convert_is_delegated(tmp_path, capsys):
    from kandinsky.testing import load_original_fixture, prefixed

    tensors, meta = load_original_fixture("movq")
    torch.save(prefixed(tensors, "state_dict."), tmp_path / "movq.ckpt")
    code, stdout, stderr = run(capsys, "convert", "movq", tmp_path / "movq.ckpt", tmp_path / "movq",
                               "--config", json.dumps(meta["original_config"]))
    assert code == 0, stderr
    assert (tmp_path / "movq" / "model.safetensors").is_file()

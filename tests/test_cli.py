"""The ``kandinsky`` command on tiny weights the test writes to a folder (our layout), in process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import kandinsky.hub as hub
import kandinsky.weights as weights_module
from kandinsky.cli import main
from kandinsky.pipeline import Kandinsky21
from kandinsky.png import read_png_metadata, save_png
from kandinsky.testing import load_original_fixture, max_errors, prefixed
from kandinsky.weights import load_converted

pytest.importorskip("diffusers")
from test_hub import FakeSnapshots  # noqa: E402
from test_pipeline import SIZE, random_image, save_reference_weights, seed, seed_example_mask  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--height", str(SIZE), "--width", str(SIZE), "--steps", "2", "--prior-steps", "2", "--no-progress",
        "--device", "cpu"]



@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_reference_weights(tmp_path_factory.mktemp("weights") / "tiny")


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
    assert settings["num_inference_steps"] == 2 and settings["sampler"] == "ddim" and settings["task"] == "text2img"
    assert settings["weights"] == {"source": str(weights)}
    pipe = Kandinsky21.from_pretrained(str(weights), progress=False)
    expected = pipe.text2img("the cat", negative_prompt="dark", height=SIZE, width=SIZE, num_inference_steps=2,
                             prior_num_inference_steps=2, generator=seed(7))[0]
    assert np.array_equal(pixels, np.asarray(expected))
    # the Python API's PNG carries the same metadata, key for key
    save_png(expected, tmp_path / "api.png")
    assert read_png_metadata(tmp_path / "api.png") == read_png_metadata(out)
    with Image.open(tmp_path / "api.png") as image:
        assert dict(image.text) == text


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


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_img2img_inpaint_and_mix_match_the_api(weights, tmp_path, capsys):
    """Each command writes what the pipeline method gives for the same arguments and seed (its defaults
    included), pixel for pixel."""
    image = random_image(1)
    image.save(tmp_path / "in.png")  # PNG is lossless: the command reads back these pixels
    Image.fromarray((seed_example_mask() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    with Image.open(tmp_path / "mask.png") as file:
        mask = file.convert("L")
    pipe = Kandinsky21.from_pretrained(str(weights), progress=False)
    api = dict(height=SIZE, width=SIZE, num_inference_steps=2, prior_num_inference_steps=2)

    code, _, stderr = run(capsys, "img2img", "a frog", "--image", tmp_path / "in.png", "--strength", 0.5,
                          "-o", tmp_path / "frog.png", "--weights", weights, "--seed", 0, *FAST)
    assert code == 0, stderr
    expected = pipe.img2img("a frog", image, strength=0.5, generator=seed(0), **api)[0]
    assert np.array_equal(_pixels(tmp_path / "frog.png"), np.asarray(expected))

    args = ["--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--weights", weights, "--seed", 0, *FAST]
    assert run(capsys, "inpaint", "a hat", "-o", tmp_path / "hat.png", *args)[0] == 0
    assert run(capsys, "inpaint", "a hat", "-o", tmp_path / "legacy.png", "--legacy-mask", *args)[0] == 0
    for name, convention in (("hat", "repaint"), ("legacy", "legacy")):
        expected = pipe.inpaint("a hat", image, mask, mask_convention=convention, generator=seed(0), **api)[0]
        assert np.array_equal(_pixels(tmp_path / f"{name}.png"), np.asarray(expected)), name
    assert not np.array_equal(_pixels(tmp_path / "hat.png"), _pixels(tmp_path / "legacy.png"))

    code, _, stderr = run(capsys, "mix", "the cat", tmp_path / "in.png", "--ratios", 0.4, 0.6, "-o",
                          tmp_path / "mix.png", "--grid", tmp_path / "grid.png", "--weights", weights, "--seed", 0,
                          *FAST)
    assert code == 0, stderr
    expected = np.asarray(pipe.mix(["the cat", image], [0.4, 0.6], generator=seed(0), **api)[0])
    assert np.array_equal(_pixels(tmp_path / "mix.png"), expected)
    grid = _pixels(tmp_path / "grid.png")
    assert grid.shape == (SIZE, 2 * SIZE, 3)  # the input image, then the result
    assert np.array_equal(grid[:, :SIZE], np.asarray(image)) and np.array_equal(grid[:, SIZE:], expected)


def test_runtime_errors_are_one_line_without_traceback(weights, tmp_path, capsys, monkeypatch):
    code, _, stderr = run(capsys, "generate", "x", "-o", tmp_path / "a.png", "--weights", tmp_path / "nowhere" / "w",
                          *FAST)
    assert code == 1 and "no such folder" in stderr and "Traceback" not in stderr
    code, _, stderr = run(capsys, "img2img", "x", "--image", tmp_path / "missing.png", "-o", tmp_path / "b.png",
                          "--weights", weights, *FAST)
    assert code == 1 and "--image" in stderr
    # an argument error is a usage error (exit 2), found before the files are read
    code, _, stderr = run(capsys, "img2img", "x", "--image", tmp_path / "missing.png", "--strength", 2, "-o",
                          tmp_path / "b.png", "--weights", weights, *FAST)
    assert code == 2 and "--strength: expected a number in (0, 1], got 2.0" in stderr
    random_image(1).save(tmp_path / "in.png")
    code, _, stderr = run(capsys, "img2img", "x", "--image", tmp_path / "in.png", "--strength", 2, "-o",
                          tmp_path / "b.png", "--weights", weights, *FAST)
    assert code == 2 and "strength" in stderr and not (tmp_path / "b.png").exists()
    # the hub unreachable: the message says what failed and how to use local files
    monkeypatch.setattr(hub, "snapshot_download", FakeSnapshots(tmp_path, tmp_path / "s", fail=True))
    code, _, stderr = run(capsys, "generate", "x", "-o", tmp_path / "c.png", "--cache-dir", tmp_path / "cache",
                          "--seed", 0, *FAST)
    assert code == 1 and "kandinsky-community/kandinsky-2-1" in stderr and "--weights" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["generate"], ["generate", "x", "--steps", "0"], ["nope"],
                                  ["generate", "x", "--dtype", "int8"], ["mix", "a", "b", "--ratios", "1"]])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own checks exit; the others return 2
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    assert _one_error_line(capsys.readouterr().err)


def _one_error_line(stderr: str) -> str:
    """The single ``kandinsky: error: ...`` line that is all a failing command may print."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kandinsky: error: "), stderr
    return lines[0]


def test_console_entry_point_usage_error():
    result = subprocess.run([sys.executable, "-m", "kandinsky", "generate"], capture_output=True, text=True)
    assert result.returncode == 2 and "prompt" in _one_error_line(result.stderr)
    assert "kandinsky generate --help" in result.stderr


def test_default_weights_is_the_hub_default():
    from kandinsky.cli import DEFAULT_WEIGHTS

    assert DEFAULT_WEIGHTS == hub.DEFAULT_SOURCE


@pytest.fixture(scope="module")
def movq_checkpoint(tmp_path_factory):
    """The tiny original MoVQ fixture as an original-layout checkpoint, and its original config."""
    tensors, meta = load_original_fixture("movq")
    path = tmp_path_factory.mktemp("original") / "movq.ckpt"
    torch.save(prefixed(tensors, "state_dict."), path)
    return path, meta["original_config"], tensors


def test_convert_writes_our_format(movq_checkpoint, tmp_path, capsys):
    checkpoint, config, tensors = movq_checkpoint
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, stdout, stderr = run(capsys, "convert", "movq", checkpoint, tmp_path / "movq", "--config",
                               tmp_path / "config.json", "--dtype", "float32")
    assert code == 0, stderr
    assert stdout.strip() == str(tmp_path / "movq")
    with torch.no_grad():
        encoded = load_converted(tmp_path / "movq").encode(tensors["input.image"])
    assert max_errors(encoded, tensors["output.encode"])[0] < 1e-5  # same bound as tests/test_movq.py
    # an existing output is replaced only with --overwrite
    code, _, stderr = run(capsys, "convert", "movq", checkpoint, tmp_path / "movq", "--config", json.dumps(config))
    assert code == 1 and "already exists" in stderr and "Traceback" not in stderr
    assert run(capsys, "convert", "movq", checkpoint, tmp_path / "movq", "--config", json.dumps(config),
               "--overwrite")[0] == 0


def test_convert_errors_are_one_line_and_write_nothing(movq_checkpoint, tmp_path, capsys):
    checkpoint, _, _ = movq_checkpoint
    # the official (full-size) config does not fit the tiny checkpoint: strict error
    code, _, stderr = run(capsys, "convert", "movq", checkpoint, tmp_path / "out")
    assert code == 1 and "shape mismatches" in stderr and "Traceback" not in stderr
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint at all")
    code, _, stderr = run(capsys, "convert", "movq", tmp_path / "bad.ckpt", tmp_path / "out")
    assert code == 1 and "bad.ckpt" in stderr and len(stderr.strip().splitlines()) == 1
    tensors, _ = load_original_fixture("prior")
    torch.save(prefixed(tensors, "state_dict."), tmp_path / "prior.ckpt")
    torch.save((tensors["input.clip_mean"], tensors["input.clip_std"]), tmp_path / "stats.th")
    code, _, stderr = run(capsys, "convert", "prior", tmp_path / "prior.ckpt", tmp_path / "out", "--clip-stats",
                          tmp_path / "stats.th", "--config", '{"model": {"hparams": {}}}')
    assert code == 1 and "--config: missing entry" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt", "prior.ckpt", "stats.th"]


@pytest.mark.parametrize("argv", [["convert", "movq", "a.ckpt", "out", "--config", "{not json"],
                                  ["convert", "vae", "a.ckpt", "out"], ["convert", "movq", "a.ckpt"]])
def test_convert_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "kandinsky convert --help" in _one_error_line(capsys.readouterr().err)


def test_scripts_are_wrappers_of_the_cli(movq_checkpoint, tmp_path):
    checkpoint, config, _ = movq_checkpoint
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_weights.py"), "movq", str(checkpoint),
                           str(tmp_path / "movq"), "--config", json.dumps(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "movq" / "model.safetensors").is_file()
    for script, command in (("parity_report.py", "parity"), ("benchmark.py", "bench")):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and f"usage: kandinsky {command}" in done.stdout, done.stderr


# --- one line, never a traceback (issue 13) ---------------------------------------------------------

def _broken_weights(weights: Path, tmp_path: Path, breakage: str) -> Path:
    """A copy of the tiny weights folder with one component broken as ``breakage`` says."""
    folder = tmp_path / "broken"
    shutil.copytree(weights, folder)
    if breakage == "integer tensor":
        path = folder / "movq" / "model.safetensors"
        with safe_open(str(path), framework="pt") as file:
            metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
        tensors["codebook.weight"] = tensors["codebook.weight"].to(torch.int32)
        save_file(tensors, str(path), metadata=metadata)
    elif breakage == "pickled text encoder":
        (folder / "clip_text" / "model.safetensors").unlink()
        torch.save({"weight": torch.zeros(1), "payload": _Exploit()}, folder / "clip_text" / "pytorch_model.bin")
    elif breakage.startswith("truncated "):
        path = folder / breakage.split()[1] / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    elif breakage in ("config without component", "config with a wrong type"):
        path = folder / "unet" / "config.json"
        meta = json.loads(path.read_text())
        if breakage == "config without component":
            del meta["component"]
        else:
            meta["config"]["model_channels"] = "wide"
        path.write_text(json.dumps(meta))
    elif breakage == "movq in unet":
        shutil.rmtree(folder / "unet")
        shutil.copytree(folder / "movq", folder / "unet")
    return folder


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch should-never-exist",))


@pytest.mark.parametrize("breakage, needle", [
    ("integer tensor", "movq/model.safetensors: 1 tensor(s) not floating point, e.g. codebook.weight (torch.int32)"),
    ("pickled text encoder", "refusing to load"),
    ("truncated mclip", "mclip/model.safetensors (truncated or corrupt?)"),
    ("truncated clip_text", "clip_text/model.safetensors (truncated or corrupt?)"),
    ("config without component", "unet/config.json has no ['component']"),
    ("config with a wrong type", "unet/config.json: config.model_channels must be of the type of 384, got 'wide'"),
    ("movq in unet", "holds a 'movq' component, not the 'unet' expected here"),
])
def test_broken_weight_files_are_one_line(weights, tmp_path, capsys, monkeypatch, breakage, needle):
    monkeypatch.chdir(tmp_path)
    folder = _broken_weights(weights, tmp_path, breakage)
    code, _, stderr = run(capsys, "generate", "the cat", "-o", tmp_path / "out.png", "--weights", folder, "--seed", 0,
                          *FAST)
    assert code == 1 and needle in _one_error_line(stderr)
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "should-never-exist").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--device", "bogus"], "--device: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'bogus'"),
    (["--seed", str(2**64)], "argument --seed: expected an integer in [0, 2**64 - 1], got 18446744073709551616"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**64 - 1], got -1"),
    (["--height", "100000"], "--height: expected at most 4096 px (MAX_IMAGE_SIDE), got 100000"),
    (["--width", "0"], "--width: expected a positive integer, got 0"),
    (["--guidance", "1e30"], "--guidance: expected a number in [0, 100], got 1e+30"),
    (["--guidance=-1e30"], "--guidance: expected a number in [0, 100], got -1e+30"),
    (["--prior-guidance", "nan"], "--prior-guidance: expected a finite number, got nan"),
])
def test_bad_arguments_are_one_line_usage_errors(weights, tmp_path, capsys, argv, needle):
    argv = ["generate", "x", "-o", str(tmp_path / "out.png"), "--weights", str(weights), "--steps", "1", *argv]
    with pytest.raises(SystemExit) as exit_info:  # argparse's own checks exit; the others return 2
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2 and needle in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA or without a GPU")
def test_cuda_on_a_machine_without_it_is_one_line(capsys):
    assert main(["generate", "x", "--device", "cuda"]) == 2
    assert "--device: 'cuda' asked for, but CUDA is not available" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="device: 'cuda:0' asked for"):
        Kandinsky21(device="cuda:0")


def test_a_bogus_device_in_the_api_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="device: expected a torch device .* got 'bogus'"):
        Kandinsky21(device="bogus")


def test_a_size_beyond_the_documented_maximum_is_refused_before_allocating(weights):
    pipe = Kandinsky21.from_pretrained(str(weights), progress=False)
    for name in ("height", "width"):
        with pytest.raises(ValueError, match=f"{name}: expected at most 4096 px"):
            pipe.text2img("the cat", **{name: 10**6}, num_inference_steps=1, prior_num_inference_steps=1)
    assert pipe.components.loaded() == []  # nothing was loaded, let alone allocated


def test_mix_item_that_looks_like_a_missing_image_is_an_error(weights, tmp_path, capsys):
    code, _, stderr = run(capsys, "mix", "typo.png", "a dog", "-o", tmp_path / "mix.png", "--weights", weights,
                          "--seed", 0, *FAST)
    assert code == 1 and "items: no such image file 'typo.png'" in _one_error_line(stderr)
    assert not (tmp_path / "mix.png").exists()


def test_bench_and_parity_without_diffusers_are_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    for command in ("bench", "parity"):
        assert main([command, "movq"]) == 1
        assert f"{command} compares against diffusers, which is not installed" in \
            _one_error_line(capsys.readouterr().err)


def test_version_and_help_without_torch():
    from kandinsky import __version__

    script = ("import sys\nfrom kandinsky.cli import main\n"
              "for argv in (['--help'], ['generate', '--help'], ['convert', '--help'], ['export', '--help'], "
              "['batch', '--help'], ['--version']):\n"
              "    try:\n        main(argv)\n    except SystemExit as done:\n        assert done.code == 0, argv\n"
              "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("[]")  # no heavy import to print help
    assert f"kandinsky {__version__}" in done.stdout


def test_the_choices_spelled_out_for_help_match_the_package():
    import kandinsky.cli as cli
    from kandinsky.convert import COMPONENTS
    from kandinsky.export import FORMATS, TARGETS
    from kandinsky.schedulers import SAMPLERS
    from kandinsky.validation import MAX_IMAGE_SIDE

    assert cli.SAMPLERS == tuple(s for s in SAMPLERS if s != "unclip")
    assert cli.CONVERTED == COMPONENTS and cli.EXPORT_FORMATS == tuple(FORMATS)
    assert cli.EXPORT_TARGETS == tuple(TARGETS) and cli.MAX_IMAGE_SIDE == MAX_IMAGE_SIDE


@pytest.mark.parametrize("command, sentence", [
    ("parity", "and against the original implementation's fixtures."),
    ("bench", "so that machine noise hits both sides alike."),
])
def test_parity_and_bench_help_is_a_complete_sentence(capsys, command, sentence):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert sentence in " ".join(capsys.readouterr().out.split())


def test_no_progress_silences_the_loading_bars(weights, tmp_path, capsys):
    from transformers.utils import logging

    before = logging.is_progress_bar_enabled()
    code, _, stderr = run(capsys, "generate", "the cat", "-o", tmp_path / "a.png", "--weights", weights, "--seed", 0,
                          *FAST)
    assert code == 0 and stderr == ""  # transformers' "Loading weights" bar included
    assert logging.is_progress_bar_enabled() == before  # restored for the rest of the process


def test_ctrl_c_during_convert_exits_130_and_leaves_nothing(movq_checkpoint, tmp_path, capsys, monkeypatch):
    checkpoint, config, _ = movq_checkpoint

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights_module, "save_file", interrupted)
    code, _, stderr = run(capsys, "convert", "movq", checkpoint, tmp_path / "movq", "--config", json.dumps(config))
    assert code == 130 and _one_error_line(stderr) == "kandinsky: error: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_a_png_is_written_keeps_the_previous_image(weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cat.png"
    assert run(capsys, "generate", "the cat", "-o", out, "--weights", weights, "--seed", 0, *FAST)[0] == 0
    good = out.read_bytes()

    def interrupted(self, fp, *args, **kwargs):
        handle = open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else fp  # PIL opens a path itself
        handle.write(b"\x89PNG\r\n\x1a\n")  # the 8 bytes an interrupted write used to leave
        handle.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    code, _, stderr = run(capsys, "generate", "the dog", "-o", out, "--overwrite", "--weights", weights, "--seed", 1,
                          *FAST)
    assert code == 130 and out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]


def test_convert_overwrite_replaces_only_its_own_output(movq_checkpoint, tmp_path, capsys):
    checkpoint, config, _ = movq_checkpoint
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.tex").write_text("precious")
    code, _, stderr = run(capsys, "convert", "movq", checkpoint, documents, "--config", json.dumps(config),
                          "--overwrite")
    assert code == 1 and "refusing to replace" in _one_error_line(stderr)
    assert (documents / "thesis.tex").read_text() == "precious"
    # nor SOURCE itself, even when it is a folder this package wrote
    assert run(capsys, "convert", "movq", checkpoint, tmp_path / "ours", "--config", json.dumps(config))[0] == 0
    code, _, stderr = run(capsys, "convert", "movq", tmp_path / "ours", tmp_path / "ours", "--dtype", "bfloat16",
                          "--overwrite")
    assert code == 1 and "it is the source" in _one_error_line(stderr)
    assert load_converted(tmp_path / "ours").encoder.conv_in.weight.dtype == torch.float32
    # a pipeline folder: each component folder is checked before anything is written
    (tmp_path / "pipe" / "movq").mkdir(parents=True)
    (tmp_path / "pipe" / "movq" / "notes.txt").write_text("precious")
    code, _, stderr = run(capsys, "convert", "pipeline", tmp_path / "nowhere", tmp_path / "pipe", "--overwrite")
    assert code == 1 and "refusing to replace" in _one_error_line(stderr) and "pipe/movq" in stderr


def test_inline_config_longer_than_a_file_name(movq_checkpoint, tmp_path, capsys):
    checkpoint, config, _ = movq_checkpoint
    inline = json.dumps(config, indent=40)
    assert len(inline) > 255  # longer than a file name may be: once an OSError traceback
    code, _, stderr = run(capsys, "convert", "movq", checkpoint, tmp_path / "movq", "--config", inline)
    assert code == 0, stderr


# ------------------------------------------------------------------------------------------- tiny weights, PNGs


TINY_FAST = ["--height", "64", "--width", "64", "--steps", "2", "--prior-steps", "2", "--no-progress"]


def test_tiny_weights_from_the_command_line_and_a_png_regenerates_itself(tmp_path, capsys):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    code, _, stderr = run(capsys, "generate", "a cat", "--weights", "tiny", "-o", first, *TINY_FAST)
    assert code == 0, stderr
    assert stderr.startswith("seed: ")  # no --seed: a random one, printed and stored
    code, _, stderr = run(capsys, "generate", "--from-png", first, "-o", second, "--no-progress")
    assert code == 0, stderr
    assert np.array_equal(_pixels(first), _pixels(second))
    assert read_png_metadata(first)["settings"] == read_png_metadata(second)["settings"]
    # the same weights as Python's tiny pipeline of seed 0
    stored = read_png_metadata(first)
    pipe = Kandinsky21.from_config("tiny", seed=0, progress=False)
    expected = pipe.text2img("a cat", height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2,
                             generator=seed(stored["seed"]))[0]
    assert np.array_equal(_pixels(first), np.asarray(expected))
    # an explicit flag overrides the stored value; another tiny seed is other weights
    code, _, stderr = run(capsys, "generate", "--from-png", first, "-o", tmp_path / "c.png", "--steps", "3",
                          "--no-progress")
    assert code == 0 and read_png_metadata(tmp_path / "c.png")["settings"]["num_inference_steps"] == 3, stderr
    code, _, stderr = run(capsys, "generate", "--from-png", first, "-o", tmp_path / "d.png", "--weights", "tiny:1",
                          "--no-progress")
    assert code == 0, stderr
    assert read_png_metadata(tmp_path / "d.png")["settings"]["weights"] == {"source": "tiny:1"}
    assert not np.array_equal(_pixels(first), _pixels(tmp_path / "d.png"))


def test_info_prints_the_schema(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert run(capsys, "generate", "a cat", "--weights", "tiny", "--seed", "5", "-o", out, *TINY_FAST)[0] == 0
    code, stdout, _ = run(capsys, "info", out, "--json")
    metadata = json.loads(stdout)
    assert code == 0 and metadata["prompt"] == "a cat" and metadata["seed"] == 5
    assert set(metadata) == {"software", "prompt", "negative_prompt", "seed", "image_index", "settings"}
    assert {"task", "num_inference_steps", "guidance_scale", "prior_num_inference_steps", "prior_guidance_scale",
            "height", "width", "sampler", "dtype", "weights", "adapters", "version"} <= set(metadata["settings"])
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "prompt: a cat" in stdout and "seed: 5" in stdout
    random_image(0).save(tmp_path / "plain.png")
    code, _, stderr = run(capsys, "info", tmp_path / "plain.png")
    assert code == 1 and "no kandinsky metadata" in _one_error_line(stderr)


def test_from_png_refuses_what_it_cannot_regenerate(tmp_path, capsys):
    random_image(0).save(tmp_path / "plain.png")
    code, stdout, stderr = run(capsys, "generate", "--from-png", tmp_path / "plain.png", "-o", tmp_path / "x.png")
    assert code == 2 and "--from-png" in _one_error_line(stderr) and not stdout
    code, _, stderr = run(capsys, "generate", "-o", tmp_path / "x.png", "--weights", "tiny")
    assert code == 2 and "prompt: expected a prompt" in _one_error_line(stderr)


# ------------------------------------------------------------------------------------------- the LoRA workflow


def test_a_trained_lora_is_the_same_image_from_every_path(tmp_path, capsys, caplog):
    """Train a LoRA on the tiny weights (3 steps), then the same seed through `--weights BASE --lora RUN`,
    `--weights RUN` and Python `load_lora` gives identical pixels, which differ from the base; the run converted
    to diffusers' layout (adapters fused) gives diffusers' pipelines the same image."""
    from tiny_training import write_jsonl_data

    base, run_dir = tmp_path / "base", tmp_path / "run"
    Kandinsky21.from_config("tiny", seed=0).save_pretrained(base)
    data = write_jsonl_data(tmp_path / "data")
    code, _, stderr = run(capsys, "train", "decoder", "--weights", base, "--data", data, "--output", run_dir,
                          "--batch-size", 2, "--resolution", 64, "--steps", 3, "--lora-rank", 4, "--lr", "1e-2",
                          "--no-progress")
    assert code == 0, stderr
    images = {}
    for name, flags in (("base", ["--weights", base]), ("lora", ["--weights", base, "--lora", run_dir]),
                        ("run", ["--weights", run_dir])):
        out = tmp_path / f"{name}.png"
        code, _, stderr = run(capsys, "generate", "a cat", "-o", out, "--seed", 3, *flags, *TINY_FAST)
        assert code == 0, stderr
        images[name] = _pixels(out)
    pipe = Kandinsky21.from_pretrained(str(base), progress=False).load_lora(run_dir)
    args = dict(height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2)
    python = np.asarray(pipe.text2img("a cat", generator=seed(3), **args)[0])
    assert np.array_equal(images["lora"], images["run"]) and np.array_equal(images["lora"], python)
    assert not np.array_equal(images["lora"], images["base"])
    stored = read_png_metadata(tmp_path / "run.png")["settings"]["adapters"]
    assert len(stored) == 1 and stored[0]["component"] == "unet" and stored[0]["scale"] == 1.0
    code, _, stderr = run(capsys, "generate", "--from-png", tmp_path / "lora.png", "-o", tmp_path / "again.png",
                          "--no-progress")
    assert code == 0 and np.array_equal(_pixels(tmp_path / "again.png"), images["lora"]), stderr

    # the run in diffusers' layout, adapters fused: diffusers draws our adapted image
    code, _, stderr = run(capsys, "convert", "pipeline", run_dir, tmp_path / "diffusers", "--to", "diffusers",
                          "--no-progress")
    assert code == 0, stderr
    import diffusers
    from test_layouts import load_quietly

    prior, _ = load_quietly(diffusers.KandinskyPriorPipeline, tmp_path / "diffusers" / "prior", caplog)
    decoder, _ = load_quietly(diffusers.KandinskyPipeline, tmp_path / "diffusers" / "decoder", caplog)
    generator = seed(3)
    embeds, negative = prior("a cat", num_inference_steps=2, generator=generator, return_dict=False)
    theirs = decoder("a cat", embeds, negative, height=64, width=64, num_inference_steps=2, generator=generator,
                     output_type="np").images
    ours = pipe.text2img("a cat", generator=seed(3), output_type="np", **args)
    assert np.abs(ours - theirs).max() < 2e-3
    assert np.abs(ours - pipe.unload_lora().text2img("a cat", generator=seed(3), output_type="np", **args)).max() > 0


def test_lora_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an adapter")
    code, _, stderr = run(capsys, "generate", "a cat", "--weights", "tiny", "--lora", tmp_path / "notes.txt", "-o",
                          tmp_path / "a.png", *TINY_FAST)
    assert code == 1 and "--lora:" in _one_error_line(stderr) and "notes.txt" in stderr
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check
        main(["generate", "a cat", "--weights", "tiny", "--lora", "x.safetensors:big", "-o", str(tmp_path / "a.png")])
    assert exit_info.value.code == 2 and "PATH:SCALE" in _one_error_line(capsys.readouterr().err)


def test_file_system_errors_name_the_file_in_one_line(tmp_path, capsys, monkeypatch):
    import kandinsky.png as png

    def refused(*args, **kwargs):
        raise IsADirectoryError(21, "Is a directory", str(tmp_path / "out.png"))

    monkeypatch.setattr(png, "save_png", refused)
    code, _, stderr = run(capsys, "generate", "a cat", "--weights", "tiny", "--seed", "1", "-o", tmp_path / "out.png",
                          *TINY_FAST)
    line = _one_error_line(stderr)
    assert code == 1 and line == f"kandinsky: error: {tmp_path / 'out.png'}: Is a directory" and "Errno" not in line


# ------------------------------------------------------------------------------------------- Kandinsky 2.2


TINY22 = ["--weights", "tiny", "--model", "2.2", *TINY_FAST]


def _tiny_dpt(folder: Path) -> Path:
    """A DPT depth model of random weights (a few kB) and its image processor, saved as transformers does."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=37, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 16, 16],
                       fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], is_hybrid=False, head_in_index=-1)
    DPTForDepthEstimation(config).eval().save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def test_tiny_22_runs_every_task_from_the_command_line_as_the_api_does(tmp_path, capsys):
    """generate, img2img, inpaint, mix, controlnet (--hint, --hint --image, --depth-from) with --model 2.2 give
    the pixels of Kandinsky22.from_config("tiny", seed=0) for the same seed; the PNGs record model 2.2."""
    from transformers import pipeline as transformers_pipeline

    from kandinsky.images import load_image
    from kandinsky.pipeline import Kandinsky22

    random_image(1, 64).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:32] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    random_image(2, 64).save(tmp_path / "hint.png")
    dpt = _tiny_dpt(tmp_path / "dpt")
    image, mask_image = load_image(tmp_path / "in.png", "RGB"), load_image(tmp_path / "mask.png", "L")
    hint = load_image(tmp_path / "hint.png", "RGB")
    depth = transformers_pipeline("depth-estimation", model=str(dpt))(image)["depth"].convert("RGB")

    pipe = Kandinsky22.from_config("tiny", seed=0, progress=False)
    size = dict(height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2)
    cases = {
        "generate": (["generate", "a cat"], lambda: pipe.text2img("a cat", generator=seed(3), **size)),
        "img2img": (["img2img", "a dog", "--image", tmp_path / "in.png"],
                    lambda: pipe.img2img("a dog", image, generator=seed(3), **size)),
        "inpaint": (["inpaint", "a hat", "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png"],
                    lambda: pipe.inpaint("a hat", image, mask_image, generator=seed(3), **size)),
        "mix": (["mix", "a cat", tmp_path / "in.png", "--ratios", "0.3", "0.7"],
                lambda: pipe.mix(["a cat", image], [0.3, 0.7], negative_prompt="", generator=seed(3), **size)),
        "controlnet": (["controlnet", "a robot", "--hint", tmp_path / "hint.png"],
                       lambda: pipe.controlnet("a robot", hint, generator=seed(3), **size)),
        "controlnet_img2img": (["controlnet", "a robot", "--hint", tmp_path / "hint.png", "--image",
                                tmp_path / "in.png", "--strength", "0.5"],
                               lambda: pipe.controlnet_img2img("a robot", image, hint, 0.5, generator=seed(3), **size)),
        "depth": (["controlnet", "a robot", "--depth-from", tmp_path / "in.png", "--depth-model", dpt],
                  lambda: pipe.controlnet("a robot", depth, generator=seed(3), **size)),
    }
    for name, (argv, api) in cases.items():
        out = tmp_path / f"{name}.png"
        code, stdout, stderr = run(capsys, *argv, *TINY22, "--seed", "3", "-o", out)
        assert code == 0 and stdout.strip() == str(out), (name, stderr)
        assert np.array_equal(_pixels(out), np.asarray(api()[0])), name
        settings = read_png_metadata(out)["settings"]
        assert settings["weights"] == {"source": "tiny:0", "model": "2.2"}, name
        assert settings["task"] == {"generate": "text2img", "depth": "controlnet"}.get(name, name)
    # 2.2's img2img guides at 4 by default (diffusers' KandinskyV22Img2ImgPipeline), 2.1's at 7
    assert read_png_metadata(tmp_path / "img2img.png")["settings"]["guidance_scale"] == 4.0
    code, _, stderr = run(capsys, "img2img", "a dog", "--image", tmp_path / "in.png", "--weights", "tiny",
                          *TINY_FAST, "--seed", "3", "-o", tmp_path / "k21.png")
    assert code == 0, stderr
    settings = read_png_metadata(tmp_path / "k21.png")["settings"]
    assert settings["guidance_scale"] == 7.0 and settings["weights"] == {"source": "tiny:0"}


def test_from_png_of_a_22_image_regenerates_its_pixels(tmp_path, capsys):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert run(capsys, "generate", "a cat", *TINY22, "--seed", "7", "-o", first)[0] == 0
    code, _, stderr = run(capsys, "generate", "--from-png", first, "-o", second, "--no-progress")
    assert code == 0, stderr
    assert np.array_equal(_pixels(first), _pixels(second))
    assert read_png_metadata(second)["settings"]["weights"] == {"source": "tiny:0", "model": "2.2"}
    # an explicit --model overrides the image's
    code, _, stderr = run(capsys, "generate", "--from-png", first, "-o", tmp_path / "c.png", "--model", "2.1",
                          "--no-progress")
    assert code == 0 and read_png_metadata(tmp_path / "c.png")["settings"]["weights"] == {"source": "tiny:0"}


def test_the_model_is_detected_from_the_weights(tmp_path, capsys):
    from kandinsky import tiny
    from kandinsky.cli import _default_weights, build_parser, detect_model
    from kandinsky.components import Components
    from kandinsky.pipeline import Kandinsky22

    assert detect_model("tiny") == detect_model("tiny:3") == "2.1"
    assert detect_model("kandinsky-community/kandinsky-2-2-decoder") == "2.2"
    assert detect_model("kandinsky-community/kandinsky-2-1") == "2.1"
    assert detect_model(tmp_path) == "2.1"  # a folder without UNet configs
    folder = tmp_path / "k22"
    Kandinsky22(Components(**tiny.components_22(0)), progress=False).save_pretrained(folder)
    assert detect_model(folder) == "2.2"
    for argv, weights in ((["generate", "a cat"], "kandinsky-community/kandinsky-2-1"),
                          (["generate", "a cat", "--model", "2.2"], "kandinsky-community/kandinsky-2-2-decoder"),
                          (["controlnet", "a robot", "--hint", "x.png"], "kandinsky-community/kandinsky-2-2-decoder"),
                          (["ui", "--model", "2.2"], "kandinsky-community/kandinsky-2-2-decoder"),
                          (["export", "unet", "-o", "u.onnx"], "kandinsky-community/kandinsky-2-1"),
                          (["generate", "a cat", "--model", "2.2", "--weights", "tiny"], "tiny")):
        args = build_parser().parse_args(argv)
        _default_weights(args)
        assert args.weights == weights, argv
    (tmp_path / "diffusers" / "unet").mkdir(parents=True)
    (tmp_path / "diffusers" / "unet" / "config.json").write_text('{"addition_embed_type": "image"}')
    assert detect_model(tmp_path / "diffusers") == "2.2"
    out = tmp_path / "a.png"
    code, _, stderr = run(capsys, "generate", "a cat", "--weights", folder, *TINY_FAST, "--seed", "0", "-o", out)
    assert code == 0, stderr
    assert read_png_metadata(out)["settings"]["weights"]["model"] == "2.2"


@pytest.mark.parametrize("argv, needle", [
    (["controlnet", "a robot", "--hint", "x.png", "--weights", "tiny"], "needs Kandinsky 2.2 weights"),
    (["controlnet", "a robot", "--hint", "x.png", "--weights", "tiny", "--model", "2.1"], "needs Kandinsky 2.2"),
    (["controlnet", "a robot", "--weights", "tiny", "--model", "2.2"], "one of the arguments --hint --depth-from"),
    (["controlnet", "a robot", "--hint", "x.png", "--depth-from", "y.png", "--model", "2.2"], "not allowed with"),
    (["controlnet", "a robot", "--hint", "x.png", "--strength", "0.5", "--weights", "tiny", "--model", "2.2"],
     "--strength: only with --image"),
    (["controlnet", "a robot", "--hint", "x.png", "--depth-model", "d", "--weights", "tiny", "--model", "2.2"],
     "--depth-model: only with --depth-from"),
    (["controlnet", "a robot", "--hint", "x.png", "--image", "x.png", "--strength", "2", "--weights", "tiny",
      "--model", "2.2"], "--strength: expected a number in (0, 1]"),
    (["generate", "a cat", "--weights", "tiny", "--model", "3"], "--model: invalid choice"),
    (["img2img", "a cat", "--image", "x.png", "--weights", "tiny", "--model", "2.2", "--guidance", "-1"],
     "--guidance"),
])
def test_22_argument_errors_are_one_line_before_any_model_work(tmp_path, capsys, monkeypatch, argv, needle):
    import kandinsky.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_pipeline", lambda args: pytest.fail("a model was loaded"))
    monkeypatch.setattr(cli, "_depth_hint", lambda *args: pytest.fail("a depth model was loaded"))
    try:
        code = main([str(a) for a in (*argv, "-o", tmp_path / "out.png")])
    except SystemExit as done:  # argparse's own errors
        code = done.code
    stdout, stderr = capsys.readouterr()
    assert code == 2 and needle in _one_error_line(stderr) and not stdout


def test_controlnet_help_without_torch():
    script = ("import sys\nfrom kandinsky.cli import main\n"
              "for argv in (['controlnet', '--help'], ['img2img', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit as done:\n        assert done.code == 0, argv\n"
              "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("[]") and "--depth-from" in done.stdout and "--model" in done.stdout

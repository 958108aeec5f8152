"""The trainer (kandinsky/training/: config, loop, checkpoints, cli; kandinsky/distributed.py) and kandinsky/lora.py
on a tiny base pipeline:
one process against two (torchrun, gloo, DDP and FSDP2), an interrupted-and-resumed run against an
uninterrupted one, the trained folder and LoRA adapters in the pipeline, a tiny model overfitting 4 images.

The distributed runs are few (one plain ``torchrun -m kandinsky train``, one torchrun of a driver that runs
two trainings in the same processes, and one of a driver that also watches DDP's synchronisation) and shared by
the tests through module-scoped fixtures.

Then the hardening of issue 29 (each test fails on the trainer before it: the output folder, atomic files, an
interrupted export, resume checks, non-finite losses, damaged checkpoints and caches, decompression bombs, model
configs) and behaviour checked against independent expectations (issue 25: closed-form EMA, the inpainting UNet's
input for a hand-made mask, which conditioning each dropout replaces, LoRA's alpha / rank, DDP's no_sync during
accumulation, 1 x 4 against 2 x 2 accumulation).

Kandinsky 2.2 (issue 26): its decoder from the command line (``--weights tiny --model 2.2``) loading in Kandinsky22,
a LoRA run's adapter over its base, DDP against one process (in the shared torchrun), the model's detection. The
data loader (issue 28): 0 and 2 workers train alike, ``--profile-steps`` and the idle fraction.

Tolerances: Adam divides each gradient by its running RMS, so float rounding in a gradient element near zero
can move that weight by up to the learning rate. Weights are compared without the parameters whose gradient is
zero analytically (the attention *key* biases; convolution biases that a one-channel-per-group GroupNorm
subtracts again), which is therefore pure rounding noise that Adam turns into +-lr steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from safetensors.torch import load_file
from torch import nn

import kandinsky.weights
from kandinsky import distributed, tiny
from kandinsky.cli import main
from kandinsky.components import Components
from kandinsky.lora import read_lora
from kandinsky.models.unet import UNet
from kandinsky.pipeline import Kandinsky21, Kandinsky22
from kandinsky.training import data, loop
from kandinsky.hub import model_evidence
from kandinsky.training.config import TrainConfig
from kandinsky.training.data import (
    CachedFeatures,
    batch_records,
    cache_description,
    cache_problems,
    draw_sample,
    read_records,
)
from kandinsky.training.loop import EMA, freeze, learning_rate
from kandinsky.training.losses import decoder_schedule
from kandinsky.weights import load_converted, write_base
from tiny_training import (
    EMBED_DIM,
    EMBED_DIM_22,
    RESOLUTION,
    corrupt_png_stream,
    write_jsonl_data,
    write_tiny_base,
    write_tiny_base_22,
)

STEPS = 3
LR = 1e-3
# the same run everywhere: global batch 4 = 1 process x 2 micro-batches of 2 = 2 processes x 1 micro-batch of 2
DECODER = ["--steps", str(STEPS), "--batch-size", "4", "--resolution", str(RESOLUTION), "--lr", str(LR),
           "--ema", "0.9", "--max-grad-norm", "1e6", "--save-every", "0", "--no-progress"]
PRIOR = ["--steps", str(STEPS), "--batch-size", "4", "--lr", str(LR), "--ema", "0.9", "--save-every", "0",
         "--no-progress"]
# runs several trainings in the same torchrun processes (one process group), saving process start-ups
DRIVER = """
import sys
import torch.distributed as dist
from kandinsky.cli import main
dist.init_process_group("gloo")
runs = [[]]
for arg in sys.argv[1:]:
    runs.append([]) if arg == "--next" else runs[-1].append(arg)
for argv in runs:
    if main(argv):
        sys.exit(1)
dist.destroy_process_group()
"""


def train(*args: str) -> None:
    assert main(["train", *map(str, args)]) == 0


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training")
    write_tiny_base(root / "base")
    write_tiny_base_22(root / "base22")
    write_jsonl_data(root / "data")
    return root


@pytest.fixture(scope="module")
def runs(root) -> Path:
    """One process (which builds the caches) and two processes of the same decoder and prior trainings; the 2.2
    decoder's too (detected from its UNet's config), in the same torchrun as FSDP."""
    decoder = ["--weights", root / "base", "--data", root / "data", "--cache", root / "cache", *DECODER]
    prior = ["--weights", root / "base", "--data", root / "data", "--cache", root / "prior_cache", *PRIOR]
    k22 = ["--weights", root / "base22", "--data", root / "data", "--cache", root / "cache22", *DECODER]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes (and the tests, see conftest.py): the same float rounding
    try:
        train("decoder", *decoder, "--grad-accum", "2", "--output", root / "single")
        train("prior", *prior, "--grad-accum", "2", "--output", root / "prior_single")
        train("decoder", *k22, "--grad-accum", "2", "--output", root / "k22_single")
    finally:
        torch.set_num_threads(threads)
    torchrun("-m", "kandinsky", "train", "decoder", *decoder, "--output", root / "ddp")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    torchrun(driver, "train", "decoder", *decoder, "--strategy", "fsdp", "--output", root / "fsdp", "--next",
             "train", "prior", *prior, "--output", root / "prior_ddp", "--next",
             "train", "decoder", *k22, "--num-workers", 1, "--output", root / "k22_ddp", "--next",  # (2 cores: 0 by default)
             "train", "decoder", *k22, "--strategy", "fsdp", "--output", root / "k22_fsdp")
    return root


def checkpoint(out: Path, name: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors"))


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _normalised_away() -> set[str]:
    """The UNet's convolution biases followed by a GroupNorm of one channel per group, which subtracts them."""
    from kandinsky.models.unet import ResBlock

    return {f"{path}.conv1.bias" for path, module in tiny.components()["unet"].named_modules()
            if isinstance(module, ResBlock) and module.norm2.num_groups == module.norm2.num_channels}


ZERO_GRADIENT = _normalised_away()


def without_zero_gradients(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without the entries whose gradient is zero analytically: the attention key biases (a constant
    added to every key of a query cancels in the softmax) and the biases that a GroupNorm subtracts again."""
    if name.endswith("qkv.bias"):  # [q | k | v]
        third = tensor.shape[0] // 3
        return torch.cat([tensor[:third], tensor[2 * third:]])
    if name.endswith("context_kv.bias"):  # [k | v]
        return tensor[tensor.shape[0] // 2:]
    return tensor


def max_weight_difference(a: Path, b: Path, name: str) -> float:
    x, y = checkpoint(a, name), checkpoint(b, name)
    assert x.keys() == y.keys()
    return max((without_zero_gradients(k, x[k]) - without_zero_gradients(k, y[k])).abs().max().item()
               for k in x if k not in ZERO_GRADIENT)


def assert_same_logs(a: Path, b: Path, rtol: float) -> None:
    first, second = log(a), log(b)
    assert [r["step"] for r in first] == [r["step"] for r in second] == list(range(1, STEPS + 1))
    for x, y in zip(first, second):
        for key in ("loss", "mse", "vb", "grad_norm"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=rtol), (key, x, y)


# ------------------------------------------------------------------------------------------------- distributed


def test_two_processes_train_like_one(runs):
    # measured: losses, gradient norms and weights bit-identical (the same micro-batches, sums of two terms; with
    # two threads in the single process instead of one, the weights end ~1e-5 apart)
    assert_same_logs(runs / "single", runs / "ddp", rtol=1e-6)
    for name in ("trainable", "ema"):
        assert max_weight_difference(runs / "single", runs / "ddp", name) <= 1e-6
    base = load_converted(runs / "base" / "unet").state_dict()
    moved = max((v - base[k]).abs().max().item() for k, v in checkpoint(runs / "single", "trainable").items())
    assert moved > 0.5 * STEPS * LR  # the comparison is not between untrained copies


def test_fsdp_trains_like_ddp(runs):
    # measured: losses equal to 1.6e-8 relative or better, weights 2.8e-5 (trainable) and 4.2e-6 (EMA) apart,
    # against a movement of 3.0e-3 (3 Adam steps of 1e-3)
    assert_same_logs(runs / "fsdp", runs / "ddp", rtol=1e-6)
    assert max_weight_difference(runs / "fsdp", runs / "ddp", "trainable") <= 1e-4
    assert max_weight_difference(runs / "fsdp", runs / "ddp", "ema") <= 1e-4


def test_prior_two_processes_train_like_one(runs):
    assert_same_logs(runs / "prior_single", runs / "prior_ddp", rtol=1e-6)
    for name in ("trainable", "ema"):
        assert max_weight_difference(runs / "prior_single", runs / "prior_ddp", name) <= 1e-6  # measured 0


def test_k22_decoder_two_processes_train_like_one(runs):
    """Kandinsky 2.2's decoder under DDP (2 processes, gloo) against 1 process x 2 micro-batches."""
    assert json.loads((runs / "k22_ddp" / "train_config.json").read_text())["model"] == "2.2"  # detected
    assert_same_logs(runs / "k22_single", runs / "k22_ddp", rtol=1e-6)
    assert "vb" not in log(runs / "k22_single")[0]  # 2.2: the eps objective
    for name in ("trainable", "ema"):
        assert max_weight_difference(runs / "k22_single", runs / "k22_ddp", name) <= 1e-6  # measured 0


def test_k22_decoder_fsdp_trains_like_ddp(runs):
    """Kandinsky 2.2's decoder sharded by FSDP2 against DDP, with 2.1's bounds (test_fsdp_trains_like_ddp)."""
    assert_same_logs(runs / "k22_fsdp", runs / "k22_ddp", rtol=1e-6)
    for name in ("trainable", "ema"):
        assert max_weight_difference(runs / "k22_fsdp", runs / "k22_ddp", name) <= 1e-4


# ------------------------------------------------------------------------------------------------- resume


def test_interrupted_and_resumed_run_ends_where_the_uninterrupted_one_does(runs, capsys):
    out = runs / "resumed"
    args = ["decoder", "--weights", runs / "base", "--data", runs / "data", "--cache", runs / "cache", *DECODER,
            "--grad-accum", "2", "--output", out]
    train(*args, "--stop-after", "2")
    assert [r["step"] for r in log(out)] == [1, 2]
    # what a kill during step 3 leaves: a logged step past the checkpoint and a half-written checkpoint folder
    with (out / "train_log.jsonl").open("a") as file:
        file.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    (out / "checkpoints" / ".step-0000003.123.tmp").mkdir()

    assert main(["train", *map(str, args)]) == 2  # the folder holds a run: continuing it must be asked for
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", *map(str, args), "--resume", "--seed", "1"]) == 2
    assert "other settings for ['seed']" in capsys.readouterr().err

    train(*args, "--resume")
    for name in ("trainable", "ema"):
        expected, got = checkpoint(runs / "single", name), checkpoint(out, name)
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(runs / "single")]
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-0000003"]


# ------------------------------------------------------------------------------------------------- outputs


def test_trained_folder_loads_in_place_of_the_base_and_generates(runs):
    out = runs / "single"
    assert json.loads((out / "base.json").read_text()) == {"source": str((runs / "base").resolve())}
    pipe = Kandinsky21.from_pretrained(str(out), progress=False)
    trained = load_converted(out / "unet").state_dict()
    ema = checkpoint(out, "ema")
    unet = pipe.module("unet").state_dict()
    assert all(torch.equal(unet[k], trained[k]) for k in trained)
    assert all(torch.equal(trained[k], ema[k]) for k in ema)  # with --ema the folder holds the averaged weights
    base_movq = load_converted(runs / "base" / "movq").state_dict()
    assert all(torch.equal(pipe.module("movq").state_dict()[k], v) for k, v in base_movq.items())
    image = pipe.text2img("a red cat", num_inference_steps=2, prior_num_inference_steps=2, height=RESOLUTION,
                          width=RESOLUTION, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert image.shape == (1, 3, RESOLUTION, RESOLUTION) and torch.isfinite(image).all()


def test_lora_round_trip_restores_the_base_exactly(runs):
    out = runs / "lora"
    train("decoder", "--weights", runs / "base", "--data", runs / "data", "--cache", runs / "cache", "--steps", 2,
          "--batch-size", 4, "--resolution", RESOLUTION, "--lora-rank", 4, "--lr", 1e-2, "--no-progress",
          "--output", out)
    assert not (out / "unet").exists() and (out / "lora.safetensors").is_file()
    embeds = torch.randn(1, EMBED_DIM, generator=torch.Generator().manual_seed(1))

    def decode(pipe: Kandinsky21) -> torch.Tensor:
        return pipe.decode("a red cat", embeds, torch.zeros_like(embeds), num_inference_steps=3, height=RESOLUTION,
                           width=RESOLUTION, generator=torch.Generator().manual_seed(0), output_type="pt")

    base_pipe = Kandinsky21.from_pretrained(str(runs / "base"), progress=False)
    base = decode(base_pipe)
    qkv_type = type(base_pipe.module("unet").mid_attn.qkv)  # nn.Linear, or its oneDNN kernel (kandinsky.ops)
    pipe = Kandinsky21.from_pretrained(str(out), progress=False)  # the base (base.json) with the run's adapter
    adapted = decode(pipe)
    assert (adapted - base).abs().max() > 1e-3  # measured 0.13
    pipe.unload_lora()
    assert torch.equal(decode(pipe), base)
    assert type(pipe.module("unet").mid_attn.qkv) is qkv_type
    pipe.load_lora(out, scale=1.0)
    assert torch.equal(decode(pipe), adapted)
    pipe.load_lora(out / "lora.safetensors", scale=0.0)  # adapters stack; one at scale 0 adds exactly nothing
    assert torch.equal(decode(pipe), adapted)
    pipe.unload_lora()
    assert torch.equal(decode(pipe), base)
    assert type(pipe.module("unet").mid_attn.qkv) is qkv_type
    # a LoRA over a LoRA run's output would lose the first adapter when loaded: refused
    assert main(["train", "decoder", "--weights", str(out), "--data", str(runs / "data"), "--lora-rank", "4",
                 "--output", str(runs / "lora_on_lora"), "--no-progress"]) == 2
    assert not (runs / "lora_on_lora").exists()


def test_k22_decoder_from_tiny_trains_from_the_command_line_loads_in_kandinsky22_and_generates(root):
    """``--weights tiny --model 2.2``: the tiny 2.2 base is written into the output (``tiny`` names 2.1's), so that
    ``Kandinsky22.from_pretrained(OUT)`` takes the trained UNet from the run and the rest from that base."""
    out = root / "k22_tiny"
    train("decoder", "--weights", "tiny", "--model", "2.2", "--data", root / "data", "--steps", 2, "--batch-size", 2,
          "--resolution", RESOLUTION, "--lr", LR, "--no-progress", "--output", out)
    lines = log(out)
    assert [r["step"] for r in lines] == [1, 2] and all(np.isfinite([r["loss"], r["mse"]]).all() for r in lines)
    assert "vb" not in lines[0]  # 2.2: the eps objective (diffusers' 2.2 decoder example)
    assert json.loads((out / "base.json").read_text()) == {"source": "base"}
    pipe = Kandinsky22.from_pretrained(str(out), progress=False)
    trained = load_converted(out / "unet").state_dict()
    unet = pipe.module("unet").state_dict()
    assert all(torch.equal(unet[k], trained[k]) for k in trained)
    reference = Kandinsky22.from_config("tiny", progress=False)
    assert not same(trained, reference.module("unet").state_dict())
    assert same(pipe.module("movq").state_dict(), reference.module("movq").state_dict())
    image = pipe.text2img("a red cat", num_inference_steps=2, prior_num_inference_steps=2, height=RESOLUTION,
                          width=RESOLUTION, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert image.shape == (1, 3, RESOLUTION, RESOLUTION) and torch.isfinite(image).all()


def test_k22_lora_loads_over_its_base_as_2_1s_does(root):
    out = root / "k22_lora"
    train("decoder", "--weights", root / "base22", "--data", root / "data", "--steps", 2, "--batch-size", 4,
          "--resolution", RESOLUTION, "--lora-rank", 4, "--lr", 1e-2, "--no-progress", "--output", out)
    assert not (out / "unet").exists() and read_lora(out)[1]["component"] == "unet"
    embeds = torch.randn(1, EMBED_DIM_22, generator=torch.Generator().manual_seed(1))

    def decode(pipe: Kandinsky22) -> torch.Tensor:
        return pipe.decode("a red cat", embeds, torch.zeros_like(embeds), num_inference_steps=3, height=RESOLUTION,
                           width=RESOLUTION, generator=torch.Generator().manual_seed(0), output_type="pt")

    base = decode(Kandinsky22.from_pretrained(str(root / "base22"), progress=False))
    pipe = Kandinsky22.from_pretrained(str(root / "base22"), progress=False).load_lora(out / "lora.safetensors")
    adapted = decode(pipe)
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(decode(Kandinsky22.from_pretrained(str(out), progress=False)), adapted)  # base.json + adapter
    assert torch.equal(decode(pipe.unload_lora()), base)


def test_tiny_decoder_overfits_four_images(root):
    out = root / "overfit"
    train("decoder", "--weights", root / "base", "--data", root / "data", "--cache", root / "overfit_cache",
          "--steps", 30, "--batch-size", 4, "--resolution", RESOLUTION, "--lr", 3e-3, "--objective", "eps",
          "--text-dropout", 0, "--image-dropout", 0, "--save-every", 0, "--no-progress", "--output", out)
    losses = [r["loss"] for r in log(out)]
    # measured: 0.88 over the first five steps, 0.25 over the last five
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_gradient_checkpointing_and_mixed_precision(root):
    common = ["--weights", root / "base", "--data", root / "data", "--cache", root / "inpaint_cache", "--steps", 2,
              "--batch-size", 2, "--resolution", RESOLUTION, "--save-every", 0, "--no-progress", "--lr", LR]
    train("inpaint", *common, "--output", root / "plain")
    train("inpaint", *common, "--gradient-checkpointing", "--output", root / "recomputed")
    plain, recomputed = checkpoint(root / "plain", "trainable", 2), checkpoint(root / "recomputed", "trainable", 2)
    # the recomputed forward is the same float32 arithmetic: measured bit-identical
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)
    train("inpaint", *common, "--mixed-precision", "bf16", "--freeze", "resblocks", "--output", root / "bf16")
    bf16 = checkpoint(root / "bf16", "trainable", 2)
    base = load_converted(root / "base" / "unet_inpaint").state_dict()
    assert "down_blocks.0.res.conv1.weight" not in bf16 and "mid_attn.qkv.weight" in bf16
    exported = load_converted(root / "bf16" / "unet_inpaint").state_dict()
    assert torch.equal(exported["down_blocks.0.res.conv1.weight"], base["down_blocks.0.res.conv1.weight"])
    losses = [r["loss"] for r in log(root / "bf16")]
    assert losses == pytest.approx([r["loss"] for r in log(root / "plain")], rel=0.05)  # bf16: ~1e-2 relative


def test_cpu_training_runs_the_winograd_convolutions(root, cache, tmp_path, monkeypatch):
    """On the CPU the trained UNet's residual-block convolutions are kandinsky.ops.cpu.Conv3x3, whose float32
    Winograd paths are differentiable. Forced onto the tiny model's 8x8 and 4x4 maps (the full-size model's thresholds
    are 32x32 and 128 channels), a step takes them and trains like the plain layers: the same loss and gradient norm."""
    from kandinsky.ops import cpu

    with monkeypatch.context() as patch:
        patch.setattr(cpu, "optimize_training", lambda model: model)  # the plain layers
        train(*quick(root, cache, "--max-grad-norm", 1e6), "--output", tmp_path / "plain")
    for name in ("WINOGRAD43_MIN_CHANNELS", "WINOGRAD43_MIN_PIXELS", "TRAIN_WINOGRAD_MIN_PIXELS"):
        monkeypatch.setattr(cpu, name, 1)
    calls = []
    real_forward, real_weight_grad = cpu.winograd43_conv3x3, cpu._winograd_weight_grad
    monkeypatch.setattr(cpu, "winograd43_conv3x3", lambda *a: calls.append("input grad" if a[3:] else "forward")
                        or real_forward(*a))
    monkeypatch.setattr(cpu, "_winograd_weight_grad", lambda *a, **k: calls.append("weight grad")
                        or real_weight_grad(*a, **k))
    train(*quick(root, cache, "--max-grad-norm", 1e6), "--output", tmp_path / "winograd")
    # the 26 of the 42 residual-block convolutions on 8x8 and 4x4 maps (the 2x2 maps are not multiples of 4)
    assert calls.count("forward") == calls.count("input grad") == calls.count("weight grad") == 26
    (plain,), (winograd,) = log(tmp_path / "plain"), log(tmp_path / "winograd")
    # F(4x4, 3x3)'s float32 rounding, a few 1e-6 of each layer's outputs and gradients: measured the same float32
    # loss, and the gradient norm 2.2e-7 apart (relative)
    assert winograd["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert winograd["grad_norm"] == pytest.approx(plain["grad_norm"], rel=3e-6)


def test_trainer_and_benchmark_swap_the_convolutions_on_the_cpu_only():
    """kandinsky bench train builds our side as the trainer does (loop.training_kernels)."""
    from kandinsky.models.unet import ResBlock
    from kandinsky.ops.cpu import Conv3x3

    def kinds(model):
        return {type(conv) for block in model.modules() if isinstance(block, ResBlock)
                for conv in (block.conv1, block.conv2)}

    unet = tiny.components()["unet"]
    assert kinds(loop.training_kernels(unet, "cuda")) == {nn.Conv2d}
    assert kinds(loop.training_kernels(unet, "cpu")) == {Conv3x3}
    assert type(unet.conv_in) is nn.Conv2d  # (only the residual blocks')
    pytest.importorskip("diffusers")
    from kandinsky.benchmark import train as bench

    assert kinds(bench._build("ours", bench.unet_config("tiny"), checkpointing=False)) == {Conv3x3}


# ------------------------------------------------------------------------------------------------- pieces


def test_freeze_follows_the_original_names():
    unet = tiny.components()["unet"]
    freeze(unet, ["resblocks"])
    frozen = {name for name, p in unet.named_parameters() if not p.requires_grad}
    assert frozen and all(n.split(".")[-2] in ("norm1", "conv1", "emb_proj", "norm2", "conv2") for n in frozen)
    assert any(n.endswith("skip.weight") for n, p in unet.named_parameters() if p.requires_grad)
    freeze(unet, ["attention"])
    frozen = {name for name, p in unet.named_parameters() if not p.requires_grad} - frozen
    assert {n.split(".")[-2] for n in frozen} == {"qkv", "proj_out"}


def test_training_takes_its_models_from_components_not_a_pipeline():
    from test_structure import PACKAGE, imported_units

    for path in sorted((PACKAGE / "training").glob("*.py")):
        assert "pipeline" not in imported_units(path), f"kandinsky/training/{path.name} imports the pipeline"


def test_learning_rate_warmup():
    config = TrainConfig(task="decoder", weights="w", data="d", output="o", lr=1e-4, lr_warmup=4)
    assert [learning_rate(config, s) for s in range(6)] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])
    assert TrainConfig(task="decoder", weights="w", data="d", output="o", lora_rank=4).resolved_lr == 1e-4


@pytest.mark.parametrize("args, message", [
    (["decoder", "--batch-size", "3", "--grad-accum", "2"], "--batch-size: the global batch (3) must split evenly"),
    (["decoder", "--lr", "inf"], "--lr: expected a finite number, got inf"),
    (["decoder", "--lr", "nan"], "--lr: expected a finite number, got nan"),
    (["decoder", "--weight-decay", "nan"], "--weight-decay: expected a finite number"),
    (["decoder", "--max-grad-norm", "inf"], "--max-grad-norm: expected a finite number"),
    (["decoder", "--objective", "eps", "--snr-gamma", "inf"], "--snr-gamma: expected a finite number"),
    (["decoder", "--lora-rank", "4", "--lora-alpha", "inf"], "--lora-alpha: expected a finite number"),
    (["decoder", "--text-dropout", "nan"], "--text-dropout: expected a finite number"),
    (["decoder", "--snr-gamma", "5"], "--snr-gamma: Min-SNR weighting needs --objective eps"),
    (["prior", "--freeze", "attention"], "--freeze: the original's resblocks/attention freezing"),
    (["decoder", "--lora-rank", "4", "--freeze", "resblocks"], "use either --freeze or --lora-rank"),
    (["decoder", "--resolution", "100"], "--resolution: expected a multiple of 64"),
    (["decoder", "--ema", "1.5"], "--ema: expected a decay in (0, 1)"),
    (["decoder", "--model", "2.2", "--objective", "original"], "--objective original: Kandinsky 2.2 has no original"),
    (["inpaint", "--model", "2.2", "--text-dropout", "0.2"], "--text-dropout: the Kandinsky 2.2 decoder reads no text"),
    (["decoder", "--num-workers", "0", "--prefetch-factor", "2"], "--prefetch-factor: only with data-loader workers"),
    (["decoder", "--num-workers", "-1"], "--num-workers: expected an integer >= 0, got -1"),
    (["decoder", "--profile-steps", "-2"], "--profile-steps: expected an integer >= 0, got -2"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(["train", *args, "--weights", str(tmp_path), "--data", str(tmp_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kandinsky: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_model_is_detected_from_the_weights_and_a_contradicting_model_refused(root, tmp_path, capsys):
    assert model_evidence("tiny") is None and model_evidence("kandinsky-community/kandinsky-2-1") is None
    assert model_evidence("kandinsky-community/kandinsky-2-2-decoder")[0] == "2.2"
    assert model_evidence(str(root / "base"))[0] == "2.1" and model_evidence(str(root / "base22"))[0] == "2.2"
    run_output = write_base(tmp_path / "lora_run", root / "base22").parent  # no UNet of its own: its base's
    assert model_evidence(str(run_output))[0] == "2.2"
    code, err = run(capsys, *quick(root, None, "--model", "2.2"), "--output", tmp_path / "o")
    assert code == 2 and "--model 2.2: --weights" in error_line(err) and "holds Kandinsky 2.1 weights" in err
    assert not (tmp_path / "o").exists()


def test_bad_data_is_a_runtime_error(tmp_path, capsys):
    code = main(["train", "decoder", "--weights", str(tmp_path), "--data", str(tmp_path / "nothing"),
                 "--output", str(tmp_path / "o")])
    assert code == 1 and "kandinsky: error: data: no such folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- hardening (issue 29)
# Each test below fails on the trainer before issue 29's changes. Runs are 1-3 steps of the tiny decoder on the
# shared encoder cache (a second or two each).


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes and the tests (conftest.py): the same float rounding
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(root) -> Path:
    """The decoder features of root/data (the cache the distributed runs use too)."""
    if not (root / "cache" / "index.json").is_file():
        with one_thread():
            train("decoder", "--weights", root / "base", "--data", root / "data", "--cache", root / "cache",
                  "--steps", 1, "--batch-size", 2, "--resolution", RESOLUTION, "--no-progress",
                  "--output", root / "cache_builder")
    return root / "cache"


def quick(root: Path, cache: Path | None, *extra) -> list:
    """A tiny decoder run's arguments (add --output): batch 2, one step unless ``extra`` says otherwise."""
    args = ["decoder", "--weights", root / "base", "--data", root / "data", "--batch-size", 2, "--resolution",
            RESOLUTION, "--lr", LR, "--steps", 1, "--no-progress"]
    return args + (["--cache", cache] if cache is not None else []) + list(extra)


def run(capsys, *args) -> tuple[int, str]:
    """``kandinsky train ARGS``: the exit code and what went to stderr."""
    code = main(["train", *map(str, args)])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one error line of a failed command (progress bars of model loading may precede it; no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("kandinsky: error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "[Errno" not in err, err
    return lines[0]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_output_that_is_the_weights_folder_or_one_of_its_bases_is_refused(root, tmp_path, capsys):
    """issue 29 item 1: ``--weights base --output base`` replaced the base UNet and pointed base.json at itself."""
    base = tmp_path / "base"
    shutil.copytree(root / "base", base)
    before = sorted(str(p.relative_to(base)) for p in base.rglob("*"))
    derived = write_base(tmp_path / "run", base).parent  # a previous run's output: its base.json leads to base
    for weights, output in ((base, base), (derived, base), (base, tmp_path)):
        code, err = run(capsys, *quick(root, None, "--weights", weights), "--output", output)
        line = error_line(err)
        assert code == 2 and line.startswith("kandinsky: error: --output: ") and "replace the weights it reads" in line
    assert sorted(str(p.relative_to(base)) for p in base.rglob("*")) == before


def test_output_folder_of_other_files_is_refused_before_any_work(root, tmp_path, capsys):
    """issue 29 items 2 and 10: a user's folder got train_config.json and checkpoints; a file as --output or
    --cache was a bare [Errno 17] after training."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    code, err = run(capsys, *quick(root, None), "--output", notes)
    assert code == 2 and "is not empty and is not a training run's folder" in error_line(err)
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    file = tmp_path / "a_file"
    file.write_text("x")
    code, err = run(capsys, *quick(root, None), "--output", file)
    assert code == 2 and f"--output: {file} is a file, not a folder" in error_line(err)
    code, err = run(capsys, *quick(root, file), "--output", tmp_path / "new")
    assert code == 2 and f"--cache: {file} is a file, not a folder" in error_line(err)
    assert not (tmp_path / "new").exists() and file.read_text() == "x"


def test_a_folder_is_written_by_one_run_at_a_time(root, cache, tmp_path, capsys):
    """Two runs into one --output (a --resume while the first still trains): the second stops with one line and
    writes nothing; once the first has ended the folder is free (its lock file alone counts as empty)."""
    from filelock import FileLock

    from kandinsky.training.checkpoints import CONFIG_FILE, LOCK_FILE

    out = tmp_path / "o"
    out.mkdir()
    with FileLock(str(out / LOCK_FILE)):  # another run holds the folder
        code, err = run(capsys, *quick(root, cache), "--output", out)
        assert code == 2 and "is being written by another kandinsky train run" in error_line(err)
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    code, err = run(capsys, *quick(root, cache), "--output", out)
    assert code == 0, err
    assert (out / CONFIG_FILE).is_file()
    code, err = run(capsys, *quick(root, cache, "--steps", 2), "--output", out, "--resume")  # the lock was released
    assert code == 0, err


def test_small_json_files_are_replaced_atomically(root, cache, tmp_path, monkeypatch):
    """issue 29 item 2: train_config.json and the cut-back log were plain writes. An empty folder is a fine
    --output."""
    replaced = []
    real = os.replace

    def spy(source, target, *args, **kwargs):
        replaced.append(Path(target).name)
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "empty"
    out.mkdir()
    train(*quick(root, cache, "--steps", 2, "--stop-after", 1), "--output", out)
    assert {"train_config.json", "base.json", "export.json"} <= set(replaced)
    replaced.clear()
    train(*quick(root, cache, "--steps", 2), "--output", out, "--resume")
    assert {"train_config.json", "base.json", "train_log.jsonl", "export.json"} <= set(replaced)


def test_export_interrupted_by_ctrl_c_is_redone_on_resume(root, cache, tmp_path, monkeypatch):
    """issue 29 item 3: Ctrl-C during the final export, then --resume, exited 0 with the older export."""
    out = tmp_path / "run"
    args = [*quick(root, cache, "--steps", 2, "--save-every", 1), "--output", out]
    real, calls = kandinsky.weights.save_converted, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the final export (step 2), after its checkpoint was written
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(kandinsky.weights, "save_converted", interrupted)
    assert main(["train", *map(str, args)]) == 130
    monkeypatch.undo()
    final = checkpoint(out, "trainable", 2)
    assert not same(final, {k: v for k, v in load_converted(out / "unet").state_dict().items() if k in final})
    train(*args, "--resume")
    assert same(final, {k: v for k, v in load_converted(out / "unet").state_dict().items() if k in final})
    assert json.loads((out / "export.json").read_text())["step"] == 2


def test_resume_refuses_other_base_weights_and_accepts_the_default_lr_given_explicitly(root, cache, tmp_path, capsys):
    """issue 29 item 4: --resume with other --weights continued the adapters on another base; --lr 1e-5 (the
    default, given explicitly) was refused."""
    out = tmp_path / "run"
    args = ["decoder", "--weights", root / "base", "--data", root / "data", "--cache", cache, "--batch-size", 2,
            "--resolution", RESOLUTION, "--steps", 2, "--no-progress", "--output", out]  # the default --lr
    train(*args, "--stop-after", 1)
    code, err = run(capsys, *args, "--resume", "--weights", "tiny")
    assert code == 2 and "other settings for ['weights']" in error_line(err)
    code, err = run(capsys, *args, "--resume", "--revision", "main")
    assert code == 2 and "other settings for ['revision']" in error_line(err)
    train(*args, "--resume", "--lr", "1e-5")
    assert [r["step"] for r in log(out)] == [1, 2]


def nan_loss_at_call(monkeypatch, bad: int) -> None:
    """The decoder loss of the ``bad``-th micro-batch (1-based) becomes NaN."""
    real, calls = loop.decoder_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return {k: v * float("nan") for k, v in out.items()} if len(calls) == bad else out

    monkeypatch.setattr(loop, "decoder_loss", loss)


def test_non_finite_loss_stops_before_the_optimizer_step(root, cache, tmp_path, monkeypatch, capsys):
    """issue 29 item 5: a NaN loss trained on and exported NaN weights with exit 0."""
    nan_loss_at_call(monkeypatch, 2)
    out = tmp_path / "run"
    code, err = run(capsys, *quick(root, cache, "--steps", 3, "--save-every", 1, "--keep-checkpoints", 3),
                    "--output", out)
    line = error_line(err)
    assert code == 1 and "step 2: the loss is nan" in line and "last checkpoint step-0000001" in line
    assert "--skip-nonfinite-steps" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    first = checkpoint(out, "trainable", 1)
    assert same(first, {k: v for k, v in load_converted(out / "unet").state_dict().items() if k in first})
    assert json.loads((out / "export.json").read_text())["step"] == 1


def test_skip_nonfinite_steps_skips_that_optimizer_step_and_counts_it(root, cache, tmp_path, monkeypatch, capsys):
    nan_loss_at_call(monkeypatch, 2)
    out = tmp_path / "run"
    code, err = run(capsys, *quick(root, cache, "--steps", 3, "--save-every", 1, "--keep-checkpoints", 3, "--ema",
                                   0.9, "--skip-nonfinite-steps"), "--output", out)
    assert code == 0 and "step 2: the loss is nan; its optimizer step is skipped (1 so far)" in err
    lines = log(out)
    assert [r.get("skipped", False) for r in lines] == [False, True, False]
    assert [r["skipped_steps"] for r in lines] == [0, 1, 1] and lines[1]["loss"] is None
    for name in ("trainable", "ema"):
        one, two, three = (checkpoint(out, name, step) for step in (1, 2, 3))
        assert same(one, two) and not same(two, three) and all(torch.isfinite(v).all() for v in three.values())
    steps = [torch.load(out / "checkpoints" / f"step-000000{s}" / "optimizer.pt", weights_only=True)["optimizer"]
             for s in (1, 2)]
    assert [{float(v["step"]) for v in o["state"].values()} for o in steps] == [{1.0}, {1.0}]  # Adam: no step 2


@pytest.fixture(scope="module")
def resumable(root, cache) -> list:
    """A run stopped after 2 of 3 steps (checkpoints of steps 1 and 2), and the same run uninterrupted."""
    args = quick(root, cache, "--steps", 3, "--save-every", 1, "--keep-checkpoints", 2)
    with one_thread():
        train(*args, "--output", root / "uninterrupted")
        train(*args, "--stop-after", 2, "--output", root / "stopped")
    return args


DAMAGE = {
    "state.json of {}": ("state.json", lambda path: path.write_text("{}")),
    "truncated trainable.safetensors": ("trainable.safetensors", lambda path: path.write_bytes(path.read_bytes()[:999])),
    "corrupt optimizer.pt": ("optimizer.pt", lambda path: path.write_bytes(b"not a checkpoint")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_over_a_damaged_newest_checkpoint(root, resumable, tmp_path, capsys, damage):
    """issue 29 item 8: a damaged newest checkpoint was a traceback (KeyError, SafetensorError, UnpicklingError)."""
    out = tmp_path / "run"
    shutil.copytree(root / "stopped", out)
    name, spoil = DAMAGE[damage]
    spoil(out / "checkpoints" / "step-0000002" / name)
    code, err = run(capsys, *resumable, "--output", out, "--resume")
    warnings = [line for line in err.splitlines() if line.startswith("kandinsky: warning: ")]
    assert code == 0 and len(warnings) == 1 and name in warnings[0] and "resumes from step-0000001" in warnings[0]
    # continued from step 1, the run ends where the uninterrupted one does
    assert same(checkpoint(root / "uninterrupted", "trainable"), checkpoint(out, "trainable"))
    assert (out / "checkpoints" / "damaged-step-0000002" / name).is_file()
    assert [r["step"] for r in log(out)] == [1, 2, 3]


def test_resume_with_no_complete_checkpoint_is_one_line(root, resumable, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(root / "stopped", out)
    (out / "checkpoints" / "step-0000002" / "state.json").write_text("{")
    trainable = out / "checkpoints" / "step-0000001" / "trainable.safetensors"
    trainable.write_bytes(trainable.read_bytes()[:999])
    code, err = run(capsys, *resumable, "--output", out, "--resume")
    line = error_line(err)
    assert code == 1 and "--resume: no complete checkpoint in" in line and "step-0000002/state.json" in line
    assert "(and 1 more damaged)" in line


def test_damaged_cache_shard_is_encoded_again(root, cache, tmp_path, capsys):
    """issue 29 item 9: a truncated cache shard was reused (a SafetensorError traceback mid-run)."""
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shard = copy / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    code, err = run(capsys, *quick(root, copy), "--output", tmp_path / "run")
    assert code == 0 and "has damaged files (shard-00000.safetensors" in err
    description = cache_description("decoder", read_records(root / "data"), RESOLUTION,
                                    {"source": str((root / "base").resolve())})
    assert cache_problems(copy, description) == []
    again, original = load_file(str(shard)), load_file(str(cache / "shard-00000.safetensors"))
    assert again.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(again[key], original[key], rtol=1e-5, atol=1e-6)  # measured: equal


def test_decompression_bomb_in_the_data_is_refused_before_any_work(root, tmp_path, monkeypatch, capsys):
    """issue 29 item 9: an image over PIL's pixel limit was decoded anyway (a warning)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # the 96 x 80 training images are then "bombs"
    code, err = run(capsys, *quick(root, None), "--output", tmp_path / "run")
    assert code == 1 and "image_0.png: refused as a decompression bomb" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_invalid_model_config_in_the_weights_is_one_line(root, tmp_path, capsys):
    """issue 29 item 11: training takes no --config, but a model config comes with --weights; a negative group
    count loaded and failed in the first forward pass with a traceback."""
    weights = tmp_path / "weights"
    shutil.copytree(root / "base" / "unet", weights / "unet")
    write_base(weights, root / "base")
    config_file = weights / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["config"]["norm_groups"] = -1
    config_file.write_text(json.dumps(config))
    code, err = run(capsys, *quick(root, None, "--weights", weights), "--output", tmp_path / "run")
    assert code == 1 and "config.json: norm_groups: expected a positive integer, got -1" in error_line(err)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------- behaviour (issue 25)


def test_ema_after_k_steps_is_the_closed_form(root, cache, tmp_path):
    """Constant parameters p from e0: ema_k = d^k e0 + (1 - d^k) p. A run: ema_3 = d^3 p0 + d^2 (1 - d) p1 +
    d (1 - d) p2 + (1 - d) p3, from the base weights p0 and the trained weights of every step's checkpoint."""
    decay = 0.9
    start, target = torch.randn(5, generator=torch.Generator().manual_seed(1)), torch.randn(5)
    parameter = nn.Parameter(start.clone())
    ema = EMA({"w": parameter}, decay)
    with torch.no_grad():
        parameter.copy_(target)
    for k in range(1, 8):
        ema.update({"w": parameter})
        expected = decay ** k * start + (1 - decay ** k) * target
        torch.testing.assert_close(ema.average["w"], expected, rtol=0, atol=1e-6)

    out = tmp_path / "run"
    train(*quick(root, cache, "--steps", 3, "--save-every", 1, "--keep-checkpoints", 3, "--ema", decay), "--output", out)
    base = load_converted(root / "base" / "unet").state_dict()
    weights = [checkpoint(out, "trainable", step) for step in (1, 2, 3)]
    average = checkpoint(out, "ema", 3)
    assert not same(weights[2], {k: base[k] for k in weights[2]})
    d = decay
    for key, value in average.items():
        p0, p1, p2, p3 = base[key].double(), *(w[key].double() for w in weights)
        expected = d ** 3 * p0 + d ** 2 * (1 - d) * p1 + d * (1 - d) * p2 + (1 - d) * p3
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)  # float32 updates: ~1e-7


def test_inpainting_unet_gets_the_masked_latents_known_where_the_mask_is_1(root, cache, monkeypatch, tmp_path,
                                                                            original_fixture):
    """The 9 input channels of the inpainting UNet for a hand-made mask: [x_t ; latents * mask ; mask], mask 1 =
    latent pixel given (kept), 0 = to generate. The convention is the original trainer's, as its recorded call
    shows (trainer_2_1_uclip.py: image_mask = 1 - generate_mask; inpaint_image = x_start * inpaint_mask)."""
    tensors, _ = original_fixture("train_unet_inpaint")
    assert torch.equal(tensors["input.inpaint_image"], tensors["input.x_start"] * tensors["input.inpaint_mask"])
    size = RESOLUTION // 8
    mask = np.zeros((size, size), dtype=np.float32)
    mask[:, :size // 2] = 1  # the left half known
    mask[0, -1] = 1  # and one pixel on the right: not symmetric
    monkeypatch.setattr(data, "inpaint_mask", lambda height, width, rng: mask.copy())
    seen, forward = [], UNet.forward

    def spy(self, x, *args, **kwargs):
        seen.append(x.detach().clone())
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", spy)
    train("inpaint", *quick(root, cache)[1:], "--output", tmp_path / "inpaint")  # the decoders' cache serves
    (x,) = seen
    latents = CachedFeatures(cache).features(batch_records(0, 0, 2, 4))["latents"]
    known = torch.from_numpy(mask)
    assert x.shape == (2, 9, size, size)
    assert torch.equal(x[:, 8], known.expand(2, size, size))
    assert torch.equal(x[:, 4:8], latents * known)
    assert x[:, 4:8][..., known == 0].abs().max() == 0 and latents[..., known == 0].abs().max() > 0
    draws = [draw_sample(0, 0, i, latents.shape[1:], text_dropout=0.5, image_dropout=0.1, mask_size=(size, size))
             for i in range(2)]
    ab = decoder_schedule().alphas_cumprod[[d.timestep for d in draws]].view(-1, 1, 1, 1)
    noise = torch.stack([d.noise for d in draws])
    x_t = ab.sqrt().float() * latents + (1 - ab).sqrt().float() * noise
    torch.testing.assert_close(x[:, :4], x_t, rtol=0, atol=1e-6)


@pytest.mark.parametrize("text, image", [(1, 0), (0, 1)])
def test_text_and_image_dropout_each_replace_their_own_conditioning(root, cache, tmp_path, monkeypatch, text, image):
    """--text-dropout replaces the text features (pooled and hidden states) by the empty caption's, --image-dropout
    the CLIP image embedding by the zero image's; neither touches the other."""
    seen, real = [], loop.decoder_loss
    monkeypatch.setattr(loop, "decoder_loss", lambda *args, **kwargs: seen.append(kwargs) or real(*args, **kwargs))
    train(*quick(root, cache, "--batch-size", 4, "--text-dropout", text, "--image-dropout", image),
          "--output", tmp_path / "run")
    (given,) = seen
    cached = CachedFeatures(cache)
    features = cached.features(batch_records(0, 0, 4, 4))
    for key, dropped in (("text_hidden_states", text), ("text_embeds", text), ("image_embeds", image)):
        null = cached.null[key].expand_as(features[key])
        assert not torch.equal(features[key], null)
        assert torch.equal(given[key], null if dropped else features[key]), key


def test_lora_alpha_scales_the_adapter_by_alpha_over_rank_in_training_and_loading(root, cache, tmp_path):
    """With alpha 8 and rank 2 an adapted layer computes x (W + 8/2 B A)^T + b: in the training run's model and in
    the model loaded from the run's output."""
    out = tmp_path / "lora"
    train(*quick(root, cache, "--steps", 2, "--lora-rank", 2, "--lora-alpha", 8, "--lr", 1e-2), "--output", out)
    weights, meta = read_lora(out)
    assert (meta["rank"], meta["alpha"]) == (2, 8.0)
    name = "mid_attn.qkv"
    down, up = weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"]
    assert up.abs().max() > 1e-3  # trained away from its zero initialisation
    base = load_converted(root / "base" / "unet").state_dict()
    weight, bias = base[f"{name}.weight"], base[f"{name}.bias"]
    x = torch.randn(3, weight.shape[1])
    expected = x @ (weight + 8 / 2 * up @ down).T + bias
    unscaled = x @ (weight + up @ down).T + bias
    assert (expected - unscaled).abs().max() > 1e-3
    with torch.no_grad():
        loaded = Components.from_pretrained(str(out)).module("unet").get_submodule(name)(x)
        torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)
        # the training model: the run's own (its checkpoint loaded, nothing left to train)
        config = TrainConfig.from_json(json.loads((out / "train_config.json").read_text()))
        trained = loop.Run(dataclasses.replace(config, resume=True), distributed.Processes()).model
        torch.testing.assert_close(trained.get_submodule(name)(x), expected, rtol=1e-5, atol=1e-5)


# ---- the data loader and the profile (issue 28)


def test_data_loader_workers_leave_the_run_unchanged(root, tmp_path):
    """Without a cache (images decoded, masks drawn in the workers), 0 and 2 workers: the same losses and weights."""
    args = ["inpaint", *quick(root, None, "--steps", 2)[1:]]
    for workers in (0, 2):
        train(*args, "--num-workers", workers, "--output", tmp_path / f"workers{workers}")
    assert [{k: r[k] for k in ("loss", "mse", "vb")} for r in log(tmp_path / "workers0")] == \
        [{k: r[k] for k in ("loss", "mse", "vb")} for r in log(tmp_path / "workers2")]
    assert same(checkpoint(tmp_path / "workers0", "trainable", 2), checkpoint(tmp_path / "workers2", "trainable", 2))


def test_profile_steps_report_the_idle_fraction(root, cache, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(capsys, *quick(root, cache, "--steps", 2, "--profile-steps", 1), "--output", out)
    assert code == 0
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert (summary["steps"], summary["first_step"], summary["last_step"]) == (1, 2, 2)
    assert 0 <= summary["idle_fraction"] < 1 and summary["data_wait_s"] + summary["inputs_s"] < summary["wall_s"]
    assert (out / "profile" / "trace.json").stat().st_size > 0
    (line,) = [line for line in err.splitlines() if line.startswith("kandinsky: profile: step 2 took ")]
    assert f"(idle fraction {100 * summary['idle_fraction']:.2f}%)" in line
    assert all(r["data_s"] >= 0 for r in log(out))


def test_idle_fraction_is_the_data_wait_over_the_step_time():
    from kandinsky.training.profiling import DATA_WAIT, INPUTS, STEP, summarize

    events = [(STEP, 0.0, 1.0, False), (STEP, 1.0, 2.0, False), (DATA_WAIT, 0.0, 0.1, False),
              (DATA_WAIT, 1.0, 1.3, False), (INPUTS, 0.1, 0.2, False), ("aten::mm", 0.3, 0.9, False),
              ("kernel", 0.5, 0.9, True), ("kernel", 0.8, 1.2, True), ("kernel", 1.5, 3.0, True)]
    summary = summarize(events, 2)
    assert summary["wall_s"] == 2.0 and summary["idle_fraction"] == pytest.approx(0.2)
    assert summary["inputs_fraction"] == pytest.approx(0.05)
    assert summary["device_busy_fraction"] == pytest.approx((0.7 + 0.5) / 2)  # the kernels' union inside the steps
    assert "device_busy_fraction" not in summarize(events[:-3], 2)


# ---- several processes: gradient synchronisation, 1 x 4 against 2 x 2 accumulation, a corrupt image mid-run

SPY_DRIVER = """
import contextlib, datetime, io, json, os, sys
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
import kandinsky.distributed
from kandinsky.cli import main

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
events, wrap = [], kandinsky.distributed.wrap


def spying_wrap(model, *args, **kwargs):
    # DDP's gradient all-reduce seen through a communication hook (it runs only when DDP synchronises), and
    # whether each forward pass was told to synchronise (DDP reads require_backward_grad_sync there)
    wrapped = wrap(model, *args, **kwargs)
    if isinstance(wrapped, DistributedDataParallel):
        def hook(state, bucket):
            events.append("allreduce")
            return allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, hook)
        forward = wrapped.forward

        def spying_forward(*a, **k):
            events.append("forward sync" if wrapped.require_backward_grad_sync else "forward no_sync")
            return forward(*a, **k)

        wrapped.forward = spying_forward
    return wrapped


kandinsky.distributed.wrap = spying_wrap
runs = [[]]
for arg in sys.argv[2:]:
    runs.append([]) if arg == "--next" else runs[-1].append(arg)
report = []
for argv in runs:
    events.clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    report.append({"code": code, "events": list(events), "stderr": err.getvalue()})
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as file:
    json.dump(report, file)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def accumulation(root, cache):
    """Global batch 4 of micro-batches of 1: 1 process x 4 accumulation steps, and (one torchrun) 2 processes x 2
    under DDP with its synchronisation recorded; then, in the same processes, a run on data whose last image
    passes the header check but cannot be decoded (by a data-loader worker)."""
    common = quick(root, cache, "--steps", 2, "--batch-size", 4, "--save-every", 1, "--keep-checkpoints", 2)
    with one_thread():
        train(*common, "--grad-accum", 4, "--output", root / "accumulated")
    corrupt = write_jsonl_data(root / "corrupt_data")
    corrupt_png_stream(corrupt / "image_3.png")
    report = root / "report"
    report.mkdir()
    driver = root / "spy_driver.py"
    driver.write_text(SPY_DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", driver, report,
               "train", *common, "--grad-accum", 2, "--output", root / "distributed", "--next",
               "train", *quick(root, None, "--batch-size", 4, "--data", corrupt), "--num-workers", 1,  # read there
               "--output", root / "corrupt_run"]
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]
    return root, done.stderr, ranks


def test_ddp_synchronises_gradients_only_on_the_last_micro_batch(accumulation):
    """Under DDP with --grad-accum 2: the first micro-batch's backward pass runs under no_sync (no all-reduce),
    the last one's synchronises (DDP's all-reduce runs); the same on every process."""
    _, _, ranks = accumulation
    for report in ranks:
        assert report[0]["code"] == 0
        segments = []  # (forward, all-reduces until the next forward)
        for event in report[0]["events"]:
            if event.startswith("forward"):
                segments.append([event, 0])
            else:
                segments[-1][1] += 1
        assert [s[0] for s in segments] == ["forward no_sync", "forward sync"] * 2  # 2 steps x 2 micro-batches
        # (one all-reduce per gradient bucket; DDP regroups its buckets after the first step, so their count may
        # change between steps)
        assert [s[1] == 0 for s in segments] == [True, False] * 2


def test_one_process_with_4_accumulation_steps_updates_like_two_processes_with_2(accumulation):
    """The same global batch and micro-batches: the first optimizer step's update (trained minus base weights,
    every weight) agrees to 1e-5 of its norm (measured 4.6e-7: the gradients are summed in another order,
    ((g1 + g2) + g3) + g4 against (g1 + g2) + (g3 + g4), see docs/training.md for the other splits)."""
    root, _, _ = accumulation
    base = load_converted(root / "base" / "unet").state_dict()
    one, two = checkpoint(root / "accumulated", "trainable", 1), checkpoint(root / "distributed", "trainable", 1)
    update_one = torch.cat([(one[k] - base[k]).flatten() for k in sorted(one)])
    update_two = torch.cat([(two[k] - base[k]).flatten() for k in sorted(one)])
    assert update_one.norm() > 0.5 * LR * update_one.numel() ** 0.5  # a real step: Adam moves each weight ~lr
    assert (update_one - update_two).norm() <= 1e-5 * update_one.norm()
    first, second = log(root / "accumulated")[0], log(root / "distributed")[0]
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6)


def test_corrupt_image_found_mid_run_stops_every_process_with_one_line(accumulation):
    """issue 29 item 9: the image passes the check before the first step (its checksums are intact) and fails
    when decoded by one process: both stop at that step (exit 1), one error line between them, no gloo
    traceback from the process that would have waited for the other."""
    root, stderr, ranks = accumulation
    assert [report[1]["code"] for report in ranks] == [1, 1]
    lines = [line for report in ranks for line in report[1]["stderr"].splitlines()
             if line.startswith("kandinsky: error: ")]
    assert len(lines) == 1 and "image_3.png: cannot read image" in lines[0]
    assert "Traceback" not in stderr and "gloo" not in stderr.lower()
    assert not (root / "corrupt_run" / "checkpoints").exists()

"""The trainer (kandinsky/training/: config, loop, checkpoints, cli; kandinsky/distributed.py) and kandinsky/lora.py
on a tiny base pipeline:
one process against two (torchrun, gloo, DDP and FSDP2), an interrupted-and-resumed run against an
uninterrupted one, the trained folder and LoRA adapters in the pipeline, a tiny model overfitting 4 images.

The distributed runs are few (one plain ``torchrun -m kandinsky train`` and one torchrun of a driver that runs
two trainings in the same processes) and shared by the tests through module-scoped fixtures.

Tolerances: Adam divides each gradient by its running RMS, so float rounding in a gradient element near zero
can move that weight by up to the learning rate. Weights are compared without the parameters whose gradient is
zero analytically (the attention *key* biases; convolution biases that a one-channel-per-group GroupNorm
subtracts again), which is therefore pure rounding noise that Adam turns into +-lr steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kandinsky import tiny
from kandinsky.cli import main
from kandinsky.pipeline import Kandinsky21
from kandinsky.training.config import TrainConfig
from kandinsky.training.loop import freeze, learning_rate
from kandinsky.weights import load_converted
from tiny_training import EMBED_DIM, RESOLUTION, write_jsonl_data, write_tiny_base

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
    write_jsonl_data(root / "data")
    return root


@pytest.fixture(scope="module")
def runs(root) -> Path:
    """One process (which builds the caches) and two processes of the same decoder and prior trainings."""
    decoder = ["--weights", root / "base", "--data", root / "data", "--cache", root / "cache", *DECODER]
    prior = ["--weights", root / "base", "--data", root / "data", "--cache", root / "prior_cache", *PRIOR]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes (and the tests, see conftest.py): the same float rounding
    try:
        train("decoder", *decoder, "--grad-accum", "2", "--output", root / "single")
        train("prior", *prior, "--grad-accum", "2", "--output", root / "prior_single")
    finally:
        torch.set_num_threads(threads)
    torchrun("-m", "kandinsky", "train", "decoder", *decoder, "--output", root / "ddp")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    torchrun(driver, "train", "decoder", *decoder, "--strategy", "fsdp", "--output", root / "fsdp", "--next",
             "train", "prior", *prior, "--output", root / "prior_ddp")
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
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(["train", *args, "--weights", str(tmp_path), "--data", str(tmp_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kandinsky: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_bad_data_is_a_runtime_error(tmp_path, capsys):
    code = main(["train", "decoder", "--weights", str(tmp_path), "--data", str(tmp_path / "nothing"),
                 "--output", str(tmp_path / "o")])
    assert code == 1 and "kandinsky: error: data: no such folder" in capsys.readouterr().err

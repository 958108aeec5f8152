"""CUDA checks: they run where a GPU is present (a lent GPU machine: ``python -m pytest tests/test_cuda.py``)
and are skipped elsewhere, CI included. The same code runs on the CPU in the other test files; what these add
is the device: no host synchronisation inside the sampling loops, and the pipeline on CUDA matching diffusers
on CUDA."""

from __future__ import annotations

import pytest
import torch

from kandinsky import schedulers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 would make float32 comparisons as loose as bf16 ones."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture(scope="module")
def pipelines():
    pytest.importorskip("diffusers")
    from kandinsky.benchmark.gpu import build

    return build("tiny", CUDA, torch.float32)


def _denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in model with a learned-variance half, computed on the device from x and t alone."""
    scale = torch.cos(t.float() / 1000)[:, None, None, None]
    return torch.cat([0.5 * torch.tanh(x) * scale + 0.1 * x, 0.3 * torch.tanh(x)], dim=1)


@pytest.mark.parametrize("name", schedulers.SAMPLERS)
def test_sampling_loops_never_wait_for_the_gpu(name):
    from kandinsky.benchmark.gpu import count_syncs

    schedule = schedulers.NoiseSchedule.linear(1000, 0.00085, 0.012)
    timesteps = schedulers.sampler_timesteps(name, schedule, 6)
    x = torch.randn(2, 4, 8, 8, device=CUDA)
    generator = torch.Generator().manual_seed(0)  # a CPU generator with CUDA latents: diffusers' convention
    out = {}

    def run():
        out["x"] = schedulers.sample(name, _denoiser, x, schedule, timesteps, generator=generator, progress=False)

    assert count_syncs(run) == 0
    # the same draws as on the CPU: the asynchronous pinned copy moves the numbers unchanged
    on_cpu = schedulers.sample(name, _denoiser, x.cpu(), schedule, timesteps,
                               generator=torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(out["x"].cpu(), on_cpu, rtol=1e-4, atol=1e-4)


def test_randn_with_a_cpu_generator_matches_the_cpu_draw():
    expected = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    drawn = schedulers.randn((3, 5), torch.Generator().manual_seed(4), CUDA)
    assert drawn.device.type == "cuda"
    assert torch.equal(drawn.cpu(), expected)


def test_text2img_on_cuda_matches_diffusers_and_never_syncs_in_the_loops(pipelines):
    from kandinsky.benchmark.gpu import count_syncs
    from kandinsky.benchmark.pipeline import text2img_diffusers, text2img_ours

    _, _, combined, ours = pipelines
    images = {}
    # one decoder step: the random-weight trajectory is chaotic over several (see test_benchmark)
    sync_count = count_syncs(lambda: images.update(ours=text2img_ours(ours, 64, (2, 1))), sampling_loops_only=True)
    theirs = text2img_diffusers(combined, 64, (2, 1))
    assert sync_count == 0
    # float32 on both sides (TF32 off); on the CPU the same comparison gives 2.4e-5 (1.1e-3 before our prior
    # sampler took diffusers' float32 unCLIP arithmetic)
    assert abs(images["ours"] - theirs).max() < 5e-3


def test_half_precision_unet_on_cuda_tracks_float32(pipelines):
    from kandinsky.parity.unet import inputs, run_ours

    unet = pipelines[3].module("unet")
    batch = {k: v.to(CUDA) for k, v in inputs(unet.config, height=16, width=16).items()}
    try:
        with torch.inference_mode():
            reference = run_ours(unet, batch).float()
            for dtype in (torch.float16, torch.bfloat16):
                half = run_ours(unet.to(dtype), {k: v.to(dtype) if v.is_floating_point() else v
                                                  for k, v in batch.items()}).float()
                relative = ((half - reference).abs().max() / reference.abs().max()).item()
                # 11 (float16) / 8 (bfloat16) mantissa bits through a few layers
                assert relative < (5e-3 if dtype == torch.float16 else 3e-2), (dtype, relative)
    finally:
        unet.float()  # the module-scoped pipeline is shared with the other tests


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_on_cuda_keep_float32_statistics(dtype):
    """Our norms' statistics are float32 for half-precision inputs on CUDA too. PyTorch's own half GroupNorm
    kernel fails this (its mean is stored in the input dtype: off by 0.017 in float16, 0.093 in bfloat16 on
    an H200), which is why GroupNorm32 upcasts."""
    from kandinsky.models.layers import GroupNorm32, LayerNorm32

    generator = torch.Generator().manual_seed(0)
    x = (50 + torch.randn(2, 64, 8, 8, generator=generator)).to(CUDA, dtype)
    group_norm, layer_norm = GroupNorm32(8, 64).to(CUDA, dtype), LayerNorm32(64).to(CUDA, dtype)
    exact = x.double()
    groups = exact.view(2, 8, -1)
    expected_group = ((groups - groups.mean(-1, keepdim=True)) / (groups.var(-1, unbiased=False, keepdim=True)
                                                                  + 1e-5).sqrt()).view_as(exact)
    rows = exact.permute(0, 2, 3, 1)
    expected_layer = (rows - rows.mean(-1, keepdim=True)) / (rows.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3  # one rounding of outputs of magnitude up to ~3
    with torch.inference_mode():
        torch.testing.assert_close(group_norm(x).double(), expected_group, rtol=0, atol=tolerance)
        torch.testing.assert_close(layer_norm(x.permute(0, 2, 3, 1)).double(), expected_layer, rtol=0, atol=tolerance)

"""kandinsky.ops: every fast kernel against the plain layer it replaces, and optimize() / plain() on the
tiny models (parameters shared, keys unchanged, no copies, same outputs)."""

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kandinsky import ops
from kandinsky.models import config_from_dict, model_class
from kandinsky.models.movq import AttentionBlock, Upsample
from kandinsky.ops import cpu, native
from kandinsky.ops.cpu import (HALF_ENV, Conv3x3, FusedMoVQResBlock, FusedUNetResBlock, OneDNNLastQueryBlock, OneDNNLinear, UpcastAttentionInput,
                               UpcastConv2d, UpcastConv3x3, UpcastLastQueryBlock, UpcastLinear,
                               UpcastSubpixelUpsample, float_weight, gemm_conv3x3, native_half, onednn_dtypes,
                               onednn_linear, winograd43_conv3x3, winograd_conv3x3)
from kandinsky.ops.generic import FastModule, LastQueryBlock, PaddingFreePrior, SubpixelUpsample, swap
from kandinsky.parity import movq as movq_parity
from kandinsky.parity import prior as prior_parity
from kandinsky.parity import unet as unet_parity
from kandinsky.testing import conv3x3_case, max_errors, randomize_
from kandinsky.weights import load_converted, save_converted

ROOT = Path(__file__).resolve().parent.parent
CHANNELS_LAST = torch.channels_last


def _tiny(component: str, seed: int = 0) -> nn.Module:
    config = config_from_dict(component, json.loads((ROOT / "configs" / f"{component}_tiny.json").read_text()))
    return randomize_(model_class(component)(config), seed).eval()


def _run(component: str, model: nn.Module) -> list[torch.Tensor]:
    """The outputs of one forward of a tiny model (MoVQ: encode of 64x64 images, decode of 8x8 latents)."""
    if component == "unet":
        return [unet_parity.run_ours(model, unet_parity.inputs(model.config))]
    if component == "prior":
        return [prior_parity.run_ours(model, prior_parity.inputs(model.config))]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return [model.encode(images), model.decode(latents)]


def _direct(x, weight, bias):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)


# --- CPU convolution --------------------------------------------------------------------------------

@pytest.fixture(params=["compiled", "torch"])
def transforms(request, monkeypatch):
    """The Winograd transforms compiled (:mod:`kandinsky.ops.native`) or as torch operations (a machine without a
    C compiler); counts the compiled calls (``{"input": n, "output": n, "adjoint": n, "columns": n, "activated": n,
    "spatial": n}``, the last two the input transforms that applied a fused norm and SiLU, and of those MoVQ's
    spatial norms; "columns": the GEMM path's columns for contiguous kernels; "kernel": the Winograd kernel
    transforms of contiguous kernels)."""
    calls = {"input": 0, "output": 0, "adjoint": 0, "columns": 0, "kernel": 0}
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
        return calls
    if native.library() is None:
        pytest.skip("no C compiler here: the compiled transforms are not built")
    calls["activated"] = calls["spatial"] = 0
    for name, function in (("input", "input_tiles"), ("output", "output_tiles"), ("adjoint", "output_adjoint_tiles"),
                           ("columns", "columns3x3"), ("kernel", "winograd_kernel")):
        def counted(*args, _name=name, _original=getattr(native, function)):
            calls[_name] += 1
            activation = args[5] if _name == "input" and len(args) > 5 else None
            calls["activated"] += activation is not None
            calls["spatial"] += activation is not None and activation[0].shape[1:3] != (1, 1)
            return _original(*args)
        monkeypatch.setattr(native, function, counted)
    calls["compiled"] = True
    return calls


# Bounds relative to the output scale. F(2x2, 3x3) transforms with +-1, +-1/2 and the GEMM over 9 * C products:
# a few float32 roundings (measured ~4e-7 and ~3e-7). F(4x4, 3x3)'s transforms scale by up to 8 and 1/24, so its
# roundings grow to measured <= 7.4e-6 (these shapes <= 4.8e-6; 384 to 3072 input channels 6.0e-6 to 7.4e-6),
# against the bound of 1e-4. 70 and 72 rows at batch 2: several bands of tile rows, the last one shorter;
# 384 channels: the UNet's narrowest.
@pytest.mark.parametrize("convolve, shape, bound", [
    *[(winograd_conv3x3, shape, 5e-6)
      for shape in [(2, 8, 16, 32, 32), (3, 16, 8, 6, 10), (1, 4, 12, 2, 2), (2, 24, 24, 70, 36)]],
    *[(gemm_conv3x3, shape, 5e-6) for shape in [(2, 12, 20, 8, 12), (1, 16, 8, 16, 16), (3, 4, 6, 1, 5)]],
    *[(winograd43_conv3x3, shape, 2e-5)
      for shape in [(2, 8, 16, 32, 32), (3, 16, 8, 8, 12), (1, 4, 12, 4, 4), (2, 24, 24, 72, 36), (1, 384, 16, 8, 8)]],
])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kernel_layout", ["channels_last", "contiguous"])  # optimized in memory / loaded from a file
def test_fast_convolutions_match_the_direct_one(transforms, convolve, shape, bound, with_bias, kernel_layout):
    x, weight, bias = conv3x3_case(*shape)
    weight = weight.contiguous() if kernel_layout == "contiguous" else weight
    bias = bias if with_bias else None
    out = convolve(x, weight, bias)
    reference = _direct(x, weight, bias)
    assert out.shape == reference.shape and out.is_contiguous(memory_format=CHANNELS_LAST)
    assert (out.double() - reference).abs().max() < bound * reference.abs().max()
    if "compiled" in transforms and convolve is not gemm_conv3x3:
        assert transforms["input"] >= 1 and transforms["output"] == transforms["input"]
        assert transforms["kernel"] == (kernel_layout == "contiguous")
    if "compiled" in transforms and convolve is gemm_conv3x3:  # the columns in the contiguous kernel's order
        assert transforms["columns"] == (kernel_layout == "contiguous")


def test_compiled_transforms_read_maps_in_any_layout_with_contiguous_channels(transforms):
    """The compiled input transform reads a map in place (batch, row and pixel strides as given): a channels-last
    slice of a wider map, and a contiguous map copied to channels-last first."""
    x, weight, bias = conv3x3_case(2, 16, 8, 12, 16)
    wider = torch.randn(2, 16, 12, 24).contiguous(memory_format=CHANNELS_LAST)
    wider[..., 8:] = x
    for view in (wider[..., 8:], x.contiguous()):
        out = winograd43_conv3x3(view, weight, bias)
        assert max_errors(out, _direct(x, weight, bias))[1] < 2e-5


def test_compiled_transforms_reject_maps_without_contiguous_channels():
    if native.library() is None:
        pytest.skip("no C compiler here: the compiled transforms are not built")
    x = torch.randn(1, 8, 8, 8)
    with pytest.raises(ValueError, match="contiguous channels"):
        native.input_tiles(x, 4, 0, 2, torch.empty(6, 6, 1, 2, 2, 8))
    with pytest.raises(ValueError, match="float32"):
        native.input_tiles(x.double().contiguous(memory_format=CHANNELS_LAST), 4, 0, 2, torch.empty(6, 6, 1, 2, 2, 8))


def test_compiled_kernel_transform_rejects_what_it_cannot_read():
    if native.library() is None:
        pytest.skip("no C compiler here: the compiled transforms are not built")
    weight, transform = torch.randn(4, 3, 3, 3), torch.tensor(cpu._WINOGRAD43_G, dtype=torch.float32)
    with pytest.raises(ValueError, match="weight: expected a contiguous float32"):
        native.winograd_kernel(weight.to(memory_format=CHANNELS_LAST), transform, False, torch.empty(36, 4, 3))
    with pytest.raises(ValueError, match=r"transform: expected a float32 \(T, 3\)"):
        native.winograd_kernel(weight, torch.zeros(7, 3), False, torch.empty(49, 4, 3))
    with pytest.raises(ValueError, match=r"out: expected a contiguous float32 \(36, 4, 3\)"):
        native.winograd_kernel(weight, transform, False, torch.empty(16, 4, 3))


@pytest.mark.parametrize("memory_format", [CHANNELS_LAST, torch.contiguous_format])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_scale_shift_is_the_norm(memory_format, affine):
    """norm(x) == x * scale + shift per sample and channel; x off-centre (mean 5, spread 3) so that the variance
    from the moments must not cancel badly."""
    if native.library() is None:
        pytest.skip("no C compiler here: the compiled transforms are not built")
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 12, 6, 10, generator=generator) * 3 + 5).contiguous(memory_format=memory_format)
    norm = nn.GroupNorm(4, 12, eps=1e-6, affine=affine)
    if affine:
        randomize_(norm, 1)
    scale, shift = cpu.group_norm_scale_shift(norm, x)
    assert scale.shape == shift.shape == (2, 12) and scale.dtype == torch.float32
    # measured 4.8e-7 of the output scale (float32 rounding of the affine map and of torch's own statistics)
    assert max_errors(x * scale[:, :, None, None] + shift[:, :, None, None], norm(x))[1] < 5e-6


@pytest.mark.parametrize("tile, shape, blocks", [
    (4, (2, 16, 8, 12, 16), None), (4, (2, 24, 24, 72, 36), None), (2, (3, 16, 8, 6, 10), None),
    (4, (1, 8, 12, 4, 4), None), (4, (2, 16, 8, 12, 16), (3, 4)), (2, (3, 16, 8, 6, 10), (2, 5))])
def test_activated_convolution_is_the_convolution_of_the_activated_map(monkeypatch, transforms, tile, shape, blocks):
    """conv.convolve_activated(x, scale, shift) == conv(silu(x * scale + shift)): the activation before the zero
    padding (a border of silu(shift) would be wrong), for both tiles, one and several bands, a scale and shift per
    channel or per (h, w) block of pixels (``blocks``: MoVQ's spatial norm), and through the fallback that computes
    the activated map first (no compiled transforms)."""
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(cpu, "WINOGRAD43_MIN_CHANNELS", 1 if tile == 4 else 10 ** 6)
    monkeypatch.setattr(cpu, "WINOGRAD43_MIN_PIXELS", 1)
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_PIXELS", 1)
    x, weight, bias = conv3x3_case(*shape)
    generator = torch.Generator().manual_seed(3)
    size = shape[:2] if blocks is None else (*shape[:2], *blocks)
    scale = torch.rand(size, generator=generator) * 2 + 0.5
    shift = torch.randn(size, generator=generator) * 2  # SiLU's curved part and both tails
    conv = nn.Conv2d(shape[1], shape[2], 3, padding=1)
    conv.weight.data, conv.bias.data = weight, bias
    swap(conv, Conv3x3)
    with torch.no_grad():
        out = conv.convolve_activated(x, scale, shift)
    if blocks is None:
        pixel_scale, pixel_shift = scale[:, :, None, None], shift[:, :, None, None]
    else:  # pixel (y, x) takes block (y // (H / h), x // (W / w))
        pixel_scale, pixel_shift = (t.repeat_interleave(shape[3] // blocks[0], 2).repeat_interleave(shape[4] // blocks[1], 3)
                                    for t in (scale, shift))
    activated = F.silu(x.double() * pixel_scale.double() + pixel_shift.double())
    reference = _direct(activated, weight, bias)
    assert max_errors(out, reference)[1] < (2e-5 if tile == 4 else 5e-6)  # the convolutions' own bounds above
    if "compiled" in transforms:
        assert transforms["activated"] == transforms["input"] >= 1
        assert transforms["spatial"] == (0 if blocks is None else transforms["input"])


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_kernels_on_several_threads(threads):
    """The compiled kernels split their work over OpenMP threads (torch's runtime and thread count; the suite runs
    on one): the per-thread moments must all be summed, and the tiles must not depend on the split."""
    if native.library() is None:
        pytest.skip("no C compiler here: the compiled transforms are not built")
    x, weight, bias = conv3x3_case(2, 24, 16, 72, 36)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        moments = native.channel_moments(x)
        out = winograd43_conv3x3(x, weight, bias)
    finally:
        torch.set_num_threads(before)
    expected = torch.stack([x.double().sum((2, 3)), x.double().square().sum((2, 3))], dim=1)
    assert torch.allclose(moments, expected, rtol=1e-12, atol=0)
    # the transforms are per tile; only the GEMMs may sum in another order on another thread count
    assert max_errors(out, winograd43_conv3x3(x, weight, bias))[1] < 1e-6


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """native.library() built anew (into an empty cache under tmp_path) by the test, and again afterwards."""
    monkeypatch.setenv("KANDINSKY21_CACHE", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path / "native"
    native.library.cache_clear()


def test_compiled_transforms_build_where_there_is_a_compiler(fresh_library):
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here")
    assert native.library() is not None
    built = list(fresh_library.glob("winograd-*.so"))
    assert len(built) == 1 and not list(fresh_library.glob("tmp*"))  # no temporary left behind
    assert native._build(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")) == built[0]


def test_compiled_transforms_are_built_per_cpu(monkeypatch, fresh_library):
    """-march=native code must never run on another CPU (a home directory shared by machines): the CPU's flags are
    part of the cached file's name."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler here")
    first = native._build(compiler)
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : fpu sse2 avx2")
    second = native._build(compiler)
    assert first != second and first.exists() and second.exists()


def test_compiled_transforms_switched_off_by_the_environment(monkeypatch, fresh_library):
    monkeypatch.setenv(native.ENV, "0")
    assert native.library() is None
    assert not fresh_library.exists()


def test_a_failed_build_warns_once_and_convolves_with_torch(monkeypatch, fresh_library, tmp_path):
    broken = tmp_path / "cc"
    broken.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "cc 1.0"; exit 0; }\necho "error: no such flag" >&2\n'
                      "exit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.warns(RuntimeWarning, match="no such flag"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the failed build is not retried
        x, weight, bias = conv3x3_case(1, 8, 8, 8, 8)
        assert max_errors(winograd43_conv3x3(x, weight, bias), _direct(x, weight, bias))[1] < 2e-5


def test_reused_buffers_made_under_inference_mode_serve_later_calls(monkeypatch):
    """The per-thread kernel and weight buffers outlive the call that made them: made under inference_mode, they
    must still be writable by a later call under no_grad (an inference tensor would not be)."""
    monkeypatch.setattr(cpu, "_kernel_scratch", cpu.threading.local())
    monkeypatch.setattr(cpu, "_scratch", cpu.threading.local())
    x, weight, bias = conv3x3_case(1, 8, 8, 8, 8)
    with torch.inference_mode():
        first = winograd43_conv3x3(x, weight, bias).clone(), float_weight(weight.bfloat16(), x).clone()
    with torch.no_grad():
        again = winograd43_conv3x3(x, weight, bias), float_weight(weight.bfloat16(), x)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("convolve, tile", [(winograd_conv3x3, 2), (winograd43_conv3x3, 4)])
def test_winograd_rejects_sizes_off_the_tile_and_mismatched_kernels(convolve, tile):
    x, weight, bias = conv3x3_case(1, 4, 8, 2 * tile, 2 * tile + 1)
    with pytest.raises(ValueError, match=f"x: .*divisible by {tile}, got {2 * tile}x{2 * tile + 1}"):
        convolve(x, weight, bias)
    x, weight, bias = conv3x3_case(1, 4, 8, 2 * tile, 2 * tile)
    with pytest.raises(ValueError, match="weight"):
        convolve(x, weight[:, :3], bias)


def _fast_conv(in_channels: int, out_channels: int) -> Conv3x3:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1).to(memory_format=CHANNELS_LAST)
    swap(conv, Conv3x3)
    return conv


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (8, 12), (33, 35), (40, 24), (30, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv3x3_dispatch_and_results(monkeypatch, size, dtype):
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_CHANNELS", 1)  # so that small test layers take it too
    calls = []
    monkeypatch.setattr(cpu, "winograd_conv3x3", lambda *a: calls.append("winograd") or winograd_conv3x3(*a))
    monkeypatch.setattr(cpu, "gemm_conv3x3", lambda *a: calls.append("gemm") or gemm_conv3x3(*a))
    torch.manual_seed(0)
    conv = _fast_conv(12, 20).to(dtype)
    x = torch.randn(2, 12, *size).contiguous(memory_format=CHANNELS_LAST).to(dtype)
    with torch.no_grad():
        out = conv(x)
    reference = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    # of the output scale: float32 a few roundings (measured 4e-7); bfloat16 its output rounding (measured 4e-3)
    tolerance = 5e-6 if dtype == torch.float32 else 1e-2
    assert (out.double() - reference).abs().max() < tolerance * reference.abs().max()
    pixels, even = size[0] * size[1], size[0] % 2 == 0 and size[1] % 2 == 0
    if pixels <= cpu.GEMM_MAX_PIXELS:
        expected = ["gemm"]
    elif dtype == torch.float32 and even and pixels >= cpu.WINOGRAD_MIN_PIXELS:
        expected = ["winograd"]
    else:
        expected = []  # oneDNN's direct convolution
    assert calls == expected


def test_conv3x3_takes_winograd_only_from_the_channel_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "winograd_conv3x3", lambda *a: calls.append(a[0].shape[1]) or winograd_conv3x3(*a))
    with torch.no_grad():
        for channels in (cpu.WINOGRAD_MIN_CHANNELS // 2, cpu.WINOGRAD_MIN_CHANNELS):
            _fast_conv(channels, channels)(torch.randn(1, channels, 32, 34))  # 34: not F(4x4, 3x3)
    assert calls == [cpu.WINOGRAD_MIN_CHANNELS]


@pytest.mark.parametrize("size, expected", [((24, 24), "winograd43"), ((32, 36), "winograd43"), ((32, 34), "winograd"),
                                            ((26, 26), "direct"), ((16, 16), "winograd43"), ((12, 12), "gemm"),
                                            ((12, 16), "gemm")])
def test_conv3x3_takes_winograd43_for_sides_divisible_by_4(monkeypatch, size, expected):
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_CHANNELS", 1)
    calls = []
    for name in ("winograd43_conv3x3", "winograd_conv3x3", "gemm_conv3x3"):
        monkeypatch.setattr(cpu, name, lambda *a, f=getattr(cpu, name), n=name: calls.append(n) or f(*a))
    channels = cpu.WINOGRAD43_MIN_CHANNELS
    conv, x = _fast_conv(channels, channels), torch.randn(1, channels, *size)
    with torch.no_grad():
        out = conv(x)
    assert calls == ([] if expected == "direct" else [f"{expected}_conv3x3"])
    # measured <= 7.4e-6 of the output scale for F(4x4, 3x3) (test_fast_convolutions_match_the_direct_one)
    assert max_errors(out, F.conv2d(x, conv.weight, conv.bias, padding=1))[1] < 2e-5


# --- CPU convolution under autograd (training) ---------------------------------------------------------

def _gradients(convolve, x, weight, bias, grad_y) -> list[torch.Tensor]:
    """[grad x, grad weight, grad bias] of ``convolve(x, weight, bias)`` for the output gradient ``grad_y``."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    convolve(*leaves).backward(grad_y)
    return [t.grad for t in leaves]


BIAS_GRAD_BOUND = 2e-6


def _case(shape, seed=0):
    """A conv3x3_case in the trainer's layout (contiguous) and an output gradient of about unit scale."""
    x, weight, bias = (t.contiguous() for t in conv3x3_case(*shape, seed=seed))
    grad_y = torch.randn(shape[0], shape[2], *shape[3:], generator=torch.Generator().manual_seed(seed + 1))
    return x, weight, bias, grad_y


# Bounds relative to each gradient's max abs, ~10x the measured errors against the float64 gradients: F(4x4, 3x3)
# input and weight gradients (both by Winograd, transforms scaling by up to 8 and 1/24 as in the forward) measured
# <= 7.9e-6 on these shapes (at full size, 384 channels on 64x64 maps: 1.7e-5 and 9.4e-6, as the forward's),
# F(2x2, 3x3)'s <= 5.1e-7 (7.3e-7 on others); the bias gradient is a float32 sum over the batch and the pixels,
# the same for both tiles (measured <= 2.0e-7, bound BIAS_GRAD_BOUND).
# (2, 128, 128, 16, 16): WINOGRAD43_MIN_CHANNELS wide; 72 and 70 rows at batch 2: several bands of tile rows
# (accumulated weight gradient), the last one shorter; K != C: the swapped channel roles of the input gradient.
@pytest.mark.parametrize("tile, shape, bound", [
    *[(4, shape, 8e-5) for shape in [(2, 128, 128, 16, 16), (2, 24, 16, 72, 36), (1, 8, 12, 4, 4), (3, 16, 8, 8, 12)]],
    *[(2, shape, 8e-6) for shape in [(2, 24, 16, 70, 36), (1, 8, 12, 2, 2), (2, 16, 24, 6, 10)]],
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_winograd_function_gradients_match_the_direct_convolution(transforms, tile, shape, bound, layout):
    x, weight, bias, grad_y = _case(shape)
    if layout == "channels_last":  # (the optimized inference model's layout, under autograd)
        x, weight, grad_y = (t.contiguous(memory_format=CHANNELS_LAST) for t in (x, weight, grad_y))
    reference = _gradients(lambda *a: F.conv2d(*a, padding=1), x.double(), weight.double(), bias.double(),
                           grad_y.double())
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = cpu.WinogradConv3x3.apply(*leaves, tile)
    out.backward(grad_y)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    assert max_errors(out, expected)[1] < bound
    for name, leaf, ref in zip(("x", "weight", "bias"), leaves, reference):
        assert leaf.grad.shape == ref.shape
        assert max_errors(leaf.grad, ref)[1] < (BIAS_GRAD_BOUND if name == "bias" else bound), name
    # the output and the gradients keep their tensors' memory format (the rest of a contiguous model stays so)
    memory_format = CHANNELS_LAST if layout == "channels_last" else torch.contiguous_format
    for tensor in (out, leaves[0].grad, leaves[1].grad):
        assert tensor.is_contiguous(memory_format=memory_format)
    if "compiled" in transforms:  # forward, input gradient and weight gradient
        assert transforms["adjoint"] >= 1 and transforms["input"] == 3 * transforms["adjoint"]
        assert transforms["kernel"] == (2 if layout == "contiguous" else 0)  # the forward's and its transpose


def test_winograd_function_leaves_frozen_inputs_without_gradients():
    """A frozen layer (--freeze resblocks) and the first layer (an input that needs no gradient)."""
    x, weight, bias, grad_y = _case((1, 8, 12, 8, 8))
    reference = _gradients(lambda *a: F.conv2d(*a, padding=1), x.double(), weight.double(), bias.double(),
                           grad_y.double())
    frozen = [x.clone().requires_grad_(), weight.clone(), bias.clone()]
    cpu.WinogradConv3x3.apply(*frozen, 4).backward(grad_y)
    assert frozen[1].grad is None and frozen[2].grad is None
    assert max_errors(frozen[0].grad, reference[0])[1] < 8e-5
    first = [x.clone(), weight.clone().requires_grad_(), None]
    cpu.WinogradConv3x3.apply(*first, 4).backward(grad_y)
    assert first[0].grad is None and max_errors(first[1].grad, reference[1])[1] < 8e-5


def _spy_winograd(monkeypatch) -> list[str]:
    """Record the Winograd calls of Conv3x3 and WinogradConv3x3: 'forward F(4x4)', 'input grad F(2x2)', 'weight
    grad F(4x4)', ..."""
    calls = []
    for name, tile in (("winograd43_conv3x3", 4), ("winograd_conv3x3", 2)):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, real=real, tile=tile: calls.append(
            f"{'input grad' if len(a) > 3 and a[3] else 'forward'} F({tile}x{tile})") or real(*a))
    real_grad = cpu._winograd_weight_grad
    monkeypatch.setattr(cpu, "_winograd_weight_grad", lambda *a, **k: calls.append(
        f"weight grad F({k['tile']}x{k['tile']})") or real_grad(*a, **k))
    return calls


@pytest.mark.parametrize("size, tile", [(32, 4), (34, 2)])
def test_conv3x3_under_autograd_takes_the_winograd_path(monkeypatch, size, tile):
    """Float32 training on the CPU: the forward, the input gradient and the weight gradient all by Winograd, with
    the plain layer's gradients (contiguous tensors, as the trainer's)."""
    calls = _spy_winograd(monkeypatch)
    conv = _fast_conv(256, 256).to(memory_format=torch.contiguous_format)
    x, _, _, grad_y = _case((1, 256, 256, size, size))
    with torch.no_grad():
        conv(x)
    assert calls == [f"forward F({tile}x{tile})"]  # the kernel this size takes without autograd, too
    calls.clear()
    expected = _gradients(lambda *a: F.conv2d(*a, padding=1), x, conv.weight, conv.bias, grad_y)
    grads = _gradients(conv.convolve, x, conv.weight, conv.bias, grad_y)
    assert calls == [f"{what} F({tile}x{tile})" for what in ("forward", "input grad", "weight grad")]
    # float32 against float32: F(4x4, 3x3)'s rounding dominates (bounds of the test above)
    for ours, theirs in zip(grads, expected):
        assert max_errors(ours, theirs)[1] < (8e-5 if tile == 4 else 8e-6)
    x = x.clone().requires_grad_()
    out = conv(x)
    out.backward(grad_y)  # the module's own parameters accumulate their gradients
    assert out.is_contiguous() and x.grad.is_contiguous() and conv.weight.grad.is_contiguous()
    assert max_errors(conv.weight.grad, expected[1])[1] < 8e-5


@pytest.mark.parametrize("size, channels, expected", [
    ((32, 32), 128, "winograd"), ((16, 16), 128, "gemm"),  # Winograd under autograd from TRAIN_WINOGRAD_MIN_PIXELS
    ((8, 8), 48, "gemm"), ((8, 8), 40, "direct"), ((20, 20), 48, "direct")])  # GEMM: small maps, many channels
def test_conv3x3_under_autograd_dispatch(monkeypatch, size, channels, expected):
    monkeypatch.setattr(cpu, "TRAIN_GEMM_MIN_CHANNELS", 48)  # (1024 at full size) so that small layers take it
    calls = _spy_winograd(monkeypatch)
    monkeypatch.setattr(cpu, "gemm_conv3x3", lambda *a, real=gemm_conv3x3: calls.append("gemm") or real(*a))
    conv = _fast_conv(channels, channels).to(memory_format=torch.contiguous_format)
    x, _, _, grad_y = _case((1, channels, channels, *size))
    expected_grads = _gradients(lambda *a: F.conv2d(*a, padding=1), x, conv.weight, conv.bias, grad_y)
    leaves = [t.detach().clone().requires_grad_() for t in (x, conv.weight, conv.bias)]
    out = conv.convolve(*leaves)
    out.backward(grad_y)
    paths = {"winograd": ["forward F(4x4)", "input grad F(4x4)", "weight grad F(4x4)"], "gemm": ["gemm"], "direct": []}
    assert calls == paths[expected]
    assert out.is_contiguous()  # the GEMM path's channels-last result too: the trained model stays contiguous
    for leaf, theirs in zip(leaves, expected_grads):
        assert max_errors(leaf.grad, theirs)[1] < 8e-5


def test_padded_channels_last_zeroes_the_border_in_reused_memory():
    """The Winograd paths' padding zeroes only the border of an uninitialised buffer: it must be F.pad's result even
    where the allocator hands back memory just freed with NaN in it."""
    from kandinsky.ops.cpu import _padded_channels_last

    x = torch.randn(2, 8, 6, 10)
    expected = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    for _ in range(3):
        dirty = torch.full(expected.shape, float("nan"))
        del dirty  # its memory is what the next allocation of this size gets back
        assert torch.equal(_padded_channels_last(x), expected)


def test_gemm_path_under_autograd_keeps_no_copy_of_the_kernel():
    """With a contiguous (training) kernel the GEMM reads it as a view, so what autograd keeps for the backward is the
    columns, not a reshaped copy of the kernel (which cost 1.8 GiB in a training step of the UNet)."""
    conv = _fast_conv(64, 48).to(memory_format=torch.contiguous_format)  # kernel and columns of other sizes
    x = torch.randn(1, 64, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = gemm_conv3x3(x, conv.weight, conv.bias)
    kernel_sized = [t for t in saved if t.numel() == conv.weight.numel()]
    assert kernel_sized and all(t.untyped_storage().data_ptr() == conv.weight.untyped_storage().data_ptr()
                                for t in kernel_sized)
    grad_y = torch.randn(out.shape)
    out.backward(grad_y)
    expected = _gradients(lambda *a: F.conv2d(*a, padding=1), x.detach(), conv.weight.detach(), conv.bias.detach(),
                          grad_y)
    for ours, theirs in zip((x.grad, conv.weight.grad, conv.bias.grad), expected):
        assert max_errors(ours, theirs)[1] < 1e-5  # float32 GEMM against float32 convolution (measured ~1e-7)


def test_conv3x3_under_autocast_or_in_half_precision_keeps_the_plain_convolution(monkeypatch):
    """bf16 autocast (--mixed-precision) and half-precision tensors train on the plain layer (the Winograd GEMMs
    are float32 only; under autocast they would run in the half dtype)."""
    calls = _spy_winograd(monkeypatch)
    monkeypatch.setattr(cpu, "gemm_conv3x3", lambda *a, real=gemm_conv3x3: calls.append("gemm") or real(*a))
    conv = _fast_conv(128, 128).to(memory_format=torch.contiguous_format)
    x = torch.randn(1, 128, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert calls == [] and x.grad is not None and conv.weight.grad is not None
    half = _fast_conv(128, 128).to(torch.bfloat16)
    half(x.detach().bfloat16().requires_grad_()).float().sum().backward()
    assert calls == [] and half.weight.grad.dtype == torch.bfloat16


def test_checkpointed_conv3x3_gives_the_same_gradients(monkeypatch):
    """torch.utils.checkpoint (--gradient-checkpointing) over the Winograd path: the forward runs again in the
    backward, the same float32 arithmetic, so the same gradients bit for bit; the kernel buffer that the
    recomputation and the backward share holds nothing across them."""
    from torch.utils.checkpoint import checkpoint

    calls = _spy_winograd(monkeypatch)
    first, second = _fast_conv(128, 128), _fast_conv(128, 256)  # two layers: the buffer serves both in turn
    for conv in (first, second):
        conv.to(memory_format=torch.contiguous_format)
    x = torch.randn(1, 128, 32, 32, generator=torch.Generator().manual_seed(3))

    def gradients(recomputed: bool) -> list[torch.Tensor]:
        for conv in (first, second):
            conv.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()

        def block(t):
            return second(F.silu(first(t)))

        out = checkpoint(block, leaf, use_reentrant=False) if recomputed else block(leaf)
        out.square().sum().backward()
        return [leaf.grad, *(p.grad for conv in (first, second) for p in conv.parameters())]

    plain = gradients(False)
    assert calls.count("forward F(4x4)") == 2 and calls.count("weight grad F(4x4)") == 2
    calls.clear()
    recomputed = gradients(True)
    assert calls.count("forward F(4x4)") == 4  # the recomputation
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))


# --- oneDNN linear ----------------------------------------------------------------------------------

onednn = pytest.mark.skipif(torch.float32 not in onednn_dtypes(), reason="this torch build has no oneDNN linear")


@onednn
def test_onednn_linear_matches_f_linear():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 81, 64, generator=generator)
    weight, bias = torch.randn(96, 64, generator=generator) / 8, torch.randn(96, generator=generator)
    reference = F.linear(x.double(), weight.double(), bias.double())
    with torch.no_grad():
        out = onednn_linear(x, weight, bias)
    # float32 GEMM, another summation order than MKL's (measured ~2e-7 relative)
    assert max_errors(out, reference)[1] < 1e-5
    # with autograd, and for dtypes oneDNN cannot run here, it is F.linear itself
    weight.requires_grad_(True)
    torch.testing.assert_close(onednn_linear(x, weight, bias), F.linear(x, weight, bias), rtol=0, atol=0)
    half = (x.half(), weight.detach().half(), bias.half())
    with torch.no_grad():
        torch.testing.assert_close(onednn_linear(*half), F.linear(*half), rtol=0, atol=0)


@onednn
def test_onednn_linear_compiles_to_the_same_call():
    # inductor cannot lower oneDNN's linear on an unpacked weight: under torch.compile it is an opaque op,
    # so the compiled function runs the very same kernel as eager (bitwise equal)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 81, 64, generator=generator)
    weight, bias = torch.randn(96, 64, generator=generator) / 8, torch.randn(96, generator=generator)
    torch._dynamo.reset()
    compiled = torch.compile(onednn_linear, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, weight, bias), onednn_linear(x, weight, bias), rtol=0, atol=0)


@pytest.mark.skipif(torch.bfloat16 not in onednn_dtypes(), reason="this CPU has no oneDNN bfloat16 linear")
def test_onednn_linear_bfloat16():
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 81, 64, generator=generator), torch.randn(96, 64, generator=generator) / 8
    reference = F.linear(x.double(), weight.double(), None)
    with torch.no_grad():
        out = onednn_linear(x.bfloat16(), weight.bfloat16(), None)
    # inputs rounded to bfloat16 (2^-9 relative each), float32 accumulation, output rounded (measured ~3e-3)
    assert max_errors(out.float(), reference)[1] < 2e-2


# --- device-independent rewrites --------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_upsample_equals_nearest_then_conv(channels_last):
    upsample = randomize_(Upsample(32), 4)
    x = torch.randn(2, 32, 5, 7, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=CHANNELS_LAST)
    with torch.no_grad():
        plain = upsample(x)
        swap(upsample, SubpixelUpsample)
        ours = upsample(x)
    assert ours.shape == plain.shape == (2, 32, 10, 14)
    # same sums of products, taps pre-added in another order: float32 rounding, values O(1) (measured ~3e-6)
    assert max_errors(ours, plain)[0] < 1e-5


def test_last_query_block_is_the_last_position_of_the_block():
    prior = _tiny("prior")
    batch = prior_parity.inputs(prior.config)
    block = prior.blocks[-1]
    tokens = torch.randn(2, prior.config.text_ctx + 4, prior.config.width, generator=torch.Generator().manual_seed(2))
    mask = prior.attention_mask(batch["text_mask"], 2, tokens.device)  # with padding keys
    with torch.no_grad():
        full = block(tokens, mask)
        swap(block, LastQueryBlock)
        last = block(tokens, mask)
    assert last.shape == (2, 1, prior.config.width)
    # the same float32 operations on one row instead of all (measured ~1e-6 abs, values O(1))
    assert max_errors(last, full[:, -1:])[0] < 1e-5


def _prior_masks(text_ctx: int) -> dict[str, torch.Tensor]:
    """(2, text_ctx) text masks: prompts of 5 and 12 tokens, one with holes, and ones with nothing to leave out."""
    holes = torch.zeros(2, text_ctx, dtype=torch.bool)
    holes[0, [0, 3, 4, 9]], holes[1, [0, 1, 9, text_ctx - 1]] = True, True
    return {"prompts": torch.arange(text_ctx)[None] < torch.tensor([[5], [12]]), "holes": holes,
            "empty row": torch.arange(text_ctx)[None] < torch.tensor([[0], [3]]),
            "no text": torch.zeros(2, text_ctx, dtype=torch.bool),
            "full": torch.ones(2, text_ctx, dtype=torch.bool), "none": None}


# the text positions some row reads, of the tiny prior's 77
KEPT = {"prompts": 12, "holes": 6, "empty row": 3, "no text": 0, "full": 77, "none": 77}


@pytest.mark.parametrize("case", list(KEPT))
def test_padding_free_prior_runs_only_the_positions_some_row_reads(case):
    prior = _tiny("prior")
    c = prior.config
    batch = dict(prior_parity.inputs(c), text_mask=_prior_masks(c.text_ctx)[case])
    lengths = []
    prior.blocks[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        plain = prior_parity.run_ours(prior, batch)
        plain_prefix = prior.encode_text(text_embeds=batch["text_embeds"], text_hidden_states=batch["text_hidden_states"],
                                         text_mask=batch["text_mask"])
        swap(prior, PaddingFreePrior)
        fast = prior_parity.run_ours(prior, batch)
        prefix = prior.encode_text(text_embeds=batch["text_embeds"], text_hidden_states=batch["text_hidden_states"],
                                   text_mask=batch["text_mask"])
        stepped = prior(batch["x"], batch["timesteps"], text_prefix=prefix)
        plain_stepped = prior(batch["x"], batch["timesteps"], text_prefix=plain_prefix)
    text = KEPT[case]
    # plain forward, plain encode_text, then the same two without the padding, then two steps of 3 positions
    assert lengths == [c.text_ctx + 4, c.text_ctx + 1, text + 4, text + 1, 3, 3]
    assert prefix.caches[0].keys.shape[2] == text + 1 and prefix.attn_mask.shape == (2, 1, 3, text + 4)
    # float32: the same products, the softmax over fewer (masked, exactly zero) terms; measured <= 1e-6 relative
    for output in (fast, stepped, plain_stepped):
        assert max_errors(output, plain)[1] < 1e-5


# --- optimize() and plain() on the models -----------------------------------------------------------

FAST_TYPES = {"unet": {Conv3x3, FusedUNetResBlock, *([OneDNNLinear] if torch.float32 in onednn_dtypes() else [])},
              "movq": {Conv3x3, SubpixelUpsample, FusedMoVQResBlock,
                       *([OneDNNLinear] if torch.float32 in onednn_dtypes() else [])},
              "prior": {PaddingFreePrior, *([OneDNNLinear, OneDNNLastQueryBlock] if torch.float32 in onednn_dtypes()
                                            else [LastQueryBlock])}}


@pytest.mark.parametrize("component", ["unet", "movq", "prior"])
def test_optimize_swaps_in_place_sharing_every_tensor(component):
    model = _tiny(component)
    keys = list(model.state_dict())
    tensors = dict(model.state_dict(keep_vars=True))
    assert ops.optimize(model, "cpu", torch.float32) is model
    assert {type(m) for m in model.modules() if isinstance(m, FastModule)} == FAST_TYPES[component]
    state = model.state_dict(keep_vars=True)
    assert list(state) == keys
    assert all(state[k] is tensors[k] for k in keys)  # the same Parameter objects
    kernels = [v for v in state.values() if v.ndim == 4]  # none in the prior
    assert bool(kernels) == (component != "prior")
    as_built = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv3x3)}  # any layout
    assert all(v.is_contiguous(memory_format=torch.contiguous_format if k in as_built else CHANNELS_LAST)
               for k, v in state.items() if v.ndim == 4)
    # idempotent: nothing is copied the second time (every kernel is in its layout now)
    pointers = {k: v.data_ptr() for k, v in state.items()}
    types = [type(m) for m in model.modules()]
    ops.optimize(model, "cpu", torch.float32)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers
    assert [type(m) for m in model.modules()] == types
    ops.plain(model)
    assert not any(isinstance(m, FastModule) for m in model.modules())
    assert list(model.state_dict()) == keys and {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers


def test_optimize_keeps_channels_last_kernels_as_they_are():
    """Kernels that are already channels-last (views of (O, kh, kw, I) buffers) are not copied: optimize
    copies only the kernels it must re-lay out."""
    unet = _tiny("unet")
    stored = {k: torch.empty(v.shape[0], *v.shape[2:], v.shape[1]).copy_(v.permute(0, 2, 3, 1))
              for k, v in unet.state_dict().items() if v.ndim == 4}  # (O, kh, kw, I)
    unet.load_state_dict({k: v.permute(0, 3, 1, 2) for k, v in stored.items()}, strict=False, assign=True)
    ops.optimize(unet, "cpu", torch.float32)
    state = unet.state_dict()
    assert all(state[k].data_ptr() == v.data_ptr() for k, v in stored.items())


@pytest.mark.parametrize("component", ["unet", "movq"])
def test_optimize_copies_out_of_weight_files_only_the_kernels_it_must_re_lay_out(component, tmp_path):
    """Weight files hold the plain state dict: loaded, the kernels are contiguous (O, I, kh, kw) tensors mapped
    from the file. On the CPU in float32 the residual blocks' :class:`Conv3x3` read them as they are (no copy:
    the same memory); optimize gives the other kernels the channels-last layout (a copy), and the model computes
    as the optimized original does."""
    model = _tiny(component)
    loaded = load_converted(save_converted(model, component, tmp_path / component))
    kernels = [k for k, v in loaded.state_dict().items() if v.ndim == 4]
    assert kernels and all(loaded.state_dict()[k].is_contiguous() for k in kernels)
    assert not all(loaded.state_dict()[k].is_contiguous(memory_format=CHANNELS_LAST) for k in kernels)
    pointers = {k: v.data_ptr() for k, v in loaded.state_dict().items()}
    ops.optimize(loaded, "cpu", torch.float32)
    ops.optimize(model, "cpu", torch.float32)
    state = loaded.state_dict()
    residual = {f"{name}.weight" for name, m in loaded.named_modules() if isinstance(m, Conv3x3)}
    assert residual and residual < set(kernels)
    assert all(state[k].data_ptr() == pointers[k] and state[k].is_contiguous() for k in residual)
    assert all(state[k].is_contiguous(memory_format=CHANNELS_LAST) for k in set(kernels) - residual)
    assert {type(m) for m in loaded.modules()} == {type(m) for m in model.modules()}
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():  # the same weights in the same layout through the same kernels: the same result
        for ours, reference in zip(_run(component, loaded), _run(component, model)):
            assert torch.equal(ours, reference)


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_other_devices_get_only_the_device_independent_rewrites(device):
    """Only what is swapped depends on ``device`` (nothing is moved), so this runs without the device."""
    model = nn.ModuleDict({"unet": _tiny("unet"), "movq": _tiny("movq"), "prior": _tiny("prior")})
    ops.optimize(model, "cpu", torch.float32)
    ops.optimize(model, device, torch.float32)
    assert {type(m) for m in model.modules() if isinstance(m, FastModule)} == {SubpixelUpsample, LastQueryBlock,
                                                                               PaddingFreePrior}
    # every kernel, those the CPU's Conv3x3 left contiguous too
    assert all(p.is_contiguous(memory_format=CHANNELS_LAST) for name in ("unet", "movq")
               for p in model[name].parameters() if p.ndim == 4)


def test_prior_linears_go_through_onednn_only_for_its_dtypes():
    prior = _tiny("prior")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ops.optimize(prior, "cpu", dtype)
        # half precision through oneDNN only where the CPU computes in it; elsewhere in float32 (Upcast*)
        assert isinstance(prior.out_proj, OneDNNLinear) == (dtype in onednn_dtypes() and native_half(dtype)), dtype
        assert isinstance(prior.blocks[-1], LastQueryBlock)


def test_movq_attention_projections_go_through_onednn_where_it_has_the_dtype():
    model = ops.optimize(_tiny("movq"), "cpu", torch.float32)
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert blocks
    assert all(isinstance(layer, OneDNNLinear) == (torch.float32 in onednn_dtypes())
               for block in blocks for layer in (block.qkv, block.proj))


@pytest.mark.parametrize("component, winograd", [("unet", None), ("unet", 2), ("unet", 4), ("movq", None),
                                                 ("movq", 2), ("movq", 4), ("prior", None)])
def test_optimized_model_matches_the_plain_one(monkeypatch, transforms, component, winograd):
    if winograd:  # the full-size models' paths (F(4x4, 3x3) from 128 channels), forced on the tiny ones
        monkeypatch.setattr(cpu, "WINOGRAD_MIN_CHANNELS", 1)
    if winograd == 4:
        monkeypatch.setattr(cpu, "WINOGRAD43_MIN_CHANNELS", 1)
    model = _tiny(component)
    with torch.no_grad():
        plain = _run(component, model)
        fast = _run(component, ops.optimize(model, "cpu", torch.float32))
    for fast_output, plain_output in zip(fast, plain):
        assert fast_output.is_contiguous()
        # float32, the same function in another summation order (F(4x4, 3x3): transforms scaling by up to 8; the
        # fused norms: statistics in float64, the activation's e^x to ~2 ulp): measured <= 2e-6 of the output
        # scale (unet 1.9e-6, movq 1.8e-6, prior 4e-7), F(4x4, 3x3) with the fused norms <= 3e-6
        assert max_errors(fast_output, plain_output)[1] < 1e-5
    if winograd and component != "prior" and "compiled" in transforms:  # the residual blocks' norms were fused
        assert transforms["activated"] >= 1
        assert (transforms["spatial"] >= 1) == (component == "movq")  # the decoder's spatial norms


def test_optimized_prior_trains_through_the_plain_kernels():
    """Under autograd the oneDNN GEMMs fall back to F.linear: gradients flow and equal the plain model's."""
    prior = _tiny("prior")
    batch = prior_parity.inputs(prior.config)
    prior_parity.run_ours(prior, batch).square().sum().backward()
    plain = {k: v.grad.clone() for k, v in prior.named_parameters()}
    prior.zero_grad()
    prior_parity.run_ours(ops.optimize(prior, "cpu", torch.float32), batch).square().sum().backward()
    for name, parameter in prior.named_parameters():
        # the last block computes one row instead of all: float32 summation order (measured ~1e-6 relative)
        torch.testing.assert_close(parameter.grad, plain[name], rtol=1e-4, atol=1e-5, msg=name)


def test_optimize_rejects_bad_arguments():
    with pytest.raises(TypeError, match="module: expected an nn.Module"):
        ops.optimize("unet", "cpu", torch.float32)
    with pytest.raises(TypeError, match="dtype: expected a torch.dtype"):
        ops.optimize(nn.Linear(2, 2), "cpu", "float32")
    with pytest.raises(TypeError, match="cannot swap a Linear for a Conv3x3"):
        swap(nn.Linear(2, 2), Conv3x3)


# --- half precision on CPUs without native half arithmetic ------------------------------------------

HALF = [torch.bfloat16, torch.float16]
# max error of the tiny models' outputs relative to their float32 outputs, native and upcast alike (measured up
# to 2.4e-2 in bfloat16 (movq decode), 5.8e-3 in float16): 8 / 11 significant bits through a few layers
HALF_MODEL_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
COMPUTING_LAYERS = (nn.Linear, nn.Conv2d)


@pytest.fixture
def half_mode(monkeypatch):
    """``half_mode("native" | "upcast")`` forces the path of the half dtypes; the once-only warning may fire again."""
    monkeypatch.setattr(cpu, "_warned", set())
    return lambda mode: monkeypatch.setenv(HALF_ENV, mode)


@pytest.mark.parametrize("flags, native", [
    ({"avx2": True, "f16c": True}, set()),  # AVX2 only: AMD Zen 3, Intel before Cooper Lake
    ({"avx512_f": True, "avx512_bf16": True}, {torch.bfloat16}),  # AMD Zen 4, Intel Cooper Lake
    ({"amx_bf16": True, "avx512_fp16": True}, {torch.bfloat16, torch.float16}),  # Intel Sapphire Rapids
    ({"bf16": True, "fp16_arith": True}, {torch.bfloat16, torch.float16}),  # ARMv8.6
])
def test_native_half_reads_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.delenv(HALF_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags, raising=False)
    cpu._native_half_dtypes.cache_clear()
    try:
        assert {dtype for dtype in HALF if native_half(dtype)} == native
        assert native_half(torch.float32) and native_half(torch.float64)
    finally:
        cpu._native_half_dtypes.cache_clear()


def test_native_half_asks_onednn_where_torch_lists_no_cpu_flags(monkeypatch):
    monkeypatch.delenv(HALF_ENV, raising=False)
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    cpu._native_half_dtypes.cache_clear()
    try:
        assert native_half(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
        assert native_half(torch.float16) == torch.ops.mkldnn._is_mkldnn_fp16_supported()
    finally:
        cpu._native_half_dtypes.cache_clear()


def test_native_half_environment_override(monkeypatch):
    for mode, native in (("native", True), ("upcast", False)):
        monkeypatch.setenv(HALF_ENV, mode)
        assert [native_half(dtype) for dtype in HALF] == [native, native]
        assert native_half(torch.float32)
    monkeypatch.setenv(HALF_ENV, "fast")
    with pytest.raises(ValueError, match=f"{HALF_ENV}: expected 'native' or 'upcast'"):
        native_half(torch.bfloat16)


def _upcast_cases(generator):
    """(plain layer, upcast class, input): linears, convolutions of other shapes, both 3x3 paths."""
    return [(nn.Linear(64, 96), UpcastLinear, torch.randn(2, 81, 64, generator=generator)),
            (nn.Linear(64, 96), UpcastAttentionInput, torch.randn(2, 81, 64, generator=generator)),
            (nn.Conv2d(16, 24, 3, stride=2), UpcastConv2d, torch.randn(2, 16, 9, 11, generator=generator)),
            (nn.Conv2d(16, 24, 1), UpcastConv2d, torch.randn(2, 16, 6, 5, generator=generator)),
            (nn.Conv2d(16, 24, 3, padding=1), UpcastConv3x3, torch.randn(2, 16, 8, 8, generator=generator)),  # GEMM
            (nn.Conv2d(16, 24, 3, padding=1), UpcastConv3x3, torch.randn(2, 16, 20, 18, generator=generator))]


def _layer_function(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What the plain ``layer`` computes, with the given tensors (float64 ones for a reference)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return nn.Conv2d._conv_forward(layer, x, weight, bias)


@pytest.mark.parametrize("dtype", HALF)
def test_upcast_layers_compute_in_float32(dtype):
    """Weights and inputs exact in ``dtype``: the result is the exact one rounded once, to float32 for the
    attention inputs (which half-precision arithmetic could not give) and to ``dtype`` for the others."""
    for layer, cls, x in _upcast_cases(torch.Generator().manual_seed(0)):
        layer = randomize_(layer, 1).to(dtype)
        x = x.to(dtype)
        reference = _layer_function(layer, x.double(), layer.weight.double(), layer.bias.double())
        swap(layer, cls)
        with torch.no_grad():
            out = layer(x)
        float_output = cls is UpcastAttentionInput
        assert out.dtype == (torch.float32 if float_output else dtype) and out.shape == reference.shape
        # float32: summation order (measured <= 2.6e-7, against 3.9e-4 / 3.3e-3 in native float16 / bfloat16);
        # dtype: one rounding, 2^-8 (bf16) / 2^-11 (fp16) relative (measured <= 2.1e-3 / 3.2e-4)
        tolerance = 1e-5 if float_output else {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
        assert max_errors(out, reference)[1] < tolerance, cls


def test_upcast_layers_train_their_half_precision_weights():
    generator = torch.Generator().manual_seed(0)
    for layer, cls, x in _upcast_cases(generator):
        layer = randomize_(layer, 1).to(torch.bfloat16)
        x = x.to(torch.bfloat16)
        plain = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
        _layer_function(layer, x.double(), plain["weight"], plain["bias"]).sum().backward()
        swap(layer, cls)
        layer(x).float().sum().backward()
        for name, parameter in layer.named_parameters():
            assert parameter.grad.dtype == torch.bfloat16
            # float32 gradients rounded once to bfloat16: 2^-8 relative (measured <= 3.0e-3)
            assert max_errors(parameter.grad.float(), plain[name].grad)[1] < 2 ** -8, (cls, name)


def test_float_weight_reuses_one_buffer_without_autograd():
    kernel = torch.randn(8, 4, 3, 3).to(torch.bfloat16, memory_format=CHANNELS_LAST)
    matrix = torch.randn(5, 7).to(torch.bfloat16)
    x = torch.zeros(1)
    with torch.no_grad():
        first = float_weight(kernel, x)
        assert first.dtype == torch.float32 and torch.equal(first, kernel.float())
        assert first.is_contiguous(memory_format=CHANNELS_LAST)  # the layout the fast paths read as it is
        pointer = first.data_ptr()
        second = float_weight(matrix, x)
        assert torch.equal(second, matrix.float()) and second.data_ptr() == pointer
    weight = nn.Parameter(matrix.float())
    copy = float_weight(weight.to(torch.bfloat16), x)  # under autograd: a fresh copy that gradients flow through
    assert copy.requires_grad and copy.data_ptr() != pointer


@pytest.mark.parametrize("component", ["unet", "movq", "prior"])
@pytest.mark.parametrize("dtype", HALF)
def test_optimize_upcasts_every_layer_keeping_half_weights(half_mode, component, dtype):
    model = _tiny(component).to(dtype)
    tensors = dict(model.state_dict(keep_vars=True))
    half_mode("upcast")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of our models is left to compute in dtype
        ops.optimize(model, "cpu", dtype)
    modules = list(model.modules())
    left = [m for m in modules if isinstance(m, COMPUTING_LAYERS) and not type(m).__name__.startswith("Upcast")]
    assert not left and not any(type(m) in (SubpixelUpsample, LastQueryBlock, OneDNNLastQueryBlock) for m in modules)
    expected = {UpcastLinear, UpcastAttentionInput, UpcastConv2d, UpcastConv3x3, UpcastSubpixelUpsample,
                UpcastLastQueryBlock, PaddingFreePrior}
    assert {type(m) for m in modules if isinstance(m, FastModule)} <= expected
    qkv = [m.qkv for m in modules if hasattr(m, "qkv")]
    assert qkv and all(type(layer) is UpcastAttentionInput for layer in qkv)
    # the memory saving is kept: the same half-precision parameters, and no float32 copy kept anywhere
    state = model.state_dict(keep_vars=True)
    assert list(state) == list(tensors) and all(state[k] is v for k, v in tensors.items())
    assert all(p.dtype == dtype for p in model.parameters())
    assert not [name for m in modules for name, value in vars(m).items() if isinstance(value, torch.Tensor)]
    half_mode("native")
    ops.optimize(model, "cpu", dtype)
    assert not any(type(m).__name__.startswith("Upcast") for m in model.modules())
    ops.plain(model)
    assert not any(isinstance(m, FastModule) for m in model.modules())


@pytest.mark.parametrize("component", ["unet", "movq", "prior"])
@pytest.mark.parametrize("dtype", HALF)
def test_upcast_outputs_match_native_and_float32(half_mode, component, dtype):
    with torch.no_grad():
        reference = _run(component, _tiny(component))
        outputs = {}
        for mode in ("native", "upcast"):
            half_mode(mode)
            outputs[mode] = _run(component, ops.optimize(_tiny(component).to(dtype), "cpu", dtype))
    tolerance = HALF_MODEL_TOLERANCE[dtype]
    for native, upcast, exact in zip(outputs["native"], outputs["upcast"], reference):
        assert native.dtype == upcast.dtype == dtype  # the models' contract: outputs in the weights' dtype
        assert max_errors(upcast.float(), exact)[1] < tolerance
        assert max_errors(native.float(), exact)[1] < tolerance
        assert max_errors(upcast.float(), native.float())[1] < tolerance


def test_upcast_convolutions_take_the_float32_winograd_path(monkeypatch, half_mode):
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_CHANNELS", 1)  # the full-size models' path, forced on the tiny one
    kernels = []
    monkeypatch.setattr(cpu, "winograd_conv3x3", lambda x, w, b: kernels.append(w.dtype) or winograd_conv3x3(x, w, b))
    half_mode("upcast")
    model = _tiny("unet")
    with torch.no_grad():
        reference = _run("unet", model)[0]
        out = _run("unet", ops.optimize(model.to(torch.bfloat16), "cpu", torch.bfloat16))[0]
    assert kernels and set(kernels) == {torch.float32}
    assert max_errors(out.float(), reference)[1] < HALF_MODEL_TOLERANCE[torch.bfloat16]


def test_upcast_text_encoder_warns_once_about_its_attention(half_mode):
    """The transformers encoders' linear layers compute in float32; their attention stays in the half dtype
    (the rest of the transformers model expects it), which one warning says."""
    from tiny_components import tiny_clip_text_model

    model = tiny_clip_text_model()
    input_ids = torch.randint(0, 500, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids).text_embeds
    model.to(torch.bfloat16)
    half_mode("upcast")
    with pytest.warns(UserWarning, match=r"CLIPTextModelWithProjection .*bfloat16.*: CLIPAttention\. "
                                         r"dtype=torch\.float32"):
        ops.optimize(model, "cpu", torch.bfloat16)
    assert not [m for m in model.modules() if type(m) in COMPUTING_LAYERS]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.optimize(model, "cpu", torch.bfloat16)  # once per process and dtype
        with torch.no_grad():
            out = model(input_ids).text_embeds
    assert out.dtype == torch.bfloat16
    # bfloat16 hidden states through 2 layers (measured 8.3e-3 relative)
    assert max_errors(out.float(), reference)[1] < HALF_MODEL_TOLERANCE[torch.bfloat16]


def test_upcast_warns_about_layers_it_cannot_upcast(half_mode):
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(3, 4)).to(torch.float16)
    half_mode("upcast")
    with pytest.warns(UserWarning, match=r"still compute in float16, slower than in float32: Conv1d\. dtype="):
        ops.optimize(model, "cpu", torch.float16)
    assert type(model[1]) is UpcastLinear


# --- the parity report's rows for the models as the pipeline runs them ------------------------------

def test_unet_parity_rows_include_the_optimized_model(monkeypatch):
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_CHANNELS", 1)  # the full-size model's path, forced on the tiny one
    calls = []
    monkeypatch.setattr(cpu, "winograd_conv3x3", lambda *a, **k: calls.append(1) or winograd_conv3x3(*a, **k))
    config = _tiny("unet").config
    rows = list(unet_parity.diffusers_rows("unet", config, label="tiny config"))
    assert [row.check for row in rows] == [
        "tiny config vs diffusers, 2x32x32", "tiny config vs diffusers, 2x24x40",
        "tiny config vs diffusers, 2x32x32, ops.optimize (CPU)",
        "tiny config vs diffusers, 2x24x40, ops.optimize (CPU)"]
    assert all(row.passed for row in rows) and calls


def test_movq_parity_rows_include_the_optimized_model(monkeypatch):
    monkeypatch.setattr(cpu, "WINOGRAD_MIN_CHANNELS", 1)
    calls = []
    monkeypatch.setattr(cpu, "winograd_conv3x3", lambda *a, **k: calls.append(1) or winograd_conv3x3(*a, **k))
    rows = list(movq_parity.diffusers_rows(_tiny("movq").config, label="diffusers tiny"))
    assert [row.check for row in rows] == [
        "diffusers tiny: encode 64x64", "diffusers tiny: decode (no quantisation)", "diffusers tiny: quantize",
        "diffusers tiny: encode 64x64, ops.optimize (CPU)",
        "diffusers tiny: decode (no quantisation), ops.optimize (CPU)"]
    assert all(row.passed for row in rows) and calls

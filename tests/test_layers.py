"""Shared layers: the Winograd and GEMM convolution paths of Conv3x3 against the direct convolution."""

import pytest
import torch
import torch.nn.functional as F

from kandinsky.models import layers
from kandinsky.models.layers import Conv3x3, winograd_conv3x3


def _case(batch, channels, out_channels, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, channels, 3, 3, generator=g) / (3 * channels ** 0.5)
    bias = torch.randn(out_channels, generator=g)
    return x, weight.contiguous(memory_format=torch.channels_last), bias


@pytest.mark.parametrize("shape", [(2, 8, 16, 32, 32), (3, 16, 8, 6, 10), (1, 4, 12, 2, 2), (2, 24, 24, 70, 36)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_matches_direct_convolution(shape, with_bias):
    # (70 rows: several bands of tile rows at batch 2, the last one shorter)
    x, weight, bias = _case(*shape)
    bias = bias if with_bias else None
    out = winograd_conv3x3(x, weight, bias)
    reference = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    assert out.shape == reference.shape and out.is_contiguous(memory_format=torch.channels_last)
    # float32 with +-1, +-1/2 transforms: a few float32 roundings of the output scale (measured ~4e-7)
    assert (out.double() - reference).abs().max() < 5e-6 * reference.abs().max()


def test_winograd_rejects_odd_sizes_and_mismatched_kernels():
    x, weight, bias = _case(1, 4, 8, 6, 7)
    with pytest.raises(ValueError, match="even height and width"):
        winograd_conv3x3(x, weight, bias)
    x, weight, bias = _case(1, 4, 8, 6, 6)
    with pytest.raises(ValueError, match="weight"):
        winograd_conv3x3(x, weight[:, :3], bias)


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (8, 12), (33, 35), (40, 24)])
def test_conv3x3_paths_match_conv2d(monkeypatch, size):
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 1)  # so that small test layers take it too
    calls = []
    monkeypatch.setattr(layers, "winograd_conv3x3", lambda *a: calls.append(1) or winograd_conv3x3(*a))
    torch.manual_seed(0)
    conv = Conv3x3(12, 20).to(memory_format=torch.channels_last)
    x = torch.randn(2, 12, *size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = conv(x)
        reference = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert (out.double() - reference).abs().max() < 5e-6 * reference.abs().max()
    even = size[0] % 2 == 0 and size[1] % 2 == 0
    assert len(calls) == (1 if even and size[0] * size[1] >= layers.WINOGRAD_MIN_PIXELS else 0)


def test_conv3x3_keeps_autograd_on_the_direct_path():
    conv = Conv3x3(256, 256)
    x = torch.randn(1, 256, 32, 32, requires_grad=True)
    conv(x).sum().backward()  # the Winograd path writes with out=, which autograd refuses
    assert x.grad is not None and conv.weight.grad is not None

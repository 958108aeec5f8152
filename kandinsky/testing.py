"""Helpers shared by the tests, the parity report and the benchmarks: seeded random weights and the
original-implementation fixtures. Nothing here is needed to run the models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from kandinsky.tiny import randomize_  # noqa: F401  (seeded random weights: shared with the tiny pipeline)


def fixture_dir() -> Path:
    """Folder of the original-implementation fixtures (``$KANDINSKY_FIXTURES`` or ``tests/fixtures/original``)."""
    env = os.environ.get("KANDINSKY_FIXTURES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "original"


def load_original_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON sidecar of one fixture, e.g. ``load_original_fixture("movq")``."""
    folder = fixture_dir()
    path = folder / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"original fixture {name!r} not found in {folder} (set KANDINSKY_FIXTURES)")
    return load_file(str(path)), json.loads((folder / f"{name}.json").read_text())


def diffusers_reference_config(name: str) -> dict:
    """A config of the official diffusers-layout repositories, e.g. ``"kandinsky-2-1.unet.config.json"``
    (copied into ``tests/fixtures/diffusers-configs/``, see its README)."""
    path = fixture_dir().parent / "diffusers-configs" / name
    if not path.exists():
        raise FileNotFoundError(f"diffusers reference config {name!r} not found in {path.parent}")
    return json.loads(path.read_text())


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a fixture under ``prefix`` (e.g. ``"state_dict."``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def max_errors(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error relative to the reference's max magnitude)."""
    diff = (ours.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return diff, diff / max(scale, 1e-12)


def conv3x3_case(batch: int, channels: int, out_channels: int, height: int, width: int,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A channels-last input, 3x3 kernel and bias with outputs of about unit scale, for the convolution paths."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, channels, 3, 3, generator=generator) / (3 * channels ** 0.5)
    bias = torch.randn(out_channels, generator=generator)
    return x, weight.contiguous(memory_format=torch.channels_last), bias

"""MoVQ parity rows: the full official config against diffusers 0.42.1 ``VQModel`` (same random
weights, converted with ``from_diffusers``), plain and as the pipeline runs it on CPU (``ops.optimize``),
and the tiny original-implementation fixture."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import torch

from kandinsky import ops
from kandinsky.convert import from_diffusers, from_original
from kandinsky.convert.movq import to_diffusers_config
from kandinsky.models.movq import MoVQConfig
from kandinsky.parity import Row, compare
from kandinsky.testing import load_original_fixture, prefixed, randomize_


def diffusers_rows(config: MoVQConfig = MoVQConfig(), label: str = "diffusers full", size: int = 64) -> Iterator[Row]:
    """``config`` against diffusers on one ``size`` x ``size`` image: encode, decode and quantize of our plain
    model, then encode and decode as the pipeline runs it on CPU (``ops.optimize``: sub-pixel upsampling, and
    at full size Winograd convolutions at 256 channels)."""
    from diffusers import VQModel

    reference = randomize_(VQModel(**to_diffusers_config(config)), 0).eval()
    ours = from_diffusers("movq", dict(reference.config), reference.state_dict())
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = reference.encode(images).latents
        decoded = reference.decode(latents, force_not_quantize=True).sample
        quantized = reference.quantize(latents)[0]
    del reference
    gc.collect()
    # float32, same maths in another op order: 1e-4 relative
    for optimized in (False, True):
        suffix = ", ops.optimize (CPU)" if optimized else ""
        if optimized:
            ops.optimize(ours, "cpu", torch.float32)
        with torch.no_grad():
            rows = [compare("movq", f"{label}: encode {size}x{size}{suffix}", ours.encode(images), latents, 1e-4),
                    compare("movq", f"{label}: decode (no quantisation){suffix}", ours.decode(latents), decoded, 1e-4)]
            if not optimized:
                rows.append(compare("movq", f"{label}: quantize", ours.quantize(latents), quantized, 1e-6, "abs"))
        yield from rows
    del ours
    gc.collect()


def _original_rows() -> Iterator[Row]:
    t, meta = load_original_fixture("movq")
    model = from_original("movq", meta["original_config"], prefixed(t, "state_dict."))
    # tolerance_hint: single-thread reruns of the original move encode by 1.2e-6 and decode by 1.7e-5
    # (|decode| up to 7), so encode is bounded in abs, the decodes relative to the output magnitude.
    yield compare("movq", "original fixture: encode", model.encode(t["input.image"]), t["output.encode"], 1e-5, "abs")
    quantized, indices = model.quantize(t["output.encode"], return_indices=True)
    yield compare("movq", "original fixture: quantize.quant", quantized, t["output.quantize.quant"], 1e-6, "abs")
    yield compare("movq", "original fixture: quantize.indices", indices.double(),
                  t["output.quantize.indices"].double(), 0.0, "abs")
    yield compare("movq", "original fixture: decode", model.decode(t["output.encode"]), t["output.decode"], 1e-5)
    yield compare("movq", "original fixture: decode_quantized", model.decode(t["output.quantize.quant"]),
                  t["output.decode_quantized"], 1e-5)


def checks() -> Iterator[Row]:
    """Rows for ``scripts/parity_report.py movq``."""
    yield from _original_rows()
    yield from diffusers_rows()

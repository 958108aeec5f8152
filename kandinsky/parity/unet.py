"""Decoder UNet parity: the full official configurations against diffusers 0.42.1 ``UNet2DConditionModel``
(same random weights, converted with our diffusers converter), plain and as the pipeline runs them on CPU
(``ops.optimize``): Kandinsky 2.1's text-to-image and inpainting UNets with the original implementation's fixtures
``unet`` / ``unet_inpaint``, or (``checks(model="2.2")``) Kandinsky 2.2's text-to-image, inpainting and ControlNet
UNets (:data:`CONFIGS_22`; 2.2 has no original implementation of its own).

Also the helpers the UNet tests and benchmark share: :func:`diffusers_config`, :func:`diffusers_unet`,
:func:`inputs`, :func:`run_ours`, :func:`run_diffusers`, :func:`original_fixture_output`. The inputs and both
calls follow the config's conditioning: 2.1's UNet reads text and the image embedding, 2.2's the image embedding
only, and the ControlNet UNet a hint image too.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterator

import torch

from kandinsky import ops
from kandinsky.models.unet import UNetConfig
from kandinsky.parity import Row, compare
from kandinsky.testing import load_original_fixture, prefixed, randomize_

# diffusers float32 vs ours: the same float32 operations in another order (fused QKV, SDPA instead of
# baddbmm + softmax); through ~40 residual blocks this stays around 1e-6 relative, 1e-4 leaves margin.
TOLERANCE_DIFFUSERS = 1e-4
# original fixtures: their own thread-count rerun moves the output by ~1.8e-6 abs (output scale ~2.7).
TOLERANCE_ORIGINAL = 1e-5
# Kandinsky 2.2's official UNets (= configs/unet_22.json, unet_22_inpaint.json, unet_22_controlnet.json), by the
# name of the pipeline component each is
OFFICIAL_22 = UNetConfig(conditioning="image", image_embed_dim=1280, num_image_tokens=32)
CONFIGS_22 = {"unet": OFFICIAL_22, "unet_inpaint": dataclasses.replace(OFFICIAL_22, in_channels=9),
              "unet_controlnet": dataclasses.replace(OFFICIAL_22, in_channels=8, conditioning="image_hint")}
CONFIGS_21 = {"unet": UNetConfig(), "unet_inpaint": UNetConfig(in_channels=9)}
MODELS = ("2.1", "2.2")
SIZES = ((32, 32), (24, 40))  # the latent sizes of the report: a square and a non-square one


def diffusers_config(config: UNetConfig = UNetConfig()) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of one of our configs (the official one by default)."""
    from kandinsky.convert.unet import to_diffusers_config

    return to_diffusers_config(config)


def diffusers_unet(config: UNetConfig = UNetConfig(), seed: int = 0):
    """(diffusers ``UNet2DConditionModel`` with seeded random weights, ours converted from it), eval mode,
    float32. Ours shares every weight tensor with diffusers' except the fused attention projections."""
    from diffusers import UNet2DConditionModel

    from kandinsky.convert import from_diffusers

    component = "unet_inpaint" if config.in_channels == 9 else "unet"
    dconfig = diffusers_config(config)
    with torch.device("meta"):  # skip diffusers' own (slow, full-size) initialisation
        theirs = UNet2DConditionModel(**dconfig)
    theirs = randomize_(theirs.to_empty(device="cpu"), seed).eval()
    ours = from_diffusers(component, dconfig, theirs.state_dict())
    return theirs, ours


def inputs(config: UNetConfig, batch: int = 2, height: int = 32, width: int = 32, seed: int = 1,
           dtype: torch.dtype = torch.float32) -> dict:
    """Random UNet inputs for ``config``'s conditioning: ``x`` (``config.x_channels``), ``timesteps``, then 2.1's
    ``text_hidden_states`` (77 tokens), ``text_embeds`` and ``image_embeds``; 2.2's ``image_embeds`` only; the
    ControlNet's ``image_embeds`` and ``hint`` (B, 3, 8 * height, 8 * width) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    values = {"x": randn(batch, config.x_channels, height, width),
              "timesteps": torch.randint(0, 1000, (batch,), generator=generator)}
    if config.has_text:
        values["text_hidden_states"] = randn(batch, 77, config.text_hidden_dim)
        values["text_embeds"] = randn(batch, config.text_embed_dim)
    values["image_embeds"] = randn(batch, config.image_embed_dim)
    if config.has_hint:
        values["hint"] = torch.rand(batch, 3, 8 * height, 8 * width, generator=generator).to(dtype)
    return values


def run_ours(unet, batch: dict) -> torch.Tensor:
    """Our UNet on :func:`inputs` (whichever conditioning inputs ``batch`` holds)."""
    rest = {k: v for k, v in batch.items() if k not in ("x", "timesteps")}
    return unet(batch["x"], batch["timesteps"], **rest)


def run_diffusers(model, batch: dict) -> torch.Tensor:
    """diffusers' Kandinsky calls: 2.1's text hidden states as ``encoder_hidden_states``, pooled text and image
    embeddings through ``added_cond_kwargs``; 2.2's image embedding (and the ControlNet's hint) through
    ``added_cond_kwargs`` alone, ``encoder_hidden_states=None`` (its image projection makes the context)."""
    if "text_hidden_states" in batch:
        return model(batch["x"], batch["timesteps"], encoder_hidden_states=batch["text_hidden_states"],
                     added_cond_kwargs={"text_embeds": batch["text_embeds"], "image_embeds": batch["image_embeds"]}
                     ).sample
    added = {"image_embeds": batch["image_embeds"], **({"hint": batch["hint"]} if "hint" in batch else {})}
    return model(batch["x"], batch["timesteps"], encoder_hidden_states=None, added_cond_kwargs=added).sample


def original_fixture_output(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, original) outputs on the original fixture ``unet`` or ``unet_inpaint``."""
    from kandinsky.convert import from_original

    tensors, meta = load_original_fixture(name)
    unet = from_original(name, meta["original_config"], prefixed(tensors, "state_dict."))
    x = tensors["input.x"]
    if name == "unet_inpaint":  # what the original InpaintText2ImUNet.forward feeds its first conv
        mask = tensors["input.inpaint_mask"]
        x = torch.cat([x, tensors["input.inpaint_image"] * mask, mask], dim=1)
    with torch.no_grad():
        ours = unet(x, tensors["input.timesteps"], text_hidden_states=tensors["input.full_emb"],
                    text_embeds=tensors["input.pooled_emb"], image_embeds=tensors["input.image_emb"])
    return ours, tensors["output.out"]


def diffusers_rows(name: str, config: UNetConfig, label: str = "full config",
                   sizes: tuple[tuple[int, int], ...] | None = None) -> Iterator[Row]:
    """``config`` against diffusers at each latent size (default :data:`SIZES`), batch 2: our plain model, then
    ours as the pipeline runs it on CPU (``ops.optimize``: at full size Winograd convolutions from 24x24, GEMM ones
    on small maps)."""
    sizes = sizes or SIZES
    theirs, ours = diffusers_unet(config)
    batches = [inputs(config, height=height, width=width) for height, width in sizes]
    with torch.no_grad():
        references = [run_diffusers(theirs, batch) for batch in batches]
    del theirs  # before optimize copies the kernels to channels-last: one model's weights at a time
    gc.collect()
    for optimized in (False, True):
        if optimized:
            ops.optimize(ours, "cpu", torch.float32)
        for (height, width), batch, reference in zip(sizes, batches, references):
            check = f"{label} vs diffusers, 2x{height}x{width}" + (", ops.optimize (CPU)" if optimized else "")
            with torch.no_grad():
                row = compare(name, check, run_ours(ours, batch), reference, TOLERANCE_DIFFUSERS)
            yield row
    del ours
    gc.collect()


def checks(model: str = "2.1") -> Iterator[Row]:
    """Kandinsky 2.1: the original fixtures, then each full official UNet vs diffusers at 32x32 and 24x40 latents,
    batch 2. ``model="2.2"``: the full official 2.2 UNets (text-to-image, inpainting, ControlNet) vs diffusers."""
    if model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {model!r}")
    if model == "2.2":
        for name, config in CONFIGS_22.items():
            yield from diffusers_rows(name, config, label="2.2 full config")
        return
    for name in ("unet", "unet_inpaint"):
        ours, reference = original_fixture_output(name)
        yield compare(name, "original fixture (tiny config)", ours, reference, TOLERANCE_ORIGINAL)
    for name, config in CONFIGS_21.items():
        yield from diffusers_rows(name, config)

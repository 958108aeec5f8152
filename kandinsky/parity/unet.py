"""Decoder UNet parity: the full official configurations (text-to-image and inpainting) against
diffusers 0.42.1 ``UNet2DConditionModel`` (same random weights, converted with our diffusers converter),
and the original implementation's fixtures ``unet`` / ``unet_inpaint``.

Also the helpers the UNet tests and benchmark share: :func:`diffusers_config`, :func:`diffusers_unet`,
:func:`inputs`, :func:`run_ours`, :func:`run_diffusers`, :func:`original_fixture_output`.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import torch

from kandinsky.models.unet import UNetConfig
from kandinsky.parity import Row, compare
from kandinsky.testing import load_original_fixture, prefixed, randomize_

# diffusers float32 vs ours: the same float32 operations in another order (fused QKV, SDPA instead of
# baddbmm + softmax); through ~40 residual blocks this stays around 1e-6 relative, 1e-4 leaves margin.
TOLERANCE_DIFFUSERS = 1e-4
# original fixtures: their own thread-count rerun moves the output by ~1.8e-6 abs (output scale ~2.7).
TOLERANCE_ORIGINAL = 1e-5


def diffusers_config(config: UNetConfig = UNetConfig()) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of one of our configs (the official one by default,
    equal to kandinsky-community/kandinsky-2-1[-inpaint]/unet/config.json apart from null-valued keys)."""
    if not config.text_embed_dim == config.image_embed_dim == config.context_dim:
        raise ValueError("diffusers ties text_embed_dim and image_embed_dim to cross_attention_dim (context_dim)")
    if config.num_image_tokens != 10:
        raise ValueError("diffusers' TextImageProjection always makes 10 image tokens")
    levels = range(len(config.channel_mult))
    attends = [level in config.attention_levels for level in levels]
    return {
        "act_fn": "silu", "addition_embed_type": "text_image", "addition_embed_type_num_heads": 64,
        "attention_head_dim": config.head_channels,
        "block_out_channels": [config.model_channels * m for m in config.channel_mult],
        "center_input_sample": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": config.context_dim,
        "down_block_types": ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attends],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": config.text_hidden_dim,
        "encoder_hid_dim_type": "text_image_proj", "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": config.in_channels, "layers_per_block": config.num_res_blocks,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": 1e-05,
        "norm_num_groups": config.norm_groups, "only_cross_attention": False, "out_channels": config.out_channels,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "scale_shift",
        "sample_size": 64, "time_embedding_type": "positional", "upcast_attention": False,
        "up_block_types": ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attends)],
        "use_linear_projection": False,
    }


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
    """Random UNet inputs: ``x``, ``timesteps``, ``text_hidden_states`` (77 tokens), ``text_embeds``, ``image_embeds``."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    return {
        "x": randn(batch, config.in_channels, height, width),
        "timesteps": torch.randint(0, 1000, (batch,), generator=generator),
        "text_hidden_states": randn(batch, 77, config.text_hidden_dim),
        "text_embeds": randn(batch, config.text_embed_dim),
        "image_embeds": randn(batch, config.image_embed_dim),
    }


def run_ours(unet, batch: dict) -> torch.Tensor:
    return unet(batch["x"], batch["timesteps"], text_hidden_states=batch["text_hidden_states"],
                text_embeds=batch["text_embeds"], image_embeds=batch["image_embeds"])


def run_diffusers(model, batch: dict) -> torch.Tensor:
    """diffusers' Kandinsky 2.1 call: text hidden states as ``encoder_hidden_states``, pooled text and
    image embeddings through ``added_cond_kwargs``."""
    return model(batch["x"], batch["timesteps"], encoder_hidden_states=batch["text_hidden_states"],
                 added_cond_kwargs={"text_embeds": batch["text_embeds"], "image_embeds": batch["image_embeds"]}).sample


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


def checks() -> Iterator[Row]:
    """Original fixtures, then each full official UNet vs diffusers at 32x32 and 24x40 latents, batch 2."""
    for name in ("unet", "unet_inpaint"):
        ours, reference = original_fixture_output(name)
        yield compare(name, "original fixture (tiny config)", ours, reference, TOLERANCE_ORIGINAL)
    for name, config in (("unet", UNetConfig()), ("unet_inpaint", UNetConfig(in_channels=9))):
        theirs, ours = diffusers_unet(config)
        for height, width in ((32, 32), (24, 40)):
            batch = inputs(config, height=height, width=width)
            with torch.no_grad():
                row = compare(name, f"full config vs diffusers, 2x{height}x{width}",
                              run_ours(ours, batch), run_diffusers(theirs, batch), TOLERANCE_DIFFUSERS)
            yield row
        del theirs, ours
        gc.collect()

"""MoVQ conversion from the original ``MOVQ`` (``movq_final.ckpt``) and from diffusers ``VQModel``, and back.

One layer table per layout (:func:`layers`) maps module paths both ways. Two layout changes need more
than a rename: separate q/k/v (1x1 convs or linears) become one fused ``qkv`` linear, and a spatial
norm's ``conv_y``/``conv_b`` become one ``to_scale_shift`` conv (scale channels first).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from kandinsky.convert.core import Layer, Source, layer, read_layers
from kandinsky.models.movq import MoVQ, MoVQConfig

OFFICIAL_ORIGINAL_CONFIGS: dict[str, dict] = {
    # CONFIG_2_1["image_enc_params"]["params"] of ai-forever/Kandinsky-2 (kandinsky2/configs.py)
    "movq": {
        "ddconfig": {
            "double_z": False,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 2, 2, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [32],
            "dropout": 0.0,
        },
        "n_embed": 16384,
        "embed_dim": 4,
    },
}


def _norm(layout: str, src: str, dst: str, spatial: bool) -> list[Layer]:
    """A GroupNorm (encoder) or a spatial norm (decoder; its conv_y and conv_b fused, scale channels first)."""
    if not spatial:
        return [layer(dst, src, traced=False)]  # ours applies the SiLU of the residual blocks inside the norm
    return [layer(f"{dst}.norm", f"{src}.norm_layer"), layer(f"{dst}.to_scale_shift", f"{src}.conv_y", f"{src}.conv_b")]


def _res(layout: str, src: str, dst: str, spatial: bool) -> list[Layer]:
    shortcut = "nin_shortcut" if layout == "original" else "conv_shortcut"
    return [layer(dst, src, params=()), *_norm(layout, f"{src}.norm1", f"{dst}.norm1", spatial),
            layer(f"{dst}.conv1", f"{src}.conv1"), *_norm(layout, f"{src}.norm2", f"{dst}.norm2", spatial),
            layer(f"{dst}.conv2", f"{src}.conv2"), layer(f"{dst}.shortcut", f"{src}.{shortcut}")]


def _attention(layout: str, src: str, dst: str, spatial: bool) -> list[Layer]:
    norm_path = f"{src}.norm" if layout == "original" else f"{src}.{'spatial_norm' if spatial else 'group_norm'}"
    norm = [layer(f"{dst}.norm", norm_path, params=() if spatial else ("weight", "bias"))]  # no SiLU here: traced
    if spatial:
        norm += _norm(layout, norm_path, f"{dst}.norm", spatial)
    if layout == "original":  # 1x1 convolutions
        return [layer(dst, src, params=()), *norm,
                layer(f"{dst}.qkv", *(f"{src}.{name}" for name in "qkv"), kernel=(1, 1)),
                layer(f"{dst}.proj", f"{src}.proj_out", kernel=(1, 1), traced=False)]
    return [layer(dst, src, params=()), *norm, layer(f"{dst}.qkv", *(f"{src}.to_{name}" for name in "qkv")),
            layer(f"{dst}.proj", f"{src}.to_out.0")]


def layers(layout: str, config: MoVQConfig) -> list[Layer]:
    """The MoVQ's layer table in ``layout`` ("original" or "diffusers") for our config.

    Our encoder and decoder index their levels by resolution (0 = full); diffusers orders the decoder's
    blocks deepest first. Inside a spatial norm, ``to_scale_shift`` is the foreign ``conv_y`` and ``conv_b``
    fused; attention q, k, v are fused into ``qkv`` (1x1 convolutions in the original, linears in diffusers).
    """
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    original = layout == "original"
    n = len(config.channel_mult)
    table = [layer("codebook", "quantize.embedding", params=("weight",))]
    for part, spatial in (("encoder", False), ("decoder", True)):
        table += [layer(part, part, params=()), layer(f"{part}.conv_in", f"{part}.conv_in")]
        mid = ("mid.block_1", "mid.attn_1", "mid.block_2") if original else \
              ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")
        table += _res(layout, f"{part}.{mid[0]}", f"{part}.mid_block1", spatial)
        table += _attention(layout, f"{part}.{mid[1]}", f"{part}.mid_attention", spatial)
        table += _res(layout, f"{part}.{mid[2]}", f"{part}.mid_block2", spatial)
        blocks = config.num_res_blocks + spatial  # the decoder has one more block per level
        for level in range(n):
            if original:
                src = f"{part}.{'up' if spatial else 'down'}.{level}"
                names = ("block", "attn", "upsample" if spatial else "downsample")
            else:
                src = f"{part}.up_blocks.{n - 1 - level}" if spatial else f"{part}.down_blocks.{level}"
                names = ("resnets", "attentions", "upsamplers.0" if spatial else "downsamplers.0")
            dst = f"{part}.levels.{level}"
            for j in range(blocks):
                table += _res(layout, f"{src}.{names[0]}.{j}", f"{dst}.blocks.{j}", spatial)
                table += _attention(layout, f"{src}.{names[1]}.{j}", f"{dst}.attentions.{j}", spatial)
            table += [layer(f"{dst}.resample", f"{src}.{names[2]}", params=()),
                      layer(f"{dst}.resample.conv", f"{src}.{names[2]}.conv")]
        norm_out = f"{part}.norm_out" if original else f"{part}.conv_norm_out"
        table += _norm(layout, norm_out, f"{part}.norm_out", spatial)
        table += [layer(f"{part}.conv_out", f"{part}.conv_out")]
        if part == "encoder":
            table += [layer("quant_conv", "quant_conv"), layer("post_quant_conv", "post_quant_conv")]
    with torch.device("meta"):
        present = dict(MoVQ(config).named_modules())
    return [item for item in table if item.ours in present]  # shortcuts, attentions, resamplers where they exist


def _levels_with(resolutions: list[int], first: int, step: Callable[[int], int], order: range) -> set[int]:
    found, res = set(), first
    for i in order:
        if res in resolutions:
            found.add(i)
        res = step(res)
    return found


def original(component: str, config: dict, source: Source) -> tuple[MoVQConfig, dict[str, torch.Tensor]]:
    """Original ``MOVQ(ddconfig, n_embed, embed_dim)`` hyperparameters and state dict -> ours."""
    missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in config]
    if missing:
        raise ValueError(f"original movq config must have keys ddconfig, n_embed, embed_dim; missing {missing}")
    dd: Mapping = config["ddconfig"]
    unsupported = {"double_z": False, "resamp_with_conv": True, "give_pre_end": False, "add_conv": False}
    for key, supported in unsupported.items():
        if dd.get(key, supported) != supported:
            raise ValueError(f"original movq ddconfig[{key!r}] must be {supported} (Kandinsky 2.1's MOVQ), "
                             f"got {dd[key]!r}")
    mult = tuple(dd["ch_mult"])
    n = len(mult)
    attn = list(dd.get("attn_resolutions", []))
    # The original places attention by the NOMINAL resolution: the encoder halves it level by level,
    # the decoder starts from resolution // 2^(n-1) and doubles it.
    encoder_levels = _levels_with(attn, dd["resolution"], lambda r: r // 2, range(n))
    decoder_levels = _levels_with(attn, dd["resolution"] // 2 ** (n - 1), lambda r: r * 2, range(n - 1, -1, -1))
    if encoder_levels != decoder_levels:
        raise ValueError(f"original movq ddconfig puts attention at encoder levels {sorted(encoder_levels)} "
                         f"but decoder "
                         f"levels {sorted(decoder_levels)}; only identical placements are supported")
    ours = MoVQConfig(
        in_channels=dd["in_channels"], out_channels=dd["out_ch"], channels=dd["ch"], channel_mult=mult,
        num_res_blocks=dd["num_res_blocks"], attention_levels=tuple(sorted(encoder_levels)),
        z_channels=dd["z_channels"], embed_dim=config["embed_dim"], n_embed=config["n_embed"],
    )
    return ours, read_layers(source, layers("original", ours))


# diffusers' VQModel constructor defaults (0.42.1): what a config.json without the key means
DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 3, "num_vq_embeddings": 256, "norm_num_groups": 32, "vq_embed_dim": None,
    "norm_type": "group", "mid_block_add_attention": True, "lookup_from_codebook": False,
}
# The value MoVQ needs of every field that changes the computation and that our MoVQ does not make a choice of.
# sample_size, scaling_factor and force_upcast do nothing in the Kandinsky pipelines. norm_num_groups sets the
# encoder's groups only (diffusers' spatial norms, the decoder's, always have 32): our norm_groups, with
# decoder_norm_groups 32. lookup_from_codebook would make the pipelines' decode(force_not_quantize=True) read the
# latents as codebook indices.
_DIFFUSERS_FIXED = {"norm_type": "spatial", "act_fn": "silu", "mid_block_add_attention": True,
                    "lookup_from_codebook": False}


def diffusers(component: str, config: dict, source: Source) -> tuple[MoVQConfig, dict[str, torch.Tensor]]:
    """diffusers ``VQModel`` ``config.json`` dict and state dict -> ours."""
    def value(key: str):
        return config.get(key, DIFFUSERS_DEFAULTS[key])

    for key, expected in _DIFFUSERS_FIXED.items():
        if value(key) != expected:
            raise ValueError(f"diffusers VQModel config[{key!r}] must be {expected!r} for MoVQ, got {value(key)!r}")
    widths = list(value("block_out_channels"))
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"diffusers block_out_channels {widths} must all be multiples of the first")
    n = len(widths)
    down, up = list(value("down_block_types")), list(value("up_block_types"))
    known_down = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
    known_up = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
    if len(down) != n or len(up) != n or any(t not in known_down for t in down) or any(t not in known_up for t in up):
        raise ValueError(f"diffusers down_block_types/up_block_types must be {n} of {list(known_down)} / "
                         f"{list(known_up)}, got {down} / {up}")
    encoder_levels = {i for i, t in enumerate(down) if known_down[t]}
    decoder_levels = {n - 1 - j for j, t in enumerate(up) if known_up[t]}
    if encoder_levels != decoder_levels:
        raise ValueError(f"diffusers config has attention at encoder levels {sorted(encoder_levels)} "
                         f"but decoder levels "
                         f"{sorted(decoder_levels)}; only identical placements are supported")
    latent, embed_dim = value("latent_channels"), value("vq_embed_dim") or value("latent_channels")
    if embed_dim != latent:
        raise ValueError(f"diffusers VQModel config: vq_embed_dim ({embed_dim}) must equal latent_channels ({latent}): "
                         f"diffusers' decoder sizes its spatial norms by latent_channels and feeds them the "
                         f"vq_embed_dim-channel quantised latents")
    layers_per_block = value("layers_per_block")
    if isinstance(layers_per_block, bool) or not isinstance(layers_per_block, int):
        raise ValueError(f"diffusers VQModel config: layers_per_block must be an int, got {layers_per_block!r}")
    ours = MoVQConfig(
        in_channels=value("in_channels"), out_channels=value("out_channels"), channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=layers_per_block,
        attention_levels=tuple(sorted(encoder_levels)), z_channels=latent, embed_dim=embed_dim,
        n_embed=value("num_vq_embeddings"), norm_groups=value("norm_num_groups"), decoder_norm_groups=32,
    )
    return ours, read_layers(source, layers("diffusers", ours))


def to_original_config(config: MoVQConfig) -> dict:
    """The original ``MOVQ(ddconfig, n_embed, embed_dim)`` arguments of one of our configs (the official ones
    for ``MoVQConfig()``); attention is placed by nominal resolution, 256 at level 0 as released."""
    official = OFFICIAL_ORIGINAL_CONFIGS["movq"]
    resolution = official["ddconfig"]["resolution"]
    n = len(config.channel_mult)
    if (config.norm_groups, config.decoder_norm_groups) != (32, 32):
        raise ValueError(f"config: the original MOVQ has 32 norm groups, got {config.norm_groups} (encoder) and "
                         f"{config.decoder_norm_groups} (decoder)")
    if resolution % 2 ** (n - 1):
        raise ValueError(f"config: {n} levels are too many for the original's nominal resolution {resolution}")
    ddconfig = {**official["ddconfig"], "z_channels": config.z_channels, "in_channels": config.in_channels,
                "out_ch": config.out_channels, "ch": config.channels, "ch_mult": list(config.channel_mult),
                "num_res_blocks": config.num_res_blocks,
                "attn_resolutions": [resolution // 2 ** level for level in sorted(config.attention_levels)]}
    return {"ddconfig": ddconfig, "n_embed": config.n_embed, "embed_dim": config.embed_dim}


def to_diffusers_config(config: MoVQConfig) -> dict:
    """The diffusers ``VQModel`` constructor kwargs of one of our configs (for comparisons with diffusers)."""
    if config.decoder_norm_groups != 32:
        raise ValueError(f"config: diffusers' VQModel decoder always has 32 norm groups, got "
                         f"{config.decoder_norm_groups}")
    if config.z_channels != config.embed_dim:
        raise ValueError(f"config: diffusers' VQModel decoder needs z_channels == embed_dim, got {config.z_channels} "
                         f"and {config.embed_dim}")
    n = len(config.channel_mult)
    attention = set(config.attention_levels)
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": [("AttnDownEncoderBlock2D" if i in attention else "DownEncoderBlock2D") for i in range(n)],
        "up_block_types": [("AttnUpDecoderBlock2D" if n - 1 - j in attention else "UpDecoderBlock2D")
                           for j in range(n)],
        "block_out_channels": [config.channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "num_vq_embeddings": config.n_embed,
        "norm_num_groups": config.norm_groups,
        "vq_embed_dim": config.embed_dim,
        "norm_type": "spatial",
    }

"""Decoder UNet converters (``unet`` and ``unet_inpaint``): original ``decoder_fp16.ckpt`` /
``inpainting_fp16.ckpt`` and diffusers ``UNet2DConditionModel`` (kandinsky-2-1[-inpaint]/unet).

Both layouts are mapped block by block onto ours (``conv_in``, ``down_blocks.<n>.{res,attn}``,
``mid_res1``/``mid_attn``/``mid_res2``, ``up_blocks.<n>.{res,attn,upsample}``, ``norm_out``, ``conv_out``):
first a table "foreign block prefix -> our prefix", then the per-block-kind key names. Only the attention
projections change layout:

* original: ``qkv`` is a Conv1d whose 3C outputs are head-major ``[h0: q,k,v | h1: q,k,v | ...]``,
  ``encoder_kv`` likewise ``[h0: k,v | ...]``; ours are Linear ``[q | k | v]`` / ``[k | v]``;
* diffusers: separate ``to_q``/``to_k``/``to_v`` and ``add_k_proj``/``add_v_proj``, concatenated here.
"""

from __future__ import annotations

import math
import re

import torch

from kandinsky.convert.core import Source
from kandinsky.models.unet import UNetConfig

# The CONFIG_2_1["model_config"] of ai-forever/Kandinsky-2 with the create_model arguments the official
# loader adds (up=False, inpainting=False/True).
_MODEL_CONFIG_2_1 = {
    "version": "2.1", "image_size": 64, "num_channels": 384, "num_res_blocks": 3, "channel_mult": "",
    "num_heads": 1, "num_head_channels": 64, "num_heads_upsample": -1, "attention_resolutions": "32,16,8",
    "dropout": 0, "model_dim": 768, "use_scale_shift_norm": True, "resblock_updown": True, "use_fp16": True,
    "cache_text_emb": True, "text_encoder_in_dim1": 1024, "text_encoder_in_dim2": 768,
    "image_encoder_in_dim": 768, "num_image_embs": 10, "pooling_type": "from_model", "in_channels": 4,
    "out_channels": 8, "use_flash_attention": False, "up": False,
}
OFFICIAL_ORIGINAL_CONFIGS = {
    "unet": {**_MODEL_CONFIG_2_1, "inpainting": False},
    "unet_inpaint": {**_MODEL_CONFIG_2_1, "inpainting": True},
}

# key names inside one block, foreign -> ours
_ORIGINAL_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "skip"}
_DIFFUSERS_RES = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb_proj",
                  "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "skip"}
_ORIGINAL_TOP = {"time_embed.0": "time_embed.0", "time_embed.2": "time_embed.2",
                 "proj_n": "text_embed_proj", "ln_model_n": "text_embed_norm", "img_layer": "image_embed_proj",
                 "clip_to_seq": "image_to_tokens", "to_model_dim_n": "text_to_context",
                 "input_blocks.0.0": "conv_in", "out.0": "norm_out", "out.2": "conv_out"}
_DIFFUSERS_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.text_proj": "text_embed_proj", "add_embedding.text_norm": "text_embed_norm",
                  "add_embedding.image_proj": "image_embed_proj", "encoder_hid_proj.image_embeds": "image_to_tokens",
                  "encoder_hid_proj.text_proj": "text_to_context", "conv_in": "conv_in",
                  "conv_norm_out": "norm_out", "conv_out": "conv_out"}


def _block_layout(config: UNetConfig) -> tuple[list[tuple[int, bool, bool]], list[tuple[int, bool, bool]]]:
    """(output channels, has attention, resamples) of each of our down blocks and up blocks, in order."""
    down, up = [], []
    last = len(config.channel_mult) - 1
    for level, mult in enumerate(config.channel_mult):
        ch = config.model_channels * mult
        down += [(ch, level in config.attention_levels, False)] * config.num_res_blocks
        if level != last:
            down.append((ch, False, True))
    for level, mult in reversed(list(enumerate(config.channel_mult))):
        ch = config.model_channels * mult
        for i in range(config.num_res_blocks + 1):
            up.append((ch, level in config.attention_levels, bool(level) and i == config.num_res_blocks))
    return down, up


def _rules(top: dict[str, str], blocks: list[tuple[str, str, dict[str, str]]]) -> list[tuple[str, str]]:
    """Regex rules ``<prefix>.<name>.(weight|bias)`` -> ours, for the top-level layers and every block."""
    rules = [(re.escape(src) + r"\.(weight|bias)", dst + r".\1") for src, dst in top.items()]
    for src_prefix, dst_prefix, names in blocks:
        for src, dst in names.items():
            rules.append((re.escape(f"{src_prefix}.{src}") + r"\.(weight|bias)", f"{dst_prefix}.{dst}.\\1"))
    return rules


def _head_major_to_ours(n: int, heads: int):
    """Original fused Conv1d rows ordered (heads, n, ch) -> our Linear rows (n, heads, ch); drops the
    kernel dimension of the weight."""
    def reorder(t: torch.Tensor) -> torch.Tensor:
        t = t.flatten(1) if t.ndim == 3 else t
        return t.unflatten(0, (heads, n, -1)).transpose(0, 1).flatten(0, 2)
    return reorder


def _attention_original(source: Source, converted: dict, src: str, dst: str, heads: int) -> None:
    def drop_kernel_dim(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1) if t.ndim == 3 else t

    for suffix in ("weight", "bias"):
        converted[f"{dst}.qkv.{suffix}"] = source.fuse([f"{src}.qkv.{suffix}"], _head_major_to_ours(3, heads))
        converted[f"{dst}.context_kv.{suffix}"] = source.fuse(
            [f"{src}.encoder_kv.{suffix}"], _head_major_to_ours(2, heads))
        converted[f"{dst}.proj_out.{suffix}"] = source.fuse([f"{src}.proj_out.{suffix}"], drop_kernel_dim)
        converted[f"{dst}.norm.{suffix}"] = source.take(f"{src}.norm.{suffix}")


def _attention_diffusers(source: Source, converted: dict, src: str, dst: str) -> None:
    def cat(*tensors: torch.Tensor) -> torch.Tensor:
        return torch.cat(tensors)

    for suffix in ("weight", "bias"):
        converted[f"{dst}.qkv.{suffix}"] = source.fuse(
            [f"{src}.{name}.{suffix}" for name in ("to_q", "to_k", "to_v")], cat)
        converted[f"{dst}.context_kv.{suffix}"] = source.fuse(
            [f"{src}.{name}.{suffix}" for name in ("add_k_proj", "add_v_proj")], cat)
        converted[f"{dst}.proj_out.{suffix}"] = source.take(f"{src}.to_out.0.{suffix}")
        converted[f"{dst}.norm.{suffix}"] = source.take(f"{src}.group_norm.{suffix}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_keys(layout: str, config: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in config]
    _require(not missing, f"{layout} UNet config lacks {missing}")


def _config_from_original(component: str, c: dict) -> UNetConfig:
    _require_keys("original", c, ("image_size", "num_channels", "num_res_blocks", "channel_mult",
                                  "attention_resolutions", "num_head_channels", "use_scale_shift_norm",
                                  "resblock_updown", "model_dim", "text_encoder_in_dim1", "text_encoder_in_dim2",
                                  "pooling_type", "in_channels", "out_channels"))
    _require(str(c.get("version", "2.0")) == "2.1",
             f"only the Kandinsky 2.1 UNet is supported, got version {c.get('version')!r}")
    _require(c["use_scale_shift_norm"] and c["resblock_updown"],
             "only use_scale_shift_norm=True and resblock_updown=True (Kandinsky 2.1) are supported")
    _require(c["pooling_type"] == "from_model", f"pooling_type must be 'from_model', got {c['pooling_type']!r}")
    _require(not c.get("up", False), "the super-resolution UNet (up=True) is not supported")
    _require(c["num_head_channels"] > 0, f"num_head_channels must be positive, got {c['num_head_channels']}")
    inpainting = bool(c.get("inpainting", False))
    _require(inpainting == (component == "unet_inpaint"),
             f"component {component!r} needs inpainting={component == 'unet_inpaint'}, got {inpainting}")
    image_size = int(c["image_size"])
    if c["channel_mult"] == "":
        defaults = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        _require(image_size in defaults, f"no default channel_mult for image_size {image_size}")
        channel_mult = defaults[image_size]
    else:
        channel_mult = tuple(int(m) for m in str(c["channel_mult"]).split(","))
    levels = []
    for res in str(c["attention_resolutions"]).split(","):
        ds = image_size // int(res)  # the original attends where the running downsample factor equals ds
        level = int(math.log2(ds))
        _require(2 ** level == ds, f"attention resolution {res} is not image_size / 2**k")
        levels.append(level)
    return UNetConfig(
        in_channels=2 * c["in_channels"] + 1 if inpainting else c["in_channels"],
        out_channels=c["out_channels"], model_channels=c["num_channels"], channel_mult=channel_mult,
        num_res_blocks=c["num_res_blocks"], attention_levels=tuple(sorted(levels)),
        head_channels=c["num_head_channels"], context_dim=c["model_dim"],
        text_hidden_dim=c["text_encoder_in_dim1"], text_embed_dim=c["text_encoder_in_dim2"],
        image_embed_dim=c.get("image_encoder_in_dim", 768), num_image_tokens=c.get("num_image_embs", 10),
    )


def original(component: str, config: dict, source: Source) -> tuple[UNetConfig, dict]:
    """Original ``create_model`` kwargs + ``decoder_fp16.ckpt``/``inpainting_fp16.ckpt`` keys -> ours.

    The original numbers its blocks flatly: ``input_blocks.0`` is the input conv, ``input_blocks.<n+1>`` our
    ``down_blocks.<n>``, ``output_blocks.<n>`` our ``up_blocks.<n>``; inside a block ``.0`` is the residual
    block, then ``.1`` the attention if any, then the upsampling residual block if any.
    """
    cfg = _config_from_original(component, config)
    down, up = _block_layout(cfg)
    converted: dict = {}
    blocks = []
    for n, (ch, has_attn, resample) in enumerate(down):
        blocks.append((f"input_blocks.{n + 1}.0", f"down_blocks.{n}.res", _ORIGINAL_RES))
        if has_attn:
            _attention_original(source, converted, f"input_blocks.{n + 1}.1", f"down_blocks.{n}.attn",
                                ch // cfg.head_channels)
    for n, (ch, has_attn, resample) in enumerate(up):
        blocks.append((f"output_blocks.{n}.0", f"up_blocks.{n}.res", _ORIGINAL_RES))
        if has_attn:
            _attention_original(source, converted, f"output_blocks.{n}.1", f"up_blocks.{n}.attn",
                                ch // cfg.head_channels)
        if resample:
            blocks.append((f"output_blocks.{n}.{2 if has_attn else 1}", f"up_blocks.{n}.upsample", _ORIGINAL_RES))
    blocks += [("middle_block.0", "mid_res1", _ORIGINAL_RES), ("middle_block.2", "mid_res2", _ORIGINAL_RES)]
    mid_ch = cfg.model_channels * cfg.channel_mult[-1]
    _attention_original(source, converted, "middle_block.1", "mid_attn", mid_ch // cfg.head_channels)
    converted.update(source.rename(_rules(_ORIGINAL_TOP, blocks)))
    return cfg, converted


def _config_from_diffusers(component: str, c: dict) -> UNetConfig:
    _require_keys("diffusers", c, ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                                   "attention_head_dim", "cross_attention_dim", "encoder_hid_dim", "in_channels",
                                   "out_channels"))
    fixed = {"addition_embed_type": "text_image", "encoder_hid_dim_type": "text_image_proj",
             "resnet_time_scale_shift": "scale_shift", "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
             "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
             "only_cross_attention": False, "conv_in_kernel": 3, "conv_out_kernel": 3}
    for key, value in fixed.items():
        _require(c.get(key, value) == value,
                 f"diffusers config: {key} must be {value!r} (Kandinsky 2.1), got {c.get(key)!r}")
    for key in ("resnet_out_scale_factor", "mid_block_scale_factor"):
        _require(float(c.get(key, 1.0)) == 1.0, f"diffusers config: {key} must be 1.0, got {c.get(key)!r}")
    for key in ("class_embed_type", "time_cond_proj_dim", "cross_attention_norm", "timestep_post_act"):
        _require(c.get(key) is None, f"diffusers config: {key} must be null, got {c.get(key)!r}")
    widths = list(c["block_out_channels"])
    base = widths[0]
    _require(all(w % base == 0 for w in widths), f"block_out_channels {widths} must be multiples of the first")
    last = len(widths) - 1
    down_types, up_types = list(c["down_block_types"]), list(c["up_block_types"])
    levels = []
    for level, kind in enumerate(down_types):
        _require(kind in ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"), f"unsupported down block {kind!r}")
        mirrored = up_types[last - level]
        attends = kind.startswith("SimpleCrossAttn")
        _require(mirrored == ("SimpleCrossAttnUpBlock2D" if attends else "ResnetUpsampleBlock2D"),
                 f"up block {mirrored!r} does not mirror down block {kind!r}")
        if attends:
            levels.append(level)
    head_dim = c["attention_head_dim"]
    _require(isinstance(head_dim, int), f"attention_head_dim must be one int, got {head_dim!r}")
    groups = c.get("norm_num_groups", 32)
    _require(groups == 32 and float(c.get("norm_eps", 1e-5)) == 1e-5, "norm_num_groups must be 32 and norm_eps 1e-5")
    in_channels = c["in_channels"]
    expected_in = 9 if component == "unet_inpaint" else 4
    _require(in_channels == expected_in, f"component {component!r} expects in_channels {expected_in}, got {in_channels}")
    return UNetConfig(
        in_channels=in_channels, out_channels=c["out_channels"], model_channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=c["layers_per_block"],
        attention_levels=tuple(levels), head_channels=head_dim, context_dim=c["cross_attention_dim"],
        text_hidden_dim=c["encoder_hid_dim"], text_embed_dim=c["cross_attention_dim"],
        image_embed_dim=c["cross_attention_dim"], num_image_tokens=10,  # fixed in diffusers' TextImageProjection
    )


def diffusers(component: str, config: dict, source: Source) -> tuple[UNetConfig, dict]:
    """diffusers ``UNet2DConditionModel`` (Kandinsky 2.1 config) -> ours.

    diffusers groups by level: ``down_blocks.<level>.{resnets,attentions}.<j>`` then ``downsamplers.0``;
    ``up_blocks.<u>`` (deepest level first) likewise with ``upsamplers.0``.
    """
    cfg = _config_from_diffusers(component, config)
    down, up = _block_layout(cfg)
    r = cfg.num_res_blocks
    converted: dict = {}
    blocks = []
    n = 0  # our down block index
    for level in range(len(cfg.channel_mult)):
        for j in range(r):
            blocks.append((f"down_blocks.{level}.resnets.{j}", f"down_blocks.{n}.res", _DIFFUSERS_RES))
            if down[n][1]:
                _attention_diffusers(source, converted, f"down_blocks.{level}.attentions.{j}", f"down_blocks.{n}.attn")
            n += 1
        if level != len(cfg.channel_mult) - 1:
            blocks.append((f"down_blocks.{level}.downsamplers.0", f"down_blocks.{n}.res", _DIFFUSERS_RES))
            n += 1
    for n, (_, has_attn, resample) in enumerate(up):
        u, j = divmod(n, r + 1)
        blocks.append((f"up_blocks.{u}.resnets.{j}", f"up_blocks.{n}.res", _DIFFUSERS_RES))
        if has_attn:
            _attention_diffusers(source, converted, f"up_blocks.{u}.attentions.{j}", f"up_blocks.{n}.attn")
        if resample:
            blocks.append((f"up_blocks.{u}.upsamplers.0", f"up_blocks.{n}.upsample", _DIFFUSERS_RES))
    blocks += [("mid_block.resnets.0", "mid_res1", _DIFFUSERS_RES), ("mid_block.resnets.1", "mid_res2", _DIFFUSERS_RES)]
    _attention_diffusers(source, converted, "mid_block.attentions.0", "mid_attn")
    converted.update(source.rename(_rules(_DIFFUSERS_TOP, blocks)))
    return cfg, converted

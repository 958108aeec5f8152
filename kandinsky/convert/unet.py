"""Decoder UNet converters (``unet`` and ``unet_inpaint``): original ``decoder_fp16.ckpt`` /
``inpainting_fp16.ckpt`` and diffusers ``UNet2DConditionModel`` (kandinsky-2-1[-inpaint]/unet, and the Kandinsky 2.2
ones: kandinsky-2-2-decoder[-inpaint]/unet, kandinsky-2-2-controlnet-depth/unet).

The diffusers config tells the variants apart: ``encoder_hid_dim_type`` / ``addition_embed_type``
``"text_image_proj"`` / ``"text_image"`` is 2.1, ``"image_proj"`` / ``"image"`` 2.2, ``"image_proj"`` /
``"image_hint"`` the 2.2 ControlNet (our ``UNetConfig.conditioning``); ``in_channels`` 9 is inpainting. Kandinsky 2.2
has no original layout: ai-forever's own 2.2 code loads the diffusers repositories.

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

import torch

from kandinsky.convert.core import Layer, Source, layer, read_layers
from kandinsky.models.unet import HINT_CHANNELS, HintEncoder, UNet, UNetConfig

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
# Kandinsky 2.2 (conditioning "image" / "image_hint"): ImageTimeEmbedding / ImageHintTimeEmbedding + ImageProjection
_DIFFUSERS_TOP_22 = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                     "add_embedding.image_proj": "image_embed_proj", "add_embedding.image_norm": "image_embed_norm",
                     "encoder_hid_proj.image_embeds": "image_to_tokens", "encoder_hid_proj.norm": "image_tokens_norm",
                     "conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}
_HINT_CONVS = tuple(range(0, 2 * len(HintEncoder.STRIDES), 2))  # the Conv2d indices of the hint encoder
# diffusers' encoder_hid_dim_type and addition_embed_type of each of our conditionings
DIFFUSERS_CONDITIONING = {("text_image_proj", "text_image"): "text_image", ("image_proj", "image"): "image",
                          ("image_proj", "image_hint"): "image_hint"}
IMAGE_PROJECTION_TOKENS = 32  # fixed in diffusers' ImageProjection (UNet2DConditionModel does not pass it)


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


def _attention(layout: str, src: str, dst: str, heads: int) -> list[Layer]:
    if layout == "original":  # Conv1d projections, head-major fused rows
        return [layer(dst, src, params=()), layer(f"{dst}.norm", f"{src}.norm"),
                layer(f"{dst}.qkv", f"{src}.qkv", head_major=(heads, 3), kernel=(1,)),
                layer(f"{dst}.context_kv", f"{src}.encoder_kv", head_major=(heads, 2), kernel=(1,)),
                layer(f"{dst}.proj_out", f"{src}.proj_out", kernel=(1,), traced=False)]
    return [layer(dst, src, params=()), layer(f"{dst}.norm", f"{src}.group_norm"),
            layer(f"{dst}.qkv", *(f"{src}.{name}" for name in ("to_q", "to_k", "to_v"))),
            layer(f"{dst}.context_kv", f"{src}.add_k_proj", f"{src}.add_v_proj"),
            layer(f"{dst}.proj_out", f"{src}.to_out.0")]


def _res(src: str, dst: str, names: dict[str, str]) -> list[Layer]:
    return [layer(dst, src, params=())] + [layer(f"{dst}.{ours}", f"{src}.{theirs}") for theirs, ours in names.items()]


def layers(layout: str, cfg: UNetConfig) -> list[Layer]:
    """The UNet's layer table in ``layout`` ("original" or "diffusers") for our config ``cfg``.

    The original numbers its blocks flatly: ``input_blocks.0`` is the input conv, ``input_blocks.<n+1>`` our
    ``down_blocks.<n>``, ``output_blocks.<n>`` our ``up_blocks.<n>``; inside a block ``.0`` is the residual
    block, then ``.1`` the attention if any, then the upsampling residual block if any. diffusers groups by
    level: ``down_blocks.<level>.{resnets,attentions}.<j>`` then ``downsamplers.0``; ``up_blocks.<u>``
    (deepest level first) likewise with ``upsamplers.0``.
    """
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    original = layout == "original"
    _require(cfg.has_text or not original, f"config: a Kandinsky 2.2 UNet (conditioning {cfg.conditioning!r}) has no "
                                           "original layout (ai-forever's 2.2 code loads the diffusers repositories)")
    down, up = _block_layout(cfg)
    top, res = (_ORIGINAL_TOP, _ORIGINAL_RES) if original else (_DIFFUSERS_TOP, _DIFFUSERS_RES)
    if not cfg.has_text:
        top = _DIFFUSERS_TOP_22
    table = [layer("", "", params=())] + [layer(ours, theirs) for theirs, ours in top.items()]
    if cfg.has_hint:
        table.append(layer("hint_encoder", "add_embedding.input_hint_block", params=()))
        table += [layer(f"hint_encoder.{i}", f"add_embedding.input_hint_block.{i}") for i in _HINT_CONVS]
    r, n = cfg.num_res_blocks, 0
    for level in range(len(cfg.channel_mult)):  # diffusers' level-major numbering, ours flat
        for j in range(r + (level != len(cfg.channel_mult) - 1)):
            ch, has_attn, resample = down[n]
            if original:
                table += [layer(f"down_blocks.{n}", f"input_blocks.{n + 1}", params=())]
                table += _res(f"input_blocks.{n + 1}.0", f"down_blocks.{n}.res", res)
                if has_attn:
                    table += _attention(layout, f"input_blocks.{n + 1}.1", f"down_blocks.{n}.attn", ch // cfg.head_channels)
            else:
                where = f"down_blocks.{level}.downsamplers.0" if resample else f"down_blocks.{level}.resnets.{j}"
                table += _res(where, f"down_blocks.{n}.res", res)
                if has_attn:
                    table += _attention(layout, f"down_blocks.{level}.attentions.{j}", f"down_blocks.{n}.attn", 0)
            n += 1
    mid_heads = cfg.model_channels * cfg.channel_mult[-1] // cfg.head_channels
    table += _res("middle_block.0" if original else "mid_block.resnets.0", "mid_res1", res)
    table += _attention(layout, "middle_block.1" if original else "mid_block.attentions.0", "mid_attn", mid_heads)
    table += _res("middle_block.2" if original else "mid_block.resnets.1", "mid_res2", res)
    for n, (ch, has_attn, resample) in enumerate(up):
        if original:
            table += [layer(f"up_blocks.{n}", f"output_blocks.{n}", params=())]
            table += _res(f"output_blocks.{n}.0", f"up_blocks.{n}.res", res)
            if has_attn:
                table += _attention(layout, f"output_blocks.{n}.1", f"up_blocks.{n}.attn", ch // cfg.head_channels)
            if resample:
                table += _res(f"output_blocks.{n}.{2 if has_attn else 1}", f"up_blocks.{n}.upsample", res)
        else:
            u, j = divmod(n, r + 1)
            table += _res(f"up_blocks.{u}.resnets.{j}", f"up_blocks.{n}.res", res)
            if has_attn:
                table += _attention(layout, f"up_blocks.{u}.attentions.{j}", f"up_blocks.{n}.attn", 0)
            if resample:
                table += _res(f"up_blocks.{u}.upsamplers.0", f"up_blocks.{n}.upsample", res)
    with torch.device("meta"):
        present = dict(UNet(cfg).named_modules())
    return [item for item in table if item.ours in present]  # residual blocks have a skip only when widths differ


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
    """Original ``create_model`` kwargs + ``decoder_fp16.ckpt``/``inpainting_fp16.ckpt`` keys -> ours."""
    cfg = _config_from_original(component, config)
    return cfg, read_layers(source, layers("original", cfg))


# diffusers' UNet2DConditionModel constructor defaults (0.42.1): what a config.json without the key means
DIFFUSERS_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1280, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "attention_head_dim": 8,
    "num_attention_heads": None, "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "attention_type": "default",
}
# Kandinsky 2.1's (and 2.2's) value of every field that changes the computation and that our UNet does not make a
# choice of (encoder_hid_dim_type and addition_embed_type are: DIFFUSERS_CONDITIONING).
# The fields not named here or read below do nothing for these block types or at inference (sample_size, dropout,
# downsample_padding, transformer_layers_per_block, reverse_transformer_layers_per_block, dual_cross_attention,
# use_linear_projection, upcast_attention, addition_time_embed_dim,
# projection_class_embeddings_input_dim, class_embeddings_concat, addition_embed_type_num_heads).
_DIFFUSERS_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "act_fn": "silu", "norm_eps": 1e-5,
    "num_attention_heads": None,
    "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "scale_shift",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "mid_block_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None,
    "attention_type": "default",  # "gated": GLIGEN's position_net
}


def _one_int(name: str, value) -> int:
    """An int, or a per-block list of one repeated int (diffusers takes both)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    _require(bool(values) and all(isinstance(v, int) and not isinstance(v, bool) and v == values[0] for v in values),
             f"diffusers config: {name} must be one int (or a list of one repeated int), got {value!r}")
    return values[0]


def _config_from_diffusers(component: str, c: dict) -> UNetConfig:
    def value(key: str):
        return c.get(key, DIFFUSERS_DEFAULTS[key])

    kinds = (value("encoder_hid_dim_type"), value("addition_embed_type"))
    _require(kinds in DIFFUSERS_CONDITIONING,
             f"diffusers config: (encoder_hid_dim_type, addition_embed_type) must be one of "
             f"{list(DIFFUSERS_CONDITIONING)} (Kandinsky 2.1, 2.2, 2.2 ControlNet), got {kinds}")
    conditioning = DIFFUSERS_CONDITIONING[kinds]
    for key, expected in _DIFFUSERS_FIXED.items():
        got = value(key)
        same = got == expected if not isinstance(expected, float) else isinstance(got, (int, float)) and got == expected
        _require(same, f"diffusers config: {key} must be {expected!r} (Kandinsky 2.1 and 2.2), got {got!r}")
    for key in ("only_cross_attention", "mid_block_only_cross_attention"):
        got = value(key)
        flags = list(got) if isinstance(got, (list, tuple)) else [got]
        _require(all(flag in (False, None) for flag in flags),
                 f"diffusers config: {key} must be false (self- and cross-attention, Kandinsky 2.1), got {got!r}")
    widths = list(value("block_out_channels"))
    base = widths[0]
    _require(all(w % base == 0 for w in widths), f"block_out_channels {widths} must be multiples of the first")
    time_embed_dim = value("time_embedding_dim")
    _require(time_embed_dim in (None, 4 * base),
             f"diffusers config: time_embedding_dim must be 4 * block_out_channels[0] = {4 * base}, got {time_embed_dim!r}")
    last = len(widths) - 1
    down_types, up_types = list(value("down_block_types")), list(value("up_block_types"))
    _require(len(down_types) == len(up_types) == len(widths),
             f"diffusers config: {len(widths)} down_block_types and up_block_types expected, got {down_types} / {up_types}")
    levels = []
    for level, kind in enumerate(down_types):
        _require(kind in ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"), f"unsupported down block {kind!r}")
        mirrored = up_types[last - level]
        attends = kind.startswith("SimpleCrossAttn")
        _require(mirrored == ("SimpleCrossAttnUpBlock2D" if attends else "ResnetUpsampleBlock2D"),
                 f"up block {mirrored!r} does not mirror down block {kind!r}")
        if attends:
            levels.append(level)
    groups = value("norm_num_groups")
    _require(isinstance(groups, int) and groups > 0 and all(w % groups == 0 for w in widths),
             f"diffusers config: norm_num_groups must divide every block width {widths}, got {groups!r}")
    context_dim = value("cross_attention_dim")  # a per-block list is not possible with text_image_proj
    _require(isinstance(context_dim, int), f"diffusers config: cross_attention_dim must be an int, got {context_dim!r}")
    hid_dim = value("encoder_hid_dim")  # 2.1: the text hidden states' width; 2.2: the image embedding's
    _require(hid_dim is not None, f"diffusers UNet config lacks ['encoder_hid_dim'] (encoder_hid_dim_type "
                                  f"{kinds[0]!r} needs it)")
    _require(isinstance(hid_dim, int), f"diffusers config: encoder_hid_dim must be an int, got {hid_dim!r}")
    in_channels = value("in_channels")
    expected_in = 9 if component == "unet_inpaint" else 4
    if conditioning == "image_hint":
        _require(component == "unet", f"component {component!r}: a ControlNet UNet (addition_embed_type "
                                      "'image_hint') is converted as component 'unet'")
        expected_in += HINT_CHANNELS  # conv_in also reads the hint encoder's channels
    _require(in_channels == expected_in, f"component {component!r} expects in_channels {expected_in}, got {in_channels}")
    if conditioning == "text_image":
        dims = dict(text_hidden_dim=hid_dim, text_embed_dim=context_dim, image_embed_dim=context_dim,
                    num_image_tokens=10)  # fixed in diffusers' TextImageProjection
    else:  # the text fields keep their defaults: no text
        dims = dict(image_embed_dim=hid_dim, num_image_tokens=IMAGE_PROJECTION_TOKENS)
    return UNetConfig(
        in_channels=in_channels, out_channels=value("out_channels"), model_channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=_one_int("layers_per_block", value("layers_per_block")),
        attention_levels=tuple(levels), head_channels=_one_int("attention_head_dim", value("attention_head_dim")),
        context_dim=context_dim, norm_groups=groups, conditioning=conditioning, **dims,
    )


def diffusers(component: str, config: dict, source: Source) -> tuple[UNetConfig, dict]:
    """diffusers ``UNet2DConditionModel`` (Kandinsky 2.1, 2.2 or 2.2 ControlNet config) -> ours."""
    cfg = _config_from_diffusers(component, config)
    return cfg, read_layers(source, layers("diffusers", cfg))


# --------------------------------------------------------------------------------------------- ours -> foreign


def to_original_config(component: str, cfg: UNetConfig) -> dict:
    """The original ``create_model`` kwargs of one of our configs (the official ones for ``UNetConfig()``)."""
    inpainting = component == "unet_inpaint"
    _require(cfg.has_text, f"config: a Kandinsky 2.2 UNet (conditioning {cfg.conditioning!r}) has no original layout")
    _require(cfg.norm_groups == 32, f"config: the original UNet has 32 norm groups, got {cfg.norm_groups}")
    _require(not inpainting or cfg.in_channels % 2 == 1,
             f"config: an inpainting UNet takes 2 * latent channels + 1 inputs, got {cfg.in_channels}")
    image_size = _MODEL_CONFIG_2_1["image_size"]
    _require(2 ** max(cfg.attention_levels, default=0) <= image_size,
             f"config: attention levels {cfg.attention_levels} too deep for the original's image_size {image_size}")
    return {
        **OFFICIAL_ORIGINAL_CONFIGS[component],
        "num_channels": cfg.model_channels, "num_res_blocks": cfg.num_res_blocks,
        "channel_mult": "" if cfg.channel_mult == (1, 2, 3, 4) else ",".join(map(str, cfg.channel_mult)),
        "attention_resolutions": ",".join(str(image_size // 2 ** level) for level in sorted(cfg.attention_levels)),
        "num_head_channels": cfg.head_channels, "model_dim": cfg.context_dim,
        "text_encoder_in_dim1": cfg.text_hidden_dim, "text_encoder_in_dim2": cfg.text_embed_dim,
        "image_encoder_in_dim": cfg.image_embed_dim, "num_image_embs": cfg.num_image_tokens,
        "in_channels": (cfg.in_channels - 1) // 2 if inpainting else cfg.in_channels,
        "out_channels": cfg.out_channels,
    }


def to_diffusers_config(cfg: UNetConfig) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of one of our configs (the official one by default,
    equal to kandinsky-community/kandinsky-2-1[-inpaint]/unet/config.json apart from null-valued keys)."""
    if cfg.has_text:
        _require(cfg.text_embed_dim == cfg.image_embed_dim == cfg.context_dim,
                 "config: diffusers ties text_embed_dim and image_embed_dim to cross_attention_dim (context_dim)")
        _require(cfg.num_image_tokens == 10, "config: diffusers' TextImageProjection always makes 10 image tokens")
    else:
        _require(cfg.num_image_tokens == IMAGE_PROJECTION_TOKENS,
                 f"config: diffusers' ImageProjection always makes {IMAGE_PROJECTION_TOKENS} image tokens")
    kinds = {conditioning: pair for pair, conditioning in DIFFUSERS_CONDITIONING.items()}[cfg.conditioning]
    attends = [level in cfg.attention_levels for level in range(len(cfg.channel_mult))]
    return {
        "act_fn": "silu", "addition_embed_type": kinds[1], "addition_embed_type_num_heads": 64,
        "attention_head_dim": cfg.head_channels,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "center_input_sample": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": cfg.context_dim,
        "down_block_types": ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attends],
        "downsample_padding": 1, "dual_cross_attention": False,
        "encoder_hid_dim": cfg.text_hidden_dim if cfg.has_text else cfg.image_embed_dim,
        "encoder_hid_dim_type": kinds[0], "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": cfg.in_channels, "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": 1e-05,
        "norm_num_groups": cfg.norm_groups, "only_cross_attention": False, "out_channels": cfg.out_channels,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "scale_shift",
        "sample_size": 64, "time_embedding_type": "positional", "upcast_attention": False,
        "up_block_types": ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attends)],
        "use_linear_projection": False,
    }

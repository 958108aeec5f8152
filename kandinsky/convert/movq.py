"""MoVQ conversion from the original ``MOVQ`` (``movq_final.ckpt``) and from diffusers ``VQModel``.

Key names are mapped by ordered regex substitutions on module paths. Two layout changes need more
than a rename: separate q/k/v (1x1 convs or linears) become one fused ``qkv`` linear, and a spatial
norm's ``conv_y``/``conv_b`` become one ``to_scale_shift`` conv (scale channels first).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from kandinsky.convert.core import Source
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

Rule = tuple[str, str | Callable[[re.Match], str]]

_ORIGINAL_PATHS: list[Rule] = [
    (r"^quantize\.embedding\b", "codebook"),
    (r"\.(?:down|up)\.(\d+)\.block\.", r".levels.\1.blocks."),
    (r"\.(?:down|up)\.(\d+)\.attn\.", r".levels.\1.attentions."),
    (r"\.(?:down|up)\.(\d+)\.(?:downsample|upsample)\b", r".levels.\1.resample"),
    (r"\.mid\.block_([12])\b", r".mid_block\1"),
    (r"\.mid\.attn_1\b", ".mid_attention"),
    (r"\.nin_shortcut\b", ".shortcut"),
    (r"\.proj_out\b", ".proj"),
    (r"\.norm_layer\b", ".norm"),  # the GroupNorm inside a decoder SpatialNorm
]
_ORIGINAL_FUSED = [(("q", "k", "v"), "qkv"), (("conv_y", "conv_b"), "to_scale_shift")]


def _diffusers_paths(num_levels: int) -> list[Rule]:
    return [
        (r"^quantize\.embedding\b", "codebook"),
        (r"^encoder\.down_blocks\.(\d+)\.", r"encoder.levels.\1."),
        # diffusers orders decoder blocks deepest first; ours are indexed by resolution level
        (r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.levels.{num_levels - 1 - int(m[1])}."),
        (r"\.mid_block\.resnets\.([01])\b", lambda m: f".mid_block{int(m[1]) + 1}"),
        (r"\.mid_block\.attentions\.0\b", ".mid_attention"),
        (r"\.resnets\.", ".blocks."),
        (r"\.(?:down|up)samplers\.0\b", ".resample"),
        (r"\.conv_shortcut\b", ".shortcut"),
        (r"\.(?:group_norm|spatial_norm)\b", ".norm"),
        (r"\.norm_layer\b", ".norm"),
        (r"\.to_out\.0\b", ".proj"),
        (r"\.conv_norm_out\b", ".norm_out"),
    ]


_DIFFUSERS_FUSED = [(("to_q", "to_k", "to_v"), "qkv"), (("conv_y", "conv_b"), "to_scale_shift")]


def _map(path: str, rules: list[Rule]) -> str:
    for pattern, replacement in rules:
        path = re.sub(pattern, replacement, path)
    return path


def _fit(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A 1x1 conv kernel (O, I, 1, 1) used as a linear weight (O, I): a view, no copy. Any other
    mismatch is left for the strict check to report."""
    if tensor.shape != shape and tensor.numel() == shape.numel() and tensor.shape[: len(shape)] == shape:
        return tensor.reshape(shape)
    return tensor


def _convert_state(source: Source, config: MoVQConfig, rules: list[Rule],
                   fused: list[tuple[tuple[str, ...], str]]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        expected = {k: v.shape for k, v in MoVQ(config).state_dict().items()}
    converted: dict[str, torch.Tensor] = {}
    for key in list(source.keys()):
        if key in source.used:
            continue
        module_path, _, param = key.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        group = next(((parts, target) for parts, target in fused if leaf in parts), None)
        if group is not None:
            parts, target = group
            if leaf != parts[0]:  # fused when its first part is met; an orphan part stays unconsumed
                continue
            name = f"{_map(parent, rules)}.{target}.{param}"
            if name not in expected:
                continue
            tensor = source.fuse([f"{parent}.{p}.{param}" for p in parts], lambda *ts: torch.cat(ts))
        else:
            name = _map(key, rules)
            if name not in expected:  # unknown key: left unconsumed, so the strict check names it
                continue
            tensor = source.take(key)
        if tensor is not None:
            converted[name] = _fit(tensor, expected[name])
    return converted


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
    return ours, _convert_state(source, ours, _ORIGINAL_PATHS, _ORIGINAL_FUSED)


def diffusers(component: str, config: dict, source: Source) -> tuple[MoVQConfig, dict[str, torch.Tensor]]:
    """diffusers ``VQModel`` ``config.json`` dict and state dict -> ours."""
    required = {"norm_type": "spatial", "act_fn": "silu", "mid_block_add_attention": True}
    for key, value in required.items():
        if config.get(key, value if key != "norm_type" else "group") != value:
            raise ValueError(f"diffusers VQModel config[{key!r}] must be {value!r} for MoVQ, got {config.get(key)!r}")
    widths = list(config["block_out_channels"])
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"diffusers block_out_channels {widths} must all be multiples of the first")
    n = len(widths)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
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
    latent = config.get("latent_channels", 3)
    ours = MoVQConfig(
        in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3), channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=config.get("layers_per_block", 1),
        attention_levels=tuple(sorted(encoder_levels)), z_channels=latent,
        embed_dim=config.get("vq_embed_dim") or latent, n_embed=config.get("num_vq_embeddings", 256),
        norm_groups=config.get("norm_num_groups", 32),
    )
    return ours, _convert_state(source, ours, _diffusers_paths(n), _DIFFUSERS_FUSED)


def to_diffusers_config(config: MoVQConfig) -> dict:
    """The diffusers ``VQModel`` constructor kwargs of one of our configs (for comparisons with diffusers)."""
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

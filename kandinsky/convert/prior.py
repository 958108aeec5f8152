"""Prior conversion from the original ``PriorDiffusionModel`` (``prior_fp16.ckpt``, keys ``model.*``)
and from diffusers ``PriorTransformer`` (``kandinsky-2-1-prior/prior``).

Two layout changes beyond renaming:

* QKV: the original's fused ``c_qkv`` output is viewed as (heads, q|k|v, head_dim), i.e. head-major;
  diffusers has separate ``to_q``/``to_k``/``to_v``. Ours is one fused linear in (q|k|v, heads,
  head_dim) order, so the original's rows are permuted and diffusers' are concatenated.
* CLIP statistics: the original keeps ``clip_mean``/``clip_std`` outside the checkpoint (the official
  ``ViT-L-14_stats.th``), passed here as ``clip_stats=(mean, std)``; diffusers stores them as (1, dim)
  parameters. Ours are persistent (dim,) buffers.
"""

from __future__ import annotations

import torch

from kandinsky.convert.core import Source
from kandinsky.models.prior import NUM_EXTRA_TOKENS, PriorConfig

OFFICIAL_ORIGINAL_CONFIGS: dict[str, dict] = {
    # CONFIG_2_1["prior"]["params"] of ai-forever/Kandinsky-2 (kandinsky2/configs.py)
    "prior": {
        "model": {
            "type": "prior",
            "diffusion_sampler": "uniform",
            "hparams": {
                "text_ctx": 77, "xf_width": 2048, "xf_layers": 20, "xf_heads": 32, "xf_final_ln": True,
                "xf_padding": False, "text_drop": 0.2, "clip_dim": 768, "clip_xf_width": 768,
            },
        },
        "diffusion": {
            "steps": 1000, "learn_sigma": False, "sigma_small": True, "noise_schedule": "cosine", "use_kl": False,
            "predict_xstart": True, "rescale_learned_sigmas": False, "timestep_respacing": "",
        },
    },
}

_ORIGINAL_RULES = [
    (r"model\.positional_embedding", "positional_embedding"),
    (r"model\.prd_emb", "prd_token"),
    (r"model\.time_embed\.([02])\.(weight|bias)", r"time_embed.\1.\2"),
    (r"model\.text_enc_proj\.(weight|bias)", r"text_hidden_proj.\1"),
    (r"model\.text_emb_proj\.(weight|bias)", r"text_embed_proj.\1"),
    (r"model\.clip_img_proj\.(weight|bias)", r"image_embed_proj.\1"),
    (r"model\.out_proj\.(weight|bias)", r"out_proj.\1"),
    (r"model\.final_ln\.(weight|bias)", r"final_norm.\1"),
    (r"model\.transformer\.resblocks\.(\d+)\.attn\.c_proj\.(weight|bias)", r"blocks.\1.attn.out.\2"),
    (r"model\.transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"model\.transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"model\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"model\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
]

_DIFFUSERS_RULES = [
    (r"positional_embedding", "positional_embedding"),
    (r"prd_embedding", "prd_token"),
    (r"time_embedding\.linear_1\.(weight|bias)", r"time_embed.0.\1"),
    (r"time_embedding\.linear_2\.(weight|bias)", r"time_embed.2.\1"),
    (r"encoder_hidden_states_proj\.(weight|bias)", r"text_hidden_proj.\1"),
    (r"embedding_proj\.(weight|bias)", r"text_embed_proj.\1"),
    (r"proj_in\.(weight|bias)", r"image_embed_proj.\1"),
    (r"proj_to_clip_embeddings\.(weight|bias)", r"out_proj.\1"),
    (r"norm_out\.(weight|bias)", r"final_norm.\1"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.out.\2"),
    (r"transformer_blocks\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer_blocks\.(\d+)\.norm3\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
]


def head_major_to_qkv_major(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder fused-QKV rows from the original's (heads, q|k|v, head_dim) to ours (q|k|v, heads, head_dim).

    Works for the weight (3W, W) and the bias (3W,).
    """
    rows = tensor.shape[0]
    head_dim = rows // (3 * heads)
    return tensor.reshape(heads, 3, head_dim, *tensor.shape[1:]).transpose(0, 1).reshape(rows, *tensor.shape[1:])


def _stat(value, name: str, dim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != dim:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"clip_stats: {name} must be a tensor of {dim} values ((dim,) or (1, dim)), got {got}")
    return value.reshape(dim)


def original(component: str, config: dict, source: Source, clip_stats=None) -> tuple[PriorConfig, dict]:
    """``config``: the original ``prior.params`` dict (``model.hparams`` + ``diffusion``);
    ``clip_stats``: the (mean, std) pair of ``ViT-L-14_stats.th``."""
    try:
        hparams = config["model"]["hparams"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"config: expected the original prior.params dict with model.hparams, got keys {list(config)}") from error
    if not hparams.get("xf_final_ln", True) or hparams.get("xf_padding", False):
        raise ValueError("config: only xf_final_ln=True, xf_padding=False (the released prior) is supported, got "
                         f"xf_final_ln={hparams.get('xf_final_ln')}, xf_padding={hparams.get('xf_padding')}")
    if clip_stats is None or len(clip_stats) != 2:
        raise ValueError("clip_stats: the original checkpoint has no CLIP statistics; pass clip_stats=(mean, std) "
                         "as loaded from ViT-L-14_stats.th")
    our_config = PriorConfig(text_ctx=hparams["text_ctx"], width=hparams["xf_width"], layers=hparams["xf_layers"],
                             heads=hparams["xf_heads"], clip_dim=hparams["clip_dim"], text_width=hparams["clip_xf_width"])
    converted: dict[str, torch.Tensor | None] = {}
    for i in range(our_config.layers):
        prefix = f"model.transformer.resblocks.{i}.attn.c_qkv"
        for kind in ("weight", "bias"):
            tensor = source.take(f"{prefix}.{kind}")
            converted[f"blocks.{i}.attn.qkv.{kind}"] = None if tensor is None else head_major_to_qkv_major(tensor, our_config.heads)
    converted.update(source.rename(_ORIGINAL_RULES))
    mean, std = clip_stats
    converted["clip_mean"] = _stat(mean, "mean", our_config.clip_dim)
    converted["clip_std"] = _stat(std, "std", our_config.clip_dim)
    return our_config, converted


def diffusers(component: str, config: dict, source: Source) -> tuple[PriorConfig, dict]:
    """``config``: diffusers ``PriorTransformer`` ``config.json`` dict (clip_mean/clip_std are in the state dict)."""
    heads, head_dim = config.get("num_attention_heads", 32), config.get("attention_head_dim", 64)
    width, dim = heads * head_dim, config.get("embedding_dim", 768)
    unsupported = {
        "additional_embeddings": (config.get("additional_embeddings", 4), NUM_EXTRA_TOKENS),
        "time_embed_act_fn": (config.get("time_embed_act_fn", "silu"), "silu"),
        "norm_in_type": (config.get("norm_in_type"), None),
        "embedding_proj_norm_type": (config.get("embedding_proj_norm_type"), None),
        "encoder_hid_proj_type": (config.get("encoder_hid_proj_type", "linear"), "linear"),
        "added_emb_type": (config.get("added_emb_type", "prd"), "prd"),
        "time_embed_dim": (config.get("time_embed_dim") or width, width),
        "embedding_proj_dim": (config.get("embedding_proj_dim") or dim, dim),
        "clip_embed_dim": (config.get("clip_embed_dim") or dim, dim),
    }
    wrong = {k: got for k, (got, want) in unsupported.items() if got != want}
    if wrong:
        raise ValueError(f"config: unsupported PriorTransformer options for the Kandinsky 2.1 prior: {wrong}")
    our_config = PriorConfig(text_ctx=config.get("num_embeddings", 77), width=width, layers=config.get("num_layers", 20),
                             heads=heads, clip_dim=dim, text_width=dim)
    converted: dict[str, torch.Tensor | None] = {}
    for i in range(our_config.layers):
        prefix = f"transformer_blocks.{i}.attn1"
        for kind in ("weight", "bias"):
            converted[f"blocks.{i}.attn.qkv.{kind}"] = source.fuse(
                [f"{prefix}.to_{name}.{kind}" for name in "qkv"], lambda *t: torch.cat(t))
    for name in ("clip_mean", "clip_std"):
        tensor = source.take(name)
        converted[name] = None if tensor is None else tensor.reshape(-1)
    converted.update(source.rename(_DIFFUSERS_RULES))
    return our_config, converted

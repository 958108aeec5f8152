"""Prior conversion from the original ``PriorDiffusionModel`` (``prior_fp16.ckpt``, keys ``model.*``)
and from diffusers ``PriorTransformer`` (``kandinsky-2-1-prior/prior``, and ``kandinsky-2-2-prior/prior``: the
same model at ``embedding_dim`` 1280).

Both directions (and the divergence tracer's module pairs) come from one layer table per layout,
:func:`layers`. Two layout changes beyond renaming:

* QKV: the original's fused ``c_qkv`` output is viewed as (heads, q|k|v, head_dim), i.e. head-major;
  diffusers has separate ``to_q``/``to_k``/``to_v``. Ours is one fused linear in (q|k|v, heads,
  head_dim) order, so the original's rows are permuted and diffusers' are concatenated.
* CLIP statistics: the original keeps ``clip_mean``/``clip_std`` outside the checkpoint (the official
  ``ViT-L-14_stats.th``), passed here as ``clip_stats=(mean, std)``; diffusers stores them as (1, dim)
  parameters. Ours are persistent (dim,) buffers.
"""

from __future__ import annotations

import torch

from kandinsky.convert.core import Layer, Source, layer, read_layers, write_layers
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

# (ours, original, diffusers) module paths of the layers outside the blocks, and inside block {i}
_TOP = [
    ("time_embed.0", "model.time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "model.time_embed.2", "time_embedding.linear_2"),
    ("text_hidden_proj", "model.text_enc_proj", "encoder_hidden_states_proj"),
    ("text_embed_proj", "model.text_emb_proj", "embedding_proj"),
    ("image_embed_proj", "model.clip_img_proj", "proj_in"),
    ("final_norm", "model.final_ln", "norm_out"),
    ("out_proj", "model.out_proj", "proj_to_clip_embeddings"),
]
_BLOCK = [
    ("norm1", "ln_1", "norm1"),
    ("attn.out", "attn.c_proj", "attn1.to_out.0"),
    ("norm2", "ln_2", "norm3"),
    ("mlp.fc1", "mlp.c_fc", "ff.net.0.proj"),
    ("mlp.fc2", "mlp.c_proj", "ff.net.2"),
]
_TENSORS = [("positional_embedding", "model.positional_embedding", "positional_embedding"),
            ("prd_token", "model.prd_emb", "prd_embedding")]
_BLOCK_PREFIX = {"original": "model.transformer.resblocks", "diffusers": "transformer_blocks"}


def layers(layout: str, config: PriorConfig) -> list[Layer]:
    """The prior's layer table in ``layout`` ("original" or "diffusers"); the CLIP statistics are not in it
    (the original keeps them in a separate file, diffusers as (1, dim) tensors)."""
    column = {"original": 1, "diffusers": 2}[layout]
    table = [layer("", "model" if layout == "original" else "", params=())]  # the whole model: traced only
    table += [layer(row[0], row[column], params=("",)) for row in _TENSORS]
    table += [layer(row[0], row[column]) for row in _TOP[:-2]]
    for i in range(config.layers):
        ours, theirs = f"blocks.{i}", f"{_BLOCK_PREFIX[layout]}.{i}"
        table.append(layer(ours, theirs, params=()))  # the whole block: traced only
        if layout == "original":
            table += [layer(f"{ours}.attn.qkv", f"{theirs}.attn.c_qkv", head_major=(config.heads, 3)),
                      layer(f"{ours}.attn", f"{theirs}.attn", params=()), layer(f"{ours}.mlp", f"{theirs}.mlp", params=())]
        else:
            table += [layer(f"{ours}.attn.qkv", *(f"{theirs}.attn1.to_{name}" for name in "qkv")),
                      layer(f"{ours}.attn", f"{theirs}.attn1", params=()), layer(f"{ours}.mlp", f"{theirs}.ff", params=())]
        table += [layer(f"{ours}.{row[0]}", f"{theirs}.{row[column]}") for row in _BLOCK]
    # diffusers normalises the whole sequence, then takes the prd token: not comparable with ours
    table += [layer(row[0], row[column], traced=not (row[0] == "final_norm" and layout == "diffusers"))
              for row in _TOP[-2:]]
    return table


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
    converted = read_layers(source, layers("original", our_config))
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
        raise ValueError(f"config: unsupported PriorTransformer options for the Kandinsky 2.1 / 2.2 prior: {wrong}")
    our_config = PriorConfig(text_ctx=config.get("num_embeddings", 77), width=width, layers=config.get("num_layers", 20),
                             heads=heads, clip_dim=dim, text_width=dim)
    converted = read_layers(source, layers("diffusers", our_config))
    for name in ("clip_mean", "clip_std"):
        tensor = source.take(name)
        converted[name] = None if tensor is None else tensor.reshape(-1)
    return our_config, converted


# --------------------------------------------------------------------------------------------- ours -> foreign


def to_original_config(config: PriorConfig) -> dict:
    """The original ``prior.params`` dict of one of our configs (the official one for ``PriorConfig()``)."""
    if config.width % config.heads:
        raise ValueError(f"config: width ({config.width}) must be a multiple of heads ({config.heads})")
    official = OFFICIAL_ORIGINAL_CONFIGS["prior"]
    hparams = {**official["model"]["hparams"], "text_ctx": config.text_ctx, "xf_width": config.width,
               "xf_layers": config.layers, "xf_heads": config.heads, "clip_dim": config.clip_dim,
               "clip_xf_width": config.text_width}
    return {"model": {**official["model"], "hparams": hparams}, "diffusion": dict(official["diffusion"])}


def to_diffusers_config(config: PriorConfig) -> dict:
    """The diffusers ``PriorTransformer`` constructor kwargs of one of our configs (their defaults left out)."""
    if config.text_width != config.clip_dim:
        raise ValueError(f"config: diffusers' PriorTransformer needs text_width == clip_dim, got {config.text_width} "
                         f"and {config.clip_dim}")
    return {"num_attention_heads": config.heads, "attention_head_dim": config.width // config.heads,
            "num_layers": config.layers, "embedding_dim": config.clip_dim, "num_embeddings": config.text_ctx,
            "additional_embeddings": NUM_EXTRA_TOKENS, "dropout": 0.0}


def write_state(layout: str, config: PriorConfig, state_dict: dict, dtype: torch.dtype | None = None
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """Our state dict in ``layout``: (foreign state dict, extras). The original layout keeps the CLIP
    statistics out of the checkpoint: ``extras["clip_stats"] = (mean, std)``, (dim,) float32 each, as in
    ``ViT-L-14_stats.th``; diffusers stores them in the state dict as (1, dim)."""
    state = dict(state_dict)
    stats = [state.pop(name, None) for name in ("clip_mean", "clip_std")]
    if any(stat is None for stat in stats):
        raise ValueError("state_dict: the prior's clip_mean and clip_std are missing")
    foreign = write_layers("prior", layout, state, layers(layout, config), dtype)
    if layout == "original":
        return foreign, {"clip_stats": tuple(stat.detach().float().clone() for stat in stats)}
    for name, stat in zip(("clip_mean", "clip_std"), stats):
        foreign[name] = stat.detach().reshape(1, -1).to(dtype or stat.dtype, copy=True)
    return foreign, {}

"""A tiny Kandinsky 2.1 with seeded random weights, built in memory: no download, no file, no diffusers.

Every component of the real pipeline at a few hundred kB in all, with the dimensions tied as the real
ones are (``configs/*_tiny.json`` hold the same configs):

* CLIP text and vision towers: width 32, projection 32 = the prior's ``clip_dim`` and ``text_width``;
* M-CLIP (XLM-RoBERTa): width 32 = the UNet's ``text_hidden_dim``, projection 32 = its ``text_embed_dim``;
* UNet: ``image_embed_dim`` 32 = ``clip_dim``, 4 latent channels = the MoVQ's ``embed_dim``;
* MoVQ: 4 levels (images are multiples of 64 px, as with the real one).

The tokenizers are real ``transformers`` tokenizers with tiny vocabularies, so padding, truncation and
special tokens behave like the official ones (CLIP: byte-level BPE, ``<|startoftext|>`` / ``<|endoftext|>``,
pad = end-of-text; XLM-RoBERTa: Unigram, ``<s>`` / ``</s>`` / ``<pad>`` = 1). They are built from
in-memory vocabularies, which needs transformers >= 5.

    from kandinsky import Kandinsky21
    pipe = Kandinsky21.from_config("tiny", seed=0)
    images = pipe.text2img("a cat", height=64, width=64, num_inference_steps=4)

The tiny Kandinsky 2.2 (:func:`components_22`, ``configs/*_22_tiny.json``) has no M-CLIP and three image-conditioned
UNets (text-to-image, inpainting, ControlNet); its CLIP towers are 48 wide (hidden and projection = the prior's
``clip_dim`` and ``text_width`` = the UNets' ``image_embed_dim``), wider than the UNets' context tokens (32), as the
real ViT-bigG's 1280 are wider than the UNet's 768.
"""

from __future__ import annotations

import dataclasses
import string

import torch
from torch import nn

from kandinsky.models.movq import MoVQ, MoVQConfig
from kandinsky.models.prior import Prior, PriorConfig
from kandinsky.models.unet import UNet, UNetConfig
from kandinsky.text_encoders import CONTEXT_LENGTH, MultilingualCLIP

PRIOR = PriorConfig(text_ctx=CONTEXT_LENGTH, width=64, layers=2, heads=4, clip_dim=32, text_width=32)
UNET = UNetConfig(in_channels=4, out_channels=8, model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2,
                  attention_levels=(1, 2), head_channels=16, context_dim=32, text_hidden_dim=32, text_embed_dim=32,
                  image_embed_dim=32, num_image_tokens=10, norm_groups=32)
UNET_INPAINT = dataclasses.replace(UNET, in_channels=9)
MOVQ = MoVQConfig(in_channels=3, out_channels=3, channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1,
                  attention_levels=(3,), z_channels=4, embed_dim=4, n_embed=64, norm_groups=32)
CONFIGS = {"prior": PRIOR, "unet": UNET, "unet_inpaint": UNET_INPAINT, "movq": MOVQ}
WIDTH = 32  # the text and image towers' hidden width
PROJECTION = 32  # CLIP's and M-CLIP's output width (= clip_dim, text_embed_dim, image_embed_dim above)

# Kandinsky 2.2: CLIP towers 48 wide (hidden = projection, as ViT-bigG's 1280), image-conditioned UNets
WIDTH_22 = 48
PRIOR_22 = PriorConfig(text_ctx=CONTEXT_LENGTH, width=64, layers=2, heads=4, clip_dim=WIDTH_22, text_width=WIDTH_22)
UNET_22 = UNetConfig(in_channels=4, out_channels=8, model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2,
                     attention_levels=(1, 2), head_channels=16, context_dim=32, image_embed_dim=WIDTH_22,
                     num_image_tokens=32, norm_groups=32, conditioning="image")
UNET_22_INPAINT = dataclasses.replace(UNET_22, in_channels=9)
UNET_22_CONTROLNET = dataclasses.replace(UNET_22, in_channels=8, conditioning="image_hint")
CONFIGS_22 = {"prior": PRIOR_22, "unet": UNET_22, "unet_inpaint": UNET_22_INPAINT,
              "unet_controlnet": UNET_22_CONTROLNET, "movq": MOVQ}

_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, overrides: dict | None = None) -> nn.Module:
    """Overwrite every parameter with seeded random values, so that no zero-initialised layer hides a bug.

    Matrices and kernels ~ N(0, 1/fan_in) with fan_in = weight[0].numel(); norm weights 1 + 0.1 N(0,1);
    every other 1-D parameter (biases, norm shifts) 0.1 N(0,1). ``overrides`` maps a parameter name to a
    function ``(tensor, generator) -> None`` that fills it in place instead (e.g. a positive ``clip_std``).
    This is the scheme the original fixtures used.
    """
    generator = torch.Generator().manual_seed(seed)
    norm_weights = {
        f"{name}.weight" if name else "weight"
        for name, m in module.named_modules()
        if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None
    }
    for name, param in module.named_parameters():
        if overrides and name in overrides:
            overrides[name](param, generator)
            continue
        values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name in norm_weights:
            values = 1 + 0.1 * values
        elif param.ndim >= 2:
            values = values / param[0].numel() ** 0.5
        else:
            values = 0.1 * values
        param.copy_(values)
    return module


# ------------------------------------------------------------------------------------------- tokenizers


def clip_tokenizer():
    """A byte-level BPE ``CLIPTokenizer`` with 519 tokens: every byte (alone and word-final) + a few merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    _check_transformers()
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)


def xlmr_tokenizer():
    """A Unigram ``XLMRobertaTokenizer`` (75 pieces: lowercase letters, digits, a few words)."""
    from transformers import XLMRobertaTokenizer

    _check_transformers()
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -2.0) for c in string.ascii_lowercase]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ".,!?'"]
    pieces += [("\u2581", -4.0), ("\u2581the", -1.0), ("\u2581cat", -1.0), ("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=pieces, model_max_length=512)


def _check_transformers() -> None:
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"the tiny tokenizers are built from in-memory vocabularies, which needs transformers >= 5 "
                          f"(installed: {transformers.__version__})")


# ------------------------------------------------------------------------------------------- encoders


def clip_text_model(seed: int = 0, vocab_size: int = 519, projection_dim: int = PROJECTION, *, width: int = WIDTH):
    """A 2-layer ``CLIPTextModelWithProjection`` (width 32) with seeded random weights, eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH, projection_dim=projection_dim,
        hidden_act="quick_gelu", bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return randomize_(CLIPTextModelWithProjection(config), seed).eval()


def clip_vision_model(seed: int = 0, image_size: int = 224, projection_dim: int = PROJECTION, *, width: int = WIDTH):
    """A 2-layer ``CLIPVisionModelWithProjection`` (patch 32, width 32) with seeded random weights, eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=32, projection_dim=projection_dim, hidden_act="quick_gelu",
    )
    return randomize_(CLIPVisionModelWithProjection(config), seed).eval()


def mclip_config(vocab_size: int = 75, projection_dim: int = PROJECTION) -> dict:
    """An M-CLIP ``config.json``-like dict (XLM-RoBERTa fields + ``transformerDimensions`` / ``numDims``)."""
    return {
        "model_type": "xlm-roberta", "vocab_size": vocab_size, "hidden_size": WIDTH, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 2 * WIDTH, "max_position_embeddings": 80,
        "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "layer_norm_eps": 1e-5, "hidden_act": "gelu", "transformerDimensions": WIDTH, "numDims": projection_dim,
    }


def mclip(seed: int = 0, projection_dim: int = PROJECTION) -> MultilingualCLIP:
    """:class:`~kandinsky.text_encoders.MultilingualCLIP` at the tiny config, seeded random weights, eval mode."""
    return randomize_(MultilingualCLIP.from_config(mclip_config(projection_dim=projection_dim)), seed).eval()


# ------------------------------------------------------------------------------------------- the pipeline


@torch.no_grad()
def components(seed: int = 0) -> dict:
    """Every component of :class:`~kandinsky.pipeline.Kandinsky21` at the tiny configs, each from its own
    seed derived from ``seed``, by constructor argument name. Random weights are scaled where they would
    saturate the images: the UNet's noise prediction (x 0.1: DDIM latents stay near unit scale) and the
    MoVQ's output (x 0.05: random decoders give |x| ~ 50, which clips every pixel)."""
    tokenizer = clip_tokenizer()
    return dict(clip_tokenizer=tokenizer, clip_text=clip_text_model(seed + 1, vocab_size=len(tokenizer)),
                clip_vision=clip_vision_model(seed + 2), mclip_tokenizer=xlmr_tokenizer(), mclip=mclip(seed + 4),
                **_diffusion_models(seed, PRIOR, {"unet": UNET, "unet_inpaint": UNET_INPAINT}))


def _diffusion_models(seed: int, prior_config: PriorConfig, unet_configs: dict) -> dict:
    """The prior, the UNets (by name) and the MoVQ of the tiny pipelines, each from its own seed derived from
    ``seed``, scaled as :func:`components` says."""
    prior = randomize_(Prior(prior_config), seed + 3).eval()
    prior.clip_std.copy_(0.5 + torch.rand(prior_config.clip_dim, generator=torch.Generator().manual_seed(seed + 3)))
    unets = {}
    for offset, (name, config) in enumerate(unet_configs.items()):
        unet = randomize_(UNet(config), seed + 6 + offset).eval()
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
        unets[name] = unet
    movq = randomize_(MoVQ(MOVQ), seed + 5).eval()
    movq.decoder.conv_out.weight.mul_(0.05)
    return dict(prior=prior, movq=movq, **unets)


@torch.no_grad()
def components_22(seed: int = 0) -> dict:
    """Every component of :class:`~kandinsky.pipeline.Kandinsky22` at the tiny 2.2 configs (:data:`CONFIGS_22`),
    by constructor argument name of :class:`~kandinsky.components.Components`, each from its own seed derived
    from ``seed``, scaled as :func:`components` scales them. No M-CLIP: the 2.2 decoder reads no text."""
    tokenizer = clip_tokenizer()
    return dict(clip_tokenizer=tokenizer,
                clip_text=clip_text_model(seed + 1, vocab_size=len(tokenizer), projection_dim=WIDTH_22, width=WIDTH_22),
                clip_vision=clip_vision_model(seed + 2, projection_dim=WIDTH_22, width=WIDTH_22),
                **_diffusion_models(seed, PRIOR_22, {name: CONFIGS_22[name]
                                                     for name in ("unet", "unet_inpaint", "unet_controlnet")}))

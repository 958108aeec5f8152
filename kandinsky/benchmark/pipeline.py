"""End-to-end benchmark: text2img at 512 px, our :class:`~kandinsky.pipeline.Kandinsky21` against diffusers
0.42.1 (``KandinskyPriorPipeline`` + ``KandinskyPipeline``, the two halves of ``KandinskyCombinedPipeline``)
with the same (random) weights at the full official configurations.

What is measured (``python scripts/benchmark.py pipeline``, under the heavy-job lock), per stage:

* the whole stage call with 2 steps, both sides interleaved in one process: prior stage (prompt -> image
  embeddings: CLIP text, zero-image embedding, 2 guided prior steps) and decoder stage (embeddings -> 512 px
  image: M-CLIP, 2 guided UNet steps, MoVQ decode); their sum is ``text2img`` with 2 + 2 steps;
* the pieces a default run repeats or pays once: text encoding, one prior step (ours: with the text's keys and
  values already computed, as every step of our loop after the first; batch 2: classifier-free
  guidance), one decoder step (UNet, batch 2, 64x64 latents, with achieved GFLOP/s), one MoVQ decode.
  The default 25 + 100 steps are extrapolated as ``stages + 23 prior steps + 98 decoder steps``;
* weight loading: our converted safetensors (:func:`~kandinsky.weights.load_converted`) against diffusers
  ``from_pretrained`` of a ``save_pretrained`` folder, each followed by a first and a second forward
  (diffusers memory-maps on CPU and reads lazily, so load alone would flatter it; ``load cost`` = load +
  first forward - second forward), one component at a time in a temporary folder deleted afterwards, with
  the page cache warm (files just written) and cold (evicted with ``posix_fadvise`` before every load);
* peak resident memory of each side running the full ``text2img`` (2 + 2 steps) from its own folder on disk,
  alone in its own process; ours also with ``offload="sequential"``;
* ``--dtype bfloat16``: ours cast to bfloat16 against diffusers in float32 (the usual CPU choice), and the
  error of the full-size bfloat16 UNet output relative to diffusers' float32 output.

The two stages are timed one at a time (the other stage is a tiny stand-in) because both sides of both
stages do not fit this machine's memory: our UNet keeps its convolution kernels channels-last, a second copy
of 3.35 GiB when converted from a live diffusers model. Otherwise ours shares diffusers' tensors:
``Kandinsky21.from_diffusers`` converts without copying except the fused attention projections, and
:func:`share_weights_` then points diffusers' separate q/k/v tensors into our fused ones. ``ours separate
GiB`` in the results says what is not shared.

``config="tiny"`` builds tiny components (32 px images) so that the tests exercise this code in seconds.
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kandinsky.benchmark import Result, count_flops, interleaved, peak_rss_gib
from kandinsky.testing import max_errors, randomize_

PROMPT = "red cat, 4k photo"
TIMED_STEPS = (2, 2)  # (prior, decoder) steps of the timed text2img
DEFAULT_STEPS = (25, 100)  # the defaults of both pipelines, extrapolated from the pieces
CONFIGS = ("full", "tiny")
CONFIG = "full"  # what `scripts/benchmark.py pipeline` measures (the tests set "tiny")
CONTEXT = 77  # both text encoders pad / truncate to 77 tokens
# bfloat16 has an 8-bit mantissa (relative step 2^-8 = 3.9e-3); through the UNet's ~60 residual blocks the
# output moves by about ten steps relative to its largest value.
BF16_UNET_TARGET = 3e-2

# kandinsky-community/kandinsky-2-1-prior: prior/, text_encoder/ and image_encoder/ config.json
FULL_PRIOR = {"num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20, "embedding_dim": 768,
              "num_embeddings": 77, "additional_embeddings": 4, "dropout": 0.0}
FULL_CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
                  "hidden_act": "quick_gelu", "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
FULL_CLIP_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 768,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TINY_WIDTH = 24  # CLIP projection = prior width = UNet cross-attention width of the tiny models


# ------------------------------------------------------------------------------------------- components


def clip_tokenizer():
    """A byte-level BPE CLIP tokenizer built in code (no hub): every byte, alone and word-final, and the two
    special tokens. Its ids differ from the official vocabulary, but prompts are padded to 77 tokens, so the
    encoders' cost is the same."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT)


def mclip_tokenizer():
    """A Unigram XLM-RoBERTa tokenizer built in code (lowercase letters, digits, punctuation)."""
    import string

    from transformers import XLMRobertaTokenizer

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -2.0) for c in string.ascii_lowercase]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ".,!?'"]
    pieces += [("\u2581", -4.0), ("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=pieces, model_max_length=512)


def check_config(config: str) -> str:
    """``config`` if it names a benchmark configuration (``"full"`` or ``"tiny"``), else a ValueError."""
    if config not in CONFIGS:
        raise ValueError(f"config: expected one of {list(CONFIGS)}, got {config!r}")
    return config


def _positive_std(param: torch.Tensor, generator: torch.Generator) -> None:
    param.copy_(0.5 + torch.rand(param.shape, generator=generator))  # clip_std must be positive


def _diffusers_module_configs(config: str) -> dict[str, dict]:
    """Constructor kwargs of diffusers' prior, UNet and MoVQ and our M-CLIP config dict."""
    from kandinsky.convert.movq import to_diffusers_config
    from kandinsky.models.movq import MoVQConfig
    from kandinsky.models.unet import UNetConfig
    from kandinsky.parity.text_encoder import CONFIGS as MCLIP_CONFIGS
    from kandinsky.parity.unet import diffusers_config

    if config == "full":
        return {"prior": FULL_PRIOR, "unet": diffusers_config(UNetConfig()), "movq": to_diffusers_config(MoVQConfig()),
                "mclip": MCLIP_CONFIGS["full"]}
    return {
        "prior": {"num_attention_heads": 2, "attention_head_dim": 12, "num_layers": 1, "embedding_dim": TINY_WIDTH},
        "unet": dict(in_channels=4, out_channels=8, addition_embed_type="text_image",
                     down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                     up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                     mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64),
                     layers_per_block=1, encoder_hid_dim=32, encoder_hid_dim_type="text_image_proj",
                     cross_attention_dim=TINY_WIDTH, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
                     class_embed_type=None),
        "movq": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                     in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32, norm_type="spatial",
                     num_vq_embeddings=12, out_channels=3, up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
                     vq_embed_dim=4),
        "mclip": {**MCLIP_CONFIGS["tiny"], "hidden_size": 32, "numDims": TINY_WIDTH},
    }


def image_size(config: str) -> int:
    """Image side in pixels: 512 (the default) at the full config, 32 for the tiny one."""
    return 512 if check_config(config) == "full" else 32


STAGES = {"prior": ("prior", "clip_text", "clip_vision"), "decoder": ("mclip", "unet", "movq")}


def _clip_towers(config: str, seed: int) -> tuple[nn.Module, nn.Module]:
    """(``CLIPTextModelWithProjection``, ``CLIPVisionModelWithProjection``) with seeded random weights."""
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    if config == "full":
        text, vision = FULL_CLIP_TEXT, FULL_CLIP_VISION
    else:
        vocab = len(clip_tokenizer())
        text = {"vocab_size": vocab, "hidden_size": TINY_WIDTH, "intermediate_size": 48, "num_hidden_layers": 2,
                "num_attention_heads": 4, "max_position_embeddings": CONTEXT, "projection_dim": TINY_WIDTH,
                "hidden_act": "quick_gelu", "bos_token_id": vocab - 2, "eos_token_id": vocab - 1,
                "pad_token_id": vocab - 1}
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "image_size": 224, "patch_size": 32, "projection_dim": TINY_WIDTH, "hidden_act": "quick_gelu"}
    clip_text = randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**text)), seed + 1).eval()
    clip_vision = randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)), seed + 2).eval()
    return clip_text, clip_vision


def _diffusers_mclip(config: str, seed: int) -> nn.Module:
    """diffusers' ``MultilingualCLIP`` with seeded random weights."""
    from kandinsky.parity.text_encoder import diffusers_pair

    return diffusers_pair(_diffusers_module_configs(config)["mclip"], seed)[1]


DIFFUSERS_MODELS = ("prior", "unet", "movq")


def _diffusers_models(config: str, seed: int, names: tuple[str, ...] = DIFFUSERS_MODELS) -> dict[str, nn.Module]:
    """diffusers' prior, UNet and MoVQ (or the ``names`` among them) with seeded random weights."""
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel

    configs = _diffusers_module_configs(config)
    classes = {"prior": PriorTransformer, "unet": UNet2DConditionModel, "movq": VQModel}
    with torch.device("meta"):  # skip diffusers' own (slow, full-size) initialisation
        models = {name: classes[name](**configs[name]).eval() for name in names}
    for name, model in models.items():
        index = DIFFUSERS_MODELS.index(name)
        model = model.to_empty(device="cpu")
        if name == "prior":  # its only non-persistent buffer, garbage after to_empty
            model.causal_attention_mask = torch.full_like(model.causal_attention_mask, -10000.0).triu_(1)
        randomize_(model, seed + 3 + index, overrides={"clip_std": _positive_std} if name == "prior" else None)
        models[name] = model.eval()
    return models


def diffusers_pipelines(config: str = "full", seed: int = 0, stages: tuple[str, ...] = ("prior", "decoder")) -> tuple:
    """(``KandinskyPriorPipeline``, ``KandinskyPipeline``, ``KandinskyCombinedPipeline``) sharing one set of
    components with seeded random weights; schedulers as in the official ``scheduler_config.json`` files.
    The models of a stage not in ``stages`` are tiny stand-ins (they must not be called)."""
    from diffusers import (DDIMScheduler, KandinskyCombinedPipeline, KandinskyPipeline, KandinskyPriorPipeline,
                           UnCLIPScheduler)
    from transformers import CLIPImageProcessor

    check_config(config)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: expected a subset of {list(STAGES)}, got {list(stages)}")
    prior_config, decoder_config = (config if s in stages else "tiny" for s in STAGES)
    # M-CLIP first: its 1 GB embedding matrix is randomised while little else is resident
    mclip = _diffusers_mclip(decoder_config, seed)
    gc.collect()
    clip_text, clip_vision = _clip_towers(prior_config, seed)
    models = {**_diffusers_models(prior_config, seed, names=("prior",)),
              **_diffusers_models(decoder_config, seed, names=("unet", "movq"))}
    prior = dict(prior=models["prior"], image_encoder=clip_vision, text_encoder=clip_text, tokenizer=clip_tokenizer(),
                 scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                           num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0),
                 image_processor=CLIPImageProcessor(crop_size=224, size=224, resample=3))
    decoder = dict(text_encoder=mclip, tokenizer=mclip_tokenizer(), unet=models["unet"], movq=models["movq"],
                   scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                           beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                           prediction_type="epsilon", thresholding=False))
    pipes = (KandinskyPriorPipeline(**prior), KandinskyPipeline(**decoder),
             KandinskyCombinedPipeline(**decoder, **{f"prior_{k}": v for k, v in prior.items()}))
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def _storages(modules) -> set[int]:
    return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}


@torch.no_grad()
def share_weights_(ours: list[nn.Module], theirs: list[nn.Module]) -> dict[str, float]:
    """Point diffusers' weights into ours wherever the values are the same: a tensor of ours that equals
    the row-wise concatenation of diffusers tensors (fused QKV, KV) becomes their common storage.

    Identification is by value (random weights make a match unique; every match is checked with
    ``torch.equal``). Tensors of ours in another memory layout (our UNet keeps its convolution kernels
    channels-last) stay separate. Returns the GiB of our weights still separate, and the total.
    """
    shared = _storages(theirs)
    candidates: dict[tuple, list[tuple[nn.Module, str, torch.Tensor]]] = {}
    for model in theirs:
        for module in model.modules():
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor.ndim and tensor.numel() and tensor.is_floating_point():
                    rows = tensor.reshape(tensor.shape[0], -1)
                    candidates.setdefault((rows.shape[1], rows[0, 0].item()), []).append((module, name, tensor))
    for model in ours:
        for tensor in [*model.parameters(), *model.buffers()]:
            if (tensor.untyped_storage().data_ptr() in shared or not tensor.ndim or not tensor.is_floating_point()
                    or not tensor.is_contiguous()):  # a reshape of a non-contiguous tensor would be a copy
                continue
            rows, offset, matches = tensor.reshape(tensor.shape[0], -1), 0, []
            while offset < rows.shape[0]:
                match = next(((m, n, t) for m, n, t in candidates.get((rows.shape[1], rows[offset, 0].item()), [])
                              if t.dtype == tensor.dtype and t.shape[0] <= rows.shape[0] - offset
                              and torch.equal(t.reshape(t.shape[0], -1), rows[offset:offset + t.shape[0]])), None)
                if match is None:
                    break
                matches.append((offset, match))
                offset += match[2].shape[0]
            if offset != rows.shape[0]:
                continue
            for offset, (module, name, their) in matches:
                view = rows[offset:offset + their.shape[0]].view(their.shape)
                if isinstance(getattr(module, name), nn.Parameter):
                    setattr(module, name, nn.Parameter(view, requires_grad=False))
                else:
                    setattr(module, name, view)
    shared = _storages(theirs)
    separate = total = 0
    for model in ours:
        for tensor in [*model.parameters(), *model.buffers()]:
            total += tensor.numel() * tensor.element_size()
            if tensor.untyped_storage().data_ptr() not in shared:
                separate += tensor.numel() * tensor.element_size()
    return {"ours separate GiB": separate / 2**30, "ours total GiB": total / 2**30}


def _stage_modules(prior_pipe, decoder_pipe, stage: str) -> list[nn.Module]:
    if stage == "prior":
        return [prior_pipe.prior, prior_pipe.text_encoder, prior_pipe.image_encoder]
    return [decoder_pipe.text_encoder, decoder_pipe.unet, decoder_pipe.movq]


def build(config: str = "full", stage: str = "decoder", seed: int = 0, dtype: torch.dtype = torch.float32):
    """(diffusers' prior and decoder pipelines, our ``Kandinsky21`` from them, sharing report) with one
    ``stage`` ("prior" or "decoder") at ``config`` and the other tiny: the full pair of both stages plus our
    channels-last UNet kernels (a second copy of 3.5 GiB) need about twice the memory of one stage.

    Ours comes from :meth:`Kandinsky21.from_diffusers` and shares diffusers' float32 tensors (see
    :func:`share_weights_`); with another ``dtype`` our stage's modules are cast copies (diffusers stays
    float32, the usual choice on CPU)."""
    from kandinsky.pipeline import Kandinsky21

    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {list(STAGES)}, got {stage!r}")
    prior_pipe, decoder_pipe, _ = diffusers_pipelines(config, seed, stages=(stage,))
    ours = Kandinsky21.from_diffusers(prior_pipe, decoder_pipe, device="cpu", progress=False)
    sharing = share_weights_([ours.module(name) for name in STAGES[stage]],
                             _stage_modules(prior_pipe, decoder_pipe, stage))
    if dtype != torch.float32:
        for name in STAGES[stage]:  # clip_text / clip_vision are diffusers' own objects: never cast in place
            ours.components.replace(name, _cast_copy(ours.module(name), dtype))
        ours.components.dtype = dtype
    gc.collect()
    return prior_pipe, decoder_pipe, ours, sharing


# ------------------------------------------------------------------------------------------- timed calls


def text2img_ours(ours, size: int, steps=TIMED_STEPS, output_type: str = "np"):
    """One seeded ``Kandinsky21.text2img`` call of the benchmark prompt, (prior, decoder) ``steps``."""
    return ours.text2img(PROMPT, prior_num_inference_steps=steps[0], num_inference_steps=steps[1], height=size,
                         width=size, generator=torch.Generator().manual_seed(0), output_type=output_type)


def text2img_diffusers(combined, size: int, steps=TIMED_STEPS, output_type: str = "np"):
    """The same call as :func:`text2img_ours` through diffusers' ``KandinskyCombinedPipeline``."""
    return combined(PROMPT, prior_num_inference_steps=steps[0], num_inference_steps=steps[1], height=size,
                    width=size, generator=torch.Generator().manual_seed(0), output_type=output_type).images


def _stage_calls(stage: str, prior_pipe, decoder_pipe, ours, size: int, embeds) -> dict:
    """side -> the stage's whole pipeline call with ``TIMED_STEPS`` steps (prior: prompt -> image embeddings;
    decoder: embeddings -> np images, 0..1). Each call stores its output under ``out[side]``."""
    out = {}
    if stage == "prior":
        def ours_call():
            out["ours"] = ours.prior(PROMPT, num_inference_steps=TIMED_STEPS[0],
                                     generator=torch.Generator().manual_seed(0))

        def diffusers_call():
            result = prior_pipe(PROMPT, num_inference_steps=TIMED_STEPS[0], output_type="pt",
                                generator=torch.Generator().manual_seed(0))
            out["diffusers"] = (result.image_embeds, result.negative_image_embeds)
    else:
        image_embeds, negative_image_embeds = embeds

        def ours_call():
            out["ours"] = ours.decode(PROMPT, image_embeds, negative_image_embeds, num_inference_steps=TIMED_STEPS[1],
                                      height=size, width=size, generator=torch.Generator().manual_seed(0),
                                      output_type="np")

        def diffusers_call():
            out["diffusers"] = decoder_pipe(PROMPT, image_embeds=image_embeds,
                                            negative_image_embeds=negative_image_embeds,
                                            num_inference_steps=TIMED_STEPS[1], height=size, width=size,
                                            generator=torch.Generator().manual_seed(0), output_type="np").images
    return {"ours": ours_call, "diffusers": diffusers_call, "out": out}


def _encode_ours(ours, stage: str) -> None:
    """Our pipeline's text work of one stage: prior: CLIP text (prompt, then the empty prompt) and the
    zero-image embedding; decoder: M-CLIP (prompt, then the empty prompt)."""
    from kandinsky.text_encoders import encode_clip_text, encode_multilingual, zero_image_embeds

    for prompts in ([PROMPT], [""]):
        if stage == "prior":
            encode_clip_text(ours.tokenizer("clip_tokenizer"), ours.module("clip_text"), prompts)
        else:
            encode_multilingual(ours.tokenizer("mclip_tokenizer"), ours.module("mclip"), prompts)
    if stage == "prior":
        zero_image_embeds(ours.module("clip_vision"), 1)


def _encode_diffusers(prior_pipe, decoder_pipe, stage: str) -> None:
    if stage == "prior":
        prior_pipe._encode_prompt(PROMPT, torch.device("cpu"), 1, True, None)
        prior_pipe.get_zero_embed(1)
    else:
        decoder_pipe._encode_prompt(PROMPT, torch.device("cpu"), 1, True, None)


def _pieces(stage: str, prior_pipe, decoder_pipe, ours, size: int, dtype: torch.dtype) -> dict[str, tuple]:
    """name -> (ours callable, diffusers callable) of the pieces of one stage. Inputs are made in float32
    and cast for ours."""
    from kandinsky.parity import prior as prior_parity
    from kandinsky.parity import unet as unet_parity

    cast = _caster(dtype)
    if stage == "prior":
        prior_inputs = prior_parity.inputs(ours.module("prior").config, batch=2)
        ours_inputs = cast(prior_inputs)
        with torch.no_grad():  # a step of our sampling loop: the text's keys and values are computed once per call
            text_prefix = ours.module("prior").encode_text(
                text_embeds=ours_inputs["text_embeds"], text_hidden_states=ours_inputs["text_hidden_states"],
                text_mask=ours_inputs["text_mask"])
        return {
            "text encoding, prior stage (CLIP text x2, zero image)": (
                lambda: _encode_ours(ours, stage), lambda: _encode_diffusers(prior_pipe, decoder_pipe, stage)),
            "prior step (batch 2)": (
                lambda: ours.module("prior")(ours_inputs["x"], ours_inputs["timesteps"], text_prefix=text_prefix),
                lambda: prior_parity.run_diffusers(prior_pipe.prior, prior_inputs)),
        }
    latent = size // ours.module("movq").config.downsample_factor
    unet_inputs = unet_parity.inputs(ours.module("unet").config, batch=2, height=latent, width=latent)
    ours_unet_inputs = cast(unet_inputs)
    latents = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(2))
    return {
        "text encoding, decoder stage (M-CLIP x2)": (
            lambda: _encode_ours(ours, stage), lambda: _encode_diffusers(prior_pipe, decoder_pipe, stage)),
        f"decoder step (UNet, batch 2, 4x{latent}x{latent})": (
            lambda: unet_parity.run_ours(ours.module("unet"), ours_unet_inputs),
            lambda: unet_parity.run_diffusers(decoder_pipe.unet, unet_inputs)),
        f"MoVQ decode 1x4x{latent}x{latent}": (
            lambda: ours.module("movq").decode(cast(latents)),
            lambda: decoder_pipe.movq.decode(latents, force_not_quantize=True).sample),
    }


def _cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` whose floating-point tensors are in ``dtype``, without a float32 copy first."""
    if dtype == torch.float32:
        return module
    memo = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        cast = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor
        memo[id(tensor)] = nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast
    return copy.deepcopy(module, memo).eval()


def _caster(dtype: torch.dtype):
    def cast(value):
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
    return cast


# ------------------------------------------------------------------------------------------- load times


def _evict_page_cache(folder: Path) -> None:
    """Drop ``folder``'s files from the kernel's page cache (``posix_fadvise(DONTNEED)``; needs no privileges),
    so that the next load reads them from disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # only clean pages can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _time_loading(component: str, cache: str, folder: Path, forward: dict, load: Callable, repeats: int,
                  disk: dict[str, float]) -> list[Result]:
    """Two results: load + first forward, and the load cost (that minus a second forward), with the page
    cache ``"warm"`` (files just written or read) or ``"cold"`` (evicted before every load)."""
    load_times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    first_times: dict[str, list[float]] = {"ours": [], "diffusers": []}  # load + first forward
    load_costs: dict[str, list[float]] = {"ours": [], "diffusers": []}

    def load_and_run(side: str) -> None:
        if cache == "cold":
            _evict_page_cache(folder / side)
        start = time.perf_counter()
        model = load(component, side, folder)
        load_times[side].append(time.perf_counter() - start)
        forward[side](model)
        first_times[side].append(time.perf_counter() - start)
        start = time.perf_counter()
        forward[side](model)  # the weights are resident now: what every later call costs
        load_costs[side].append(first_times[side][-1] - (time.perf_counter() - start))

    interleaved({side: (lambda s=side: load_and_run(s)) for side in ("ours", "diffusers")}, repeats=repeats, warmup=0)
    return [Result("pipeline", f"load + first forward: {component} ({cache} page cache)", first_times["ours"],
                   first_times["diffusers"], {"ours load s": statistics.median(load_times["ours"]),
                                        "diffusers load s": statistics.median(load_times["diffusers"]),
                                        "ours file GiB": disk["ours"], "diffusers file GiB": disk["diffusers"]}),
            Result("pipeline", f"load cost: {component} ({cache} page cache; load + first forward - second forward)",
                   load_costs["ours"], load_costs["diffusers"])]


def _weight_loading(config: str, repeats: int, seed: int = 0) -> list[Result]:
    """Load + first forward of the converted components: ours from ``save_converted`` safetensors, diffusers
    ``from_pretrained`` from a ``save_pretrained`` folder. One component on disk at a time."""
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel

    from kandinsky import ops
    from kandinsky.convert import from_diffusers
    from kandinsky.parity import prior as prior_parity
    from kandinsky.parity import unet as unet_parity
    from kandinsky.weights import load_converted, save_converted

    classes = {"prior": PriorTransformer, "unet": UNet2DConditionModel, "movq": VQModel}
    size = image_size(config)
    results = []

    def load(component: str, side: str, folder: Path) -> nn.Module:
        if side == "diffusers":
            return classes[component].from_pretrained(str(folder / "diffusers")).eval()
        return ops.optimize(load_converted(folder / "ours"), "cpu", torch.float32)  # as Kandinsky21 loads it

    for component in ("unet", "prior", "movq"):
        folder = Path(tempfile.mkdtemp(prefix=f"kandinsky-bench-{component}-"))
        try:
            theirs = _diffusers_models(config, seed, names=(component,))[component]
            theirs.save_pretrained(str(folder / "diffusers"))
            ours = from_diffusers(component, dict(theirs.config), theirs.state_dict())
            del theirs  # saving makes contiguous byte copies: keep one model resident, not two
            gc.collect()
            save_converted(ours, component, folder / "ours")
            if component == "prior":
                batch = prior_parity.inputs(ours.config, batch=2)
                forward = {"ours": lambda m: prior_parity.run_ours(m, batch),
                           "diffusers": lambda m: prior_parity.run_diffusers(m, batch)}
            elif component == "unet":
                latent = size // 2 ** (len(_diffusers_module_configs(config)["movq"]["block_out_channels"]) - 1)
                batch = unet_parity.inputs(ours.config, batch=2, height=latent, width=latent)
                forward = {"ours": lambda m: unet_parity.run_ours(m, batch),
                           "diffusers": lambda m: unet_parity.run_diffusers(m, batch)}
            else:
                latent = size // ours.config.downsample_factor
                z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(2))
                forward = {"ours": lambda m: m.decode(z),
                           "diffusers": lambda m: m.decode(z, force_not_quantize=True).sample}
            del ours
            gc.collect()
            disk = {side: sum(f.stat().st_size for f in (folder / side).iterdir()) / 2**30 for side in forward}
            # cold: needs posix_fadvise (Linux and most Unixes) to evict the files from the page cache
            for cache in ("warm", "cold") if hasattr(os, "posix_fadvise") else ("warm",):
                results += _time_loading(component, cache, folder, forward, load, repeats, disk)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            gc.collect()
    return results


# ------------------------------------------------------------------------------------------- memory


def write_folders(folder: str, config: str = "full") -> None:
    """Both sides' pipelines with the same random weights on disk, as a user has them: diffusers'
    ``save_pretrained`` (``folder/diffusers-prior``, ``folder/diffusers-decoder``) and ours converted
    (``folder/ours``, read by :meth:`Kandinsky21.from_pretrained`). One stage at a time, to bound memory."""
    from kandinsky.weights import save_component
    from kandinsky.pipeline import Kandinsky21

    root = Path(folder)
    for stage, tokenizer in zip(STAGES, ("clip_tokenizer", "mclip_tokenizer")):
        prior_pipe, decoder_pipe, _ = diffusers_pipelines(config, stages=(stage,))
        (prior_pipe if stage == "prior" else decoder_pipe).save_pretrained(str(root / f"diffusers-{stage}"))
        ours = Kandinsky21.from_diffusers(prior_pipe, decoder_pipe, device="cpu", progress=False)
        save_component(tokenizer, ours.tokenizer(tokenizer), root / "ours" / tokenizer)
        for name in STAGES[stage]:
            save_component(name, ours.module(name), root / "ours" / name)
        del prior_pipe, decoder_pipe, ours
        gc.collect()


def memory_probe(side: str, config: str, dtype: str, folder: str, offload: str = "") -> None:
    """Load one side from ``folder`` (see :func:`write_folders`) and run text2img (2 + 2 steps) once, for
    ``peak_rss_gib``. Ours loads each component memory-mapped when the task first needs it; with
    ``offload="sequential"`` it drops the prior stage before the decoder stage. diffusers loads both
    pipelines with ``from_pretrained`` (memory-mapped too) and runs them as ``KandinskyCombinedPipeline``."""
    from kandinsky.pipeline import Kandinsky21

    root = Path(folder)
    size = image_size(config)
    with torch.inference_mode():
        if side == "diffusers":
            from diffusers import KandinskyCombinedPipeline, KandinskyPipeline, KandinskyPriorPipeline

            prior = KandinskyPriorPipeline.from_pretrained(str(root / "diffusers-prior"))
            decoder = KandinskyPipeline.from_pretrained(str(root / "diffusers-decoder"))
            combined = KandinskyCombinedPipeline(**decoder.components,
                                                 **{f"prior_{k}": v for k, v in prior.components.items()})
            combined.set_progress_bar_config(disable=True)
            text2img_diffusers(combined, size)
            return
        pipe = Kandinsky21.from_pretrained(str(root / "ours"), dtype=getattr(torch, dtype), offload=offload or None,
                                           progress=False)
        text2img_ours(pipe, size)


# ------------------------------------------------------------------------------------------- run


def _measure_stage(stage: str, config: str, dtype: torch.dtype, repeats: int, embeds):
    """Build one stage, time it whole and in pieces: (stage result, step result, piece results, the
    diffusers image embeddings of the prior stage for the decoder stage)."""
    size = image_size(config)
    label_dtype = str(dtype).removeprefix("torch.")
    prior_pipe, decoder_pipe, ours, sharing = build(config, stage, dtype=dtype)
    calls = _stage_calls(stage, prior_pipe, decoder_pipe, ours, size, embeds)
    times = interleaved({side: calls[side] for side in ("ours", "diffusers")}, repeats=repeats, warmup=1)
    ours_out, their_out = calls["out"]["ours"], calls["out"]["diffusers"]
    if stage == "prior":
        embeds = tuple(t.float() for t in their_out)  # the decoder stage starts from the same embeddings
        extra = {"image_embeds max rel diff": max_errors(ours_out[0].float(), their_out[0].float())[1]}
        label = f"prior stage: prompt -> embeddings, {TIMED_STEPS[0]} steps"
    else:
        extra = {"image max abs diff (0..1)": max_errors(torch.as_tensor(ours_out), torch.as_tensor(their_out))[0]}
        label = f"decoder stage: embeddings -> {size}px image, {TIMED_STEPS[1]} steps"
    stage_result = Result("pipeline", f"{label}, ours {label_dtype}", times["ours"], times["diffusers"],
                          {**sharing, **extra})
    pieces, step = [], None
    for name, (ours_fn, diffusers_fn) in _pieces(stage, prior_pipe, decoder_pipe, ours, size, dtype).items():
        times = interleaved({"ours": ours_fn, "diffusers": diffusers_fn}, repeats=repeats, warmup=1)
        extra = {}
        if name.startswith("decoder step"):
            flops = count_flops(diffusers_fn)  # direct convolutions: ours does fewer multiplications (Winograd)
            extra.update({"GFLOP": flops / 1e9,
                          "ours GFLOP/s": flops / 1e9 / statistics.median(times["ours"]),
                          "diffusers GFLOP/s": flops / 1e9 / statistics.median(times["diffusers"])})
            with torch.inference_mode():
                extra["UNet output max rel diff vs diffusers float32"] = max_errors(ours_fn().float(), diffusers_fn())[1]
            if dtype != torch.float32:
                extra["target"] = BF16_UNET_TARGET
        result = Result("pipeline", f"{name}, ours {label_dtype}", times["ours"], times["diffusers"], extra)
        pieces.append(result)
        if name.startswith(("prior step", "decoder step")):
            step = result
    return stage_result, step, pieces, embeds


def _peak_memory(config: str, dtype: str) -> list[Result]:
    """Peak RSS of text2img run from disk by each side in its own process: ours as loaded by default and
    with ``offload="sequential"``, against diffusers (always float32)."""
    folder = tempfile.mkdtemp(prefix="kandinsky-bench-memory-")
    try:
        peak_rss_gib("kandinsky.benchmark.pipeline:write_folders", folder, config)  # a child: this process stays small
        diffusers = peak_rss_gib("kandinsky.benchmark.pipeline:memory_probe", "diffusers", config, "float32", folder)
        results = []
        for offload in ("", "sequential"):
            ours = peak_rss_gib("kandinsky.benchmark.pipeline:memory_probe", "ours", config, dtype, folder, offload)
            label = f", offload={offload!r}" if offload else ""
            results.append(Result("pipeline", f"peak RSS GiB (not s) of text2img {image_size(config)}px from disk, "
                                  f"ours {dtype}{label}", [ours], [diffusers], {"unit": "GiB"}))
        return results
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args, config: str | None = None) -> list[Result]:
    """All measurements (see the module docstring); ``args``: ``repeats``, ``dtype``, ``no_memory`` and
    optionally ``config`` ("full" or "tiny"; default :data:`CONFIG`)."""
    config = check_config(getattr(args, "config", None) or config or CONFIG)
    dtype = getattr(torch, args.dtype)
    size = image_size(config)
    results: list[Result] = []
    if not args.no_memory:  # first, while this process is small (the machine's budget counts both)
        results += _peak_memory(config, args.dtype)
    stage_results: dict[str, Result] = {}
    steps: dict[str, Result] = {}
    embeds = None
    for stage in STAGES:
        # one function call per stage: every model of the stage is freed when it returns
        stage_results[stage], steps[stage], pieces, embeds = _measure_stage(stage, config, dtype, args.repeats,
                                                                            embeds)
        results += [stage_results[stage], *pieces]
        gc.collect()

    totals = {}
    for side in ("ours", "diffusers"):
        totals[side] = sum(statistics.median(getattr(stage_results[s], side)) +
                           (default - timed) * statistics.median(getattr(steps[s], side))
                           for s, default, timed in zip(STAGES, DEFAULT_STEPS, TIMED_STEPS))
    timed = {side: sum(statistics.median(getattr(r, side)) for r in stage_results.values()) for side in totals}
    results.append(Result("pipeline", f"text2img {size}px, {TIMED_STEPS[0]} + {TIMED_STEPS[1]} steps "
                          f"(prior stage + decoder stage), ours {args.dtype}", [timed["ours"]], [timed["diffusers"]]))
    results.append(Result("pipeline", f"text2img {size}px, {DEFAULT_STEPS[0]} + {DEFAULT_STEPS[1]} steps "
                          f"(extrapolated), ours {args.dtype}", [totals["ours"]], [totals["diffusers"]],
                          {"method": f"stages + {DEFAULT_STEPS[0] - TIMED_STEPS[0]} prior steps + "
                                     f"{DEFAULT_STEPS[1] - TIMED_STEPS[1]} decoder steps"}))

    if dtype == torch.float32:  # file formats are float32 on both sides
        results += _weight_loading(config, args.repeats)
    return results

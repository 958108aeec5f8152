"""Tiny, hub-free stand-ins for the text/image encoders and their tokenizers, shared by the tests.

Everything is built in code from seeded random weights: no download, no file from the model hub.
The tokenizers are real ``transformers`` tokenizers with tiny vocabularies, so padding, truncation and
special tokens behave like the official ones (CLIP: BPE, ``<|startoftext|>`` / ``<|endoftext|>``, pad =
end-of-text; XLM-RoBERTa: Unigram, ``<s>`` / ``</s>`` / ``<pad>`` = 1).
"""

from __future__ import annotations

import string
from pathlib import Path

from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    XLMRobertaTokenizer,
)

from kandinsky.testing import randomize_

CONTEXT = 77  # every Kandinsky 2.1 text encoder pads/truncates to 77 tokens


def tiny_clip_tokenizer(tmp_dir: str | Path | None = None) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer with 519 tokens: every byte (alone and word-final) + a few merges.

    ``tmp_dir`` is accepted for API symmetry and unused: transformers 5 builds it from in-memory vocab.
    """
    from tokenizers import pre_tokenizers

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
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT)


def tiny_xlmr_tokenizer() -> XLMRobertaTokenizer:
    """A Unigram XLM-RoBERTa tokenizer (75 pieces, lowercase letters, digits, a few words)."""
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -2.0) for c in string.ascii_lowercase]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ".,!?'"]
    pieces += [("\u2581", -4.0), ("\u2581the", -1.0), ("\u2581cat", -1.0), ("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=pieces, model_max_length=512)


def tiny_clip_text_model(seed: int = 0, vocab_size: int = 519) -> CLIPTextModelWithProjection:
    """A 2-layer CLIP text tower (width 32, projection 24) with seeded random weights, eval mode."""
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CONTEXT, projection_dim=24, hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return randomize_(CLIPTextModelWithProjection(config), seed).eval()


def tiny_clip_vision_model(seed: int = 0, image_size: int = 224) -> CLIPVisionModelWithProjection:
    """A 2-layer CLIP vision tower (patch 32, width 32, projection 24) with seeded random weights."""
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=32, projection_dim=24, hidden_act="quick_gelu",
    )
    return randomize_(CLIPVisionModelWithProjection(config), seed).eval()


def tiny_mclip_config(vocab_size: int = 75) -> dict:
    """An M-CLIP ``config.json``-like dict (XLM-RoBERTa fields + ``transformerDimensions`` / ``numDims``)."""
    return {
        "model_type": "xlm-roberta", "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 80,
        "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "layer_norm_eps": 1e-5, "hidden_act": "gelu", "transformerDimensions": 32, "numDims": 24,
    }


def tiny_mclip(seed: int = 0):
    """Our :class:`~kandinsky.text_encoders.MultilingualCLIP` at the tiny config, seeded random weights."""
    from kandinsky.text_encoders import MultilingualCLIP

    return randomize_(MultilingualCLIP.from_config(tiny_mclip_config()), seed).eval()


def tiny_diffusers_mclip(seed: int = 0):
    """diffusers' ``MultilingualCLIP`` at the tiny config with the same seeded weights as :func:`tiny_mclip`."""
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    values = tiny_mclip_config()
    config = MCLIPConfig(transformerDimSize=values.pop("transformerDimensions"),
                         imageDimSize=values.pop("numDims"), **{k: v for k, v in values.items() if k != "model_type"})
    model = MultilingualCLIP(config).eval()
    model.load_state_dict(tiny_mclip(seed).state_dict())
    return model


"""Tiny, hub-free stand-ins for the text/image encoders and their tokenizers, shared by the tests: the
tiny pipeline's (:mod:`kandinsky.tiny`), with 24-wide projections, and diffusers' M-CLIP with the same weights.
"""

from __future__ import annotations

from pathlib import Path

from kandinsky import tiny

PROJECTION = 24  # the tests' towers project to 24 (the tiny pipeline's to 32)


def tiny_clip_tokenizer(tmp_dir: str | Path | None = None):
    """The tiny pipeline's byte-level BPE CLIP tokenizer (519 tokens). ``tmp_dir`` is unused (API symmetry)."""
    return tiny.clip_tokenizer()


def tiny_xlmr_tokenizer():
    """The tiny pipeline's Unigram XLM-RoBERTa tokenizer (75 pieces)."""
    return tiny.xlmr_tokenizer()


def tiny_clip_text_model(seed: int = 0, vocab_size: int = 519):
    """A 2-layer CLIP text tower (width 32, projection 24) with seeded random weights, eval mode."""
    return tiny.clip_text_model(seed, vocab_size, projection_dim=PROJECTION)


def tiny_clip_vision_model(seed: int = 0, image_size: int = 224):
    """A 2-layer CLIP vision tower (patch 32, width 32, projection 24) with seeded random weights."""
    return tiny.clip_vision_model(seed, image_size, projection_dim=PROJECTION)


def tiny_mclip_config(vocab_size: int = 75) -> dict:
    """An M-CLIP ``config.json``-like dict (XLM-RoBERTa fields + ``transformerDimensions`` / ``numDims`` 24)."""
    return tiny.mclip_config(vocab_size, projection_dim=PROJECTION)


def tiny_mclip(seed: int = 0):
    """Our :class:`~kandinsky.text_encoders.MultilingualCLIP` at the tiny config (projection 24), seeded weights."""
    return tiny.mclip(seed, projection_dim=PROJECTION)


def tiny_diffusers_mclip(seed: int = 0):
    """diffusers' ``MultilingualCLIP`` at the tiny config with the same seeded weights as :func:`tiny_mclip`."""
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    values = tiny_mclip_config()
    config = MCLIPConfig(transformerDimSize=values.pop("transformerDimensions"),
                         imageDimSize=values.pop("numDims"), **{k: v for k, v in values.items() if k != "model_type"})
    model = MultilingualCLIP(config).eval()
    model.load_state_dict(tiny_mclip(seed).state_dict())
    return model


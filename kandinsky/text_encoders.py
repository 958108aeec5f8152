"""The three pretrained encoders Kandinsky 2.1 conditions on, as thin wrappers over ``transformers``.

* :class:`MultilingualCLIP` (M-CLIP): XLM-RoBERTa-large whose last hidden states are mean-pooled over
  the attention mask and projected 1024 -> 768. It conditions the decoder UNet. State-dict keys
  (``transformer.*``, ``LinearTransformation.*``) are those of both the original ``text_encoder/``
  folder and diffusers' ``MultilingualCLIP``, so either loads as is.
* the CLIP ViT-L/14 text tower (``CLIPTextModelWithProjection``): conditions the prior.
* the CLIP ViT-L/14 vision tower (``CLIPVisionModelWithProjection``): image embeddings for mixing and the
  default negative embedding (:func:`zero_image_embeds`).

Models never see tokenizers or PIL images; the ``encode_*`` functions here do the tokenising and the
CLIP image preprocessing, matching what the diffusers 0.42.1 Kandinsky pipelines do.

Example::

    text_embeds, text_hidden_states, text_mask = encode_clip_text(clip_tokenizer, clip_text_model, ["a cat"])
    mclip_embeds, mclip_hidden_states, mclip_mask = encode_multilingual(xlmr_tokenizer, mclip, ["a cat"])
    image_embeds = encode_clip_images(clip_vision_model, [pil_image])
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaModel

from kandinsky.validation import prompt_list

CONTEXT_LENGTH = 77  # both Kandinsky 2.1 text encoders see exactly 77 tokens
CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP pixel statistics (= the prior's preprocessor config)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Buffers some XLM-RoBERTa checkpoints carry that recent transformers versions no longer store.
_OPTIONAL_BUFFER_KEYS = ("transformer.embeddings.position_ids", "transformer.embeddings.token_type_ids")


class MultilingualCLIP(nn.Module):
    """M-CLIP text encoder: XLM-RoBERTa + masked mean pooling + linear projection.

    ``forward(input_ids, attention_mask) -> (text_embeds (B, numDims), text_hidden_states (B, L, hidden))``.
    """

    def __init__(self, config: XLMRobertaConfig, projection_dim: int = 768):
        super().__init__()
        self.config = config
        self.transformer = XLMRobertaModel(config)  # keeps its pooler: checkpoints carry its weights
        # The checkpoint name (capitalised) is kept so that both official layouts load without renaming.
        self.LinearTransformation = nn.Linear(config.hidden_size, projection_dim)

    @classmethod
    def from_config(cls, values: dict) -> MultilingualCLIP:
        """Build from an M-CLIP ``config.json`` dict (XLM-RoBERTa fields + ``transformerDimensions`` / ``numDims``)."""
        values = dict(values)
        hidden = values.pop("transformerDimensions", values.get("hidden_size", 1024))
        projection_dim = values.pop("numDims", 768)
        for key in ("architectures", "model_type", "_class_name", "_name_or_path", "transformers_version",
                    "torch_dtype", "dtype", "transformerDimSize", "imageDimSize"):
            values.pop(key, None)
        if values.setdefault("hidden_size", hidden) != hidden:
            raise ValueError(f"config: transformerDimensions ({hidden}) must equal hidden_size ({values['hidden_size']})")
        return cls(XLMRobertaConfig(**values), projection_dim)

    @classmethod
    def from_state_dict(cls, config: dict, state_dict: Mapping[str, torch.Tensor]) -> MultilingualCLIP:
        """Build from an M-CLIP ``config.json`` dict and a state dict, in eval mode. The tensors become the
        parameters as they are (``assign``): memory-mapped or shared weights are not copied."""
        model = cls.from_config(config)
        _check_keys(model, state_dict)
        model.load_state_dict({k: v for k, v in state_dict.items() if k not in _OPTIONAL_BUFFER_KEYS}, strict=False,
                              assign=True)  # strict=False: the optional buffers, checked above
        return model.eval()

    @classmethod
    def from_diffusers_module(cls, mclip: nn.Module) -> MultilingualCLIP:
        """Wrap the weights of a diffusers ``pipelines.kandinsky.text_encoder.MultilingualCLIP``: the tensors are
        shared, not copied (same dtype)."""
        return cls.from_state_dict(mclip.config.to_dict(), mclip.state_dict())

    def to_config(self) -> dict:
        """The M-CLIP ``config.json`` dict of this model (the inverse of :meth:`from_config`)."""
        return {**self.config.to_dict(), "transformerDimensions": self.config.hidden_size,
                "numDims": self.LinearTransformation.out_features, "architectures": ["MultilingualCLIP"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids and (B, L) 0/1 mask -> ((B, numDims) pooled projection, (B, L, hidden) states)."""
        if input_ids.ndim != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids: expected (B, L) integer tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        text_hidden_states = self.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, L, hidden)
        mask = attention_mask.to(text_hidden_states.dtype)[..., None]  # (B, L, 1)
        pooled = (text_hidden_states * mask).sum(dim=1) / mask.sum(dim=1)  # mean over real tokens only
        return self.LinearTransformation(pooled), text_hidden_states


def _check_keys(model: nn.Module, state_dict: dict) -> None:
    ours = set(model.state_dict())
    theirs = set(state_dict) - set(_OPTIONAL_BUFFER_KEYS)
    missing, unexpected = sorted(ours - theirs - set(_OPTIONAL_BUFFER_KEYS)), sorted(theirs - ours)
    if missing or unexpected:
        raise ValueError(f"M-CLIP state dict does not match: missing {missing[:10]}, unexpected {unexpected[:10]}")


# --------------------------------------------------------------------------------------------- tokenising


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = CONTEXT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both (B, max_length), padded and truncated like the diffusers pipelines.

    A prompt longer than ``max_length`` tokens is truncated (its last kept token is then not the
    end-of-text token, as in diffusers) and a ``UserWarning`` names the dropped text.
    """
    prompts = prompt_list(prompts, "prompts")
    encoded = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
    untruncated = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    removed = [tokenizer.decode(ids[max_length - 1:-1]) for ids in untruncated if len(ids) > max_length]
    if removed:
        warnings.warn(f"prompts longer than {max_length} tokens were truncated; removed text: {removed}", stacklevel=3)
    return encoded["input_ids"], encoded["attention_mask"]


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


@torch.no_grad()
def encode_clip_text(tokenizer, text_model: nn.Module, prompts: str | Sequence[str]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts through the CLIP text tower (``CLIPTextModelWithProjection``), as the prior needs them.

    Returns ``text_embeds`` (B, projection_dim) pooled and projected, ``text_hidden_states`` (B, 77, width)
    and ``text_mask`` (B, 77) bool, True for real tokens. Like diffusers' prior pipeline and the
    original, the tower itself runs without a padding mask (CLIP is causal: padding cannot change the real
    tokens); the mask is for the prior.
    """
    input_ids, attention_mask = tokenize(tokenizer, prompts)
    device, _ = _device_dtype(text_model)
    output = text_model(input_ids.to(device))
    return output.text_embeds, output.last_hidden_state, attention_mask.bool().to(device)


@torch.no_grad()
def encode_multilingual(tokenizer, model: MultilingualCLIP, prompts: str | Sequence[str]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts through M-CLIP, as the decoder UNet needs them.

    Returns ``text_embeds`` (B, 768), ``text_hidden_states`` (B, 77, 1024) and ``attention_mask`` (B, 77)
    (int64 0/1 as the tokenizer gives it; the UNet's text attention masks padding with it).
    """
    input_ids, attention_mask = tokenize(tokenizer, prompts)
    device, _ = _device_dtype(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    text_embeds, text_hidden_states = model(input_ids, attention_mask)
    return text_embeds, text_hidden_states, attention_mask


# ---------------------------------------------------------------------------------------------- images


def _pil_to_pixels(image, size: int) -> torch.Tensor:
    """One PIL image -> (3, size, size) float32 in [0, 1]: bicubic resize of the shortest side, centre crop.

    Mirrors transformers' ``CLIPImageProcessor`` (PIL backend) step by step, including its integer
    rounding of the long side and of the crop offsets, so that the result is the same to float rounding.
    """
    from PIL import Image

    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # transparency is composited onto white, as transformers' CLIPImageProcessor does
            rgba = image.convert("RGBA")
            rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except Exception as error:  # PIL raises ValueError/OSError for modes it cannot convert
        raise ValueError(f"images: cannot convert a PIL image of mode {image.mode!r} to RGB ({error})") from error

    width, height = rgb.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    resized = np.array(rgb.resize((new_width, new_height), resample=Image.BICUBIC))  # (H, W, 3) uint8
    top, left = (new_height - size) // 2, (new_width - size) // 2
    cropped = resized[top:top + size, left:left + size]
    return torch.from_numpy(np.ascontiguousarray(cropped)).permute(2, 0, 1).float() / 255.0


def _tensor_to_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size): antialiased bicubic resize of the shortest side, centre crop."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images: expected a float tensor (B, 3, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"images: tensor values must lie in [0, 1] (unnormalised pixels), got "
                         f"[{images.min().item():.3g}, {images.max().item():.3g}]")
    images = images.float()
    height, width = images.shape[-2:]
    if min(height, width) != size:  # same output size rule as for PIL images
        if height <= width:
            height, width = size, int(size * width / height)
        else:
            height, width = int(size * height / width), size
        images = F.interpolate(images, size=(height, width), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top:top + size, left:left + size]


def preprocess_clip_images(images, size: int = CLIP_IMAGE_SIZE, mean: Sequence[float] = CLIP_MEAN,
                           std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP preprocessing: PIL image, list of PIL images, or float tensor (B, 3, H, W) in [0, 1] ->
    normalised pixel values (B, 3, size, size) float32.

    PIL inputs follow ``CLIPImageProcessor`` exactly (PIL bicubic resize of the shortest side to 224,
    centre crop, /255, CLIP mean/std). Tensors are resized with torch's antialiased bicubic, which is
    close to but not bit-identical with PIL's.
    """
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        pixels = _tensor_to_pixels(images, size)
    elif isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        pixels = torch.stack([_pil_to_pixels(image, size) for image in images])
    else:
        kind = type(images).__name__ if not isinstance(images, (list, tuple)) else \
            f"{type(images).__name__} of {[type(i).__name__ for i in images]}"
        raise ValueError(f"images: expected a PIL image, a non-empty list of PIL images or a (B, 3, H, W) tensor, got {kind}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device)[:, None, None]
    return (pixels - mean_t) / std_t


@torch.no_grad()
def encode_clip_images(vision_model: nn.Module, images) -> torch.Tensor:
    """Images (see :func:`preprocess_clip_images`) -> CLIP image embeddings (B, projection_dim)."""
    device, dtype = _device_dtype(vision_model)
    pixels = preprocess_clip_images(images, size=vision_model.config.image_size)
    return vision_model(pixels.to(device=device, dtype=dtype)).image_embeds


@torch.no_grad()
def zero_image_embeds(vision_model: nn.Module, batch: int = 1, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """CLIP image embedding of an all-zeros (1, 3, S, S) input, repeated ``batch`` times: (batch, projection_dim).

    The zeros are in normalised pixel space (no preprocessing): this is the default negative image
    embedding of both the original and diffusers.
    """
    if batch < 1:
        raise ValueError(f"batch: expected a positive integer, got {batch}")
    model_device, model_dtype = _device_dtype(vision_model)
    size = vision_model.config.image_size
    zeros = torch.zeros(1, 3, size, size, device=model_device, dtype=model_dtype)
    embeds = vision_model(zeros).image_embeds.repeat(batch, 1)
    return embeds.to(device=device or model_device, dtype=dtype or embeds.dtype)

"""Images in and out of the pipeline: PIL images, arrays and tensors to the model's (B, 3, H, W) pixels in
[-1, 1], masks to (B, 1, H, W) in {0, 1}, decoded pixels to the requested output type. No model is involved.

* images go in as PIL images, ``uint8``/float ``[0, 1]`` arrays ``(H, W, 3)`` or float tensors ``(B, 3, H, W)``
  in ``[0, 1]``; NaN or infinite values are refused;
* masks: PIL images are read as grey levels / 255, arrays and tensors as they are (integer ones: not 0 = 1),
  then binarised at 0.5 as diffusers does;
* outputs: ``"pil"`` (list of PIL images), ``"np"`` (float32 ``(B, H, W, 3)`` in ``[0, 1]``) or ``"pt"``
  (float32 ``(B, 3, H, W)`` in ``[0, 1]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kandinsky.validation import check_finite

# the image files that training data, batch inputs and evaluation folders may hold (what PIL reads everywhere)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on (as CLIP's image processor does)


def load_image(path, mode: str = "RGB"):
    """The image file at ``path`` as a PIL image of ``mode`` (``"RGB"`` or ``"L"``), read the same way by training,
    batch generation and evaluation: 16-bit and 32-bit grey levels scaled to 8 bits (PIL's ``convert`` would clip
    them to white), transparency composited on white (:data:`BACKGROUND`), palettes, CMYK and the rest converted
    by PIL. Anything unreadable, a decompression bomb included, is one ``ValueError`` naming the file."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return _to_mode(image, mode)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: refused as a decompression bomb ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path}: cannot read image ({error})") from None


def _to_mode(image, mode: str):
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        top = 1.0 if image.mode == "F" and array.max() <= 1.0 else top
        image = Image.fromarray(np.clip(np.round(array / top * 255), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)


def images_to_tensor(image: Any, height: int, width: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images -> ((B, 3, height, width) float32 in [-1, 1], (H, W) of the input before resizing)."""
    from PIL import Image

    if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        image = [image] if not (isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4) else image
    if isinstance(image, (list, tuple)) and len(image) == 0:
        raise ValueError("image: expected an image or a non-empty list of images, got an empty list")
    if isinstance(image, (list, tuple)) and all(isinstance(i, Image.Image) for i in image):
        sizes = {i.size for i in image}
        if len(sizes) != 1:
            raise ValueError(f"image: all images must have the same size, got {sorted(sizes)}")
        w0, h0 = image[0].size
        # PIL bicubic with reducing_gap=1 is what diffusers' image processors use
        arrays = [np.asarray(_converted("image", i, "RGB").resize((width, height), resample=Image.BICUBIC,
                                                                  reducing_gap=1)) for i in image]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return pixels * 2 - 1, (h0, w0)
    if isinstance(image, (list, tuple)) and all(isinstance(i, np.ndarray) for i in image):
        image = _stacked("image", image)
    elif isinstance(image, (list, tuple)) and all(isinstance(i, torch.Tensor) for i in image):
        try:
            image = torch.stack(image) if image[0].ndim == 3 else torch.cat(image)
        except RuntimeError as error:  # different shapes, dtypes or devices
            raise ValueError(f"image: expected tensors of one shape, got {[tuple(i.shape) for i in image]} ({error})") \
                from None
    if isinstance(image, np.ndarray):
        if image.ndim != 4 or image.shape[-1] != 3 or image.dtype.kind not in "uf":
            raise ValueError(f"image: expected uint8 or float arrays of shape (H, W, 3) or (B, H, W, 3), got "
                             f"{image.shape} {image.dtype}")
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image: expected PIL images, arrays (H, W, 3) or tensors (B, 3, H, W), got {type(image).__name__}")
    if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point() or image.numel() == 0:
        raise ValueError(f"image: expected a float tensor (B, 3, H, W) in [0, 1], got {tuple(image.shape)} {image.dtype}")
    image = check_finite("image", image.detach().float().cpu())
    low, high = image.min().item(), image.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"image: expected values in [0, 1], got [{low:.3g}, {high:.3g}] "
                         "(a [-1, 1] tensor x converts with x / 2 + 0.5)")
    size = tuple(image.shape[-2:])
    if size != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        image = image.clamp(0, 1)
    return image * 2 - 1, size


def mask_to_tensor(mask_image: Any, height: int, width: int, image_size: tuple[int, int]) -> torch.Tensor:
    """A mask -> (B, 1, height, width) float32 in {0, 1}: 1 where the mask is >= 0.5 (diffusers' binarisation).

    PIL masks are read as 8-bit grey levels / 255 and resized to the output size whatever their own size (as
    diffusers does: a 64x64 mask serves a 256x256 image); arrays and tensors as they are, at the image's size, so that
    an integer mask of {0, 1} or {0, 255} repaints where it is not 0 (as diffusers binarises arrays, without scaling
    them)."""
    from PIL import Image

    if isinstance(mask_image, Image.Image):
        mask_image = [mask_image]
    if isinstance(mask_image, (list, tuple)) and len(mask_image) == 0:
        raise ValueError("mask_image: expected a mask or a non-empty list of masks, got an empty list")
    if isinstance(mask_image, (list, tuple)) and all(isinstance(m, Image.Image) for m in mask_image):
        arrays = [np.asarray(_converted("mask_image", m, "L").resize((width, height), resample=Image.LANCZOS))
                  for m in mask_image]
        mask = torch.from_numpy(np.stack(arrays)[:, None].astype(np.float32) / 255.0)
    else:
        if isinstance(mask_image, (list, tuple)):
            mask_image = _stacked("mask_image", [np.asarray(m) for m in mask_image])
        integer = isinstance(mask_image, torch.Tensor) and not mask_image.is_floating_point()
        if isinstance(mask_image, np.ndarray):
            if mask_image.dtype.kind not in "biuf":
                raise ValueError(f"mask_image: expected a numeric array, got dtype {mask_image.dtype}")
            integer = mask_image.dtype.kind in "biu"
            mask_image = torch.from_numpy(np.ascontiguousarray(mask_image.astype(np.float32)))
        if not isinstance(mask_image, torch.Tensor):
            raise ValueError(f"mask_image: expected a PIL image, an array or a tensor, got {type(mask_image).__name__}")
        mask = check_finite("mask_image", mask_image.detach().float().cpu())
        if mask.ndim == 2:  # (H, W)
            mask = mask[None, None]
        elif mask.ndim == 3:  # (1, H, W) or (B, H, W)
            mask = mask[:, None]
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.numel() == 0:
            raise ValueError(f"mask_image: expected (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask_image.shape)}")
        if tuple(mask.shape[-2:]) != image_size:
            raise ValueError(f"mask_image: expected the size of image (H, W) = {image_size}, got {tuple(mask.shape[-2:])}")
        low, high = mask.min().item(), mask.max().item()
        if low < 0 or (high > 1 and not integer):
            raise ValueError(f"mask_image: expected values in [0, 1] (or integers >= 0), got [{low:.3g}, {high:.3g}]")
        if tuple(mask.shape[-2:]) != (height, width):
            mask = F.interpolate(mask, size=(height, width), mode="nearest")
    return (mask >= 0.5).float()


def _converted(name: str, image, mode: str):
    """A PIL image in ``mode``; PIL raises ValueError or OSError for modes it cannot convert."""
    try:
        return image.convert(mode)
    except (ValueError, OSError) as error:
        raise ValueError(f"{name}: cannot convert a PIL image of mode {image.mode!r} to {mode!r} ({error})") from None


def _stacked(name: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays of one image (or mask) each, or of a batch each, as one batch."""
    try:
        return np.stack(arrays) if arrays[0].ndim in (2, 3) else np.concatenate(arrays)
    except ValueError as error:  # different shapes
        raise ValueError(f"{name}: expected items of one shape, got {[a.shape for a in arrays]} ({error})") from None


def to_output(images: torch.Tensor, output_type: str):
    """Decoded images (B, 3, H, W) in about [-1, 1] -> the requested output type, values in [0, 1]."""
    images = (images.float() * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images.cpu()
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def unit_range(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point() or tensor.ndim not in (3, 4) or tensor.shape[-3] != 3 or tensor.numel() == 0:
        raise ValueError(f"{name}: expected float image tensors (3, H, W) or (B, 3, H, W) in [0, 1], got "
                         f"{tuple(tensor.shape)} {tensor.dtype}")
    check_finite(name, tensor)
    if tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{name}: image tensors must be in [0, 1], got [{tensor.min().item():.3g}, "
                         f"{tensor.max().item():.3g}]")
    return tensor

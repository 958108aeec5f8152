"""FID, KID and CLIP score of a folder of generated images (``kandinsky eval``; see docs/generation.md).

    from kandinsky.eval import evaluate
    metrics = evaluate("out", "coco30k/reference")  # {"fid": ..., "kid_mean": ..., "clip_score": ..., ...}

The metrics are torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance``, ``CLIPScore``). The
Inception-v3 is the TensorFlow FID network as torch-fidelity ports it (torchmetrics' default), defined here
(:class:`FIDInceptionV3`, same module names, same weights file) so that neither torch-fidelity nor torchvision is
needed: the numbers are comparable with the published ones. Both folders are read the same way: each image
centre-cropped to a square and resized to ``size`` px (256 in the published COCO evaluations) with PIL bicubic,
then given to the Inception network as uint8 (it resizes to 299 itself). One Inception pass per image feeds both
FID and KID. The CLIP score (100 x cosine similarity of CLIP image and text embeddings, averaged, floored at 0)
uses the full-size generated images and their prompts from ``manifest.jsonl``.

Everything runs offline from local files: ``inception_weights=`` (``--inception-weights FILE``) and a CLIP model
folder (``clip_source=`` / ``--clip-model DIR``: a transformers ``CLIPModel`` and its ``CLIPProcessor``, as
``save_pretrained`` writes them). By default the Inception weights are read from torch's hub cache (downloaded
there when missing unless ``HF_HUB_OFFLINE=1``) and the CLIP model from the Hugging Face hub cache; a missing file
is a :class:`~kandinsky.hub.WeightsNotFoundError` whose one-line message names it and says how to get it. Feature
extractors can also be injected (``inception_module=`` a module mapping uint8 (B, 3, H, W) to (B, D) features,
``clip=`` a callable returning ``(model, processor)`` as torchmetrics' ``CLIPScore`` takes it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from kandinsky.hub import WeightsNotFoundError
from kandinsky.images import IMAGE_SUFFIXES

DEFAULT_SIZE = 256
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# torch-fidelity's conversion of the TensorFlow FID Inception weights (what torchmetrics downloads by default); the
# file name holds the first hex digits of its SHA-256
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256_PREFIX = "6726825d"
CLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
              "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
# a CLIP model folder needs one file of each group (the hub's openai repositories have the first of each; a
# processor saved by transformers >= 5 writes processor_config.json)
CLIP_REQUIRED = (("config.json",), ("model.safetensors", "pytorch_model.bin"),
                 ("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json"))


# ------------------------------------------------------------------------------------------- feature extractors


def default_inception_path() -> Path:
    """Where torch-fidelity and torchmetrics keep the FID Inception weights: torch's hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class _Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, running statistics), ReLU: a TensorFlow Inception conv."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 average pool leaves the zero padding out of the average
    return nn.functional.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = _Conv(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = _Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _Conv(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _Conv(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class _InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = _Conv(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _Conv(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          nn.functional.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _Conv(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = _Conv(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _Conv(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), double,
                          self.branch_pool(_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = _Conv(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = _Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _Conv(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = _Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), tower,
                          nn.functional.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):
    """``max_pool``: the TensorFlow graph's last block pools with a 3x3 max where the others average."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = _Conv(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _Conv(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = nn.functional.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(single), self.branch3x3_2b(single),
                          self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double), self.branch_pool(pooled)], 1)


def _resize_like_tensorflow1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's bilinear resize (align_corners=False, no antialiasing) of float (B, C, H, W) to size x size:
    torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x`` (its exact method), the same operations."""

    def grid(length: int):
        position = torch.arange(0, size, 1, dtype=x.dtype, device=x.device) * torch.tensor(length / size,
                                                                                            dtype=torch.float32)
        low = position.long()
        return low, (low + 1).clamp_max(length - 1), position - low.float()

    y_low, y_high, dy = grid(x.shape[2])
    x_low, x_high, dx = grid(x.shape[3])
    top, bottom = x[:, :, y_low, :], x[:, :, y_high, :]
    top_left, top_right = top[:, :, :, x_low], top[:, :, :, x_high]
    bottom_left, bottom_right = bottom[:, :, :, x_low], bottom[:, :, :, x_high]
    upper = top_left + (top_right - top_left) * dx.view(1, 1, 1, size)
    lower = bottom_left + (bottom_right - bottom_left) * dx.view(1, 1, 1, size)
    return upper + (lower - upper) * dy.view(1, 1, size, 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3: the TensorFlow graph ``inception-2015-12-05`` the published FIDs use, as
    torch-fidelity ports it (``FeatureExtractorInceptionV3``, which torchmetrics' ``NoTrainInceptionV3`` extends;
    Apache-2.0, after pytorch-fid), with its module names, so that its weights file
    ``weights-inception-2015-12-05-6726825d.pth`` loads as it is. Defined here because torch-fidelity imports
    torchvision, whose wheels each require one torch build (see docs/generation.md).

    Input: uint8 (B, 3, H, W) of any size, resized to 299 with TensorFlow 1's bilinear rule (torchmetrics'
    ``antialias=False``) and scaled to [-1, 1); output: float32 (B, 2048), the pool3 features. ``fc`` (1008
    classes) is unused but part of the weights file."""

    INPUT_SIZE = 299

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = _Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, channels_7x7=128)
        self.Mixed_6c = _InceptionC(768, channels_7x7=160)
        self.Mixed_6d = _InceptionC(768, channels_7x7=160)
        self.Mixed_6e = _InceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, max_pool=False)
        self.Mixed_7c = _InceptionE(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FIDInceptionV3:
        return super().train(False)  # batch norm always uses the stored statistics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FID Inception: expected uint8 images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = _resize_like_tensorflow1(images.to(torch.float32), self.INPUT_SIZE)
        x = (x - 128) / 128
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.MaxPool_1, self.Conv2d_3b_1x1,
                      self.Conv2d_4a_3x3, self.MaxPool_2, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c, self.AvgPool):
            x = layer(x)
        return torch.flatten(x, 1)

    def weight_names(self) -> dict[str, torch.Size]:
        """Name -> shape of the tensors of a weights file (the state dict without batch norm's step counters)."""
        return {name: value.shape for name, value in self.state_dict().items()
                if not name.endswith("num_batches_tracked")}


def inception_path(weights: str | os.PathLike | None = None) -> Path:
    """The FID Inception weights file: ``weights``, by default :func:`default_inception_path` (downloaded there
    when missing, unless ``HF_HUB_OFFLINE=1``). A missing file is a one-line :class:`WeightsNotFoundError`."""
    from huggingface_hub import constants

    path = Path(weights).expanduser() if weights is not None else default_inception_path()
    hint = f"download {INCEPTION_URL} to {path}" + ("" if weights is not None else " or pass --inception-weights FILE")
    if path.is_file():
        return path
    if weights is not None or constants.HF_HUB_OFFLINE:
        raise WeightsNotFoundError(f"FID Inception weights not found: {path}; {hint}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(path), hash_prefix=INCEPTION_SHA256_PREFIX,
                                       progress=False)
    except Exception as error:  # noqa: BLE001 - urllib raises many types
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise WeightsNotFoundError(f"FID Inception weights not found: {path} (download failed: {reason}); "
                                   f"{hint}") from None
    return path


def load_inception(path: str | os.PathLike) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the weights of ``path``: a ``torch.save``'d dict of tensors named as
    torch-fidelity names them (its ``weights-inception-2015-12-05-6726825d.pth``). Anything else is a one-line
    ``ValueError`` naming the file."""
    path = Path(path)
    model = FIDInceptionV3()
    expected = model.weight_names()
    again = f"expected torch-fidelity's {INCEPTION_FILE} ({INCEPTION_URL})"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle and zipfile raise many types
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise ValueError(f"{path}: not a torch weights file ({reason}); {again}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a dict of tensors; {again}")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})" for k, v in state.items()
             if k in expected and v.shape != expected[k]]
    if missing or unexpected or wrong:
        problems = [f"{len(found)} {what} ({found[0]}{', ...' if len(found) > 1 else ''})"
                    for what, found in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                        ("tensors of another shape", wrong)) if found]
        raise ValueError(f"{path}: not the FID Inception-v3 weights: {', '.join(problems)}; {again}")
    counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    model.load_state_dict({**counters, **state})
    return model


def inception(weights: str | os.PathLike | None = None) -> FIDInceptionV3:
    """The FID Inception-v3 (:class:`FIDInceptionV3`) with the weights of :func:`inception_path` ``(weights)``.
    Input: uint8 (B, 3, H, W); output: float32 (B, 2048)."""
    return load_inception(inception_path(weights))


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, hex (torch-fidelity's Inception weights: 6726825d..., their name says so)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _ProjectedFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as
    tensors: transformers >= 5 returns a model output there, which torchmetrics 1.9's CLIPScore cannot read
    (Lightning-AI/torchmetrics#3407)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _hf_download(folder: Path | None, source: str = DEFAULT_CLIP) -> str:
    """The command that fetches a CLIP model (into the hub cache, or ``folder``); for the default model only the
    files needed (its repository also holds PyTorch, TensorFlow and Flax copies of the weights)."""
    files = " config.json model.safetensors preprocessor_config.json tokenizer.json tokenizer_config.json " \
            "vocab.json merges.txt special_tokens_map.json" if source == DEFAULT_CLIP else ""
    return f"hf download {source}{files}" + (f" --local-dir {folder}" if folder is not None else "")


def _looks_like_a_path(source: str) -> bool:
    """Whether ``source`` names a folder rather than a hub repository id ("owner/name" or "name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.startswith((".", "~", "/", "\\")) or Path(source).exists():
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return False


def clip_files(source: str = DEFAULT_CLIP) -> Path:
    """The folder of a CLIP model (``CLIPModel`` + ``CLIPProcessor`` files): ``source`` itself when it is a folder,
    else the hub repository's snapshot (from the cache, or downloaded unless offline)."""
    local = Path(source).expanduser()
    if not local.is_dir() and _looks_like_a_path(source):
        raise WeightsNotFoundError(f"CLIP model folder not found: {local}; save a transformers CLIPModel and its "
                                   f"CLIPProcessor there (save_pretrained), or run `{_hf_download(local)}` where "
                                   "the hub is reachable")
    if local.is_dir():
        missing = [group for group in CLIP_REQUIRED if not any((local / name).is_file() for name in group)]
        if missing:
            raise WeightsNotFoundError(f"CLIP model folder {local} has no {' or '.join(missing[0])}; save a "
                                       "transformers CLIPModel and its CLIPProcessor there (save_pretrained), or run "
                                       f"`{_hf_download(local)}` where the hub is reachable")
        return local
    from huggingface_hub import constants, snapshot_download, try_to_load_from_cache

    try:
        return Path(snapshot_download(source, allow_patterns=list(CLIP_FILES)))
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises many types
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        missing = next((group[0] for group in CLIP_REQUIRED
                        if not any(isinstance(try_to_load_from_cache(source, name), str) for name in group)),
                       CLIP_REQUIRED[0][0])
        raise WeightsNotFoundError(
            f"CLIP model file {missing} of {source!r} is not in the hub cache {constants.HF_HUB_CACHE} and could not "
            f"be downloaded ({reason}); run `{_hf_download(None, source)}` where the hub is reachable, or pass "
            f"--clip-model DIR (a folder with those files)") from None


def clip_model(source: str = DEFAULT_CLIP) -> Callable[[], tuple]:
    """A loader of ``(model, processor)`` for torchmetrics' ``CLIPScore`` from a hub id or a local folder.
    The files are located at once (a missing one is an error now), the model loaded when called."""
    import transformers
    from transformers import CLIPModel, CLIPProcessor

    folder = clip_files(source)
    # the PIL image processor (OpenAI's CLIP preprocessing): transformers >= 5 takes its torchvision one whenever
    # torchvision is installed, and the CLIP score would depend on that; transformers 4's default is PIL already
    options = {"backend": "pil"} if hasattr(transformers, "CLIPImageProcessorPil") else {}

    def load() -> tuple:
        return (_ProjectedFeatures(CLIPModel.from_pretrained(folder).eval()),
                CLIPProcessor.from_pretrained(folder, **options))

    return load


# ------------------------------------------------------------------------------------------- images


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The images of ``folder`` (not its subfolders, not hidden files), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such image folder: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def square_pixels(image, size: int) -> torch.Tensor:
    """A PIL image -> uint8 (3, size, size): centre-cropped to a square, resized with bicubic filtering."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _read(path: Path, size: int, full: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - PIL raises many types
        raise ValueError(f"cannot read image {path}: {error}") from None
    whole = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) if full else None
    return square_pixels(image, size), whole


def _batches(files: Sequence[Path], size: int, batch_size: int, full: bool = False
             ) -> Iterator[tuple[list[Path], torch.Tensor, list[torch.Tensor] | None]]:
    """(files, uint8 (B, 3, size, size), full-size uint8 (3, H, W) images when ``full``), decoded by threads."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), batch_size):
            chunk = list(files[start:start + batch_size])
            read = list(pool.map(lambda p: _read(p, size, full), chunk))
            yield chunk, torch.stack([r[0] for r in read]), [r[1] for r in read] if full else None


# ------------------------------------------------------------------------------------------- metrics


def _torchmetrics(module: str):
    """``import module`` (a torchmetrics module). torchmetrics imports torchvision and torch-fidelity whenever they
    are installed, and a torchvision wheel built for another torch fails there with a RuntimeError or OSError:
    that is an ImportError here whose one line says what to do (this module needs neither of them)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise
    except Exception as error:  # noqa: BLE001 - torchvision's failed operator registration, a missing libc10_cuda.so
        from importlib.metadata import PackageNotFoundError, version

        try:
            cause = f": torchvision {version('torchvision')} does not work with torch {torch.__version__}"
        except PackageNotFoundError:
            cause = ""
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise ImportError(f"torchmetrics cannot be imported ({reason}){cause}; kandinsky eval needs neither "
                          "torchvision nor torch-fidelity: pip uninstall torchvision torch-fidelity (or install the "
                          "torchvision built for this torch), then pip install 'kandinsky21[eval]'") from None


class _Precomputed(nn.Module):
    """The "feature extractor" torchmetrics' FID and KID get: the features themselves, already computed once
    for both metrics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance (torchmetrics) between two sets of features (N, D), both N >= 2."""
    FrechetInceptionDistance = _torchmetrics("torchmetrics.image.fid").FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed(generated.shape[1]))
    metric.update(reference.double(), real=True)
    metric.update(generated.double(), real=False)
    return float(metric.compute())


def kid(generated: torch.Tensor, reference: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (torchmetrics; cubic polynomial kernel): (mean, std) over ``subsets`` random
    subsets of ``min(subset_size, N)`` features of each set, drawn with ``seed``."""
    import warnings

    KernelInceptionDistance = _torchmetrics("torchmetrics.image.kid").KernelInceptionDistance

    subset_size = min(subset_size, len(generated), len(reference))
    with warnings.catch_warnings():  # "will save all extracted features": they are in memory already
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(generated.shape[1]), subsets=subsets,
                                         subset_size=subset_size)
    metric.update(reference.double(), real=True)
    metric.update(generated.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def features(files: Sequence[Path], extractor: nn.Module, size: int = DEFAULT_SIZE, batch_size: int = 50,
             device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """float64 (N, D) features of the images ``files`` (read as in :func:`square_pixels`) by ``extractor``."""
    from tqdm.auto import tqdm

    out = []
    with torch.inference_mode():
        for _, pixels, _ in tqdm(_batches(files, size, batch_size), total=-(-len(files) // batch_size),
                                 disable=not progress, desc="features", unit="batch"):
            out.append(extractor(pixels.to(device)).double().cpu())
    return torch.cat(out)


def manifest_prompts(folder: str | os.PathLike) -> dict[str, str]:
    """File name -> prompt, from ``folder/manifest.jsonl`` (written by ``kandinsky batch``); {} without one."""
    path = Path(folder) / "manifest.jsonl"
    if not path.is_file():
        return {}
    prompts = {}
    for line, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            prompts[record["file"]] = record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{line}: expected a JSON record with 'file' and 'prompt'") from None
    return prompts


def prepare_coco(captions: str | os.PathLike, images: str | os.PathLike, output: str | os.PathLike,
                 count: int = 30000, seed: int = 0) -> tuple[Path, Path]:
    """The COCO-30k protocol's inputs from COCO 2014 val (``annotations/captions_val2014.json`` and the ``val2014``
    image folder): ``count`` distinct images drawn at random with ``seed``, one of each image's captions drawn
    likewise. Writes ``output/prompts.jsonl`` (``id`` = the image's file name without extension, ``prompt`` = the
    caption) and ``output/reference/`` (links to the chosen images). Returns both paths."""
    import random

    captions, images, output = Path(captions), Path(images), Path(output)
    try:
        data = json.loads(captions.read_text(encoding="utf-8"))
        names = {image["id"]: image["file_name"] for image in data["images"]}
        by_image: dict[int, list[str]] = {}
        for annotation in data["annotations"]:
            by_image.setdefault(annotation["image_id"], []).append(" ".join(annotation["caption"].split()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{captions}: expected a COCO captions file (images, annotations): {error}") from None
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= len(by_image):
        raise ValueError(f"count: expected an integer in [1, {len(by_image)}] (captioned images), got {count!r}")
    rng = random.Random(seed)
    chosen = rng.sample(sorted(by_image), count)
    rows = []
    for image_id in chosen:
        source = images / names[image_id]
        if not source.is_file():
            raise FileNotFoundError(f"{source}: an image of {captions} is missing from {images}")
        rows.append((source, rng.choice(by_image[image_id])))
    reference = output / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    for source, _ in rows:
        link = reference / source.name
        if not link.exists():
            link.symlink_to(source.resolve())
    prompts = output / "prompts.jsonl"
    partial = output / ".prompts.jsonl.partial"
    partial.write_text("".join(json.dumps({"id": source.stem, "prompt": caption}) + "\n" for source, caption in rows),
                       encoding="utf-8")
    os.replace(partial, prompts)
    return prompts, reference


def evaluate(generated: str | os.PathLike, reference: str | os.PathLike | None = None, *,
             prompts: Mapping[str, str] | None = None, inception_module: nn.Module | None = None,
             inception_weights: str | os.PathLike | None = None, clip: Callable[[], tuple] | None = None,
             clip_source: str | None = DEFAULT_CLIP, size: int = DEFAULT_SIZE, batch_size: int = 50,
             device: str | torch.device | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
             progress: bool = False) -> dict:
    """FID and KID of ``generated`` against ``reference`` (when given) and the CLIP score of the generated images
    against ``prompts`` (file name -> prompt; default: the folder's ``manifest.jsonl``; none: no CLIP score).

    ``inception_module`` replaces the FID Inception (:func:`inception` of ``inception_weights``, whose path and
    SHA-256 the result records); ``clip`` replaces :func:`clip_model` of ``clip_source`` (``None``: no CLIP
    score). The feature extractors' files are located before any image is read. Returns a JSON-ready dict (see
    docs/generation.md)."""
    CLIPScore = _torchmetrics("torchmetrics.multimodal.clip_score").CLIPScore

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, value in (("size", size), ("batch_size", batch_size), ("kid_subsets", kid_subsets),
                        ("kid_subset_size", kid_subset_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    generated_files = image_files(generated)
    reference_files = image_files(reference) if reference is not None else []
    prompts = manifest_prompts(generated) if prompts is None else dict(prompts)
    captioned = [f for f in generated_files if f.name in prompts]
    clip_name = "custom" if clip is not None else clip_source
    if clip is None and clip_source is not None and captioned:
        clip = clip_model(clip_source)
    extractor = weights_path = weights_sha256 = None
    if reference is not None:
        for folder, files in ((generated, generated_files), (reference, reference_files)):
            if len(files) < 2:
                raise ValueError(f"FID needs at least 2 images in each folder, {folder} has {len(files)}")
        if inception_module is None:
            weights_path = inception_path(inception_weights)
            extractor, weights_sha256 = load_inception(weights_path), file_sha256(weights_path)
        else:
            extractor = inception_module
        extractor = extractor.to(device).eval()

    result: dict = {"generated": str(generated), "generated_images": len(generated_files), "size": size}
    if extractor is not None:
        fake = features(generated_files, extractor, size, batch_size, device, progress)
        real = features(reference_files, extractor, size, batch_size, device, progress)
        kid_mean, kid_std = kid(fake, real, kid_subsets, kid_subset_size)
        result.update({"reference": str(reference), "reference_images": len(reference_files), "fid": fid(fake, real),
                       "kid_mean": kid_mean, "kid_std": kid_std, "kid_subsets": kid_subsets,
                       "kid_subset_size": min(kid_subset_size, len(fake), len(real)),
                       "feature_extractor": "custom" if inception_module is not None else "inception-v3-compat"})
        if inception_module is None:
            result.update({"inception_weights": str(weights_path), "inception_sha256": weights_sha256})
    if clip is not None and captioned:
        metric = CLIPScore(model_name_or_path=clip).to(device)
        for files, _, images in _batches(captioned, size, batch_size, full=True):
            metric.update([image.to(device) for image in images], [prompts[f.name] for f in files])
        result.update({"clip_score": float(metric.compute()), "clip_images": len(captioned),
                       "clip_model": clip_name})
    result["library"] = f"torchmetrics {_torchmetrics('torchmetrics').__version__}"
    return result

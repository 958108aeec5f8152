"""FID, KID and CLIP score of a folder of generated images (``kandinsky eval``; see docs/generation.md).

    from kandinsky.eval import evaluate
    metrics = evaluate("out", "coco30k/reference")  # {"fid": ..., "kid_mean": ..., "clip_score": ..., ...}

The metrics are torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance``, ``CLIPScore``); the
Inception-v3 is torch-fidelity's port of the TensorFlow FID network (torchmetrics' default), so the numbers are
comparable with the published ones. Both folders are read the same way: each image centre-cropped to a square
and resized to ``size`` px (256 in the published COCO evaluations) with PIL bicubic, then given to the Inception
network as uint8 (it resizes to 299 itself). One Inception pass per image feeds both FID and KID. The CLIP score
(100 x cosine similarity of CLIP image and text embeddings, averaged, floored at 0) uses the full-size generated
images and their prompts from ``manifest.jsonl``.

Feature extractors can be injected (``inception=`` a module mapping uint8 (B, 3, H, W) to (B, D) features,
``clip=`` a callable returning ``(model, processor)`` as torchmetrics' ``CLIPScore`` takes it), which is how the
tests run without downloads. By default the Inception weights are read from torch's hub cache (downloaded there
when missing unless ``HF_HUB_OFFLINE=1``) and the CLIP model from the Hugging Face hub cache; a missing file is a
:class:`~kandinsky.hub.WeightsNotFoundError` whose one-line message names it and says where to put it.
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
# torch-fidelity's conversion of the TensorFlow FID Inception weights (what torchmetrics downloads by default)
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
CLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
              "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
# a CLIP model folder needs one file of each group (the hub's openai repositories have the first of each; a
# processor saved by transformers >= 5 writes processor_config.json)
CLIP_REQUIRED = (("config.json",), ("model.safetensors", "pytorch_model.bin"),
                 ("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json"))


# ------------------------------------------------------------------------------------------- feature extractors


def default_inception_path() -> Path:
    """Where torch-fidelity and torchmetrics keep the FID Inception weights: torch's hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


def inception(weights: str | os.PathLike | None = None) -> nn.Module:
    """The FID Inception-v3 (pool3, 2048 features) from ``weights``, by default :func:`default_inception_path`
    (downloaded there when missing, unless offline). Input: uint8 (B, 3, H, W); output: float32 (B, 2048)."""
    import importlib.util

    from huggingface_hub import constants
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = Path(weights).expanduser() if weights is not None else default_inception_path()
    hint = f"download {INCEPTION_URL} to {path}" + ("" if weights is not None else " or pass --inception-weights FILE")
    if not path.is_file():
        if weights is not None or constants.HF_HUB_OFFLINE:
            raise WeightsNotFoundError(f"FID Inception weights not found: {path}; {hint}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=False)
        except Exception as error:  # noqa: BLE001 - urllib raises many types
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            raise WeightsNotFoundError(f"FID Inception weights not found: {path} (download failed: {reason}); "
                                       f"{hint}") from None
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError("the FID Inception network comes from torch-fidelity, which is not installed: "
                                  "pip install 'kandinsky21[eval]' (after the torchvision that matches your torch)")
    # antialias=False: torch-fidelity's TensorFlow-compatible resize, as the reference FID code
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(path), antialias=False)


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


def clip_files(source: str = DEFAULT_CLIP) -> Path:
    """The folder of a CLIP model (``CLIPModel`` + ``CLIPProcessor`` files): ``source`` itself when it is a folder,
    else the hub repository's snapshot (from the cache, or downloaded unless offline)."""
    local = Path(source).expanduser()
    if local.is_dir():
        missing = [group for group in CLIP_REQUIRED if not any((local / name).is_file() for name in group)]
        if missing:
            raise WeightsNotFoundError(f"CLIP model folder {local} has no {' or '.join(missing[0])}; save a "
                                       "transformers CLIPModel and its CLIPProcessor there (save_pretrained)")
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
            f"be downloaded ({reason}); run `hf download {source}` where the hub is reachable, or pass "
            f"--clip-model /path/to/folder") from None


def clip_model(source: str = DEFAULT_CLIP) -> Callable[[], tuple]:
    """A loader of ``(model, processor)`` for torchmetrics' ``CLIPScore`` from a hub id or a local folder.
    The files are located at once (a missing one is an error now), the model loaded when called."""
    from transformers import CLIPModel, CLIPProcessor

    folder = clip_files(source)

    def load() -> tuple:
        return _ProjectedFeatures(CLIPModel.from_pretrained(folder).eval()), CLIPProcessor.from_pretrained(folder)

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
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed(generated.shape[1]))
    metric.update(reference.double(), real=True)
    metric.update(generated.double(), real=False)
    return float(metric.compute())


def kid(generated: torch.Tensor, reference: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (torchmetrics; cubic polynomial kernel): (mean, std) over ``subsets`` random
    subsets of ``min(subset_size, N)`` features of each set, drawn with ``seed``."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

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

    ``inception_module`` replaces the FID Inception (:func:`inception` of ``inception_weights``); ``clip`` replaces
    :func:`clip_model` of ``clip_source`` (``None``: no CLIP score). The feature extractors' files are located
    before any image is read. Returns a JSON-ready dict (see docs/generation.md)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

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
    extractor = None
    if reference is not None:
        for folder, files in ((generated, generated_files), (reference, reference_files)):
            if len(files) < 2:
                raise ValueError(f"FID needs at least 2 images in each folder, {folder} has {len(files)}")
        extractor = inception_module if inception_module is not None else inception(inception_weights)
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
    if clip is not None and captioned:
        metric = CLIPScore(model_name_or_path=clip).to(device)
        for files, _, images in _batches(captioned, size, batch_size, full=True):
            metric.update([image.to(device) for image in images], [prompts[f.name] for f in files])
        result.update({"clip_score": float(metric.compute()), "clip_images": len(captioned),
                       "clip_model": clip_name})
    import torchmetrics

    result["library"] = f"torchmetrics {torchmetrics.__version__}"
    return result

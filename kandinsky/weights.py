"""Weight files: reading foreign checkpoints safely, writing and loading our converted format, and the
conversion driver behind ``scripts/convert_weights.py`` / ``kandinsky convert``.

Our format is one folder per component::

    movq/
      config.json        {"format": "kandinsky21", "component": "movq", "config": {...}, "source": {...}}
      model.safetensors  our state dict

Example::

    from kandinsky.weights import convert_files, load_converted
    convert_files("movq", "movq_final.ckpt", "weights/movq")        # original layout, official config
    convert_files("movq", "kandinsky-2-1/movq", "weights/movq2")     # a diffusers component folder
    movq = load_converted("weights/movq", dtype=torch.bfloat16)

Safety: pickled checkpoints are read with ``torch.load(weights_only=True)``, so a file that would run
code when unpickled is refused. Writes are atomic: a temporary sibling folder is renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "kandinsky21"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHANNELS_LAST_KEY = "channels_last"  # safetensors metadata: JSON list of the kernels stored as (O, kh, kw, I)
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".th", ".bin")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightsFileError(ValueError):
    """A weight file that cannot be read: missing, truncated, corrupt, or containing code."""


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        # legacy (pre-zip) serialisation cannot be memory-mapped: read it into memory instead
        return torch.load(path, map_location="cpu", weights_only=True)


def _offending_global(error: Exception) -> str:
    """The 'Unsupported global: ...' line of a weights_only refusal, if torch names one."""
    lines = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
    return f" ({lines[0].split('Unsupported global:')[-1].strip()})" if lines else ""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, without executing any code and without copying into memory.

    ``.ckpt``/``.pt``/``.pth``/``.th``/``.bin`` are read with ``torch.load(weights_only=True, mmap=True)``
    (a top-level ``"state_dict"`` entry, as in Lightning checkpoints, is unwrapped); ``.safetensors`` is
    memory-mapped. Raises :class:`WeightsFileError` naming the file if it is missing, truncated, corrupt,
    contains pickled code or is not a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"checkpoint {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            state = load_file(str(path))
        elif suffix in _PICKLE_SUFFIXES:
            state = _torch_load(path)
        else:
            raise WeightsFileError(f"checkpoint {path}: unknown extension {suffix!r}; expected .safetensors or one of "
                                   f"{list(_PICKLE_SUFFIXES)}")
    except WeightsFileError:
        raise
    except Exception as error:  # noqa: BLE001 - every reader failure becomes one clear message
        text = str(error).lower()
        if "weights only" in text or "weights_only" in text or "unsupported global" in text:
            raise WeightsFileError(
                f"refusing to load {path}: it contains pickled objects other than tensors (code would run on "
                f"load). Only plain state dicts are accepted.{_offending_global(error)}") from None
        raise WeightsFileError(f"cannot read checkpoint {path} (truncated or corrupt?): "
                               f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__
        raise WeightsFileError(f"checkpoint {path} is not a state dict (a mapping of names to tensors), got {kind}")
    return dict(state)


def read_clip_stats(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clip_mean, clip_std)`` from ``ViT-L-14_stats.th`` (a pickled tuple of two (768,) tensors)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"CLIP statistics file {path} does not exist")
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise WeightsFileError(f"cannot read CLIP statistics {path}: {type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if (not isinstance(stats, (tuple, list)) or len(stats) != 2
            or not all(isinstance(t, torch.Tensor) for t in stats)):
        raise WeightsFileError(f"CLIP statistics {path} must hold a (mean, std) pair of tensors, "
                               f"got {type(stats).__name__}")
    return stats[0], stats[1]


def save_converted(module: nn.Module, component: str, folder: str | os.PathLike, *, force: bool = False,
                   source_info: dict | None = None) -> Path:
    """Write ``module`` as ``folder/model.safetensors`` + ``folder/config.json``, atomically.

    Everything is written into a temporary sibling folder that is renamed into place at the end, so
    on any failure nothing partial remains. An existing ``folder`` is only replaced with ``force``.
    """
    from kandinsky.models import config_to_dict

    folder = Path(folder)
    if folder.exists() and not force:
        raise FileExistsError(f"output folder {folder} already exists (use force=True / --force to replace it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    previous = None
    try:
        state, channels_last = _file_layout(module.state_dict())
        save_file(state, str(temporary / MODEL_FILE),
                  metadata={"format": FORMAT, "component": component, CHANNELS_LAST_KEY: json.dumps(channels_last)})
        meta = {"format": FORMAT, "component": component, "config": config_to_dict(module.config),
                "source": source_info}
        (temporary / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():  # force: move the old folder aside first, so it can be restored on failure
            previous = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(previous)
        temporary.rename(folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if previous is not None and not folder.exists():
            previous.rename(folder)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return folder


def _file_layout(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors as safetensors stores them (contiguous), and the keys of the convolution kernels kept in
    channels-last order: those are written as their (O, kh, kw, I) permutation, which is the same bytes, so
    that loading can hand the model channels-last kernels as views of the memory-mapped file instead of
    copying them (3.35 GiB for the UNet)."""
    state, channels_last = {}, []
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if tensor.ndim == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
            tensor = tensor.permute(0, 2, 3, 1)  # contiguous: no copy
            channels_last.append(key)
        state[key] = tensor.contiguous()
    return state, channels_last


def _channels_last_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return json.loads((file.metadata() or {}).get(CHANNELS_LAST_KEY, "[]"))


def load_converted(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Our module from a folder written by :func:`save_converted`, in eval mode.

    The module is built on the meta device and takes the memory-mapped tensors as its parameters
    (``assign=True``), so the weights are never copied when device and dtype match the file: convolution
    kernels that the model keeps channels-last are stored in that order, and arrive as views too.
    """
    from kandinsky.convert.core import Source, build_strict
    from kandinsky.models import config_from_dict, model_class

    folder = Path(folder)
    config_path, model_path = folder / CONFIG_FILE, folder / MODEL_FILE
    if not config_path.is_file() or not model_path.is_file():
        raise WeightsFileError(f"{folder} is not a converted weights folder (needs {CONFIG_FILE} and {MODEL_FILE})")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise WeightsFileError(f"cannot parse {config_path}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise WeightsFileError(f"{config_path} is not in the {FORMAT!r} format (format={found!r})")
    component = meta["component"]
    config = config_from_dict(component, meta["config"])
    try:
        state = load_file(str(model_path), device=str(device))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise WeightsFileError(f"cannot read {model_path} (truncated or corrupt?): {error}") from None
    try:
        for key in _channels_last_keys(model_path):
            state[key] = state[key].permute(0, 3, 1, 2)  # (O, kh, kw, I) on disk -> channels-last (O, I, kh, kw) view
    except (KeyError, RuntimeError, TypeError, ValueError) as error:  # ValueError: JSONDecodeError
        raise WeightsFileError(f"{model_path}: bad {CHANNELS_LAST_KEY!r} metadata ({type(error).__name__}: {error})") from None
    source = Source(state, FORMAT)
    converted = source.rename([(r"(.*)", r"\1")])
    cls = model_class(component)
    return build_strict(component, lambda: cls(config), converted, source, dtype)


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _diffusers_weights(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsFileError(f"diffusers folder {folder} has no diffusion_pytorch_model.safetensors or .bin")


def convert_files(component: str, source: str | os.PathLike, output: str | os.PathLike, *, layout: str = "auto",
                  config: Mapping | None = None, clip_stats: str | os.PathLike | None = None, force: bool = False,
                  dtype: str | torch.dtype | None = None) -> Path:
    """Convert official weights on disk into our format at ``output``; returns the output folder.

    ``source`` is an original checkpoint file (``layout="original"``; ``config`` defaults to the
    official constructor arguments, and the prior needs ``clip_stats`` = ``ViT-L-14_stats.th``) or a
    diffusers component folder with ``config.json`` (``layout="diffusers"``); ``"auto"`` picks by
    file vs folder. ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``) casts the weights; the
    default keeps the checkpoint's dtype.
    """
    from kandinsky.convert import COMPONENTS, from_diffusers, from_original, official_original_config

    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {list(COMPONENTS)}, got {component!r}")
    source, output = Path(source), Path(output)
    torch_dtype = _parse_dtype(dtype)
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    if layout == "auto":
        layout = "diffusers" if source.is_dir() else "original"
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original', 'diffusers' or 'auto', got {layout!r}")
    if output.exists() and not force:  # fail before the (slow) conversion
        raise FileExistsError(f"output folder {output} already exists (use --force to replace it)")

    if layout == "original":
        if source.is_dir():
            raise ValueError(f"layout 'original' needs a checkpoint file, got the folder {source}")
        if config is None:
            config = official_original_config(component)
        extra = {}
        if clip_stats is not None:
            extra["clip_stats"] = read_clip_stats(clip_stats)
        elif component == "prior":
            raise ValueError("converting the original prior needs clip_stats (the path of ViT-L-14_stats.th)")
        state = read_state_dict(source)
        module = from_original(component, config, state, dtype=torch_dtype, **extra)
        info = {"layout": "original", "file": source.name, "original_config": dict(config)}
    else:
        if not source.is_dir():
            raise ValueError(f"layout 'diffusers' needs a component folder with config.json, got the file {source}")
        if config is None:
            config_path = source / "config.json"
            if not config_path.is_file():
                raise WeightsFileError(f"diffusers folder {source} has no config.json")
            config = json.loads(config_path.read_text())
        weights = _diffusers_weights(source)
        state = read_state_dict(weights)
        module = from_diffusers(component, config, state, dtype=torch_dtype)
        info = {"layout": "diffusers", "file": weights.name, "diffusers_config": dict(config)}
    return save_converted(module, component, output, force=force, source_info=info)


def _json_argument(value: str) -> dict:
    """``--config``: a JSON file path or an inline JSON object."""
    path = Path(value)
    text = path.read_text() if path.is_file() else value
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not a JSON file or JSON object: {error}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(parsed).__name__}")
    return parsed


def build_parser(prog: str = "convert_weights.py") -> argparse.ArgumentParser:
    from kandinsky.convert import COMPONENTS

    parser = argparse.ArgumentParser(prog=prog, description="Convert official Kandinsky 2.1 weights (original "
                                     "checkpoint or diffusers folder) into this package's format.")
    parser.add_argument("component", choices=COMPONENTS)
    parser.add_argument("source",
                        help="original checkpoint file (.ckpt/.pt/.safetensors) or diffusers component folder")
    parser.add_argument("output", help="output folder (model.safetensors + config.json)")
    parser.add_argument("--layout", default="auto", choices=["auto", "original", "diffusers"])
    parser.add_argument("--config", type=_json_argument, default=None,
                        help="original constructor kwargs / diffusers config (JSON file or inline JSON); "
                             "default: the official one / the folder's config.json")
    parser.add_argument("--clip-stats", default=None, help="ViT-L-14_stats.th (original prior only)")
    parser.add_argument("--dtype", default=None, choices=list(_DTYPES), help="cast weights (default: keep)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    return parser


def convert_main(argv: list[str] | None = None, prog: str = "convert_weights.py") -> int:
    """Command-line entry point; returns the exit code (2 with a one-line message on any error)."""
    args = build_parser(prog).parse_args(argv)
    try:
        folder = convert_files(args.component, args.source, args.output, layout=args.layout, config=args.config,
                               clip_stats=args.clip_stats, force=args.force, dtype=args.dtype)
    except (ValueError, OSError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0

"""Every read and write of weight files: foreign checkpoints read safely, our folders written atomically
and loaded memory-mapped, and the conversion of official files into our format.

Our layout is one folder per component (what ``kandinsky.hub`` caches and ``Kandinsky21.save_pretrained``
writes)::

    prior/ unet/ unet_inpaint/ movq/   config.json {"format": "kandinsky21", "component", "config", "source"}
    unet_controlnet/                   + model.safetensors (our state dict); unet_controlnet: Kandinsky 2.2's
                                       ControlNet UNet (a "unet" model whose conditioning is "image_hint")
    mclip/                             M-CLIP config.json + model.safetensors (Kandinsky 2.1)
    clip_text/ clip_vision/            transformers CLIP towers (save_pretrained)
    clip_tokenizer/ mclip_tokenizer/   tokenizers (save_pretrained)
    scheduler/                         optional (Kandinsky 2.2): the decoder's diffusers scheduler_config.json
    base.json                          optional: where the components missing here come from

Example::

    from kandinsky.weights import convert_files, load_component, load_converted
    convert_files("movq", "movq_final.ckpt", "weights/movq")        # original layout, official config
    convert_files("movq", "kandinsky-2-1/movq", "weights/movq2")     # a diffusers component folder
    movq = load_converted("weights/movq", dtype=torch.bfloat16)
    mclip = load_component("mclip", "weights/mclip")

Safety: pickled checkpoints are read with ``torch.load(weights_only=True)``, so a file that would run
code when unpickled is refused. Writes go through :func:`atomic_folder`: a folder is written completely
beside its destination and renamed into place, so an interrupted write never leaves a partial folder
and never loses the one it replaces; ``overwrite`` replaces only what this package wrote
(:func:`replaceable`), never an arbitrary folder. Every unreadable file, wrong tensor type or malformed
config is a :class:`WeightsFileError` that names the file.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kandinsky.convert import COMPONENTS as CONVERTED
from kandinsky.convert import check_model, from_diffusers, from_original, model_component, official_original_config
from kandinsky.convert.core import Source, build_strict
from kandinsky.models import config_class, config_from_dict, config_to_dict, model_class
from kandinsky.text_encoders import MultilingualCLIP

FORMAT = "kandinsky21"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
BASE_FILE = "base.json"
# safetensors metadata of files written by earlier versions, which stored kernels physically channels-last: a JSON
# list of the kernels stored as (O, kh, kw, I). Read only, to load those files; never written.
CHANNELS_LAST_KEY = "channels_last"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# how each component of the pipeline is stored in our layout
KINDS = {**{name: "converted" for name in CONVERTED}, "mclip": "mclip", "clip_text": "transformers",
         "clip_vision": "transformers", "clip_tokenizer": "tokenizer", "mclip_tokenizer": "tokenizer",
         "scheduler": "scheduler"}
SCHEDULER_FILE = "scheduler_config.json"  # the "scheduler" component: a diffusers scheduler config, as diffusers names it
EXPORT_FILE = "kandinsky21_export.json"  # the provenance record of every export of kandinsky.layouts
STALE_SECONDS = 300  # a temporary folder untouched this long belongs to a writer that was killed
# Linux reads at most max(read_ahead_kb, max_sectors_kb) of the disk per WILLNEED however long the range asked for
# (8 MiB on the virtio disk measured; read_ahead_kb defaults to 128 KiB): one call for a whole file reads its start
READ_AHEAD_CHUNK = 128 * 1024
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".th", ".bin")
_MCLIP_INDEX_BUFFERS = ("transformer.embeddings.position_ids", "transformer.embeddings.token_type_ids")  # integer


class WeightsFileError(ValueError):
    """A weight file that cannot be read: missing, truncated, corrupt, or containing code."""


# --------------------------------------------------------------------------------------------- foreign files


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
        raise _unreadable(path, error) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__
        raise WeightsFileError(f"checkpoint {path} is not a state dict (a mapping of names to tensors), got {kind}")
    return dict(state)


def _unreadable(path: Path, error: Exception) -> WeightsFileError:
    """The one-line error of a weights file that a reader (torch, safetensors, transformers) refused."""
    text = str(error).lower()
    if "weights only" in text or "weights_only" in text or "unsupported global" in text:
        return WeightsFileError(
            f"refusing to load {path}: it contains pickled objects other than tensors (code would run on "
            f"load). Only plain state dicts are accepted.{_offending_global(error)}")
    return WeightsFileError(f"cannot read {path} (truncated or corrupt?): "
                            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


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


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsFileError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise WeightsFileError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------- the atomic writer


def atomic_folder(folder: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False,
                  component: str | None = None) -> Path:
    """Create ``folder`` by calling ``write(temporary)`` on an empty sibling folder, then renaming it into place.

    An existing ``folder`` is replaced only with ``overwrite``, only if this package wrote it
    (:func:`replaceable`; ``component``, a key of :data:`KINDS`, is what is being written), and only after
    the new one is complete: the old folder is moved aside (``.NAME.old-PID``), the new one renamed in, the
    old one deleted. On any failure, disk full and Ctrl-C included, the old folder stays as it was and
    nothing partial remains. A folder that another process creates meanwhile wins: without ``overwrite``
    this one is discarded with a ``FileExistsError``. What a killed writer left behind is tidied first
    (:func:`tidy_leftovers`). The folder honours the umask (``mkdtemp`` and some writers, safetensors among
    them, create owner-only files).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tidy_leftovers(folder)
    check_output(folder, overwrite=overwrite, component=component)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    previous = None
    try:
        write(temporary)
        _honour_umask(temporary)
        if folder.exists() or folder.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{folder} was created by another writer while this one was written: "
                                      "theirs is kept, this one discarded")
            check_output(folder, overwrite=True, component=component)  # what appeared meanwhile may not be ours
            previous = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(previous)
        try:
            temporary.rename(folder)
        except OSError as error:  # a non-empty folder appeared between the check and the rename
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(f"{folder} was created by another writer while this one was written: theirs "
                                  "is kept, this one discarded") from None
    except BaseException:
        if previous is not None and not folder.exists():
            previous.rename(folder)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return folder


def replaceable(folder: str | os.PathLike, component: str | None = None) -> bool:
    """Whether ``overwrite`` may replace the existing ``folder``: an empty folder, or one this package wrote,
    recognised by its marker: a converted component (``config.json`` in our format), an export of
    :mod:`kandinsky.layouts` (:data:`EXPORT_FILE`), or ``component`` (a key of :data:`KINDS`) in our layout
    (an M-CLIP, CLIP tower or tokenizer config). Never a file, a link or an arbitrary folder."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    if not any(folder.iterdir()) or is_converted(folder) or (folder / EXPORT_FILE).is_file():
        return True
    kind = KINDS.get(component)
    if kind == "tokenizer":
        return (folder / "tokenizer_config.json").is_file()
    if kind == "scheduler":
        return (folder / SCHEDULER_FILE).is_file() and {p.name for p in folder.iterdir()} == {SCHEDULER_FILE}
    if kind in ("mclip", "transformers"):
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        if not isinstance(config, dict):
            return False
        if kind == "mclip":
            return config.get("architectures") == ["MultilingualCLIP"]
        return config.get("model_type") in ("clip", "clip_text_model", "clip_vision_model")
    return False


def check_not_source(output: str | os.PathLike, source: str | os.PathLike) -> None:
    """Raise if ``output`` is ``source`` (a local path; a hub id is never one) or a folder holding it."""
    if Path(source).exists():
        folder, given = Path(output).resolve(), Path(source).resolve()
        if folder == given or folder in given.parents:
            raise ValueError(f"output {output}: it is the source {source} or holds it; choose another output folder")


def check_output(folder: str | os.PathLike, *, overwrite: bool = False, component: str | None = None) -> Path:
    """Raise unless ``folder`` may be written: it does not exist, or ``overwrite`` is set and it is
    :func:`replaceable`. Writers call this before their (slow) work; :func:`atomic_folder` checks again
    before replacing anything."""
    folder = Path(folder)
    if not (folder.exists() or folder.is_symlink()):
        return folder
    if not overwrite:
        raise FileExistsError(f"{folder} already exists (pass overwrite=True to replace it)")
    if not replaceable(folder, component):
        raise FileExistsError(f"refusing to replace {folder}: it is not a folder this package wrote (no "
                              f"{CONFIG_FILE} in the {FORMAT!r} format or {EXPORT_FILE}); remove it yourself or "
                              "choose another output")
    return folder


def _honour_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions a plain mkdir / open would have."""
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it
    os.umask(mask)
    for path in (folder, *folder.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def tidy_leftovers(folder: str | os.PathLike) -> None:
    """Restore or delete what a killed :func:`atomic_folder` on ``folder`` left beside it: an old folder moved
    aside (``.NAME.old-PID`` of a process no longer alive) is restored if ``folder`` is missing, else deleted;
    temporary folders (``.NAME.*.tmp``) untouched for :data:`STALE_SECONDS` are deleted."""
    folder = Path(folder)
    old_prefix = f".{folder.name}.old-"
    for path in folder.parent.glob(f".{glob.escape(folder.name)}.*"):
        if path.name.startswith(old_prefix):
            pid = path.name[len(old_prefix):]
            if not pid.isdigit() or _writer_alive(int(pid)):
                continue
            if folder.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.rename(folder)  # killed between moving the old folder aside and renaming the new one in
        elif path.name.endswith(".tmp") and time.time() - _last_modified(path) > STALE_SECONDS:
            shutil.rmtree(path, ignore_errors=True)


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be writing (another live process; never this one, whose writes
    of one folder do not overlap)."""
    if pid == os.getpid():
        return False
    if os.name != "posix":
        return True  # no harmless liveness probe: leave its folders alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _last_modified(path: Path) -> float:
    """The newest modification time of ``path`` and everything in it (a writer touches its files)."""
    newest = 0.0
    for item in (path, *path.rglob("*")):
        try:
            newest = max(newest, item.stat().st_mtime)
        except OSError:  # deleted meanwhile
            pass
    return newest


# --------------------------------------------------------------------------------------------- converted modules


def save_converted(module: nn.Module, component: str, folder: str | os.PathLike, *, overwrite: bool = False,
                   source_info: dict | None = None) -> Path:
    """Write ``module`` as ``folder/model.safetensors`` + ``folder/config.json`` with :func:`atomic_folder`.

    The file holds ``module.state_dict()`` as it is: every tensor contiguous, in the module's own shape
    (a convolution kernel as (O, I, kh, kw), whatever its memory format here), so a saved pipeline and a
    training checkpoint share one format. Physical layouts (channels-last kernels, pre-transformed weights)
    are never stored: :func:`kandinsky.ops.optimize` applies them after :func:`load_converted`.
    """
    check_model(component, module.config)  # a unet_controlnet folder holds a ControlNet UNet, nothing else
    meta = {"format": FORMAT, "component": component, "config": config_to_dict(module.config), "source": source_info}

    def write(temporary: Path) -> None:
        save_file(_file_tensors(module.state_dict()), str(temporary / MODEL_FILE),
                  metadata={"format": FORMAT, "component": component})
        (temporary / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    return atomic_folder(folder, write, overwrite=overwrite, component=component)


def _file_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as a file stores them: detached, contiguous (a copy only of those that are not, such as
    channels-last kernels), in their state-dict shapes."""
    return {key: tensor.detach().contiguous() for key, tensor in state_dict.items()}


def _channels_last_keys(path: Path) -> list[str]:
    """The kernels a file written by an earlier version stores as (O, kh, kw, I) (:data:`CHANNELS_LAST_KEY`);
    none in the files written now."""
    with safe_open(str(path), framework="pt") as file:
        keys = json.loads((file.metadata() or {}).get(CHANNELS_LAST_KEY, "[]"))
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise TypeError(f"expected a JSON list of tensor names, got {keys!r}")
    return keys


def is_converted(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a component in our converted format (its config.json says so)."""
    config = Path(folder) / CONFIG_FILE
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def load_converted(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, component: str | None = None) -> nn.Module:
    """Our module from a folder written by :func:`save_converted`, in eval mode.

    The module is built on the meta device and takes the memory-mapped tensors as its parameters
    (``assign=True``), so the weights are never copied when device and dtype match the file. Every tensor
    arrives contiguous in its state-dict shape, as the file holds it; :func:`kandinsky.ops.optimize` then
    applies the layouts that run fastest (channels-last kernels). Folders written by earlier versions, whose
    kernels listed under the metadata key :data:`CHANNELS_LAST_KEY` are stored as (O, kh, kw, I), load too:
    those kernels are copied back into contiguous (O, I, kh, kw) tensors, the same weights (re-save such a
    folder to map them without a copy). ``dtype`` casts the weights; by default they keep the file's dtype,
    and a file mixing floating-point dtypes is read as float32.
    ``component`` (e.g. ``"unet"``) refuses a folder holding another one. Every problem with the files is
    a :class:`WeightsFileError` naming the file.
    """
    folder = Path(folder)
    config_path, model_path = folder / CONFIG_FILE, folder / MODEL_FILE
    if not config_path.is_file() or not model_path.is_file():
        raise WeightsFileError(f"{folder} is not a converted weights folder (needs {CONFIG_FILE} and {MODEL_FILE})")
    stored, config = _converted_config(config_path)
    if component is not None and stored != component:
        raise WeightsFileError(f"{folder} holds a {stored!r} component, not the {component!r} expected here "
                               f"({config_path})")
    _read_ahead(model_path)
    try:
        state = load_file(str(model_path), device=str(device))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise WeightsFileError(f"cannot read {model_path} (truncated or corrupt?): {error}") from None
    _check_floating(state, model_path)
    if dtype is None and len({t.dtype for t in state.values()}) > 1:
        dtype = torch.float32  # a tensor cast by hand: one dtype for the whole module, without losing precision
    try:
        for key in _channels_last_keys(model_path):  # an earlier version's file: (O, kh, kw, I) on disk
            # -> (O, I, kh, kw), as every file holds it now. contiguous() keeps a 1x1 kernel's permuted strides
            # (size-1 axes): re-viewed with the standard ones, or convolutions would take their channels-last path
            kernel = state[key].permute(0, 3, 1, 2).contiguous()
            state[key] = kernel.flatten().view(kernel.shape)
    except (KeyError, RuntimeError, TypeError, ValueError) as error:  # ValueError: JSONDecodeError
        raise WeightsFileError(f"{model_path}: bad {CHANNELS_LAST_KEY!r} metadata ({type(error).__name__}: {error})") from None
    source = Source(state, FORMAT)
    converted = source.rename([(r"(.*)", r"\1")])
    cls = model_class(model_component(stored))
    try:
        return build_strict(stored, lambda: cls(config), converted, source, dtype)
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as error:  # also a config no model can have
        raise WeightsFileError(f"{model_path} does not fit {config_path}: {error}") from None


def _read_ahead(path: Path) -> None:
    """Have the kernel read the whole file into the page cache now, many reads in flight at once. The tensors are
    memory-mapped: without this a cold load and first forward would fault the weights in one read-ahead window at
    a time (safetensors reads each tensor's first byte as it maps it). Pages already cached cost a lookup each.

    In the calling thread on purpose: a background thread would need the GIL between its calls, which the
    loading thread holds while it faults the tensors in, so it would fall behind the very reads it should lead.
    A no-op where ``posix_fadvise`` is missing."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the load that follows reports the problem
    try:
        for offset in range(0, os.fstat(fd).st_size, READ_AHEAD_CHUNK):
            os.posix_fadvise(fd, offset, READ_AHEAD_CHUNK, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _converted_config(path: Path):
    """``(component, config dataclass)`` from a converted folder's config.json, every value's type checked."""
    meta = _read_json(path)
    if meta.get("format") != FORMAT:
        raise WeightsFileError(f"{path} is not in the {FORMAT!r} format (format={meta.get('format')!r})")
    missing = [key for key in ("component", "config") if key not in meta]
    if missing:
        raise WeightsFileError(f"{path} has no {missing}")
    component, values = meta["component"], meta["config"]
    if component not in CONVERTED:
        raise WeightsFileError(f"{path}: \"component\" must be one of {list(CONVERTED)}, got {component!r}")
    if not isinstance(values, dict):
        raise WeightsFileError(f"{path}: \"config\" must be a JSON object, got {type(values).__name__}")
    for field in dataclasses.fields(config_class(model_component(component))):
        if field.name in values and not _same_type(values[field.name], field.default):
            raise WeightsFileError(f"{path}: config.{field.name} must be of the type of {field.default!r}, "
                                   f"got {values[field.name]!r}")
    try:
        config = config_from_dict(model_component(component), values)
        check_model(component, config)
    except (TypeError, ValueError) as error:
        raise WeightsFileError(f"{path}: {error}") from None
    return component, config


def _same_type(value, default) -> bool:
    """Whether a JSON value has the type of a config field's default (an int, a tuple of ints, ...)."""
    if isinstance(default, tuple):
        return isinstance(value, list) and (not default or all(_same_type(item, default[0]) for item in value))
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    return isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))


def _check_floating(state: Mapping[str, torch.Tensor], path: Path, optional: Sequence[str] = ()) -> None:
    """Refuse integer and bool tensors (besides the ``optional`` keys): every weight of these models is
    floating point, and an integer one would fail only later, as a parameter or inside a forward."""
    wrong = [f"{key} ({tensor.dtype})" for key, tensor in state.items()
             if not tensor.is_floating_point() and key not in optional]
    if wrong:
        raise WeightsFileError(f"{path}: {len(wrong)} tensor(s) not floating point, e.g. {wrong[0]}; every weight "
                               "of this model is floating point (a corrupt or foreign file?)")


# --------------------------------------------------------------------------------------------- every component


def _kind(name: str) -> str:
    if name not in KINDS:
        raise ValueError(f"name: expected one of {list(KINDS)}, got {name!r}")
    return KINDS[name]


def save_component(name: str, component, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the pipeline component ``name`` (a key of :data:`KINDS`) into ``folder`` in our layout, with
    :func:`atomic_folder`; :func:`load_component` reads it back. ``"scheduler"`` is a diffusers scheduler config
    (a dict with its ``_class_name``), written as diffusers writes it: ``scheduler_config.json``."""
    kind = _kind(name)
    if kind == "converted":
        return save_converted(component, name, folder, overwrite=overwrite)
    if kind == "scheduler":
        config = _scheduler_config(component, "component")

        def write(temporary: Path) -> None:
            (temporary / SCHEDULER_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    elif kind == "mclip":
        def write(temporary: Path) -> None:
            (temporary / CONFIG_FILE).write_text(json.dumps(component.to_config(), indent=2) + "\n")
            save_file(_file_tensors(component.state_dict()), str(temporary / MODEL_FILE))
    else:  # transformers CLIP towers and tokenizers
        def write(temporary: Path) -> None:
            component.save_pretrained(str(temporary))
    return atomic_folder(folder, write, overwrite=overwrite, component=name)


def load_component(name: str, folder: str | os.PathLike, *, dtype: torch.dtype | None = None):
    """The pipeline component ``name`` from ``folder``, in eval mode, memory-mapped where the format allows.

    Reads our layout, and also the foreign folders of the same formats: an M-CLIP ``text_encoder/`` folder
    (``model.safetensors`` or ``pytorch_model.bin``), transformers CLIP folders, tokenizer folders and diffusers
    ``scheduler/`` folders (``"scheduler"``: the config dict of ``scheduler_config.json``). ``dtype`` casts the floating-point weights (default: as stored); tokenizers ignore it. A folder that does
    not hold component ``name`` (another component, missing weights, a truncated or code-carrying file) is a
    :class:`WeightsFileError` naming it.
    """
    kind, folder = _kind(name), Path(folder)
    if kind == "converted":
        return load_converted(folder, dtype=dtype, component=name)
    if kind == "scheduler":
        path = folder / SCHEDULER_FILE
        if not path.is_file():
            raise WeightsFileError(f"{folder} holds no scheduler (needs {SCHEDULER_FILE})")
        try:
            return _scheduler_config(_read_json(path), str(path))
        except ValueError as error:
            raise WeightsFileError(str(error)) from None
    if kind == "tokenizer":
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as error:  # noqa: BLE001 - transformers raises many types
            raise WeightsFileError(f"no usable tokenizer in {folder}: {type(error).__name__}: {error}") from None
    model = _load_mclip(folder) if kind == "mclip" else _load_transformers(name, folder)
    return (model if dtype is None else model.to(dtype)).eval()


def _scheduler_config(config, what: str) -> dict:
    """A diffusers scheduler config as a plain JSON-ready dict (a copy); ``ValueError`` naming
    ``what`` if it is not a mapping with a ``_class_name`` string."""
    if not isinstance(config, Mapping) or not isinstance(config.get("_class_name"), str):
        raise ValueError(f"{what}: expected a diffusers scheduler config (a JSON object with a \"_class_name\"), "
                         f"got {type(config).__name__}")
    try:
        return json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: not JSON-serialisable: {error}") from None


def _load_mclip(folder: Path) -> MultilingualCLIP:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise WeightsFileError(f"{folder} is not an M-CLIP folder (needs {CONFIG_FILE})")
    weights = next((folder / f for f in (MODEL_FILE, "pytorch_model.bin") if (folder / f).is_file()), None)
    if weights is None:
        raise WeightsFileError(f"M-CLIP folder {folder} has no {MODEL_FILE} or pytorch_model.bin")
    state = read_state_dict(weights)
    _check_floating(state, weights, optional=_MCLIP_INDEX_BUFFERS)
    if len({t.dtype for k, t in state.items() if k not in _MCLIP_INDEX_BUFFERS}) > 1:  # see load_converted
        state = {k: t if k in _MCLIP_INDEX_BUFFERS else t.float() for k, t in state.items()}
    try:
        return MultilingualCLIP.from_state_dict(_read_json(config_path), state)
    except Exception as error:  # noqa: BLE001 - XLM-R's config and module checks raise many types
        raise WeightsFileError(f"{folder} does not hold an M-CLIP text encoder: {type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else ''}") from None


def _load_transformers(name: str, folder: Path) -> nn.Module:
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    from transformers.utils import logging as transformers_logging

    cls = CLIPTextModelWithProjection if name == "clip_text" else CLIPVisionModelWithProjection
    weights = next((folder / f for f in (MODEL_FILE, "pytorch_model.bin") if (folder / f).is_file()), folder)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # one tower of a full CLIP checkpoint: the other's keys are unused
    try:
        model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    except Exception as error:  # noqa: BLE001 - transformers, torch and safetensors raise many types
        raise _unreadable(weights, error) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    # transformers fills what the files lack with random weights: a folder of something else would load
    missing = list(info["missing_keys"]) + [str(key) for key in info["mismatched_keys"]]
    if missing:
        raise WeightsFileError(f"{folder} does not hold a CLIP {'text' if name == 'clip_text' else 'vision'} tower: "
                               f"{len(missing)} of its weights are missing or mis-shaped, e.g. {missing[0]}")
    return model


def write_base(folder: str | os.PathLike, source: str | os.PathLike, **options) -> Path:
    """Write ``folder/base.json``: the components missing in ``folder`` are then resolved from ``source`` (a hub
    repository id or a folder; a relative path is taken relative to ``folder``) with ``options``, keyword
    arguments of :func:`kandinsky.hub.resolve` such as ``revision`` or ``layout``. Returns the file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"source": str(source), **options}, indent=2) + "\n"
    temporary = folder / f".{BASE_FILE}.{os.getpid()}.tmp"
    try:
        temporary.write_text(text)
        os.replace(temporary, folder / BASE_FILE)
    finally:
        temporary.unlink(missing_ok=True)
    return folder / BASE_FILE


def read_base(folder: str | os.PathLike) -> dict | None:
    """The contents of ``folder/base.json`` (``{"source": ..., **options}``), or None if there is none."""
    path = Path(folder) / BASE_FILE
    if not path.is_file():
        return None
    base = _read_json(path)
    if not isinstance(base.get("source"), str) or not base["source"]:
        raise WeightsFileError(f"{path}: expected a \"source\" string (hub repository id or folder), "
                               f"got {base.get('source')!r}")
    return base


# --------------------------------------------------------------------------------------------- official files


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _diffusers_weights(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsFileError(f"diffusers folder {folder} has no diffusion_pytorch_model.safetensors or .bin")


def convert_files(component: str, source: str | os.PathLike, output: str | os.PathLike, *, layout: str = "auto",
                  config: Mapping | None = None, clip_stats: str | os.PathLike | None = None,
                  overwrite: bool = False, dtype: str | torch.dtype | None = None) -> Path:
    """Convert official weights on disk into our format at ``output``; returns the output folder.

    ``source`` is an original checkpoint file (``layout="original"``; ``config`` defaults to the
    official constructor arguments, and the prior needs ``clip_stats`` = ``ViT-L-14_stats.th``) or a
    diffusers component folder with ``config.json`` (``layout="diffusers"``); ``"auto"`` picks by
    file vs folder. ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``) casts the weights; the
    default keeps the checkpoint's dtype. An existing ``output`` is replaced only with ``overwrite`` and only if
    this package wrote it (:func:`check_output`); ``source`` itself never.
    """
    check_not_source(output, source)
    output = check_output(output, overwrite=overwrite, component=component)  # before the slow part
    module, info = read_official(component, source, layout=layout, config=config, clip_stats=clip_stats, dtype=dtype)
    return save_converted(module, component, output, overwrite=overwrite, source_info=info)


def read_official(component: str, source: str | os.PathLike, *, layout: str = "auto", config: Mapping | None = None,
                  clip_stats: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None
                  ) -> tuple[nn.Module, dict]:
    """Our module from official weights on disk, and where it came from: ``(module, source_info)``; the
    arguments are those of :func:`convert_files`, which writes the module in our format."""
    if component not in CONVERTED:
        raise ValueError(f"component must be one of {list(CONVERTED)}, got {component!r}")
    source = Path(source)
    torch_dtype = _parse_dtype(dtype)
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    if layout == "auto":
        layout = "diffusers" if source.is_dir() else "original"
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original', 'diffusers' or 'auto', got {layout!r}")

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
        _check_floating(state, source)
        module = from_original(component, config, state, dtype=torch_dtype, **extra)
        info = {"layout": "original", "file": source.name, "original_config": dict(config)}
    else:
        if not source.is_dir():
            raise ValueError(f"layout 'diffusers' needs a component folder with config.json, got the file {source}")
        if config is None:
            if not (source / CONFIG_FILE).is_file():
                raise WeightsFileError(f"diffusers folder {source} has no config.json")
            config = _read_json(source / CONFIG_FILE)
        weights = _diffusers_weights(source)
        state = read_state_dict(weights)
        _check_floating(state, weights)
        module = from_diffusers(component, config, state, dtype=torch_dtype)
        info = {"layout": "diffusers", "file": weights.name, "diffusers_config": dict(config)}
    return module, info

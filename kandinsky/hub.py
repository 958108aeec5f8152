"""Official Kandinsky 2.1 weights: find them (hub or local folder), convert them once, load them lazily.

Three layouts are read:

* **diffusers** (default): ``kandinsky-community/kandinsky-2-1`` (UNet, MoVQ, M-CLIP), ``-2-1-prior``
  (prior, CLIP ViT-L/14 text and vision towers) and ``-2-1-inpaint`` (inpainting UNet);
* **original**: ``ai-forever/Kandinsky_2.1`` (``decoder_fp16.ckpt``, ``inpainting_fp16.ckpt``,
  ``prior_fp16.ckpt``, ``movq_final.ckpt``, ``ViT-L-14_stats.th``, ``text_encoder/``), with CLIP ViT-L/14
  from ``openai/clip-vit-large-patch14`` (or a diffusers prior repo, ``clip_source=``);
* **ours**: one folder per component, what the cache holds and what ``--weights`` may point at::

      prior/ unet/ unet_inpaint/ movq/   converted weights (kandinsky.weights format)
      clip_text/ clip_vision/            transformers CLIP towers (save_pretrained)
      mclip/                             M-CLIP config.json + model.safetensors
      clip_tokenizer/ mclip_tokenizer/   tokenizers (save_pretrained)

A component is fetched (only its files: ``snapshot_download`` with ``allow_patterns``), converted into
``<cache>/<repo>@<revision>/<component>/`` the first time a task needs it, and afterwards loaded from
there memory-mapped, without touching the network. The cache is ``cache_dir``, else
``$KANDINSKY21_CACHE``, else ``~/.cache/kandinsky21``. A moving revision (``main``) is converted once:
pin ``revision=`` or delete the cache folder to refresh.

Example::

    from kandinsky.hub import resolve
    parts = resolve("ai-forever/Kandinsky_2.1")        # {name: Lazy loader or tokenizer loader}
    unet = parts["unet"].load()                        # downloads decoder_fp16.ckpt (2.7 GB), converts
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from huggingface_hub import snapshot_download

from kandinsky.pipeline import MODULES, TOKENIZERS, Lazy

DEFAULT_SOURCE = "kandinsky-community/kandinsky-2-1"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
ORIGINAL_REPOS = ("ai-forever/Kandinsky_2.1", "sberbank-ai/Kandinsky_2.1")
CONVERTED = ("prior", "unet", "unet_inpaint", "movq")  # our safetensors format (kandinsky.weights)
COMPONENTS = MODULES + TOKENIZERS
LAYOUTS = ("diffusers", "original", "ours")
# original-layout checkpoint of each converted component
ORIGINAL_FILES = {"prior": "prior_fp16.ckpt", "unet": "decoder_fp16.ckpt", "unet_inpaint": "inpainting_fp16.ckpt",
                  "movq": "movq_final.ckpt"}
CLIP_STATS_FILE = "ViT-L-14_stats.th"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WeightsNotFoundError(OSError):
    """Weights that could not be found or downloaded; the message says what and how to point at local files."""


_LOCAL_HINT = ("To work offline, download the files on a machine with access (e.g. `huggingface-cli download "
               "{repo}`) and pass the folder instead: Kandinsky21.from_pretrained('/path/to/folder') or "
               "`kandinsky generate --weights /path/to/folder ...` (diffusers, original or converted layout; "
               "see 'Loading weights' in README.md).")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted weights live: ``cache_dir``, ``$KANDINSKY21_CACHE`` or ``~/.cache/kandinsky21``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("KANDINSKY21_CACHE") or Path.home() / ".cache" / "kandinsky21")


# --------------------------------------------------------------------------------------------- repositories


class Repo:
    """A hub repository (downloads only the files asked for) or a local folder in the same layout."""

    def __init__(self, source: str | os.PathLike, revision: str | None = None, hub_cache: str | None = None):
        self.source = str(source)
        self.revision = revision
        self.hub_cache = hub_cache
        self.local = Path(self.source).expanduser() if Path(self.source).expanduser().exists() else None
        if self.local is None and not _REPO_ID.match(self.source):
            raise WeightsNotFoundError(f"weights source {self.source!r} is neither an existing folder nor a hub "
                                       "repository id (owner/name)")

    def __repr__(self) -> str:
        return f"Repo({self.source!r}{'' if self.revision is None else f', revision={self.revision!r}'})"

    def fetch(self, patterns: Sequence[str], required: Sequence[str] = ()) -> Path:
        """The folder holding ``patterns`` (downloaded if needed); every path in ``required`` must exist in it."""
        if self.local is not None:
            folder = self.local
        else:
            try:
                folder = Path(snapshot_download(self.source, revision=self.revision, cache_dir=self.hub_cache,
                                                allow_patterns=list(patterns)))
            except Exception as error:  # noqa: BLE001 - huggingface_hub/requests/httpx raise many types
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                raise WeightsNotFoundError(
                    f"could not download {list(patterns)} from the hub repository {self.source!r}"
                    f"{'' if self.revision is None else f' (revision {self.revision!r})'}: {reason}. "
                    + _LOCAL_HINT.format(repo=self.source)) from None
        missing = [name for name in required if not (folder / name).exists()]
        if missing:
            where = f"folder {folder}" if self.local is not None else f"hub repository {self.source!r}"
            raise WeightsNotFoundError(f"the {where} has no {missing}" +
                                       ("" if self.local is not None else ". " + _LOCAL_HINT.format(repo=self.source)))
        return folder

    def fetch_first(self, subfolder: str, candidates: Sequence[str], extra: Sequence[str] = ("config.json",)) -> Path:
        """``subfolder`` with its config and the first weights file of ``candidates`` that exists
        (e.g. ``model.safetensors`` before ``pytorch_model.bin``): downloads just one of them."""
        prefix = f"{subfolder}/" if subfolder else ""
        for i, candidate in enumerate(candidates):
            last = i == len(candidates) - 1
            folder = self.fetch([prefix + name for name in (*extra, candidate)],
                                required=[prefix + name for name in extra] + ([prefix + candidate] if last else []))
            if (folder / prefix / candidate).exists():
                return folder / subfolder if subfolder else folder
        raise AssertionError("unreachable")

    def key(self) -> str:
        """The cache folder name of this source."""
        if self.local is not None:
            digest = hashlib.sha1(str(self.local.resolve()).encode()).hexdigest()[:12]
            return f"local--{self.local.resolve().name}--{digest}"
        return f"{self.source.replace('/', '--')}@{self.revision or 'main'}"


def detect_layout(folder: Path) -> str | None:
    """'ours', 'original', 'diffusers' (a decoder or prior folder) or None for a local folder."""
    for name in CONVERTED:
        config = folder / name / "config.json"
        if config.is_file():
            try:
                if json.loads(config.read_text()).get("format") == "kandinsky21":
                    return "ours"
            except (json.JSONDecodeError, AttributeError):
                pass
    if any((folder / name).exists() for name in (*ORIGINAL_FILES.values(), "decoder.ckpt")):
        return "original"
    if (folder / "unet" / "config.json").is_file() or (folder / "prior" / "config.json").is_file():
        return "diffusers"
    return None


# --------------------------------------------------------------------------------------------- writers


def _atomic_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(temporary)`` and rename the temporary folder to ``out`` (nothing partial on failure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(temporary)
        try:
            temporary.rename(out)
        except OSError:
            if not out.exists():  # another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def save_mclip(model, folder: Path) -> None:
    """Our M-CLIP as ``config.json`` (the M-CLIP format) + ``model.safetensors``."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.update(transformerDimensions=model.config.hidden_size, numDims=model.LinearTransformation.out_features,
                  architectures=["MultilingualCLIP"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def save_component(name: str, component, folder: Path) -> None:
    """Write one loaded component into our layout at ``folder`` (atomically; it must not exist)."""
    if name in CONVERTED:
        from kandinsky.weights import save_converted

        save_converted(component, name, folder)
    elif name == "mclip":
        _atomic_folder(folder, lambda tmp: save_mclip(component, tmp))
    else:  # tokenizers and transformers CLIP towers
        _atomic_folder(folder, lambda tmp: component.save_pretrained(str(tmp)))


def _load_component(name: str, folder: Path):
    """One component from our layout."""
    if name in CONVERTED:
        from kandinsky.weights import load_converted

        return load_converted(folder)
    if name in TOKENIZERS:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    if name == "mclip":
        from kandinsky.text_encoders import MultilingualCLIP

        return MultilingualCLIP.from_pretrained(folder)
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    cls = CLIPTextModelWithProjection if name == "clip_text" else CLIPVisionModelWithProjection
    return cls.from_pretrained(str(folder)).eval()


_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "sentencepiece.bpe.model", "added_tokens.json")


class Origin:
    """Where each component comes from (diffusers or original layout) and how it becomes our layout."""

    def __init__(self, source: str, layout: str, *, revision: str | None = None, hub_cache: str | None = None,
                 prior_source: str | None = None, inpaint_source: str | None = None, clip_source: str | None = None,
                 original_configs: dict[str, dict] | None = None):
        if layout not in ("diffusers", "original"):
            raise ValueError(f"layout: expected 'diffusers' or 'original' for a source to convert, got {layout!r}")
        self.layout = layout
        self.original_configs = dict(original_configs or {})
        self.main = Repo(source, revision, hub_cache)
        if layout == "diffusers":
            base = re.sub(r"-(prior|inpaint)$", "", self.main.source.rstrip("/"))
            self.prior = self._beside(base, "-prior", prior_source, "prior_source", revision, hub_cache)
            self.inpaint = self._beside(base, "-inpaint", inpaint_source, "inpaint_source", revision, hub_cache)
            self.clip = Repo(clip_source, None, hub_cache) if clip_source else self.prior
        else:
            self.clip = Repo(clip_source or DEFAULT_CLIP, None, hub_cache)

    def _beside(self, base: str, suffix: str, given: str | None, option: str, revision, hub_cache):
        """The -prior / -inpaint repository of a diffusers decoder repository or folder."""
        if given is not None:
            return Repo(given, None, hub_cache)
        if self.main.local is not None and not Path(base + suffix).expanduser().exists():
            return _Missing(f"the diffusers folder {self.main.source} has no {suffix[1:]} components: expected a "
                            f"folder {base + suffix} beside it, or pass {option}=")
        return Repo(base + suffix, revision, hub_cache)

    def write(self, name: str, out: Path) -> None:
        """Produce component ``name`` in our layout at ``out`` (which must not exist)."""
        from kandinsky.weights import convert_files

        if name in CONVERTED:
            if self.layout == "diffusers":
                repo = {"prior": self.prior, "unet": self.main, "unet_inpaint": self.inpaint, "movq": self.main}[name]
                subfolder = "prior" if name == "prior" else ("movq" if name == "movq" else "unet")
                folder = repo.fetch_first(subfolder, _DIFFUSERS_WEIGHTS)
                _convert(lambda: convert_files(name, folder, out, layout="diffusers"), out)
            else:
                files = [ORIGINAL_FILES[name]] + ([CLIP_STATS_FILE] if name == "prior" else [])
                folder = self.main.fetch(files, required=files)
                stats = folder / CLIP_STATS_FILE if name == "prior" else None
                _convert(lambda: convert_files(name, folder / ORIGINAL_FILES[name], out, layout="original",
                                               config=self.original_configs.get(name), clip_stats=stats), out)
            return
        if name in ("mclip", "mclip_tokenizer"):
            repo = self.main
            if self.layout == "diffusers":
                subfolder = "text_encoder" if name == "mclip" else "tokenizer"
            else:
                subfolder = "text_encoder"  # the original folder holds the model and its tokenizer
            return self._write_text(name, repo, subfolder, out)
        # CLIP: a diffusers prior repo (subfolders) or a transformers CLIP repo (one folder, both towers)
        subfolder = {"clip_text": "text_encoder", "clip_vision": "image_encoder", "clip_tokenizer": "tokenizer"}[name]
        if not _has_subfolders(self.clip):
            subfolder = ""
        return self._write_text(name, self.clip, subfolder, out)

    def _write_text(self, name: str, repo: Repo, subfolder: str, out: Path) -> None:
        prefix = f"{subfolder}/" if subfolder else ""
        if name in TOKENIZERS:
            folder = repo.fetch([prefix + f for f in _TOKENIZER_FILES]) / subfolder
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
            except Exception as error:  # noqa: BLE001
                raise WeightsNotFoundError(f"no usable tokenizer in {folder} (from {repo.source!r}): "
                                           f"{type(error).__name__}: {error}") from None
            _atomic_folder(out, lambda tmp: tokenizer.save_pretrained(str(tmp)))
            return
        folder = repo.fetch_first(subfolder, _WEIGHTS)
        if name == "mclip":
            from kandinsky.text_encoders import MultilingualCLIP

            model = MultilingualCLIP.from_pretrained(folder)
            _atomic_folder(out, lambda tmp: save_mclip(model, tmp))
            return
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        from transformers.utils import logging as transformers_logging

        cls = CLIPTextModelWithProjection if name == "clip_text" else CLIPVisionModelWithProjection
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # one tower of a full CLIP checkpoint: the other's keys are unused
        try:
            model = cls.from_pretrained(str(folder))
        finally:
            transformers_logging.set_verbosity(verbosity)
        _atomic_folder(out, lambda tmp: model.save_pretrained(str(tmp)))


class _Missing:
    """A repository that is not there: fetching from it raises with the explanation."""

    def __init__(self, message: str):
        self.message = message
        self.source, self.local = message, None

    def fetch(self, *args, **kwargs):
        raise WeightsNotFoundError(self.message)

    fetch_first = fetch


def _convert(run: Callable[[], Path], out: Path) -> None:
    try:
        run()
    except FileExistsError:
        if not out.exists():
            raise  # a stale temporary, not a finished conversion


def _has_subfolders(repo: Repo) -> bool:
    """Whether a CLIP source is a diffusers prior repo (text_encoder/, image_encoder/, tokenizer/)."""
    if repo.local is not None:
        return (repo.local / "text_encoder").is_dir()
    return repo.source.rstrip("/").endswith("-prior")


# --------------------------------------------------------------------------------------------- resolve


def resolve(source: str | os.PathLike = DEFAULT_SOURCE, *, revision: str | None = None,
            cache_dir: str | os.PathLike | None = None, layout: str | None = None, prior_source: str | None = None,
            inpaint_source: str | None = None, clip_source: str | None = None, hub_cache: str | None = None,
            original_configs: dict[str, dict] | None = None) -> dict[str, Lazy]:
    """Lazy loaders for every component of ``source`` (keys: the :class:`~kandinsky.pipeline.Kandinsky21`
    constructor arguments). Nothing is downloaded or converted until a loader runs.

    ``layout`` is detected (``"ours"`` / ``"original"`` / ``"diffusers"`` from a folder's files, ``"original"``
    for ``ai-forever/Kandinsky_2.1``, else ``"diffusers"``). ``prior_source`` / ``inpaint_source`` default
    to the ``-prior`` / ``-inpaint`` siblings of a diffusers decoder repo; ``clip_source`` (original layout)
    to ``openai/clip-vit-large-patch14``. ``hub_cache`` is huggingface_hub's download cache.
    ``original_configs`` overrides the official constructor arguments of original checkpoints (tests).
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    source = str(source)
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise WeightsNotFoundError(f"weights source {source!r} is a file; expected a folder or a hub repository id")
        layout = layout or detect_layout(local)
        if layout is None:
            raise WeightsNotFoundError(
                f"folder {source} holds no Kandinsky 2.1 weights in a known layout (converted: prior/ unet/ movq/ "
                f"... with config.json; original: {', '.join(ORIGINAL_FILES.values())}; diffusers: unet/ movq/ "
                "text_encoder/ tokenizer/)")
    elif not _REPO_ID.match(source):
        raise WeightsNotFoundError(f"weights source {source!r}: no such folder, and not a hub repository id (owner/name)")
    else:
        layout = layout or ("original" if source in ORIGINAL_REPOS else "diffusers")
        if layout == "ours":
            raise ValueError("layout: 'ours' needs a local folder")

    if layout == "ours":
        return {name: Lazy(_folder_loader(name, local / name), f"{name} from {local / name}") for name in COMPONENTS}
    origin = Origin(source, layout, revision=revision, hub_cache=hub_cache, prior_source=prior_source,
                    inpaint_source=inpaint_source, clip_source=clip_source, original_configs=original_configs)
    target = cache_root(cache_dir) / origin.main.key()
    return {name: Lazy(_cached_loader(name, target / name, origin), f"{name} via {target / name}")
            for name in COMPONENTS}


def _folder_loader(name: str, folder: Path) -> Callable:
    def load():
        if not folder.exists():
            raise WeightsNotFoundError(f"converted weights folder {folder.parent} has no {name}/ (needed for this task)")
        return _load_component(name, folder)

    return load


def _cached_loader(name: str, folder: Path, origin: Origin) -> Callable:
    def load():
        if not folder.exists():
            origin.write(name, folder)
        return _load_component(name, folder)

    return load


def convert_all(source: str | os.PathLike, output: str | os.PathLike, components: Sequence[str] = COMPONENTS,
                **kwargs) -> Path:
    """Write ``components`` of ``source`` (hub repo or folder, any layout) into ``output`` in our layout."""
    output = Path(output)
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"components: unknown {unknown}; expected a subset of {list(COMPONENTS)}")
    source = str(source)
    local = Path(source).expanduser()
    layout = kwargs.pop("layout", None) or (detect_layout(local) if local.is_dir() else
                                            ("original" if source in ORIGINAL_REPOS else "diffusers"))
    origin = Origin(source, layout, **kwargs)
    for name in components:
        if not (output / name).exists():
            origin.write(name, output / name)
    return output

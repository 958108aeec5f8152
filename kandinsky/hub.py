"""Official Kandinsky 2.1 and 2.2 weights: find them (hub or local folder), convert them once, load them lazily;
and the pipeline's component table (:data:`MODULES`, :data:`TOKENIZERS`, the two stages).

Files are read, converted and written by :mod:`kandinsky.weights`; this module decides which files.

Three layouts are read:

* **diffusers** (default): ``kandinsky-community/kandinsky-2-1`` (UNet, MoVQ, M-CLIP), ``-2-1-prior``
  (prior, CLIP ViT-L/14 text and vision towers) and ``-2-1-inpaint`` (inpainting UNet); for Kandinsky 2.2
  ``kandinsky-community/kandinsky-2-2-decoder`` (UNet, MoVQ, the decoder's scheduler config), ``-2-2-prior`` (prior,
  CLIP ViT-bigG/14 towers), ``-2-2-decoder-inpaint`` (inpainting UNet) and ``-2-2-controlnet-depth`` (ControlNet UNet)
  (:func:`detect_model` tells the versions apart). ai-forever's own 2.2 code loads these same repositories: for 2.2
  the diffusers layout is the original one. A folder written by ``save_pretrained(..., layout="diffusers")``
  (``decoder/``, ``prior/``, ``inpaint/``, ``controlnet/`` pipelines) is read as the same repositories;
* **original**: ``ai-forever/Kandinsky_2.1`` (``decoder_fp16.ckpt``, ``inpainting_fp16.ckpt``,
  ``prior_fp16.ckpt``, ``movq_final.ckpt``, ``ViT-L-14_stats.th``, ``text_encoder/``), with CLIP ViT-L/14
  from ``openai/clip-vit-large-patch14`` (or a diffusers prior repo, ``clip_source=``);
* **ours**: one folder per component (see :mod:`kandinsky.weights`), what the cache holds and what
  ``--weights`` may point at. A ``base.json`` there names where the missing components come from
  (:func:`kandinsky.weights.write_base`): a folder of fine-tuned components on top of the official ones.

A component is fetched (only its files: ``snapshot_download`` with ``allow_patterns``), converted into
``<cache>/<repo>@<revision>/<component>/`` the first time a task needs it, and afterwards loaded from
there memory-mapped, without touching the network. The cache is ``cache_dir``, else
``$KANDINSKY21_CACHE``, else ``~/.cache/kandinsky21``. A moving revision (``main``) is converted once:
pin ``revision=`` or delete the cache folder to refresh. Processes sharing a cache take turns on each
component (a file lock ``.<component>.lock`` beside it): the first converts, the others wait and reuse it.

Example::

    from kandinsky.hub import resolve
    parts = resolve("ai-forever/Kandinsky_2.1")        # {name: Lazy loader or tokenizer loader}
    unet = parts["unet"].load()                        # downloads decoder_fp16.ckpt (2.7 GB), converts
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from filelock import FileLock
from huggingface_hub import snapshot_download

from kandinsky.weights import (BASE_FILE, CONVERTED, SCHEDULER_FILE, convert_files, is_converted, load_component,
                               read_base, save_component, tidy_leftovers)

# The pipeline's components. Stages of the two-stage model: `offload="sequential"` keeps only one stage's
# modules resident.
PRIOR_STAGE = ("clip_text", "clip_vision", "prior")
DECODER_STAGE = ("mclip", "unet", "unet_inpaint", "movq")
MODULES = PRIOR_STAGE + DECODER_STAGE
TOKENIZERS = ("clip_tokenizer", "mclip_tokenizer")
COMPONENTS = MODULES + TOKENIZERS  # Kandinsky 2.1's
CONTROLNET = "unet_controlnet"  # Kandinsky 2.2's ControlNet UNet (a decoder-stage module)
SCHEDULER = "scheduler"  # the decoder's diffusers scheduler config (Kandinsky 2.2; a dict, not a module)
# Kandinsky 2.2's: no M-CLIP, a ControlNet UNet and the decoder repository's scheduler config
COMPONENTS_22 = PRIOR_STAGE + ("unet", "unet_inpaint", "movq", CONTROLNET, "clip_tokenizer", SCHEDULER)
MODEL_COMPONENTS = {"2.1": COMPONENTS, "2.2": COMPONENTS_22}  # what resolve() gives for each version
ALL_COMPONENTS = COMPONENTS + (CONTROLNET, SCHEDULER)

DEFAULT_SOURCE = "kandinsky-community/kandinsky-2-1"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
ORIGINAL_REPOS = ("ai-forever/Kandinsky_2.1", "sberbank-ai/Kandinsky_2.1")
LAYOUTS = ("diffusers", "original", "ours")
BASE_OPTIONS = ("revision", "layout", "prior_source", "inpaint_source", "clip_source", "original_configs",
                "controlnet_source", "model")  # in base.json
# original-layout checkpoint of each converted component
ORIGINAL_FILES = {"prior": "prior_fp16.ckpt", "unet": "decoder_fp16.ckpt", "unet_inpaint": "inpainting_fp16.ckpt",
                  "movq": "movq_final.ckpt"}
CLIP_STATS_FILE = "ViT-L-14_stats.th"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TINY = re.compile(r"^tiny(?::(\d+))?$")  # "tiny" or "tiny:SEED": the tiny random weights (kandinsky.tiny), no file


def tiny_seed(source: str | os.PathLike) -> int | None:
    """The seed of a ``"tiny"`` / ``"tiny:SEED"`` weights source (seed 0 by default), else None."""
    match = TINY.match(str(source))
    return None if match is None else int(match.group(1) or 0)


class Lazy:
    """A component that is loaded only when a call needs it: ``Lazy(lambda: load_component("movq", folder))``.

    The loader is kept, so that ``offload="sequential"`` can drop the module and load it again later
    (from memory-mapped files this costs little).
    """

    def __init__(self, load: Callable[[], object], description: str = ""):
        self.load = load
        self.description = description

    def __repr__(self) -> str:
        return f"Lazy({self.description or self.load!r})"


class WeightsNotFoundError(OSError):
    """Weights that could not be found or downloaded; the message says what and how to point at local files."""


class _DownloadError(WeightsNotFoundError):
    """A hub download that failed; :meth:`Origin.write` adds every repository the pipeline needs."""


_LOCAL_HINT = ("To work offline, run {commands} where the hub is reachable and copy the Hugging Face cache "
               "(~/.cache/huggingface, or $HF_HOME) to this machine: the files are then found without network. Or "
               "pass local folders: `kandinsky generate --weights FOLDER ...` or Kandinsky21.from_pretrained(FOLDER) "
               "(see 'Offline use' in README.md).")


def offline_hint(repos: Sequence[str]) -> str:
    """How to get the hub repositories ``repos`` onto a machine without network."""
    return _LOCAL_HINT.format(commands=", ".join(f"`hf download {repo}`" for repo in repos))


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
                raise _DownloadError(
                    f"could not download {list(patterns)} from the hub repository {self.source!r}"
                    f"{'' if self.revision is None else f' (revision {self.revision!r})'}: {reason}.") from None
        missing = [name for name in required if not (folder / name).exists()]
        if missing:
            if self.local is not None:
                raise WeightsNotFoundError(f"the folder {folder} has no {missing}")
            raise _DownloadError(f"the hub repository {self.source!r} has no {missing}.")
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
    """'ours', 'original', 'diffusers' (a decoder or prior folder, or a diffusers export's folder of pipelines) or
    None for a local folder."""
    if (folder / BASE_FILE).is_file() or any(is_converted(folder / name) for name in CONVERTED):
        return "ours"
    if any((folder / name).exists() for name in (*ORIGINAL_FILES.values(), "decoder.ckpt")):
        return "original"
    if (folder / "unet" / "config.json").is_file() or (folder / "prior" / "config.json").is_file():
        return "diffusers"
    if _export_root(folder):
        return "diffusers"
    return None


def _export_root(folder: Path) -> bool:
    """Whether ``folder`` is what ``save_pretrained(..., layout="diffusers")`` writes: a folder of diffusers
    pipelines (``decoder/``, ``prior/``, ``inpaint/``, ``controlnet/``)."""
    return (folder / "decoder" / "unet" / "config.json").is_file()


MODELS = ("2.1", "2.2")
_UNET_FOLDERS = ("unet", "unet_inpaint", CONTROLNET, "decoder/unet")


def detect_model(source: str | os.PathLike) -> str:
    """The Kandinsky version (``"2.1"`` or ``"2.2"``) of a weights source, from configs only (no weights read):
    :func:`model_evidence`'s, else 2.1."""
    found = model_evidence(source)
    return "2.1" if found is None else found[0]


def model_evidence(source: str | os.PathLike) -> tuple[str, str] | None:
    """The Kandinsky version a weights source shows without loading anything, and why (e.g. ``("2.2",
    "k22/unet/config.json has conditioning 'image'")``), or None where it shows none (``tiny[:SEED]``, a 2.1 hub
    id). A local folder is 2.2 when it holds a ControlNet UNet or a UNet ``config.json`` with our ``conditioning``
    other than ``"text_image"`` or diffusers' image ``addition_embed_type`` (``"image"``, ``"image_hint"``), else its
    ``base.json`` decides (its ``"model"``, or its source's version: a LoRA run's output holds no UNet); otherwise
    (no UNet config, a hub repository id) it is 2.2 when the name has ``2-2`` (``kandinsky-2-2-decoder``)."""
    text = str(source)
    if tiny_seed(text) is not None:
        return None
    folder, seen = Path(text).expanduser(), set()
    while folder.is_dir() and folder.resolve() not in seen:
        seen.add(folder.resolve())
        found = _configured_model(folder)
        if found is not None:
            return found
        try:
            base = read_base(folder)
        except ValueError:
            base = None
        if base is None:
            break
        if base.get("model") in MODELS:
            return base["model"], f"{folder / BASE_FILE} says model {base['model']!r}"
        text = _base_source(folder, base)
        if tiny_seed(text) is not None:
            return None
        folder = Path(text).expanduser()
    name = Path(text).name if Path(text).expanduser().exists() else text
    return ("2.2", f"the name {name!r} has '2-2'") if "2-2" in name else None


def _configured_model(folder: Path) -> tuple[str, str] | None:
    """The version the UNet configs in ``folder`` (ours, diffusers' or a diffusers export's) say, and why; or None."""
    import json

    if is_converted(folder / CONTROLNET):
        return "2.2", f"{folder} holds a ControlNet UNet"
    for name in _UNET_FOLDERS:
        path = folder / name / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not isinstance(config, dict):
            continue
        inner = config.get("config") if isinstance(config.get("config"), dict) else {}
        conditioning = config.get("conditioning", inner.get("conditioning"))
        if conditioning is not None:
            return ("2.1" if conditioning == "text_image" else "2.2"), f"{path} has conditioning {conditioning!r}"
        if "addition_embed_type" in config:
            kind = config["addition_embed_type"]
            return ("2.2" if kind in ("image", "image_hint") else "2.1"), f"{path} has addition_embed_type {kind!r}"
    return None


def _check_model(model: str | None) -> str | None:
    if model is not None and model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)} or None (detected), got {model!r}")
    return model


_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "sentencepiece.bpe.model", "added_tokens.json")


class Origin:
    """Where each component comes from (diffusers or original layout) and how it becomes our layout.

    ``model`` (``"2.1"`` or ``"2.2"``, default: :func:`detect_model` of ``source``) picks the diffusers repositories:
    2.1's ``<decoder>-prior`` / ``<decoder>-inpaint`` beside the decoder, or 2.2's ``<stem>-decoder`` with
    ``<stem>-prior``, ``<stem>-decoder-inpaint`` and ``<stem>-controlnet-depth``; a diffusers export of ours
    (``decoder/`` ``prior/`` ``inpaint/`` ``controlnet/``) has them as subfolders. Kandinsky 2.2 has no original layout."""

    def __init__(self, source: str, layout: str, *, revision: str | None = None, hub_cache: str | None = None,
                 prior_source: str | None = None, inpaint_source: str | None = None, clip_source: str | None = None,
                 original_configs: dict[str, dict] | None = None, controlnet_source: str | None = None,
                 model: str | None = None):
        if layout not in ("diffusers", "original"):
            raise ValueError(f"layout: expected 'diffusers' or 'original' for a source to convert, got {layout!r}")
        self.model = _check_model(model) or detect_model(source)
        if self.model == "2.2" and layout == "original":
            raise ValueError("layout: Kandinsky 2.2 has no original layout (ai-forever's own 2.2 code loads the "
                             "kandinsky-community diffusers repositories); use layout='diffusers'")
        if self.model == "2.1" and controlnet_source is not None:
            raise ValueError("controlnet_source: Kandinsky 2.1 has no ControlNet UNet (a 2.2 source needs model='2.2' "
                             "or a name with '2-2')")
        self.layout = layout
        self.original_configs = dict(original_configs or {})
        self.main = Repo(source, revision, hub_cache)
        self.controlnet = None
        if layout == "diffusers":
            if self.main.local is not None and _export_root(self.main.local):  # our diffusers export: subfolders
                root = self.main.local
                self.main = Repo(root / "decoder", revision, hub_cache)
                siblings = {name: str(root / name) for name in ("prior", "inpaint", "controlnet")}
            else:
                siblings = self._sibling_paths()
            self.prior = self._beside(siblings["prior"], prior_source, "prior_source", "prior", revision, hub_cache)
            self.inpaint = self._beside(siblings["inpaint"], inpaint_source, "inpaint_source", "inpaint", revision,
                                        hub_cache)
            if self.model == "2.2":
                self.controlnet = self._beside(siblings["controlnet"], controlnet_source, "controlnet_source",
                                               "controlnet", revision, hub_cache)
            self.clip = Repo(clip_source, None, hub_cache) if clip_source else self.prior
        else:
            self.clip = Repo(clip_source or DEFAULT_CLIP, None, hub_cache)

    def _sibling_paths(self) -> dict[str, str]:
        """Where the prior, inpainting and ControlNet repositories of this diffusers decoder are (by name)."""
        source = self.main.source.rstrip("/")
        if self.model == "2.1":
            base = re.sub(r"-(prior|inpaint)$", "", source)
            return {"prior": base + "-prior", "inpaint": base + "-inpaint"}
        base = re.sub(r"-(prior|inpaint|controlnet-depth)$", "", source)  # kandinsky-2-2-decoder[-inpaint]
        stem = base[:-len("-decoder")] if base.endswith("-decoder") else base
        return {"prior": stem + "-prior", "inpaint": base + "-inpaint", "controlnet": stem + "-controlnet-depth"}

    def _beside(self, path: str, given: str | None, option: str, what: str, revision, hub_cache):
        """The prior / inpainting / ControlNet repository of a diffusers decoder repository or folder."""
        if given is not None:
            return Repo(given, None, hub_cache)
        if self.main.local is not None and not Path(path).expanduser().exists():
            return _Missing(f"the diffusers folder {self.main.source} has no {what} components: expected a "
                            f"folder {path} beside it, or pass {option}=")
        return Repo(path, revision, hub_cache)

    def repositories(self) -> dict[str, str]:
        """The hub repositories this pipeline draws from, each with the components it provides."""
        if self.layout == "diffusers":
            roles = [(self.main, "UNet, MoVQ, M-CLIP" if self.model == "2.1" else "UNet, MoVQ, scheduler"),
                     (self.prior, "prior, CLIP"), (self.inpaint, "inpainting UNet, for inpaint only")]
            if self.controlnet is not None:
                roles.append((self.controlnet, "ControlNet UNet, for controlnet only"))
            if self.clip is not self.prior:
                roles[1] = (self.prior, "prior")
                roles.append((self.clip, "CLIP"))
        else:
            roles = [(self.main, "prior, UNets, MoVQ, M-CLIP"), (self.clip, "CLIP")]
        found: dict[str, list[str]] = {}
        for repo, role in roles:
            if isinstance(repo, Repo) and repo.local is None:
                found.setdefault(repo.source, []).append(role)
        return {source: ", ".join(role) for source, role in found.items()}

    def write(self, name: str, out: Path) -> None:
        """Produce component ``name`` in our layout at ``out``, unless it is there. Processes writing the same
        ``out`` take turns (a file lock beside it): the others wait, then keep the first one's copy."""
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(out.parent / f".{out.name}.lock"):
            tidy_leftovers(out)  # a writer killed while replacing it may have left it aside
            if out.exists():
                return
            try:
                if name in CONVERTED:
                    self._convert(name, out)
                elif name == SCHEDULER:
                    self._scheduler(out)
                else:
                    save_component(name, load_component(name, self._fetch_text(name)), out)
            except _DownloadError as error:
                repositories = self.repositories()
                needed = "; ".join(f"{repo} ({role})" for repo, role in repositories.items())
                raise WeightsNotFoundError(f"{error} This pipeline needs the hub repositories {needed}. "
                                           f"{offline_hint(list(repositories))}") from None
            except FileExistsError:
                if not out.exists():  # another writer without the lock finished first: keep its copy
                    raise

    def _convert(self, name: str, out: Path) -> None:
        if self.layout == "diffusers":
            repo = {"prior": self.prior, "unet": self.main, "unet_inpaint": self.inpaint, "movq": self.main,
                    CONTROLNET: self.controlnet}[name]
            if repo is None:
                raise WeightsNotFoundError(f"Kandinsky {self.model} weights have no {name} (the ControlNet UNet is "
                                           "Kandinsky 2.2's)")
            subfolder = "prior" if name == "prior" else ("movq" if name == "movq" else "unet")
            convert_files(name, repo.fetch_first(subfolder, _DIFFUSERS_WEIGHTS), out, layout="diffusers")
            return
        files = [ORIGINAL_FILES[name]] + ([CLIP_STATS_FILE] if name == "prior" else [])
        folder = self.main.fetch(files, required=files)
        convert_files(name, folder / ORIGINAL_FILES[name], out, layout="original",
                      config=self.original_configs.get(name),
                      clip_stats=folder / CLIP_STATS_FILE if name == "prior" else None)

    def _scheduler(self, out: Path) -> None:
        """The decoder repository's ``scheduler/scheduler_config.json``, if it has one (else nothing is written)."""
        if self.layout != "diffusers":
            return
        folder = self.main.fetch([f"{SCHEDULER}/{SCHEDULER_FILE}"]) / SCHEDULER
        if (folder / SCHEDULER_FILE).is_file():
            save_component(SCHEDULER, load_component(SCHEDULER, folder), out)

    def _fetch_text(self, name: str) -> Path:
        """The folder holding the text encoder, CLIP tower or tokenizer ``name`` (downloaded if needed)."""
        if name in ("mclip", "mclip_tokenizer"):
            repo = self.main
            # the original folder holds the model and its tokenizer
            subfolder = "tokenizer" if self.layout == "diffusers" and name == "mclip_tokenizer" else "text_encoder"
        else:  # CLIP: a diffusers prior repo (subfolders) or a transformers CLIP repo (one folder, both towers)
            repo = self.clip
            subfolder = {"clip_text": "text_encoder", "clip_vision": "image_encoder", "clip_tokenizer": "tokenizer"}[name]
            if not _has_subfolders(self.clip):
                subfolder = ""
        if name in TOKENIZERS:
            prefix = f"{subfolder}/" if subfolder else ""
            return repo.fetch([prefix + f for f in _TOKENIZER_FILES]) / subfolder
        return repo.fetch_first(subfolder, _WEIGHTS)


class _Missing:
    """A repository that is not there: fetching from it raises with the explanation."""

    def __init__(self, message: str):
        self.message = message
        self.source, self.local = message, None

    def fetch(self, *args, **kwargs):
        raise WeightsNotFoundError(self.message)

    fetch_first = fetch


def _has_subfolders(repo: Repo) -> bool:
    """Whether a CLIP source is a diffusers prior repo (text_encoder/, image_encoder/, tokenizer/)."""
    if repo.local is not None:
        return (repo.local / "text_encoder").is_dir()
    return repo.source.rstrip("/").endswith("-prior")


# --------------------------------------------------------------------------------------------- resolve


def resolve(source: str | os.PathLike = DEFAULT_SOURCE, *, revision: str | None = None,
            cache_dir: str | os.PathLike | None = None, layout: str | None = None, prior_source: str | None = None,
            inpaint_source: str | None = None, clip_source: str | None = None, hub_cache: str | None = None,
            original_configs: dict[str, dict] | None = None, controlnet_source: str | None = None,
            model: str | None = None) -> dict[str, Lazy]:
    """Lazy loaders for every component of ``source`` (keys: the :class:`~kandinsky.components.Components`
    constructor arguments: :data:`COMPONENTS` for Kandinsky 2.1, :data:`COMPONENTS_22` for 2.2). Nothing is
    downloaded or converted until a loader runs. ``"tiny"`` or ``"tiny:SEED"`` is the tiny random pipeline
    (:mod:`kandinsky.tiny`), built in memory.

    ``model`` (``"2.1"`` / ``"2.2"``) is detected by default (:func:`detect_model`). ``layout`` is detected
    (``"ours"`` / ``"original"`` / ``"diffusers"`` from a folder's files, ``"original"`` for
    ``ai-forever/Kandinsky_2.1``, else ``"diffusers"``). ``prior_source`` / ``inpaint_source`` default to the
    ``-prior`` / ``-inpaint`` siblings of a diffusers decoder repo (2.2: ``kandinsky-2-2-prior`` and
    ``kandinsky-2-2-decoder-inpaint`` beside ``kandinsky-2-2-decoder``), ``controlnet_source`` (2.2) to
    ``kandinsky-2-2-controlnet-depth``; ``clip_source`` (original layout) to ``openai/clip-vit-large-patch14``.
    ``hub_cache`` is huggingface_hub's download cache. ``original_configs`` overrides the official constructor
    arguments of original checkpoints (tests). A folder in our layout with a ``base.json`` (``{"source": ...,
    **options}``, options from :data:`BASE_OPTIONS`) takes the components it lacks from ``resolve(source,
    **options)``. 2.2's ``"scheduler"`` loader gives the decoder repository's scheduler config (a dict), or None
    where there is none.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    _check_model(model)
    source = str(source)
    if tiny_seed(source) is not None:
        return _tiny(tiny_seed(source), model or "2.1")
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise WeightsNotFoundError(f"weights source {source!r} is a file; expected a folder or a hub repository id")
        layout = layout or detect_layout(local)
        if layout is None:
            raise WeightsNotFoundError(
                f"folder {source} holds no Kandinsky weights in a known layout (converted: prior/ unet/ movq/ "
                f"... with config.json; original: {', '.join(ORIGINAL_FILES.values())}; diffusers: unet/ movq/ "
                "text_encoder/ tokenizer/)")
    elif not _REPO_ID.match(source):
        raise WeightsNotFoundError(f"weights source {source!r}: no such folder, and not a hub repository id (owner/name)")
    else:
        layout = layout or ("original" if source in ORIGINAL_REPOS else "diffusers")
        if layout == "ours":
            raise ValueError("layout: 'ours' needs a local folder")

    if layout == "ours":
        return _ours(local, cache_dir, hub_cache, model)
    if layout == "original" and original_configs is None and local.is_dir():
        original_configs = _exported_configs(local)
    origin = Origin(source, layout, revision=revision, hub_cache=hub_cache, prior_source=prior_source,
                    inpaint_source=inpaint_source, clip_source=clip_source, original_configs=original_configs,
                    controlnet_source=controlnet_source, model=model)
    target = cache_root(cache_dir) / origin.main.key()
    return {name: Lazy(_cached_loader(name, target / name, origin), f"{name} via {target / name}")
            for name in MODEL_COMPONENTS[origin.model]}


def _exported_configs(folder: Path) -> dict[str, dict] | None:
    """The original constructor arguments an original-layout export of ours recorded (any size; the released
    checkpoints have none: the official ones apply)."""
    import json

    from kandinsky.weights import EXPORT_FILE

    try:
        record = json.loads((folder / EXPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    configs = record.get("original_configs") if isinstance(record, dict) else None
    return configs if isinstance(configs, dict) else None


def _tiny(seed: int, model: str = "2.1") -> dict[str, Lazy]:
    """Loaders of the tiny random weights of ``seed`` (Kandinsky ``model``), built on first use; each load is a copy
    of its own (a reloaded or trained module never shares its tensors)."""
    import copy
    import functools

    from kandinsky import tiny

    built = functools.cache(lambda: tiny.components(seed) if model == "2.1" else tiny.components_22(seed))
    names = COMPONENTS if model == "2.1" else [name for name in COMPONENTS_22 if name != SCHEDULER]
    return {name: Lazy(lambda name=name: copy.deepcopy(built()[name]), f"{name} of tiny:{seed}") for name in names}


def _ours(folder: Path, cache_dir, hub_cache, model: str | None = None) -> dict[str, Lazy]:
    """Loaders of a folder in our layout (the components of its :func:`detect_model` version, or ``model``'s);
    with a ``base.json``, the components it lacks come from that base."""
    base = read_base(folder)
    if base is None:
        names = list(MODEL_COMPONENTS[model or detect_model(folder)])
        if (folder / SCHEDULER).exists() and SCHEDULER not in names:
            names.append(SCHEDULER)
        return {name: _own(name, folder) for name in names}
    _check_base_chain(folder)
    options = {k: v for k, v in base.items() if k != "source"}
    unknown = sorted(set(options) - set(BASE_OPTIONS))
    if unknown:
        raise ValueError(f"{folder / BASE_FILE}: unknown keys {unknown}; expected \"source\" and any of "
                         f"{list(BASE_OPTIONS)}")
    own = model or (_configured_model(folder) or (None,))[0]
    if own is not None:  # the folder's own UNets say what the base is
        options.setdefault("model", own)
    base_parts = resolve(_base_source(folder, base), cache_dir=cache_dir, hub_cache=hub_cache, **options)
    names = list(base_parts) + [name for name in ALL_COMPONENTS if name not in base_parts and (folder / name).exists()]
    return {name: _own(name, folder) if (folder / name).exists() else base_parts[name] for name in names}


def _own(name: str, folder: Path) -> Lazy:
    """The loader of component ``name`` of a folder in our layout (the scheduler: None where there is none)."""
    if name == SCHEDULER:
        path = folder / SCHEDULER
        return Lazy(lambda: load_component(SCHEDULER, path) if path.exists() else None, f"{name} from {path}")
    return Lazy(_folder_loader(name, folder / name), f"{name} from {folder / name}")


def _base_source(folder: Path, base: dict) -> str:
    """The base's source: a relative path is relative to the folder holding base.json; else a hub id."""
    source = base["source"]
    beside = folder / Path(source).expanduser()
    return str(beside) if beside.exists() else source


def _check_base_chain(folder: Path) -> None:
    """Refuse local folders whose base.json files lead back to themselves."""
    seen = [folder.resolve()]
    while (base := read_base(folder)) is not None:
        folder = Path(_base_source(folder, base)).expanduser()
        if not folder.is_dir():
            return
        if folder.resolve() in seen:
            raise ValueError(f"{BASE_FILE}: the bases of {seen[0]} form a cycle: "
                             f"{' -> '.join(str(p) for p in [*seen, folder.resolve()])}")
        seen.append(folder.resolve())


def _folder_loader(name: str, folder: Path) -> Callable:
    def load():
        if not folder.exists():
            raise WeightsNotFoundError(f"converted weights folder {folder.parent} has no {name}/ (needed for this task)")
        return load_component(name, folder)

    return load


def _cached_loader(name: str, folder: Path, origin: Origin) -> Callable:
    def load():
        if not folder.exists():
            origin.write(name, folder)
        if name == SCHEDULER and not folder.exists():
            return None  # the decoder repository has no scheduler config
        return load_component(name, folder)

    return load


def convert_all(source: str | os.PathLike, output: str | os.PathLike, components: Sequence[str] | None = None,
                **kwargs) -> Path:
    """Write ``components`` of ``source`` (hub repo or folder, any layout; default: every component of its
    Kandinsky version, :data:`MODEL_COMPONENTS`) into ``output`` in our layout. ``kwargs``: :class:`Origin`'s
    (``layout``, ``model``, ``revision``, ``prior_source``, ...). A 2.2 decoder's scheduler config is written as
    ``scheduler/`` when the source has one."""
    output = Path(output)
    source = str(source)
    model = _check_model(kwargs.pop("model", None)) or detect_model(source)
    expected = MODEL_COMPONENTS[model]
    components = expected if components is None else tuple(components)
    unknown = sorted(set(components) - set(expected))
    if unknown:
        raise ValueError(f"components: unknown {unknown} for Kandinsky {model}; expected a subset of {list(expected)}")
    local = Path(source).expanduser()
    layout = kwargs.pop("layout", None) or (detect_layout(local) if local.is_dir() else
                                            ("original" if source in ORIGINAL_REPOS else "diffusers"))
    origin = Origin(source, layout, model=model, **kwargs)
    for name in components:
        if not (output / name).exists():
            origin.write(name, output / name)
    return output

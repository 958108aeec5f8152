"""LoRA adapters (through ``peft``) for the prior and the decoder UNets: add them for training, save them as one
safetensors file, load them into a pipeline with a scale and remove them again.

The adapters sit on the UNets' attention projections (``qkv``, ``context_kv`` and ``proj_out`` of every attention
layer) and on the prior's attention output and MLP projections (``attn.out``, ``mlp.fc1``, ``mlp.fc2`` of every
transformer block). Several adapters can sit on one model at once (each under its own peft adapter name, each
with its own scale): their effects add up. Loading never changes the base weights, so removing the adapters gives
back the base model's outputs exactly; :func:`fuse_lora` merges them for good.

File format (``lora.safetensors``): tensors ``<module path>.lora_A.weight`` (r, in) and ``<module path>.lora_B.weight``
(out, r); metadata ``format = "kandinsky21-lora"``, ``component``, ``rank``, ``alpha`` and ``targets`` (JSON list of
module paths).

Example::

    pipe = Kandinsky21.from_pretrained("runs/cats")         # the base, through runs/cats/base.json
    pipe.load_lora("runs/cats/lora.safetensors", scale=0.8)
    image = pipe.text2img("a cat")[0]
    pipe.unload_lora()                                      # the base outputs again, exactly
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

LORA_FORMAT = "kandinsky21-lora"
LORA_FILE = "lora.safetensors"
ADAPTER = "default"  # peft's adapter name inside the modules; never stored in files
COMPONENTS = ("prior", "unet", "unet_inpaint")


def lora_targets(model: nn.Module) -> list[str]:
    """Module paths of the linear layers of ``model`` that get adapters (see the module docstring)."""
    from kandinsky.models import prior, unet

    # The prior's fused qkv is left out: the inference fast path of its last block (kandinsky.ops) reads that
    # weight directly, which would bypass an adapter.
    names = {unet.Attention: ("qkv", "context_kv", "proj_out"), prior.Attention: ("out",), prior.MLP: ("fc1", "fc2")}
    targets = []
    for path, module in model.named_modules():
        for cls, children in names.items():
            if isinstance(module, cls):
                targets += [f"{path}.{child}" if path else child for child in children]
    if not targets:
        raise ValueError(f"model: no layers to put LoRA adapters on in {type(model).__name__}")
    return targets


def _peft():
    """peft's LoRA pieces, or a one-line error naming the extra that installs it."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    except ModuleNotFoundError:
        raise ModuleNotFoundError("LoRA needs peft: pip install 'kandinsky21[train]' (or pip install peft)") from None
    return LoraConfig, inject_adapter_in_model, LoraLayer


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: list[str] | None = None, *,
             adapter: str = ADAPTER) -> nn.Module:
    """Inject LoRA adapters of ``rank`` (scaling ``alpha / rank``, ``alpha`` defaults to ``rank``) into ``model`` in
    place, under the name ``adapter``, and make only them trainable. ``lora_B`` starts at zero, so the model's
    outputs are unchanged; ``lora_A`` is drawn from torch's global generator (seed it for reproducible runs).
    Adapters of other names already in ``model`` stay, and every adapter is active: their effects add up."""
    LoraConfig, inject_adapter_in_model, _ = _peft()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    if adapter in adapter_names(model):
        raise ValueError(f"model: already has a LoRA adapter {adapter!r} (remove it first with remove_lora)")
    targets = lora_targets(model) if targets is None else list(targets)
    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=targets,
                        lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: what stacking is
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model = inject_adapter_in_model(config, model, adapter_name=adapter)
    _activate_all(model)
    if adapter == ADAPTER:
        model._lora_meta = {"rank": rank, "alpha": float(config.lora_alpha), "targets": targets}  # saved with the weights
    return model


def lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None, *,
                    adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The weights of ``adapter`` in ``model`` (or in its full ``state_dict``) under their file names (no adapter
    name)."""
    state = model.state_dict() if state_dict is None else state_dict
    marker = f".{adapter}."
    return {key.replace(marker, "."): value for key, value in state.items()
            if (".lora_A." in key or ".lora_B." in key) and marker in key}


def save_lora(path: str | os.PathLike, weights: dict[str, torch.Tensor], *, component: str, rank: int, alpha: float,
              targets: list[str]) -> Path:
    """Write adapter ``weights`` (see :func:`lora_state_dict`) to ``path`` atomically (temporary file, rename)."""
    from safetensors.torch import save_file

    if component not in COMPONENTS:
        raise ValueError(f"component: expected one of {list(COMPONENTS)}, got {component!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    metadata = {"format": LORA_FORMAT, "component": component, "rank": str(rank), "alpha": repr(float(alpha)),
                "targets": json.dumps(targets)}
    try:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in weights.items()}, str(temporary),
                  metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def lora_file(path: str | os.PathLike) -> Path:
    """The adapter file of ``path``: the file itself, or ``lora.safetensors`` in a folder (a training output)."""
    path = Path(path)
    return path / LORA_FILE if path.is_dir() else path


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(weights, {"component", "rank", "alpha", "targets"})`` of a LoRA file, or of a folder holding
    ``lora.safetensors`` (a training output). Anything else is one ``ValueError`` naming the file and the problem."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = lora_file(path)
    if not path.is_file():
        raise ValueError(f"{path}: no LoRA file there")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format") != LORA_FORMAT:
        raise ValueError(f"{path}: not a {LORA_FORMAT!r} file (format={metadata.get('format')!r})")
    try:
        meta = {"component": metadata["component"], "rank": int(metadata["rank"]),
                "alpha": float(metadata["alpha"]), "targets": json.loads(metadata["targets"])}
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: damaged LoRA metadata ({type(error).__name__}: {error})") from None
    if meta["component"] not in COMPONENTS:
        raise ValueError(f"{path}: component {meta['component']!r} is not one of {list(COMPONENTS)}")
    if meta["rank"] < 1 or not math.isfinite(meta["alpha"]) or not isinstance(meta["targets"], list):
        raise ValueError(f"{path}: damaged LoRA metadata (rank {meta['rank']}, alpha {meta['alpha']})")
    return weights, meta


def check_fits(model: nn.Module, weights: dict[str, torch.Tensor], meta: dict, source: str | os.PathLike = "weights"):
    """Refuse (``ValueError`` naming ``source``) adapter ``weights`` that do not fit ``model``: a target that is not
    one of its linear layers, a missing or unexpected tensor, a shape that is not (rank, in) / (out, rank)."""
    layers = dict(model.named_modules())
    expected = {}
    for target in meta["targets"]:
        layer = layers.get(target)
        if _is_lora_layer(layer):
            layer = layer.get_base_layer()
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{source}: target {target!r} is not a linear layer of this {meta['component']} "
                             f"(an adapter for another model?)")
        expected[f"{target}.lora_A.weight"] = (meta["rank"], layer.in_features)
        expected[f"{target}.lora_B.weight"] = (layer.out_features, meta["rank"])
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: LoRA weights do not fit the model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(weights[key].shape)}, expected {shape} "
                             f"(rank {meta['rank']})")
        if not weights[key].is_floating_point() or not bool(weights[key].isfinite().all()):
            raise ValueError(f"{source}: {key} is not a finite floating-point tensor")


def load_lora_weights(model: nn.Module, weights: dict[str, torch.Tensor], meta: dict, scale: float = 1.0, *,
                      adapter: str = ADAPTER, source: str | os.PathLike = "weights") -> nn.Module:
    """Add the adapter described by ``meta`` to ``model`` under the name ``adapter`` and fill it with ``weights``;
    ``scale`` multiplies its contribution (1 = as trained). All or nothing: weights that do not fit
    (:func:`check_fits`) leave ``model`` as it was."""
    check_fits(model, weights, meta, source)
    add_lora(model, meta["rank"], meta["alpha"], meta["targets"], adapter=adapter)
    model.requires_grad_(False)
    renamed = {}
    for key, value in weights.items():
        module, kind, name = key.rsplit(".", 2)  # "<path>.lora_A.weight"
        renamed[f"{module}.{kind}.{adapter}.{name}"] = value
    try:
        model.load_state_dict(renamed, strict=False)
    except (RuntimeError, ValueError):
        remove_lora(model, adapter=adapter)
        raise
    set_lora_scale(model, scale, adapter=adapter)
    return model


def set_lora_scale(model: nn.Module, scale: float, *, adapter: str | None = None) -> None:
    """Scale ``adapter`` (every adapter by default) of ``model`` by ``scale`` relative to its trained
    ``alpha / rank``."""
    for module in model.modules():
        if _is_lora_layer(module):
            for name in module.lora_A:
                if adapter is None or name == adapter:
                    module.set_scale(name, float(scale))


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters in ``model``, in the order they were added."""
    names = []
    for module in model.modules():
        if _is_lora_layer(module):
            names += [name for name in module.lora_A if name not in names]
    return names


def _activate_all(model: nn.Module) -> None:
    for module in model.modules():
        if _is_lora_layer(module):
            module.set_adapter(list(module.lora_A))


def delta_weight(layer: nn.Module) -> torch.Tensor:
    """The sum of the active adapters' ``scale * alpha / rank * B A`` of a LoRA-wrapped layer, in float32."""
    return sum(layer.get_delta_weight(name).float() for name in layer.active_adapters if name in layer.lora_A)


def fuse_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter of ``model`` into its base weights (``W + scale * alpha / rank * B A`` in float32, then
    cast) and drop the adapters, in place."""
    for path, module in list(model.named_modules()):
        if _is_lora_layer(module):
            base = module.get_base_layer()
            with torch.no_grad():
                base.weight.copy_((base.weight.float() + delta_weight(module)).to(base.weight.dtype))
    return remove_lora(model)


def remove_lora(model: nn.Module, *, adapter: str | None = None) -> nn.Module:
    """Remove ``adapter`` (every adapter by default) from ``model``, in place: a layer left without adapters
    becomes its untouched base layer again."""
    for path, module in list(model.named_modules()):
        if not _is_lora_layer(module):
            continue
        if adapter is not None and set(module.lora_A) != {adapter}:
            if adapter in module.lora_A:
                module.delete_adapter(adapter)
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, module.get_base_layer())
    if adapter is None or adapter == ADAPTER:
        model.__dict__.pop("_lora_meta", None)
    if not has_lora(model):
        model.__dict__.pop("peft_config", None)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(_is_lora_layer(m) for m in model.modules())


def _is_lora_layer(module: nn.Module | None) -> bool:
    if module is None or "peft" not in sys.modules:  # no adapter can exist before peft is imported
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)

"""LoRA adapters (through ``peft``) for the prior and the decoder UNets: add them for training, save them as one
safetensors file, load them into a pipeline with a scale and remove them again.

The adapters sit on the UNets' attention projections (``qkv``, ``context_kv`` and ``proj_out`` of every attention
layer) and on the prior's attention output and MLP projections (``attn.out``, ``mlp.fc1``, ``mlp.fc2`` of every
transformer block). The base weights are never changed
(nothing is merged), so removing the adapters gives back the base model's outputs exactly.

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
import os
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


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: list[str] | None = None) -> nn.Module:
    """Inject LoRA adapters of ``rank`` (scaling ``alpha / rank``, ``alpha`` defaults to ``rank``) into ``model`` in
    place and make only them trainable. ``lora_B`` starts at zero, so the model's outputs are unchanged; ``lora_A``
    is drawn from torch's global generator (seed it for reproducible runs)."""
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    if any(_is_lora_layer(m) for m in model.modules()):
        raise ValueError("model: already has LoRA adapters (remove them first with remove_lora)")
    targets = lora_targets(model) if targets is None else list(targets)
    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=targets,
                        lora_dropout=0.0, bias="none")
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model._lora_meta = {"rank": rank, "alpha": float(config.lora_alpha), "targets": targets}  # saved with the weights
    return model


def lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model`` (or of its full ``state_dict``) under their file names (no adapter name)."""
    state = model.state_dict() if state_dict is None else state_dict
    marker = f".{ADAPTER}."
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


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(weights, {"component", "rank", "alpha", "targets"})`` of a LoRA file, or of a folder holding
    ``lora.safetensors`` (a training output)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise ValueError(f"path: no LoRA file at {path}")
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if metadata.get("format") != LORA_FORMAT:
        raise ValueError(f"path: {path} is not a {LORA_FORMAT!r} file (format={metadata.get('format')!r})")
    meta = {"component": metadata["component"], "rank": int(metadata["rank"]), "alpha": float(metadata["alpha"]),
            "targets": json.loads(metadata["targets"])}
    return load_file(str(path)), meta


def load_lora_weights(model: nn.Module, weights: dict[str, torch.Tensor], meta: dict, scale: float = 1.0) -> nn.Module:
    """Add adapters as described by ``meta`` to ``model`` and fill them with ``weights``; ``scale`` multiplies
    their contribution (1 = as trained)."""
    add_lora(model, meta["rank"], meta["alpha"], meta["targets"])
    model.requires_grad_(False)
    marker = f".{ADAPTER}."
    expected = set(lora_state_dict(model))
    if set(weights) != expected:
        remove_lora(model)
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"LoRA weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    renamed = {}
    for key, value in weights.items():
        module, kind, name = key.rsplit(".", 2)  # "<path>.lora_A.weight"
        renamed[f"{module}.{kind}{marker}{name}"] = value
    model.load_state_dict(renamed, strict=False)
    set_lora_scale(model, scale)
    return model


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale every adapter of ``model`` by ``scale`` relative to its trained ``alpha / rank``."""
    for module in model.modules():
        if _is_lora_layer(module):
            module.set_scale(ADAPTER, float(scale))


def remove_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA-wrapped layer of ``model`` by its untouched base layer (in place)."""
    for path, module in list(model.named_modules()):
        if _is_lora_layer(module):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, module.get_base_layer())
    for attribute in ("_lora_meta", "peft_config"):
        if attribute in model.__dict__:
            delattr(model, attribute)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(_is_lora_layer(m) for m in model.modules())


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)

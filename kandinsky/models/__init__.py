"""Pure ``nn.Module`` models: tensors in, tensors out. One file per model, each with its config dataclass.

Every model takes its config dataclass as the only constructor argument and keeps it as ``.config``.
"""

from __future__ import annotations

import dataclasses
import importlib

from torch import nn

# component name -> (module, model class, config class)
_MODELS = {
    "movq": ("kandinsky.models.movq", "MoVQ", "MoVQConfig"),
    "prior": ("kandinsky.models.prior", "Prior", "PriorConfig"),
    "unet": ("kandinsky.models.unet", "UNet", "UNetConfig"),
    "unet_inpaint": ("kandinsky.models.unet", "UNet", "UNetConfig"),
}


def _lookup(component: str, index: int):
    if component not in _MODELS:
        raise ValueError(f"component must be one of {list(_MODELS)}, got {component!r}")
    module = importlib.import_module(_MODELS[component][0])
    return getattr(module, _MODELS[component][index])


def model_class(component: str) -> type[nn.Module]:
    """The model class of a component name (``"movq"``, ``"prior"``, ``"unet"``, ``"unet_inpaint"``)."""
    return _lookup(component, 1)


def config_class(component: str) -> type:
    """The config dataclass of a component name."""
    return _lookup(component, 2)


def config_from_dict(component: str, values: dict):
    """Our config dataclass from a JSON dict (lists become tuples where the dataclass default is a tuple)."""
    cls = config_class(component)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {component} config fields {unknown}; expected a subset of {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_to_dict(config) -> dict:
    """A JSON-ready dict of a config dataclass."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}

"""The machinery every component converter shares: a source state dict that records which keys were
read, regex renaming, layer tables that convert in both directions, and the strict final check.

A component converter (``kandinsky/convert/<component>.py``) turns a foreign config into our config
dataclass and a foreign state dict into ours, reading the source only through :class:`Source`.
:func:`build_strict` then checks that every source key was consumed and every parameter and buffer of
our module was filled with a tensor of the right shape, and reports *all* problems in one ``ValueError``.
A converter's :class:`Layer` table also writes our state dict back in the foreign layout
(:func:`write_layers`) and pairs up the modules whose outputs the divergence tracer compares.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


class Source:
    """A read-only view of a foreign state dict that remembers which keys were consumed.

    A key the converter asks for but the source lacks is recorded (``missing``) instead of raising
    at once, so the final error can list every absent key.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], layout: str):
        self.state_dict = state_dict
        self.layout = layout
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.malformed: list[str] = []  # foreign tensors that do not combine into one of ours (their shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.state_dict

    def keys(self) -> Iterable[str]:
        return self.state_dict.keys()

    def take(self, key: str) -> torch.Tensor | None:
        """Return ``state_dict[key]`` and mark it consumed; ``None`` (recorded as missing) if absent."""
        if key not in self.state_dict:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.state_dict[key]

    def fuse(self, keys: list[str], combine: Callable[..., torch.Tensor]) -> torch.Tensor | None:
        """Take several keys and combine them (e.g. separate q, k, v into one fused QKV weight)."""
        tensors = [self.take(k) for k in keys]
        if any(t is None for t in tensors):
            return None
        try:
            return combine(*tensors)
        except RuntimeError:
            self.malformed.append(", ".join(f"{key} {tuple(t.shape)}" for key, t in zip(keys, tensors)))
            return None

    def rename(self, rules: list[tuple[str, str]], skip: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        """Map every not-yet-consumed key through the first matching regex rule (``re.fullmatch``,
        backreferences allowed in the replacement). Keys that no rule matches stay unconsumed, so the
        strict check reports them."""
        compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
        out: dict[str, torch.Tensor] = {}
        for key in list(self.state_dict.keys()):
            if key in self.used or (skip is not None and skip(key)):
                continue
            for pattern, replacement in compiled:
                match = pattern.fullmatch(key)
                if match:
                    out[match.expand(replacement)] = self.take(key)
                    break
        return out

    def unused(self) -> list[str]:
        return sorted(k for k in self.state_dict.keys() if k not in self.used)


def _listing(title: str, items: list[str], limit: int = 50) -> str:
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def build_strict(
    component: str,
    make_module: Callable[[], nn.Module],
    converted: Mapping[str, torch.Tensor | None],
    source: Source,
    dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Build our module without allocating weights, then fill it from ``converted``.

    Raises ``ValueError`` listing every unconsumed source key, every source key the converter needed
    but did not find, every parameter/buffer of ours left unfilled or unknown, and every shape mismatch.
    Floating-point tensors are cast to ``dtype`` (``None`` keeps the source dtype); tensors already in
    that dtype are used as they are, without a copy (so memory-mapped weights stay memory-mapped).
    """
    with torch.device("meta"):
        module = make_module()
    expected = module.state_dict()
    converted = {k: v for k, v in converted.items() if v is not None}

    missing = sorted(k for k in expected if k not in converted)
    unexpected = sorted(k for k in converted if k not in expected)
    mis_shaped = sorted(
        f"{k}: ours {tuple(expected[k].shape)}, source gives {tuple(converted[k].shape)}"
        for k in expected
        if k in converted and tuple(expected[k].shape) != tuple(converted[k].shape)
    )
    unused = source.unused()
    problems = []
    if source.missing:
        problems.append(_listing(f"keys absent from the {source.layout} state dict", sorted(set(source.missing))))
    if source.malformed:
        problems.append(_listing("tensors whose shapes do not combine", source.malformed))
    if unused:
        problems.append(_listing(f"{source.layout} keys not consumed", unused))
    if missing:
        problems.append(_listing("our parameters/buffers left unfilled", missing))
    if unexpected:
        problems.append(_listing("converted keys our module does not have", unexpected))
    if mis_shaped:
        problems.append(_listing("shape mismatches", mis_shaped))
    if problems:
        raise ValueError(
            f"cannot convert the {source.layout} '{component}' state dict:\n" + "\n".join(problems)
        )

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            return tensor.to(dtype)
        return tensor

    module.load_state_dict({k: cast(v) for k, v in converted.items()}, strict=True, assign=True)
    leftover = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:  # a non-persistent buffer would stay on the meta device: models must not have any
        raise ValueError(f"'{component}': tensors not in the state dict stayed unallocated: {leftover}")
    return module.eval()


# --------------------------------------------------------------------------------------------- layer tables


@dataclass(frozen=True)
class Layer:
    """One module of ours (or one tensor, with ``params=("",)``) and what it is in a foreign layout.

    A component converter lists its layers once per layout; the same table then converts a foreign state
    dict into ours (:func:`read_layers`), ours back into the foreign one (:func:`write_layers`) and names the
    modules whose outputs correspond one to one (:func:`traced_modules`, for the divergence tracer).

    ``foreign`` holds several module paths when our layer fuses them: their weights' output rows are
    concatenated in that order (separate q, k, v into one ``qkv``). ``head_major=(heads, parts)`` says that
    the foreign rows are ordered (heads, parts, channels) where ours are (parts, heads, channels).
    ``kernel`` gives the trailing 1-sized dimensions of a foreign weight that ours stores as a linear one
    (a 1x1 convolution). ``traced=False`` keeps a layer out of the tracer's map when the two outputs are
    laid out differently (a Conv1d's (B, C, T) against a Linear's (B, T, C)).
    """

    ours: str
    foreign: tuple[str, ...]
    params: tuple[str, ...] = ("weight", "bias")
    head_major: tuple[int, int] | None = None
    kernel: tuple[int, ...] = ()
    traced: bool = True

    def keys(self, param: str) -> tuple[str, list[str]]:
        """(our key, foreign keys) of one parameter name (``""``: the paths are the keys)."""
        def key(path: str) -> str:
            return f"{path}.{param}" if param else path

        return key(self.ours), [key(path) for path in self.foreign]

    def to_ours(self, param: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        tensor = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if self.kernel and param == "weight" and tensor.ndim > 2:
            tensor = tensor.flatten(1)
        if self.head_major is not None:
            heads, parts = self.head_major
            tensor = tensor.unflatten(0, (heads, parts, -1)).transpose(0, 1).flatten(0, 2)
        return tensor

    def to_foreign(self, param: str, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.head_major is not None:
            heads, parts = self.head_major
            tensor = tensor.unflatten(0, (parts, heads, -1)).transpose(0, 1).flatten(0, 2)
        if self.kernel and param == "weight":
            tensor = tensor.reshape(*tensor.shape, *self.kernel)
        return tensor.chunk(len(self.foreign)) if len(self.foreign) > 1 else (tensor,)


def layer(ours: str, *foreign: str, **options) -> Layer:
    """``Layer(ours, foreign, ...)`` with the foreign paths as positional arguments."""
    return Layer(ours, tuple(foreign), **options)


def read_layers(source: Source, layers: Iterable[Layer]) -> dict[str, torch.Tensor | None]:
    """Our tensors from a foreign state dict (``None`` where a foreign key is absent: recorded as missing)."""
    converted: dict[str, torch.Tensor | None] = {}
    for item in layers:
        for param in item.params:
            ours, foreign = item.keys(param)
            tensors = [source.take(key) for key in foreign]
            converted[ours] = None if any(t is None for t in tensors) else _combined(source, item, param, tensors)
    return converted


def _combined(source: Source, item: Layer, param: str, tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """``item.to_ours``; foreign tensors whose shapes cannot be fused or reordered are recorded (``None``)."""
    try:
        return item.to_ours(param, tensors)
    except RuntimeError:
        ours, foreign = item.keys(param)
        shapes = ", ".join(f"{key} {tuple(t.shape)}" for key, t in zip(foreign, tensors))
        source.malformed.append(f"{ours} <- {shapes}")
        return None


def write_layers(component: str, layout: str, state_dict: Mapping[str, torch.Tensor], layers: Iterable[Layer],
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The foreign state dict of our ``state_dict``: the inverse of :func:`read_layers`, exact (renames,
    splits and row permutations only). Raises ``ValueError`` listing our keys the table does not cover and
    the keys it expects but ``state_dict`` lacks. The tensors are fresh contiguous copies, floating-point
    ones cast to ``dtype`` (``None``: as they are)."""
    foreign: dict[str, torch.Tensor] = {}
    used, absent = set(), []
    for item in layers:
        for param in item.params:
            ours, keys = item.keys(param)
            if ours not in state_dict:
                absent.append(ours)
                continue
            used.add(ours)
            for key, tensor in zip(keys, item.to_foreign(param, state_dict[ours].detach())):
                foreign[key] = tensor.to(dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype,
                                         memory_format=torch.contiguous_format, copy=True)
    uncovered = sorted(set(state_dict) - used)
    if absent or uncovered:
        problems = ([_listing("keys the table expects but the state dict lacks", sorted(absent))] if absent else []) + \
                   ([_listing("keys no layer covers", uncovered)] if uncovered else [])
        raise ValueError(f"cannot write the '{component}' state dict in the {layout} layout:\n" + "\n".join(problems))
    return foreign


def traced_modules(layers: Iterable[Layer]) -> dict[str, str]:
    """Our module path -> foreign module path of the layers whose outputs correspond one to one."""
    return {item.ours: item.foreign[0] for item in layers
            if item.traced and len(item.foreign) == 1 and item.head_major is None and item.params != ("",)}

"""The machinery every component converter shares: a source state dict that records which keys were
read, regex renaming, and the strict final check.

A component converter (``kandinsky/convert/<component>.py``) turns a foreign config into our config
dataclass and a foreign state dict into ours, reading the source only through :class:`Source`.
:func:`build_strict` then checks that every source key was consumed and every parameter and buffer of
our module was filled with a tensor of the right shape, and reports *all* problems in one ``ValueError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

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
        return combine(*tensors)

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

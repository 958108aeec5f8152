"""Argument checks shared by the pipeline, the text encoders and the samplers: each raises a ``ValueError``
that names the argument, what was expected and what was given."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an ``int`` if it is a positive integer (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def check_number(name: str, value: object) -> float:
    """``value`` as a ``float`` if it is a finite real number (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """A string or a non-empty sequence of strings as a list of strings."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, Sequence) and len(prompt) == 0:
        raise ValueError(f"{name}: expected a string or a non-empty list of strings, got an empty list")
    kinds = [type(p).__name__ for p in prompt] if isinstance(prompt, Sequence) else type(prompt).__name__
    raise ValueError(f"{name}: expected a string or a non-empty list of strings, got {kinds}")


def check_in_range(name: str, value: object, low: float, high: float) -> float:
    """``value`` as a ``float`` if it is a finite number in ``[low, high]`` (``bool`` is refused)."""
    number = check_number(name, value)
    if not low <= number <= high:
        raise ValueError(f"{name}: expected a number in [{low:g}, {high:g}], got {value!r}")
    return number


def check_finite(name: str, tensor, bound: float | None = None):
    """``tensor`` (a torch tensor) if every value is finite and, with ``bound``, of magnitude at most ``bound``.
    NaN compares false with everything, so a plain range check lets it through: this one counts it."""
    values = tensor.detach()
    if not values.is_floating_point():
        return tensor
    bad = int((~values.isfinite()).sum())
    if bad:
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or infinite of {values.numel()}")
    if bound is not None and values.numel() and float(values.abs().max()) > bound:
        raise ValueError(f"{name}: expected values of magnitude at most {bound:g}, got {float(values.abs().max()):.3g}")
    return tensor


# px. Memory grows with the square of the side: at 4096 px one float32 activation of the MoVQ decoder's
# full-resolution level (128 channels) is 8.6 GB.
MAX_IMAGE_SIDE = 4096


def check_image_side(name: str, value: object) -> int:
    """``value`` as an ``int`` if it is an image height or width in [1, :data:`MAX_IMAGE_SIDE`] px, checked
    before anything is allocated."""
    side = check_positive_int(name, value)
    if side > MAX_IMAGE_SIDE:
        raise ValueError(f"{name}: expected at most {MAX_IMAGE_SIDE} px (MAX_IMAGE_SIDE), got {value!r}")
    return side


def check_device(name: str, value: object):
    """``value`` as a ``torch.device`` that this torch build can use: CUDA and MPS only when available."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {value!r} asked for, but CUDA is not available (torch {torch.__version__}, "
                             f"built {'without CUDA' if torch.version.cuda is None else 'with CUDA, no GPU visible'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {value!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                             "are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: {value!r} asked for, but MPS is not available on this machine")
    return device

"""The shared conversion machinery: strictness and error reporting."""

import pytest
import torch
from torch import nn

from kandinsky.convert import from_diffusers, from_original
from kandinsky.convert.core import Source, build_strict


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)


def _state():
    return {"lin.weight": torch.ones(2, 3), "lin.bias": torch.zeros(2),
            "ln.weight": torch.ones(2), "ln.bias": torch.zeros(2)}


def test_rename_and_build_fills_every_parameter():
    source = Source(_state(), "test")
    converted = source.rename([(r"lin\.(.*)", r"proj.\1"), (r"ln\.(.*)", r"norm.\1")])
    module = build_strict("tiny", _Tiny, converted, source)
    assert torch.equal(module.proj.weight, torch.ones(2, 3))
    assert not module.training


def test_build_lists_every_problem_at_once():
    state = _state()
    state["extra.weight"] = torch.zeros(1)
    state["ln.bias"] = torch.zeros(5)
    source = Source(state, "test")
    converted = source.rename([(r"lin\.(.*)", r"proj.\1"), (r"ln\.(.*)", r"norm.\1")])
    del converted["proj.bias"]
    source.take("absent.key")
    with pytest.raises(ValueError) as info:
        build_strict("tiny", _Tiny, converted, source)
    message = str(info.value)
    for expected in ["extra.weight", "proj.bias", "norm.bias: ours (2,), source gives (5,)", "absent.key"]:
        assert expected in message


def test_dtype_cast_and_no_copy_when_dtype_matches():
    state = _state()
    source = Source(state, "test")
    converted = source.rename([(r"lin\.(.*)", r"proj.\1"), (r"ln\.(.*)", r"norm.\1")])
    module = build_strict("tiny", _Tiny, converted, source, dtype=torch.float32)
    assert module.proj.weight.data_ptr() == state["lin.weight"].data_ptr()
    source = Source(_state(), "test")
    converted = source.rename([(r"lin\.(.*)", r"proj.\1"), (r"ln\.(.*)", r"norm.\1")])
    assert build_strict("tiny", _Tiny, converted, source, dtype=torch.bfloat16).proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("convert", [from_original, from_diffusers])
def test_unknown_component(convert):
    with pytest.raises(ValueError, match="component must be one of"):
        convert("vae", {}, {})

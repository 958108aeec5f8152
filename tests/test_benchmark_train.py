"""The training benchmark (kandinsky/benchmark/train.py) at a tiny UNet: every measurement runs and reports what
the issue asks for. Timings and memory are never compared (this machine is shared), only checked to be sane."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

pytest.importorskip("diffusers")

from kandinsky.benchmark import train  # noqa: E402


def test_step_times_and_lora_figures(monkeypatch):
    monkeypatch.setattr(train, "native_half", lambda dtype: False)  # no bf16 arithmetic: one result
    (result,) = train.run(types.SimpleNamespace(repeats=1, no_memory=True), config="tiny")
    assert result.component == "train" and "forward+backward+AdamW" in result.case
    assert all(math.isfinite(t) and t > 0 for t in result.ours + result.diffusers)
    extra = result.extra
    # identical weights and inputs: the same loss up to float32 operation order (measured 0)
    assert extra["loss |ours - diffusers| before training"] < 1e-5
    full, lora = extra["trainable parameters"], extra["LoRA rank 4 trainable parameters"]
    assert 0 < lora < full / 20
    # AdamW keeps two float32 moments per trainable parameter (and a step counter per tensor)
    assert extra["AdamW state GiB"] * 2**30 == pytest.approx(8 * full, rel=0.01)
    assert extra["LoRA rank 4 AdamW state MiB"] * 2**20 == pytest.approx(8 * lora, rel=0.1)
    assert extra["LoRA rank 4 step s"] > 0
    # our step is our forward + backward plus the AdamW step, timed apart
    assert min(result.ours) >= extra["AdamW step s"] > 0


def test_bf16_step_against_our_float32_step_where_the_cpu_has_bf16(monkeypatch):
    monkeypatch.setattr(train, "native_half", lambda dtype: dtype == torch.bfloat16)
    autocasts = []  # the autocast dtype of every timed forward + backward
    forward_backward = train.forward_backward
    monkeypatch.setattr(train, "forward_backward",
                        lambda model, batch, autocast=None: autocasts.append(autocast) or forward_backward(
                            model, batch, autocast))
    float32, mixed = train.run(types.SimpleNamespace(repeats=2, no_memory=True), config="tiny")
    # 1 warm-up + 2 timed rounds of both sides in float32 and of ours in bf16, then the LoRA steps in float32
    assert autocasts.count(torch.bfloat16) == 3 and autocasts.count(None) == 6 + 3
    assert "--mixed-precision bf16" in mixed.case and "float32" in float32.case
    assert mixed.diffusers == float32.ours  # the second result's reference is our float32 step
    assert len(mixed.ours) == 2 and all(math.isfinite(t) and t > 0 for t in mixed.ours)
    # bf16 keeps 8 significant bits: the loss moves by at most a few 2^-8 of its size
    assert mixed.extra["loss |bf16 autocast - float32| before training"] <= 0.05 * mixed.extra["float32 loss"]


@pytest.mark.parametrize("side", ["ours", "diffusers"])
def test_memory_probe_reports_baseline_and_peak(capsys, side):
    train.memory_probe(side, "1", "tiny")
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("MEMORY "))
    measured = json.loads(line[len("MEMORY "):])
    assert 0 < measured["baseline_gib"] <= measured["peak_gib"]


def test_distributed_measurement_runs_ddp_and_fsdp():
    (result,) = train._distributed("tiny")
    assert len(result.ours) == len(result.diffusers) == train.DISTRIBUTED_STEPS
    assert {"ddp", "fsdp"} == {strategy for strategy, _, _ in train.DISTRIBUTED_CASES.values()}
    for name in train.DISTRIBUTED_CASES:
        assert result.extra[f"{name} samples/s"] > 0
        assert 0 < result.extra[f"{name} peak RSS GiB per process"] < 8


def test_unknown_config_is_named():
    with pytest.raises(ValueError, match="config: expected one of"):
        train.unet_config("huge")

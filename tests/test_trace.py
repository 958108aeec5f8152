"""The divergence tracer: ours against diffusers on identical weights, clean and with planted faults.

A fault planted in a copy of our model (one weight perturbed, one norm epsilon changed) must be reported
at the module that holds it: the first pair above the tolerance in the order the modules finish.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from kandinsky.cli import main
from kandinsky.export import input_names, sample_inputs
from kandinsky.models import config_from_dict, model_class
from kandinsky.parity.trace import diffusers_reference, trace
from kandinsky.testing import randomize_

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parent.parent


def tiny(component: str) -> torch.nn.Module:
    name = "unet" if component == "unet_inpaint" else component
    values = json.loads((ROOT / "configs" / f"{name}_tiny.json").read_text())
    if component == "unet_inpaint":
        values["in_channels"] = 9
    return randomize_(model_class(component)(config_from_dict(component, values)), 0).eval()


def inputs(target: str, model: torch.nn.Module, **size) -> dict:
    return dict(zip(input_names(target, model.config), sample_inputs(target, model.config, seed=3, **size)))


@pytest.mark.parametrize("component, target", [("unet", "unet"), ("unet_inpaint", "unet_inpaint"), ("prior", "prior"),
                                               ("movq", "movq_decode"), ("movq", "movq_encode")])
def test_identical_weights_trace_clean(component, target):
    ours = tiny(component)
    report = trace(ours, diffusers_reference(component, ours), inputs(target, ours))
    assert report.first is None, str(report)
    compared = [row for row in report.rows if not row.note]
    # float32, same operations in another order: measured at most 2.6e-6 relative (inpainting UNet), 0 (prior)
    assert max(row.max_rel for row in compared) < 1e-5
    assert compared[-1].ours == "" or target.startswith("movq")  # the whole model is the last pair
    assert len(compared) > 20


def test_perturbed_weight_is_located_at_its_layer():
    ours = tiny("unet")
    reference = diffusers_reference("unet", ours)
    broken = copy.deepcopy(ours)
    with torch.no_grad():
        broken.up_blocks[2].res.conv1.weight[0, 0, 1, 1] += 0.05
    report = trace(broken, reference, inputs("unet", ours, height=8, width=8))
    assert report.first.ours == "up_blocks.2.res.conv1"
    assert report.first.reference == "up_blocks.0.resnets.2.conv1"  # diffusers' numbering of the same layer
    assert "first divergence: ours up_blocks.2.res.conv1" in str(report)


def test_changed_norm_epsilon_is_located_at_the_norm():
    ours = tiny("unet")
    reference = diffusers_reference("unet", ours)
    broken = copy.deepcopy(ours)
    broken.down_blocks[3].res.norm2.eps = 1e-2  # was 1e-5
    report = trace(broken, reference, inputs("unet", ours, height=8, width=8))
    assert report.first.ours == "down_blocks.3.res.norm2"
    assert report.first.max_rel > 1e-2  # measured 4.9e-2: far above float32 noise (~1e-6)


def test_prior_faults_are_located_at_their_block():
    ours = tiny("prior")
    reference = diffusers_reference("prior", ours)
    broken = copy.deepcopy(ours)
    broken.blocks[1].norm2.eps = 1e-1
    assert trace(broken, reference, inputs("prior", ours)).first.ours == "blocks.1.norm2"
    broken = copy.deepcopy(ours)
    with torch.no_grad():
        broken.blocks[0].mlp.fc2.bias[3] += 0.1
    assert trace(broken, reference, inputs("prior", ours)).first.ours == "blocks.0.mlp.fc2"


def test_movq_faults_are_located_in_their_block():
    """MoVQ's residual-block norms apply the SiLU inside (diffusers' do not): they have no counterpart, and
    a fault there shows at the next layer of the same block."""
    ours = tiny("movq")
    reference = diffusers_reference("movq", ours)
    broken = copy.deepcopy(ours)
    broken.decoder.levels[1].blocks[0].norm2.norm.eps = 1e-1  # a spatial norm's GroupNorm (was 1e-6)
    first = trace(broken, reference, inputs("movq_decode", ours)).first
    assert first.ours == "decoder.levels.1.blocks.0.conv2"
    broken = copy.deepcopy(ours)
    with torch.no_grad():
        broken.encoder.levels[3].attentions[0].qkv.weight[5, 2] += 0.2
    first = trace(broken, reference, inputs("movq_encode", ours)).first
    assert first.ours == "encoder.levels.3.attentions.0.proj"


def test_trace_against_our_own_model_and_optimized_modules():
    """Another of our models is a reference with the same module paths; ops-optimized modules are traced plain."""
    from kandinsky import ops

    ours = tiny("prior")
    reference = copy.deepcopy(ours)
    ops.optimize(ours, "cpu", torch.float32)
    report = trace(ours, reference, inputs("prior", reference))
    assert report.first is None and all(row.max_abs == 0 for row in report.rows)
    assert report.rows[-1].ours == "" and len(report.rows) > 20


def test_bad_arguments():
    ours = tiny("prior")
    with pytest.raises(ValueError, match="inputs: expected a dict"):
        trace(ours, ours, [torch.zeros(1)])
    with pytest.raises(ValueError, match="tolerance"):
        trace(ours, ours, inputs("prior", ours), tolerance=0)
    with pytest.raises(ValueError, match="ours: expected our MoVQ, Prior or UNet"):
        trace(torch.nn.Linear(2, 2), ours, {})


def test_cli_trace(capsys):
    args = ["parity", "trace", "unet", "--random", "--config", str(ROOT / "configs" / "unet_tiny.json"),
            "--height", "8", "--width", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "unet: ours vs diffusers UNet2DConditionModel" in out and "pairs within 1e-04" in out
    assert main(args + ["--tolerance", "1e-9"]) == 1  # float32 noise is above 1e-9: a divergence, exit 1
    assert "first divergence" in capsys.readouterr().out
    assert main(["parity", "trace", "prior", "--weights", str(ROOT / "no-such-folder")]) == 1
    assert capsys.readouterr().err.startswith("kandinsky: error: ")


def test_22_unets_trace_clean_and_a_hint_encoder_fault_is_located(capsys):
    """Kandinsky 2.2's UNets (no text; the ControlNet's hint) from the command line, --model 2.2 with the tiny 2.2
    config; a fault planted in the ControlNet's hint encoder is reported there."""
    config = str(ROOT / "configs" / "unet_22_tiny.json")
    for component in ("unet", "unet_controlnet"):
        assert main(["parity", "trace", component, "--model", "2.2", "--random", "--config", config, "--height", "8",
                     "--width", "8"]) == 0
        out = capsys.readouterr().out
        assert f"{component}: ours vs diffusers UNet2DConditionModel" in out and "pairs within 1e-04" in out
    assert "hint_encoder" in out
    assert main(["parity", "trace", "unet", "--model", "2.2", "--random", "--config",
                 str(ROOT / "configs" / "unet_tiny.json")]) == 1
    assert "--config: " in capsys.readouterr().err  # a 2.1 config for --model 2.2: one line
    values = json.loads(Path(config).read_text())
    ours = randomize_(model_class("unet")(config_from_dict("unet", {**values, "in_channels": 8,
                                                                     "conditioning": "image_hint"})), 0).eval()
    reference = diffusers_reference("unet", ours)
    broken = copy.deepcopy(ours)
    with torch.no_grad():
        broken.hint_encoder[4].bias[2] += 0.5
    report = trace(broken, reference, inputs("unet_controlnet", ours, height=8, width=8))
    assert report.first.ours == "hint_encoder.4", str(report)

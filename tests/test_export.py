"""Compiled exports (kandinsky.export): torch.export programs and ONNX graphs against eager.

Default tier: small configs, every target, checked at two input shapes other than the traced one (batch
and latent size are dynamic), the ONNX graphs with onnxruntime; Kandinsky 2.2's UNets (no text; the ControlNet
UNet with its hint) at a one-level config, the cheapest to export. Slow tier: the official configurations
with random weights, float32, within 1e-4 relative.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from kandinsky.cli import main
from kandinsky.export import TARGETS, export_program, input_names, sample_inputs, save_onnx, save_program
from kandinsky.models.movq import MoVQ, MoVQConfig
from kandinsky.models.prior import Prior, PriorConfig
from kandinsky.models.unet import UNet, UNetConfig
from kandinsky.testing import randomize_

onnxruntime = pytest.importorskip("onnxruntime")

# the smallest configurations with every kind of block (attention, resampling, skip convs)
SMALL = {
    "movq": MoVQConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), n_embed=12),
    "prior": PriorConfig(width=24, layers=2, heads=2, clip_dim=24, text_width=24),
    "unet": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                       head_channels=8, context_dim=24, text_hidden_dim=32, text_embed_dim=24, image_embed_dim=24),
}
CLASSES = {"movq": MoVQ, "prior": Prior, "unet": UNet, "unet_inpaint": UNet, "unet_controlnet": UNet}
TARGETS_21 = [target for target in TARGETS if target != "unet_controlnet"]
# Kandinsky 2.2's UNets at one level (attention, no resampling): the cheapest graphs to export with these layers
SMALL_22 = UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,), head_channels=8,
                      context_dim=24, image_embed_dim=40, num_image_tokens=4, conditioning="image")
CONTROLNET_22 = dataclasses.replace(SMALL_22, in_channels=8, conditioning="image_hint")
OFFICIAL_22 = UNetConfig(conditioning="image", image_embed_dim=1280, num_image_tokens=32)


def model(target: str, official: bool = False) -> torch.nn.Module:
    component = TARGETS[target].component
    if component == "unet_inpaint":
        base = UNetConfig() if official else SMALL["unet"]
        config = UNetConfig(**{**base.__dict__, "in_channels": 9})
    elif component == "unet_controlnet":
        config = dataclasses.replace(OFFICIAL_22 if official else SMALL_22, in_channels=8, conditioning="image_hint")
    else:
        config = type(SMALL[component])() if official else SMALL[component]
    return randomize_(CLASSES[component](config), 0).eval()


def shapes(target: str, config) -> list[dict]:
    """Inputs other than the traced (batch 2, 2 x 3 blocks): batch 1 and 3, other sizes."""
    scale = config.downsample_factor if target == "movq_encode" else 1
    return [dict(batch=1, height=4 * scale, width=2 * scale), dict(batch=3, height=2 * scale, width=5 * scale)] \
        if target.startswith("movq") else [dict(batch=1), dict(batch=3)] if target == "prior" else \
        [dict(batch=1, height=4 * config.size_multiple, width=2 * config.size_multiple),
         dict(batch=3, height=2 * config.size_multiple, width=5 * config.size_multiple)]


def relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())


@pytest.mark.parametrize("target", TARGETS_21)
def test_program_matches_eager(target, tmp_path):
    module = model(target)
    wrapped = TARGETS[target].wrapper(module).eval()
    program = torch.export.load(str(save_program(export_program(target, module), tmp_path / f"{target}.pt2")))
    for size in shapes(target, module.config):
        inputs = sample_inputs(target, module.config, seed=7, **size)
        with torch.no_grad():
            eager, exported = wrapped(*inputs), program.module()(*inputs)
        assert exported.shape == eager.shape
        assert relative(exported, eager) < 1e-6  # the same kernels: measured 0


@pytest.mark.parametrize("target", TARGETS_21)
def test_onnx_matches_eager(target, tmp_path):
    module = model(target)
    path = save_onnx(target, module, tmp_path / f"{target}.onnx")
    assert len(list(tmp_path.glob(f"{path.name}.*.data"))) == 1  # the weights, as external data
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = input_names(target, module.config)
    assert [i.name for i in session.get_inputs()] == list(names)
    assert session.get_inputs()[0].shape[0] == "batch"
    wrapped = TARGETS[target].wrapper(module).eval()
    for size in shapes(target, module.config):
        inputs = sample_inputs(target, module.config, seed=7, **size)
        with torch.no_grad():
            eager = wrapped(*inputs)
        (onnx,) = session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})
        # float32, onnxruntime's kernels: measured 2e-7 (prior) to 1.7e-6 (MoVQ decoder)
        assert onnx.shape == tuple(eager.shape) and relative(torch.from_numpy(onnx), eager) < 2e-5


def test_optimized_modules_are_exported_plain():
    from kandinsky import ops

    module = ops.optimize(model("movq_decode"), "cpu", torch.float32)
    program = export_program("movq_decode", module)
    inputs = sample_inputs("movq_decode", module.config, batch=3, height=3, width=5)
    with torch.no_grad():
        assert relative(program.module()(*inputs), module.decode(*inputs)) < 1e-6
    assert not any(isinstance(m, ops.generic.FastModule) for m in module.modules())


def test_an_onnx_graph_and_its_weights_are_one_output(tmp_path, monkeypatch):
    module, path = model("prior"), tmp_path / "m.onnx"  # the quickest target to export
    (tmp_path / "m.onnx.data").write_bytes(b"precious")  # the weights file alone: still an existing output
    with pytest.raises(FileExistsError, match="m.onnx.data"):
        save_onnx("prior", module, path)
    assert (tmp_path / "m.onnx.data").read_bytes() == b"precious" and not path.exists()
    save_onnx("prior", module, path, overwrite=True)
    first = sorted(tmp_path.glob("m.onnx*"))
    assert len(first) == 2 and not (tmp_path / "m.onnx.data").exists()  # the graph and its one weights file
    # killed after the new weights are in place but before the graph is: the old pair still loads
    import kandinsky.export as export_module

    real_replace = os.replace

    def killed(source, target):
        if Path(target) == path:
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(export_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_onnx("prior", module, path, overwrite=True)
    monkeypatch.setattr(export_module.os, "replace", real_replace)
    onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # the old graph and its weights
    save_onnx("prior", module, path, overwrite=True)
    assert len(list(tmp_path.glob("m.onnx*.data"))) == 1  # stale weights files removed once the graph switched
    onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="target: expected one of"):
        export_program("vae", model("prior"))
    with pytest.raises(ValueError, match="model: expected our prior model"):
        export_program("prior", torch.nn.Linear(2, 2))
    (tmp_path / "x.pt2").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_program(export_program("prior", model("prior")), tmp_path / "x.pt2")
    assert (tmp_path / "x.pt2").read_bytes() == b"precious"


def test_22_unet_program_matches_eager(tmp_path):
    """Kandinsky 2.2's UNet reads the image embedding only: inputs x, timesteps, image_embeds."""
    module = randomize_(UNet(SMALL_22), 0).eval()
    assert input_names("unet", module.config) == ("x", "timesteps", "image_embeds")
    program = torch.export.load(str(save_program(export_program("unet", module), tmp_path / "unet22.pt2")))
    for size in shapes("unet", module.config):
        inputs = sample_inputs("unet", module.config, seed=7, **size)
        assert [tuple(x.shape) for x in inputs][2] == (size["batch"], 40)
        with torch.no_grad():
            eager, exported = module(inputs[0], inputs[1], image_embeds=inputs[2]), program.module()(*inputs)
        assert exported.shape == eager.shape and relative(exported, eager) < 1e-6  # the same kernels: measured 0


def test_cli_exports_the_22_controlnet_unet_to_onnx(tmp_path, capsys):
    """``kandinsky export unet_controlnet`` of a converted ControlNet UNet: an ONNX graph with a hint input at 8x
    the latent size, dynamic, within float rounding of eager in onnxruntime."""
    from kandinsky.weights import save_converted

    module = randomize_(UNet(CONTROLNET_22), 0).eval()
    save_converted(module, "unet_controlnet", tmp_path / "controlnet")
    output = tmp_path / "controlnet.onnx"
    assert main(["export", "unet_controlnet", "--weights", str(tmp_path / "controlnet"), "-o", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("x", ["batch", 4, "height", "width"]), ("timesteps", ["batch"]), ("image_embeds", ["batch", 40]),
        ("hint", ["batch", 3, "8*height", "8*width"])]
    for size in [dict(batch=1, height=4, width=2), dict(batch=3, height=2, width=5)]:
        inputs = sample_inputs("unet_controlnet", module.config, seed=7, **size)
        assert tuple(inputs[3].shape) == (size["batch"], 3, 8 * size["height"], 8 * size["width"])
        with torch.no_grad():
            eager = module(inputs[0], inputs[1], image_embeds=inputs[2], hint=inputs[3])
        (onnx,) = session.run(None, {name: x.numpy() for name, x in zip(input_names("unet_controlnet", module.config),
                                                                         inputs)})
        # float32, onnxruntime's kernels (and the folder's channels-last weights): measured 1.4e-6
        assert onnx.shape == tuple(eager.shape) and relative(torch.from_numpy(onnx), eager) < 2e-5


def test_22_targets_and_the_store_of_a_22_pipeline(tmp_path, capsys, monkeypatch):
    """The unet targets take the UNets they name (the ControlNet target the hint UNet, the others not); export of a
    2.2 store (--model 2.2, or detected) hands over its UNet; a 2.1 store has no ControlNet, one line."""
    import kandinsky.export as export_module
    from kandinsky import tiny

    with pytest.raises(ValueError, match=r"model: the unet_controlnet target takes a ControlNet UNet \(conditioning "
                                         r"image_hint\), got a UNet with conditioning 'image'"):
        export_program("unet_controlnet", randomize_(UNet(SMALL_22), 0))
    with pytest.raises(ValueError, match=r"model: the unet target takes a UNet without a hint .*'image_hint'"):
        export_program("unet", randomize_(UNet(CONTROLNET_22), 0))
    exported = []
    monkeypatch.setattr(export_module, "export", lambda target, model, path, **kw: exported.append(model) or path)
    for target, component in (("unet_controlnet", "unet_controlnet"), ("unet", "unet")):
        assert main(["export", target, "--weights", "tiny", "--model", "2.2", "-o", str(tmp_path / "x.onnx")]) == 0
        assert exported[-1].config == tiny.CONFIGS_22[component]
    capsys.readouterr()
    assert main(["export", "unet_controlnet", "--weights", "tiny", "-o", str(tmp_path / "x.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "unet_controlnet: Kandinsky 2.2's ControlNet UNet; tiny are 2.1" in error


def test_cli_export(tmp_path, capsys):
    from kandinsky.weights import save_converted

    module = model("movq_encode")
    save_converted(module, "movq", tmp_path / "movq")
    output = tmp_path / "encode.pt2"
    assert main(["export", "movq_encode", "--weights", str(tmp_path / "movq"), "-o", str(output)]) == 0
    inputs = sample_inputs("movq_encode", module.config, batch=1, height=8, width=4)
    with torch.no_grad():
        # the converted folder's kernels are channels-last, the exported ones plain: measured 1.8e-6
        assert relative(torch.export.load(str(output)).module()(*inputs), module.encode(*inputs)) < 1e-5
    capsys.readouterr()
    assert main(["export", "movq_encode", "--weights", str(tmp_path / "movq"), "-o", str(output)]) == 1
    assert main(["export", "prior", "--weights", str(tmp_path / "movq"), "-o", str(tmp_path / "p.onnx")]) == 1
    assert main(["export", "prior", "--weights", str(tmp_path / "movq"), "-o", str(tmp_path / "p.bin")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("kandinsky: error: ") for line in errors)
    assert "--overwrite" in errors[0] and "holds a movq" in errors[1] and "--format" in errors[2]


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_official_size_exports_match_eager(target, tmp_path):
    """The official configurations (random weights, float32; unet_controlnet: Kandinsky 2.2's): the program and the
    ONNX graph within 1e-4 relative of eager, at a 64 x 64 latent (a 512 px image; MoVQ encode: a 512 px image) and
    batch 2."""
    module = model(target, official=True)
    wrapped = TARGETS[target].wrapper(module).eval()
    size = {} if target == "prior" else dict(height=512, width=512) if target == "movq_encode" else \
        dict(height=64, width=64)
    inputs = sample_inputs(target, module.config, batch=2, seed=7, **size)
    with torch.no_grad():
        eager = wrapped(*inputs)
        program = export_program(target, module)
        assert relative(program.module()(*inputs), eager) < 1e-4
    del program
    path = save_onnx(target, module, tmp_path / f"{target}.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx,) = session.run(None, {name: x.numpy() for name, x in zip(input_names(target, module.config), inputs)})
    assert relative(torch.from_numpy(onnx), eager) < 1e-4

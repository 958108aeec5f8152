"""The decoder UNet (text-to-image and inpainting): original fixtures, diffusers UNet2DConditionModel,
converters against the full-size key manifests, bf16, bad input."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kandinsky import ops
from kandinsky.convert import from_diffusers, from_original
from kandinsky.convert import unet as convert_unet
from kandinsky.convert.core import Source
from kandinsky.models import config_from_dict
from kandinsky.models.unet import UNet, UNetConfig
from kandinsky.ops.cpu import winograd43_conv3x3, winograd_conv3x3
from kandinsky.parity.unet import (CONFIGS_22, TOLERANCE_DIFFUSERS, TOLERANCE_ORIGINAL, diffusers_config,
                                   diffusers_unet, inputs, original_fixture_output, run_diffusers, run_ours)
from kandinsky.testing import diffusers_reference_config, max_errors, randomize_
from kandinsky.weights import load_converted, save_converted

ROOT = Path(__file__).resolve().parent.parent
TINY = config_from_dict("unet", json.loads((ROOT / "configs" / "unet_tiny.json").read_text()))
TINY_INPAINT = config_from_dict("unet_inpaint", {**json.loads((ROOT / "configs" / "unet_tiny.json").read_text()),
                                                 "in_channels": 9})


def _tiny(config: UNetConfig = TINY, seed: int = 0) -> UNet:
    return randomize_(UNet(config), seed).eval()


def test_configs_are_the_defaults_and_official():
    assert config_from_dict("unet", json.loads((ROOT / "configs" / "unet.json").read_text())) == UNetConfig()
    inpaint = config_from_dict("unet_inpaint", json.loads((ROOT / "configs" / "unet_inpaint.json").read_text()))
    assert inpaint == UNetConfig(in_channels=9)
    for component, config in (("unet", UNetConfig()), ("unet_inpaint", inpaint)):
        official = convert_unet._config_from_original(component, convert_unet.OFFICIAL_ORIGINAL_CONFIGS[component])
        assert official == config
    for name, config in (("kandinsky-2-1", UNetConfig()), ("kandinsky-2-1-inpaint", inpaint)):
        real = diffusers_reference_config(f"{name}.unet.config.json")  # the official repositories' configs
        assert convert_unet._config_from_diffusers("unet" if config.in_channels == 4 else "unet_inpaint", real) == config
        real = {k: v for k, v in real.items() if v is not None and not k.startswith("_")}
        ours = diffusers_config(config)
        assert ours == {k: real[k] for k in ours}


@pytest.mark.parametrize("name", ["unet", "unet_inpaint"])
def test_original_fixture_forward(original_fixture, name):
    ours, reference = original_fixture_output(name)
    _, meta = original_fixture(name)
    abs_err, rel_err = max_errors(ours, reference)
    # float32, same math in another order; the fixture's own thread-count rerun moves it by ~1.8e-6 abs
    # for an output of max |2.7|, i.e. ~7e-7 relative: 1e-5 relative is ~15x that noise floor
    assert rel_err < TOLERANCE_ORIGINAL, (abs_err, rel_err)
    assert abs_err < meta["tolerance_hint"]["suggested_atol"]
    # the bounds mean something: the original's output is O(1) and varies (measured max 2.7, std 0.56)
    assert float(reference.abs().max()) > 1 and float(reference.std()) > 0.1


@pytest.mark.parametrize("config", [TINY, TINY_INPAINT], ids=["text2img", "inpaint"])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("path", ["plain", "optimized", "winograd", "winograd43"])
def test_matches_diffusers_tiny(monkeypatch, config, size, path):
    """The plain model, and the model as the pipeline runs it on CPU (``ops.optimize``), with each of the
    full-size model's Winograd convolutions forced on the tiny one."""
    winograd = []
    if path == "winograd":  # F(2x2, 3x3): >= 256 channels at 32x32 and up (maps whose sides are not multiples of 4)
        monkeypatch.setattr(ops.cpu, "WINOGRAD_MIN_CHANNELS", 1)
        monkeypatch.setattr(ops.cpu, "WINOGRAD43_MIN_CHANNELS", 10**6)
        monkeypatch.setattr(ops.cpu, "winograd_conv3x3", lambda *a, **k: winograd.append(1) or winograd_conv3x3(*a, **k))
    if path == "winograd43":  # F(4x4, 3x3): >= 128 channels at 24x24 and up, sides multiples of 4
        monkeypatch.setattr(ops.cpu, "WINOGRAD43_MIN_CHANNELS", 1)
        monkeypatch.setattr(ops.cpu, "winograd43_conv3x3", lambda *a, **k: winograd.append(1) or winograd43_conv3x3(*a, **k))
    theirs, ours = diffusers_unet(config, seed=3)
    if path != "plain":
        ops.optimize(ours, "cpu", torch.float32)
    batch = inputs(config, height=size[0], width=size[1])
    with torch.no_grad():
        out, reference = run_ours(ours, batch), run_diffusers(theirs, batch)
    # each path needs maps of a minimum size at the first level: F(2x2, 3x3) 32x32 (not 24x40), F(4x4, 3x3) 24x24
    minimum = {"winograd": ops.cpu.WINOGRAD_MIN_PIXELS, "winograd43": ops.cpu.WINOGRAD43_MIN_PIXELS}.get(path)
    assert bool(winograd) == (minimum is not None and size[0] * size[1] >= minimum)
    abs_err, rel_err = max_errors(out, reference)
    assert rel_err < TOLERANCE_DIFFUSERS, (abs_err, rel_err)  # float32 both sides: summation order only
    assert reference.abs().max() > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("config", [UNetConfig(), UNetConfig(in_channels=9)], ids=["text2img", "inpaint"])
def test_matches_diffusers_full_size(config):
    """~4.9 GB of float32 weights, shared between diffusers' model and ours (only the fused attention
    projections are new): run under `flock /tmp/kandinsky-heavy.lock pytest -m slow`."""
    theirs, ours = diffusers_unet(config, seed=0)
    for height, width in ((32, 32), (24, 40)):
        batch = inputs(config, height=height, width=width)
        with torch.no_grad():
            out, reference = run_ours(ours, batch), run_diffusers(theirs, batch)
        abs_err, rel_err = max_errors(out, reference)
        assert rel_err < TOLERANCE_DIFFUSERS, (height, width, abs_err, rel_err)


def _manifest(component: str) -> dict:
    return json.loads((ROOT / "tests" / "fixtures" / "original" / f"manifest_{component}.json").read_text())


def _check_coverage(component: str, convert, config: dict, shapes: dict[str, tuple[int, ...]], total: int) -> None:
    """Convert a state dict of meta tensors and check what ``build_strict`` checks, without allocating:
    every source key consumed, none missing, our keys exactly filled with the right shapes."""
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    source = Source(state, "test")
    our_config, converted = convert(component, config, source)
    with torch.device("meta"):
        module = UNet(our_config)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert source.unused() == [] and source.missing == []
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert sum(v.numel() for v in module.parameters()) == total


@pytest.mark.parametrize("component", ["unet", "unet_inpaint"])
def test_original_converter_covers_the_official_checkpoint(component):
    """The official checkpoints are 1.2 B parameters: the manifest (every key and shape of
    decoder_fp16.ckpt / inpainting_fp16.ckpt) is converted as meta tensors, which checks the key map and
    every shape without allocating ~4.9 GB; the numerics of the same code path are checked on the fixtures."""
    manifest = _manifest(component)
    shapes = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
    _check_coverage(component, convert_unet.original, convert_unet.OFFICIAL_ORIGINAL_CONFIGS[component],
                    shapes, manifest["total_parameter_count"])


@pytest.mark.parametrize("in_channels", [4, 9])
def test_diffusers_converter_covers_the_official_model(in_channels):
    from diffusers import UNet2DConditionModel

    component = "unet" if in_channels == 4 else "unet_inpaint"
    config = diffusers_config(UNetConfig(in_channels=in_channels))
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    total = _manifest(component)["total_parameter_count"]
    assert sum(p.numel() for p in theirs.parameters()) == total  # same model as the original checkpoint
    _check_coverage(component, convert_unet.diffusers, config, shapes, total)


def test_converter_reports_missing_and_unknown_keys(original_fixture):
    tensors, meta = original_fixture("unet")
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    state.pop("middle_block.1.qkv.bias")
    state["input_blocks.1.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        from_original("unet", meta["original_config"], state)
    assert "middle_block.1.qkv.bias" in str(info.value) and "input_blocks.1.0.extra.weight" in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"version": "2.0"}, "version"),
    ({"inpainting": True}, "inpainting"),
    ({"pooling_type": "attention_pooling"}, "pooling_type"),
    ({"resblock_updown": False}, "resblock_updown"),
])
def test_converter_rejects_other_architectures(original_fixture, change, message):
    tensors, meta = original_fixture("unet")
    with pytest.raises(ValueError, match=message):
        from_original("unet", {**meta["original_config"], **change}, {})


def test_inpainting_config_from_original_means_nine_channels():
    config = convert_unet._config_from_original("unet_inpaint", convert_unet.OFFICIAL_ORIGINAL_CONFIGS["unet_inpaint"])
    assert config.in_channels == 9  # original: in_channels 4 with inpainting=True -> 2*4+1


def test_no_conditioning_cache_and_contiguous_output():
    unet = _tiny()
    a, b = inputs(TINY, seed=1), inputs(TINY, seed=2)
    b["x"], b["timesteps"] = a["x"], a["timesteps"]
    with torch.no_grad():
        first, other, again = run_ours(unet, a), run_ours(unet, b), run_ours(unet, a)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)  # the second call's conditioning was used
    assert first.is_contiguous() and first.shape == (2, 8, 32, 32)


def test_scalar_timestep_broadcasts():
    unet = _tiny()
    batch = inputs(TINY)
    with torch.no_grad():
        out = run_ours(unet, {**batch, "timesteps": torch.tensor(500)})
        ref = run_ours(unet, {**batch, "timesteps": torch.tensor([500, 500])})
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_bfloat16_close_to_float32():
    unet = _tiny()
    batch = inputs(TINY)
    with torch.no_grad():
        reference = run_ours(unet, batch)
        unet = unet.to(torch.bfloat16)
        out = run_ours(unet, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    _, rel_err = max_errors(out.float(), reference)
    # bf16 keeps 8 significant bits (~4e-3 relative per rounding); weights, inputs and every activation are
    # rounded through ~20 residual blocks, which gives a few 1e-2 of the output scale; a wrong layer gives O(1)
    assert rel_err < 5e-2, rel_err


@pytest.mark.parametrize("change, message", [
    ({"x": torch.randn(2, 9, 32, 32)}, r"x: expected a \(B, 4, h, w\)"),
    ({"x": torch.randn(2, 4, 30, 32)}, r"x: latent height and width must be multiples of 4, got 30x32"),
    ({"x": torch.randn(4, 32, 32)}, r"x: expected a \(B, 4, h, w\)"),
    ({"text_hidden_states": torch.randn(3, 77, 32)}, r"text_hidden_states: expected shape \(B=2, L, 32\).*\(3, 77, 32\)"),
    ({"text_hidden_states": torch.randn(2, 77, 1024)}, r"text_hidden_states: .*\(2, 77, 1024\)"),
    ({"text_embeds": torch.randn(1, 32)}, r"text_embeds: expected shape \(B=2, 32\)"),
    ({"image_embeds": torch.randn(2, 768)}, r"image_embeds: expected shape \(B=2, 32\).*\(2, 768\)"),
    ({"image_embeds": None}, r"image_embeds: expected a tensor"),
    ({"timesteps": torch.tensor([1, 2, 3])}, r"timesteps: expected a scalar or shape \(2,\), got \(3,\)"),
])
def test_bad_input(change, message):
    unet = _tiny()
    with pytest.raises(ValueError, match=message), torch.no_grad():
        run_ours(unet, {**inputs(TINY), **change})


def test_inpainting_checks_channels():
    unet = _tiny(TINY_INPAINT)
    with pytest.raises(ValueError, match=r"x: expected a \(B, 9, h, w\).*\(2, 4, 32, 32\)"), torch.no_grad():
        run_ours(unet, inputs(TINY))


def test_converted_weights_hold_the_state_dict_whatever_the_kernels_memory_format(tmp_path):
    """A converted file holds the kernels in the model's own (O, I, kh, kw) layout, whatever the memory format of
    the model it was saved from (here all channels-last, as ``ops.optimize`` leaves them for a GPU); reloaded
    and optimized for the CPU, the model gives the same output as the original optimized for the CPU."""
    theirs, ours = diffusers_unet(TINY, seed=4)
    ops.optimize(ours, "cuda", torch.float32)  # (only the swaps and layouts: nothing is moved)
    kernels = [v for v in ours.state_dict().values() if v.ndim == 4]
    assert kernels and all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)
    save_converted(ours, "unet", tmp_path / "unet")
    fresh = load_converted(tmp_path / "unet")
    assert all(v.is_contiguous() for v in fresh.state_dict().values())
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    ops.optimize(fresh, "cpu", torch.float32)
    ops.optimize(ours, "cpu", torch.float32)
    batch = inputs(TINY)
    # ours keeps its channels-last kernels, fresh the file's contiguous ones: the same products summed in another
    # order (the GEMM path's columns), so float32 rounding apart (measured 3.8e-6 on outputs up to 3.0)
    with torch.no_grad():
        torch.testing.assert_close(run_ours(fresh, batch), run_ours(ours, batch), rtol=1e-5, atol=1e-5)


def test_converters_name_missing_config_keys(original_fixture):
    _, meta = original_fixture("unet")
    config = {k: v for k, v in meta["original_config"].items() if k != "model_dim"}
    with pytest.raises(ValueError, match=r"original UNet config lacks \['model_dim'\]"):
        from_original("unet", config, {})
    with pytest.raises(ValueError, match=r"diffusers UNet config lacks \['encoder_hid_dim'\]"):
        from_diffusers("unet", {k: v for k, v in diffusers_config(TINY).items() if k != "encoder_hid_dim"}, {})


# ------------------------------------------------------------------------------------------------ Kandinsky 2.2

TINY_22 = config_from_dict("unet", json.loads((ROOT / "configs" / "unet_22_tiny.json").read_text()))
VARIANTS_22 = {"image": TINY_22, "inpaint": dataclasses.replace(TINY_22, in_channels=9),
               "controlnet": dataclasses.replace(TINY_22, in_channels=8, conditioning="image_hint")}


def _inputs_22(config: UNetConfig, batch: int = 2, height: int = 32, width: int = 32, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    values = {"x": torch.randn(batch, config.x_channels, height, width, generator=generator),
              "timesteps": torch.randint(0, 1000, (batch,), generator=generator),
              "image_embeds": torch.randn(batch, config.image_embed_dim, generator=generator)}
    if config.has_hint:
        values["hint"] = torch.rand(batch, 3, 8 * height, 8 * width, generator=generator)
    return values


def _run_22(unet, batch: dict) -> torch.Tensor:
    return unet(batch["x"], batch["timesteps"], image_embeds=batch["image_embeds"], hint=batch.get("hint"))


def _diffusers_22(config: UNetConfig, seed: int):
    """(diffusers' UNet2DConditionModel with seeded random weights, ours converted from it) for a 2.2 config."""
    from diffusers import UNet2DConditionModel

    dconfig = diffusers_config(config)
    theirs = randomize_(UNet2DConditionModel(**dconfig), seed).eval()
    ours = from_diffusers("unet_inpaint" if config.in_channels == 9 else "unet", dconfig, theirs.state_dict())
    return theirs, ours


def test_22_configs_are_the_official_ones():
    official = UNetConfig(conditioning="image", image_embed_dim=1280, num_image_tokens=32)
    for name, config in (("unet_22", official), ("unet_22_inpaint", dataclasses.replace(official, in_channels=9)),
                         ("unet_22_controlnet", dataclasses.replace(official, in_channels=8, conditioning="image_hint"))):
        assert config_from_dict("unet", json.loads((ROOT / "configs" / f"{name}.json").read_text())) == config
    # the kandinsky-community/kandinsky-2-2-decoder unet/config.json, where it differs from 2.1's
    config = diffusers_config(official)
    assert (config["encoder_hid_dim_type"], config["addition_embed_type"], config["encoder_hid_dim"],
            config["cross_attention_dim"], config["in_channels"]) == ("image_proj", "image", 1280, 768, 4)
    assert diffusers_config(dataclasses.replace(official, in_channels=8, conditioning="image_hint"))[
        "addition_embed_type"] == "image_hint"


@pytest.mark.parametrize("variant", VARIANTS_22)
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("optimized", [False, True], ids=["plain", "optimized"])
def test_22_matches_diffusers_tiny(variant, size, optimized):
    """Kandinsky 2.2's image-conditioned UNets (text-to-image, inpainting, ControlNet with a hint) against
    diffusers' (``encoder_hid_dim_type="image_proj"``, ``addition_embed_type="image"`` / ``"image_hint"``)."""
    config = VARIANTS_22[variant]
    theirs, ours = _diffusers_22(config, seed=3)
    if optimized:
        ops.optimize(ours, "cpu", torch.float32)
    batch = _inputs_22(config, height=size[0], width=size[1])
    added = {"image_embeds": batch["image_embeds"], **({"hint": batch["hint"]} if "hint" in batch else {})}
    with torch.no_grad():
        out = _run_22(ours, batch)
        reference = theirs(batch["x"], batch["timesteps"], encoder_hidden_states=None, added_cond_kwargs=added).sample
    abs_err, rel_err = max_errors(out, reference)
    # float32, summation order only: measured 9e-7..1.5e-6 plain, <= 2.6e-6 optimized
    assert rel_err < 1e-5, (abs_err, rel_err)
    assert reference.abs().max() > 0.5


def test_22_hint_and_image_tokens_matter():
    """Each 2.2 conditioning input moves the output: the image embedding (time embedding and context tokens)
    and, for the ControlNet, the hint."""
    unet = randomize_(UNet(VARIANTS_22["controlnet"]), 0).eval()
    batch = _inputs_22(VARIANTS_22["controlnet"])
    other = _inputs_22(VARIANTS_22["controlnet"], seed=2)
    with torch.no_grad():
        out = _run_22(unet, batch)
        assert not torch.allclose(out, _run_22(unet, {**batch, "hint": other["hint"]}))
        assert not torch.allclose(out, _run_22(unet, {**batch, "image_embeds": other["image_embeds"]}))
    assert [name for name, _ in unet.named_children()][1:6] == ["image_embed_proj", "image_embed_norm",
                                                                "image_to_tokens", "image_tokens_norm", "hint_encoder"]


@pytest.mark.parametrize("variant, change, message", [
    ("image", {"text_embeds": torch.randn(2, 768)}, r"text_embeds: this UNet \(conditioning 'image'\) takes no such"),
    ("image", {"hint": torch.rand(2, 3, 256, 256)}, r"hint: this UNet \(conditioning 'image'\) takes no such input"),
    ("image", {"image_embeds": torch.randn(2, 32)}, r"image_embeds: expected shape \(B=2, 48\)"),
    ("controlnet", {"hint": None}, r"hint: expected a tensor of shape \(2, 3, 256, 256\).*NoneType"),
    ("controlnet", {"hint": torch.rand(2, 3, 128, 128)}, r"hint: .*8x its size.*\(2, 3, 128, 128\)"),
    ("controlnet", {"x": torch.randn(2, 8, 32, 32)}, r"x: expected a \(B, 4, h, w\)"),
])
def test_22_bad_input(variant, change, message):
    config = VARIANTS_22[variant]
    unet = randomize_(UNet(config), 0).eval()
    batch = {**_inputs_22(config), **change}
    with pytest.raises(ValueError, match=message), torch.no_grad():
        unet(batch["x"], batch["timesteps"], image_embeds=batch["image_embeds"], hint=batch.get("hint"),
             text_embeds=batch.get("text_embeds"))


def test_config_refuses_unknown_conditioning_and_a_hint_without_its_channels():
    with pytest.raises(ValueError, match=r"conditioning: expected one of \['text_image', 'image', 'image_hint'\]"):
        UNetConfig(conditioning="text")
    with pytest.raises(ValueError, match="in_channels: with a hint it counts"):
        UNetConfig(conditioning="image_hint", in_channels=4)


@pytest.mark.parametrize("name, component, in_channels, kind", [
    ("decoder", "unet", 4, "image"), ("decoder-inpaint", "unet_inpaint", 9, "image"),
    ("controlnet-depth", "unet", 8, "image_hint")])
def test_diffusers_converter_covers_the_official_22_models(name, component, in_channels, kind):
    """The kandinsky-2-2-{name} UNets, replayed on the meta device (keys and shapes, no allocation): 1.2 B parameters
    as 2.1's, ControlNet-depth's hint encoder on top."""
    from diffusers import UNet2DConditionModel

    official = UNetConfig(conditioning=kind, in_channels=in_channels, image_embed_dim=1280, num_image_tokens=32)
    config = diffusers_config(official)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    total = sum(p.numel() for p in theirs.parameters())
    _check_coverage(component, convert_unet.diffusers, config, shapes, total)
    assert convert_unet._config_from_diffusers(component, config) == official
    assert 1.2e9 < total < 1.3e9


def test_22_has_no_original_layout():
    with pytest.raises(ValueError, match="no original layout"):
        convert_unet.layers("original", TINY_22)
    with pytest.raises(ValueError, match="no original layout"):
        convert_unet.to_original_config("unet", TINY_22)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS_22))
def test_22_matches_diffusers_full_size(name):
    """Kandinsky 2.2's official UNets (configs/unet_22*.json: text-to-image, inpainting, ControlNet with its hint)
    against diffusers' UNet2DConditionModel built from the diffusers config our converter writes for them, with
    the parity report's helpers: 32x32 and 24x40 latents, batch 2, plain and as the pipeline runs it (ops.optimize).
    ~4.9 GB of float32 weights per side: run under `flock /tmp/kandinsky-heavy.lock pytest -m slow`."""
    from kandinsky.parity.unet import diffusers_rows

    file = {"unet": "unet_22", "unet_inpaint": "unet_22_inpaint", "unet_controlnet": "unet_22_controlnet"}[name]
    assert config_from_dict("unet", json.loads((ROOT / "configs" / f"{file}.json").read_text())) == CONFIGS_22[name]
    rows = list(diffusers_rows(name, CONFIGS_22[name], label="2.2 full config"))
    assert len(rows) == 4 and all(row.passed for row in rows), rows
    print("\n".join(f"{row.component} {row.check}: max rel {row.max_rel:.3e}" for row in rows))


def test_22_parity_report_from_the_command_line(monkeypatch, capsys):
    """``kandinsky parity --model 2.2``: the 2.2 prior and the three 2.2 UNets (rows as the slow tier computes them
    at full size, here at the tiny 2.2 configs), and the components 2.2 does not have refused in one line."""
    from kandinsky import parity, tiny
    from kandinsky.parity import prior as prior_parity
    from kandinsky.parity import unet as unet_parity

    monkeypatch.setattr(unet_parity, "CONFIGS_22", {name: tiny.CONFIGS_22[name] for name in CONFIGS_22})
    monkeypatch.setattr(prior_parity, "CONFIG_22", tiny.PRIOR_22)
    monkeypatch.setattr(unet_parity, "SIZES", ((8, 8),))
    monkeypatch.setattr(parity.gc, "collect", lambda: 0)  # what frees full-size models costs seconds here
    assert parity.main(["--model", "2.2"]) == 0
    out = capsys.readouterr().out
    for name in ("prior", "unet", "unet_inpaint", "unet_controlnet"):
        assert f"| {name:<12} | 2.2 " in out, name
    assert "| unet_controlnet | 2.2 full config vs diffusers, 2x8x8, ops.optimize (CPU)" in out
    assert "original fixture" not in out and "9 passed, 0 failed" in out
    with pytest.raises(SystemExit):
        parity.main(["--model", "2.2", "text_encoder"])
    assert "--model 2.2: expected components among ['prior', 'unet', 'movq', 'schedulers']" in capsys.readouterr().err

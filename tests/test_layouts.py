"""Weights out: our pipeline written in the diffusers and original layouts (kandinsky.layouts).

diffusers' own pipelines load the diffusers export offline without a word about missing or unexpected
keys and draw the same images as ours with the same seed, at the tolerances of tests/test_pipeline.py;
both layouts convert back to bit-identical weights (the original one also from float16).
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from kandinsky.cli import main
from kandinsky.convert import foreign_config, from_diffusers, from_original
from kandinsky.layouts import export_component
from kandinsky.pipeline import Kandinsky21
from kandinsky.weights import load_component, load_converted, read_clip_stats, read_state_dict

diffusers = pytest.importorskip("diffusers")
from test_pipeline import EMBED_DIM, SIZE, build_reference, random_image, seed  # noqa: E402
from test_pipeline import seed_example_mask  # noqa: E402

CONVERTED = ("prior", "unet", "unet_inpaint", "movq")


@pytest.fixture(scope="module")
def reference():
    return build_reference()


@pytest.fixture(scope="module")
def ours(reference):
    return Kandinsky21.from_diffusers(reference["prior"], reference["text2img"], inpaint_pipeline=reference["inpaint"],
                                      progress=False)


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "k21-diffusers"
    ours.save_pretrained(folder, layout="diffusers", provenance={"source": "tests", "revision": "r1"})
    return folder


def cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` in ``dtype`` (the pipeline's modules are shared by the tests: never cast in place)."""
    return copy.deepcopy(module).to(dtype)


def assert_same_state(module, expected) -> None:
    ours, theirs = module.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def load_quietly(cls, folder, caplog):
    """``cls.from_pretrained(folder)`` offline; returns it with every log record of diffusers and transformers."""
    with caplog.at_level(logging.INFO):
        caplog.clear()
        pipe = cls.from_pretrained(str(folder), local_files_only=True)
        records = [r.getMessage() for r in caplog.records]
    pipe.set_progress_bar_config(disable=True)
    return pipe, records


@pytest.mark.parametrize("name, cls", [("prior", "KandinskyPriorPipeline"), ("decoder", "KandinskyPipeline"),
                                       ("inpaint", "KandinskyInpaintPipeline")])
def test_diffusers_loads_the_export_offline_with_identical_weights(exported, reference, name, cls, caplog):
    pipe, records = load_quietly(getattr(diffusers, cls), exported / name, caplog)
    words = ("missing", "unexpected", "not used", "newly initialized", "not initialized")
    assert not [r for r in records if any(w in r.lower() for w in words)], records
    source = reference[{"prior": "prior", "decoder": "text2img", "inpaint": "inpaint"}[name]]
    for part, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert_same_state(module, source.components[part])
    info = json.loads((exported / name / "kandinsky21_export.json").read_text())
    assert info["layout"] == "diffusers" and info["source"] == "tests" and info["revision"] == "r1"
    assert info["exported_by"].startswith("kandinsky21 ") and info["dtype"] is None


def test_diffusers_pipelines_from_the_export_draw_our_images(exported, ours, caplog):
    prior, _ = load_quietly(diffusers.KandinskyPriorPipeline, exported / "prior", caplog)
    decoder, _ = load_quietly(diffusers.KandinskyPipeline, exported / "decoder", caplog)
    generator = seed(4)  # one generator through both diffusers pipelines, as our text2img draws
    embeds, negative = prior("the cat", negative_prompt="dark", num_inference_steps=2, generator=generator,
                             return_dict=False)
    theirs = decoder("the cat", embeds, negative, negative_prompt="dark", height=SIZE, width=SIZE,
                     num_inference_steps=2, generator=generator, output_type="np").images
    images = ours.text2img("the cat", negative_prompt="dark", height=SIZE, width=SIZE, num_inference_steps=2,
                           prior_num_inference_steps=2, generator=seed(4), output_type="np")
    assert np.abs(images - theirs).max() < 1e-4  # measured 1.4e-5; test_pipeline.py's text2img tolerance


def test_diffusers_inpaint_pipeline_from_the_export(exported, ours, caplog):
    inpaint, _ = load_quietly(diffusers.KandinskyInpaintPipeline, exported / "inpaint", caplog)
    image, mask = random_image(3), seed_example_mask()
    embeds = torch.randn(1, EMBED_DIM, generator=seed(13))
    negative = torch.randn(1, EMBED_DIM, generator=seed(14))
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="np")
    theirs = inpaint("a hat", image=image, mask_image=mask, image_embeds=embeds, negative_image_embeds=negative,
                     generator=seed(15), **args).images
    images = ours.inpaint("a hat", image, mask, image_embeds=embeds, negative_image_embeds=negative,
                          generator=seed(15), **args)
    assert np.abs(images - theirs).max() < 2e-5  # measured 2.1e-6; as test_pipeline.py's inpainting tests


def test_our_pipeline_reads_the_diffusers_export_back_bit_identical(exported, ours, tmp_path):
    back = Kandinsky21.from_pretrained(str(exported / "decoder"), prior_source=str(exported / "prior"),
                                       inpaint_source=str(exported / "inpaint"), cache_dir=tmp_path, progress=False)
    for name in ("prior", "unet", "unet_inpaint", "movq", "mclip", "clip_text", "clip_vision"):
        assert_same_state(back.module(name), ours.module(name))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_original_export_round_trips(ours, tmp_path, dtype):
    folder = tmp_path / "k21-original"
    ours.save_pretrained(folder, layout="original", **({} if dtype == torch.float16 else {"dtype": dtype}))
    files = {"prior": "prior_fp16.ckpt", "unet": "decoder_fp16.ckpt", "unet_inpaint": "inpainting_fp16.ckpt",
             "movq": "movq_final.ckpt"}
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files.values(), "ViT-L-14_stats.th", "text_encoder",
                                                              "kandinsky21_export.json"])
    for component, file in files.items():
        module = ours.module(component)
        state = read_state_dict(folder / file)  # weights_only: tensors and nothing else
        assert {t.dtype for t in state.values()} == {dtype}
        extra = {"clip_stats": read_clip_stats(folder / "ViT-L-14_stats.th")} if component == "prior" else {}
        back = from_original(component, foreign_config(component, module.config, "original"), state, dtype=dtype,
                             **extra)  # the CLIP statistics are float32 in any case, as released
        assert_same_state(back, cast_copy(module, dtype))  # float16: exactly the cast of ours
    assert_same_state(load_component("mclip", folder / "text_encoder"), cast_copy(ours.module("mclip"), dtype))
    assert load_component("mclip_tokenizer", folder / "text_encoder")("a cat").input_ids == \
        ours.tokenizer("mclip_tokenizer")("a cat").input_ids
    info = json.loads((folder / "kandinsky21_export.json").read_text())
    assert info["layout"] == "original" and info["dtype"] == str(dtype).removeprefix("torch.")


def test_exports_are_atomic_and_refuse_to_overwrite(ours, tmp_path):
    folder = tmp_path / "out"
    ours.save_pretrained(folder, layout="original", dtype=torch.float32)
    before = (folder / "movq_final.ckpt").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        ours.save_pretrained(folder, layout="original")
    assert (folder / "movq_final.ckpt").read_bytes() == before
    ours.save_pretrained(folder, layout="original", overwrite=True)  # float16 now
    assert read_state_dict(folder / "movq_final.ckpt")["decoder.conv_out.weight"].dtype == torch.float16
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old copy left beside it
    with pytest.raises(ValueError, match="layout: expected one of"):
        ours.save_pretrained(tmp_path / "x", layout="onnx")
    with pytest.raises(ValueError, match="dtype"):
        ours.save_pretrained(tmp_path / "x", layout="diffusers", dtype="float64")
    ours.save_pretrained(folder, layout="diffusers", overwrite=True)  # a diffusers export replaces it
    assert (folder / "decoder" / "model_index.json").is_file() and not (folder / "movq_final.ckpt").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not an export")
    with pytest.raises(FileExistsError, match="not a folder this package wrote"):
        ours.save_pretrained(tmp_path / "mine", layout="diffusers", overwrite=True)
    partial = Kandinsky21(unet=ours.module("unet"), movq=ours.module("movq"))
    with pytest.raises(ValueError, match=r"decoder/ pipeline also needs \['mclip', 'mclip_tokenizer'\]"):
        partial.save_pretrained(tmp_path / "x", layout="diffusers")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("component", CONVERTED)
@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_export_component_reads_back_exactly(ours, tmp_path, component, layout):
    from kandinsky.weights import read_official

    module = ours.module(component)
    folder = export_component(component, module, tmp_path / component, layout=layout, dtype=None)
    if layout == "diffusers":
        back, _ = read_official(component, folder, layout="diffusers")
    else:
        name = next(p for p in folder.iterdir() if p.suffix == ".ckpt")
        stats = folder / "ViT-L-14_stats.th" if component == "prior" else None
        back, _ = read_official(component, name, config=foreign_config(component, module.config, "original"),
                                clip_stats=stats)
    assert_same_state(back, module)


# ------------------------------------------------------------------------------------------------ LoRA


@pytest.fixture()
def lora_unet(ours):
    from kandinsky.lora import add_lora

    unet = type(ours.module("unet"))(ours.module("unet").config)
    unet.load_state_dict(ours.module("unet").state_dict())
    torch.manual_seed(0)
    add_lora(unet, rank=2, alpha=4.0)
    with torch.no_grad():  # trained adapters: lora_B away from its zero initialisation
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=seed(len(name))))
    return unet.eval()


def unet_inputs() -> dict:
    generator = seed(31)
    return {"x": torch.randn(2, 4, 8, 8, generator=generator), "timesteps": torch.tensor([10, 900]),
            "text_hidden_states": torch.randn(2, 77, 32, generator=generator),
            "text_embeds": torch.randn(2, EMBED_DIM, generator=generator),
            "image_embeds": torch.randn(2, EMBED_DIM, generator=generator)}


@pytest.mark.parametrize("mode", ["fuse", "separate"])
def test_lora_exports_to_diffusers(lora_unet, ours, tmp_path, mode):
    from kandinsky.parity.unet import run_diffusers, run_ours

    folder = export_component("unet", lora_unet, tmp_path / "unet", layout="diffusers", lora=mode)
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True).eval()
    batch = unet_inputs()
    with torch.no_grad():
        expected, base = run_ours(lora_unet, batch), run_ours(ours.module("unet"), batch)
        if mode == "separate":
            # the weights file holds the base weights: the adapters are in their own file
            assert (run_diffusers(unet, batch) - base).abs().max() < 2e-5
            unet.load_lora_adapter(str(folder), weight_name="pytorch_lora_weights.safetensors", prefix=None)
        theirs = run_diffusers(unet, batch)
    assert (expected - base).abs().max() > 1e-2  # the adapters matter
    # float32 against diffusers: measured 2.4e-7 (fused) and 2.5e-7 (separate); the adapters move it by 2.2e-2
    assert (expected - theirs).abs().max() < 2e-5


def test_lora_fused_original_round_trip(lora_unet, tmp_path):
    from kandinsky.lora import ADAPTER

    folder = export_component("unet", lora_unet, tmp_path / "unet", layout="original", dtype=torch.float32)
    back = from_original("unet", foreign_config("unet", lora_unet.config, "original"),
                         read_state_dict(folder / "decoder_fp16.ckpt"))
    layer = lora_unet.get_submodule("down_blocks.2.attn.qkv")
    fused = layer.base_layer.weight.float() + layer.get_delta_weight(ADAPTER).float()
    assert torch.equal(back.get_submodule("down_blocks.2.attn.qkv").weight, fused)
    with pytest.raises(ValueError, match="original code has no LoRA loader"):
        export_component("unet", lora_unet, tmp_path / "x", layout="original", lora="separate")


# ------------------------------------------------------------------------------------------------ command line


def test_cli_convert_to_and_from_every_layout(ours, tmp_path, capsys):
    from kandinsky.weights import save_converted

    movq = ours.module("movq")
    save_converted(movq, "movq", tmp_path / "ours")
    assert main(["convert", "movq", str(tmp_path / "ours"), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert main(["convert", "movq", str(tmp_path / "d"), str(tmp_path / "o"), "--to", "original"]) == 0
    config = json.dumps(foreign_config("movq", movq.config, "original"))
    assert main(["convert", "movq", str(tmp_path / "o" / "movq_final.ckpt"), str(tmp_path / "back"),
                 "--config", config]) == 0
    assert_same_state(load_converted(tmp_path / "back"), cast_copy(movq, torch.float16))  # float16 by default
    info = json.loads((tmp_path / "o" / "kandinsky21_export.json").read_text())
    assert info["source_layout"] == "diffusers" and info["dtype"] == "float16"
    capsys.readouterr()
    assert main(["convert", "movq", str(tmp_path / "ours"), str(tmp_path / "d"), "--to", "diffusers"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kandinsky: error: ") and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_cli_convert_pipeline_to_diffusers(ours, tmp_path, capsys):
    ours.save_pretrained(tmp_path / "ours")
    assert main(["convert", "pipeline", str(tmp_path / "ours"), str(tmp_path / "d"), "--to", "diffusers",
                 "--dtype", "float16"]) == 0
    folder = tmp_path / "d" / "decoder" / "unet"
    state = read_state_dict(folder / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in state.values()} == {torch.float16}
    back = from_diffusers("unet", json.loads((folder / "config.json").read_text()), state, dtype=None)
    assert_same_state(back, cast_copy(ours.module("unet"), torch.float16))
    info = json.loads((tmp_path / "d" / "prior" / "kandinsky21_export.json").read_text())
    assert info["source"] == str(tmp_path / "ours") and info["dtype"] == "float16"


def test_the_tiny_pipeline_reads_back_from_the_original_layout(tmp_path):
    """The original layout holds no configs (the original code keeps them in code): the export records ours, so
    any size reads back, the tiny one included (CLIP from a diffusers prior folder: the layout has no towers)."""
    tiny = Kandinsky21.from_config("tiny", seed=0, progress=False)
    tiny.save_pretrained(tmp_path / "original", layout="original", dtype=torch.float32)
    tiny.save_pretrained(tmp_path / "diffusers", layout="diffusers")
    back = Kandinsky21.from_pretrained(str(tmp_path / "original"), clip_source=str(tmp_path / "diffusers" / "prior"),
                                       cache_dir=tmp_path / "cache", progress=False)
    for name in ("prior", "unet", "unet_inpaint", "movq", "mclip"):
        assert_same_state(back.module(name), tiny.module(name))
    args = dict(height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2, output_type="np")
    assert np.array_equal(back.text2img("a cat", generator=seed(0), **args),
                          tiny.text2img("a cat", generator=seed(0), **args))


@pytest.mark.parametrize("component", ["unet", "unet_inpaint", "movq", "prior"])
def test_an_original_export_is_what_the_original_code_loads(component, tmp_path):
    """The original implementation's own state dicts (its fixtures, seeded random weights at small configs) come
    back key for key, tensor for tensor: what its strict load_state_dict takes."""
    from kandinsky.layouts import ORIGINAL_FILES, export_component
    from kandinsky.testing import load_original_fixture, prefixed

    tensors, meta = load_original_fixture(component)
    state = prefixed(tensors, "state_dict.")
    stats = (tensors["input.clip_mean"], tensors["input.clip_std"]) if component == "prior" else None
    ours = from_original(component, meta["original_config"], state, **({"clip_stats": stats} if stats else {}))
    folder = export_component(component, ours, tmp_path / component, layout="original", dtype=torch.float32)
    written = read_state_dict(folder / ORIGINAL_FILES[component])
    assert sorted(written) == sorted(state)
    assert all(torch.equal(written[key], state[key].float()) for key in state)
    if stats is not None:
        # as the original reads it: clip_mean, clip_std = torch.load(clip_mean_std_path)
        mean, std = torch.load(folder / "ViT-L-14_stats.th", weights_only=True)
        assert torch.equal(mean.flatten(), stats[0].flatten()) and torch.equal(std.flatten(), stats[1].flatten())
    recorded = json.loads((folder / "kandinsky21_export.json").read_text())["original_configs"][component]
    assert from_original(component, recorded, written, **({"clip_stats": stats} if stats else {})).config == ours.config


# --- Kandinsky 2.2: prior/ decoder/ inpaint/ controlnet/ as kandinsky-2-2-prior, -decoder, -decoder-inpaint,
# -controlnet-depth ---------------------------------------------------------------------------------------------

PIPELINES_22 = {"prior": "KandinskyV22PriorPipeline", "decoder": "KandinskyV22Pipeline",
                "inpaint": "KandinskyV22InpaintPipeline", "controlnet": "KandinskyV22ControlnetPipeline"}


@pytest.fixture(scope="module")
def tiny_22():
    from kandinsky.pipeline import Kandinsky22

    return Kandinsky22.from_config("tiny", seed=0, progress=False)


@pytest.fixture(scope="module")
def exported_22(tiny_22, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export22") / "k22-diffusers"
    tiny_22.save_pretrained(folder, layout="diffusers")
    return folder


def test_diffusers_22_pipelines_load_the_export_and_draw_our_images(exported_22, tiny_22, caplog):
    """The decoders' scheduler is the DDIM configuration our pipeline samples with (a store without a scheduler
    config of its own). Same seeds, float32: the prior within 3e-5 (test_k22.py's bound), the decoders' images in
    [0, 1] (two steps from given embeddings) within 2e-4, test_k22.py's two-step bound (measured beside each)."""
    from kandinsky import tiny

    pipes = {}
    for name, cls in PIPELINES_22.items():
        pipes[name], records = load_quietly(getattr(diffusers, cls), exported_22 / name, caplog)
        words = ("missing", "unexpected", "not used", "newly initialized", "not initialized")
        assert not [r for r in records if any(w in r.lower() for w in words)], (name, records)
    assert type(pipes["decoder"].scheduler).__name__ == "DDIMScheduler"
    theirs = pipes["prior"]("the cat", num_inference_steps=2, generator=seed(1)).image_embeds
    embeds, _ = tiny_22.prior("the cat", num_inference_steps=2, generator=seed(1))
    assert float((embeds - theirs).abs().max()) < 3e-5  # measured 5.8e-6 (|embeds| up to 8.2)
    embeds = torch.randn(1, tiny.WIDTH_22, generator=seed(2))
    negative = torch.randn(1, tiny.WIDTH_22, generator=seed(3))
    hint = torch.rand(1, 3, 64, 64, generator=seed(4))
    image, mask = random_image(5, 64), np.zeros((64, 64), dtype=np.float32)
    mask[:32] = 1
    args = dict(height=64, width=64, num_inference_steps=2, output_type="np")
    cases = {
        "decoder": (pipes["decoder"](embeds, negative, generator=seed(6), **args).images,
                    tiny_22.decode("", embeds, negative, generator=seed(6), **args)),
        "controlnet": (pipes["controlnet"](embeds, negative, hint, generator=seed(6), **args).images,
                       tiny_22.controlnet("", hint, image_embeds=embeds, negative_image_embeds=negative,
                                          generator=seed(6), **args)),
        "inpaint": (pipes["inpaint"](embeds, image, mask, negative, generator=seed(6), **args).images,
                    tiny_22.inpaint("", image, mask, image_embeds=embeds, negative_image_embeds=negative,
                                    generator=seed(6), **args)),
    }
    for name, (theirs, ours) in cases.items():
        assert np.abs(ours - theirs).max() < 2e-4, name  # measured 2.6e-6 decoder, 4.2e-6 controlnet, 9.1e-6 inpaint


def test_our_pipeline_reads_the_22_export_back_bit_identical(exported_22, tiny_22, tmp_path):
    from kandinsky.hub import detect_model
    from kandinsky.pipeline import Kandinsky22

    assert detect_model(exported_22) == "2.2"
    back = Kandinsky22.from_pretrained(exported_22, cache_dir=tmp_path, progress=False)  # the folder of pipelines
    assert back.components.names() == tiny_22.components.names()
    for name in ("prior", "unet", "unet_inpaint", "unet_controlnet", "movq", "clip_text", "clip_vision"):
        assert_same_state(back.module(name), tiny_22.module(name))
    assert back.decoder_sampling.sampler == "ddim"  # the exported DDIM config: our default's timesteps
    assert back.decoder_sampling.timesteps("ddim", 7).tolist() == tiny_22.decoder_sampling.timesteps("ddim", 7).tolist()
    with pytest.raises(ValueError, match="use layout='diffusers'"):
        tiny_22.save_pretrained(tmp_path / "original", layout="original")

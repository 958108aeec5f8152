"""The components store: ready models, adapters (stacked, scaled, fused, all or nothing), saving, copies."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("peft")

from kandinsky import lora  # noqa: E402
from kandinsky.components import Components  # noqa: E402
from kandinsky.models.unet import UNet  # noqa: E402
from kandinsky.ops.generic import FastModule  # noqa: E402


def unet_inputs(config, batch=2, size=8):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, config.in_channels, size, size, generator=generator), torch.tensor([10, 500]),
            dict(image_embeds=torch.randn(batch, config.image_embed_dim, generator=generator),
                 text_embeds=torch.randn(batch, config.text_embed_dim, generator=generator),
                 text_hidden_states=torch.randn(batch, 77, config.text_hidden_dim, generator=generator)))


def run_unet(components):
    unet = components.module("unet")
    x, t, kwargs = unet_inputs(unet.config)
    with torch.no_grad():
        return unet(x, t, **kwargs)


def write_adapter(path, component="unet", rank=2, alpha=3.0, seed=0, model=None):
    """An adapter file of ``rank`` and ``alpha`` with random A and B (B is zero when trained from scratch, which
    would hide every mistake of the scaling)."""
    model = model or Components.from_config("tiny", seed=0).plain_copy(component)
    lora.add_lora(model, rank, alpha)
    generator = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in lora.lora_state_dict(model).items()}
    return lora.save_lora(path, weights, component=component, rank=rank, alpha=alpha,
                          targets=model._lora_meta["targets"]), weights


def test_module_is_ready_and_the_source_is_recorded():
    components = Components.from_config("tiny", seed=3, dtype=torch.bfloat16)
    unet = components.module("unet")
    assert not unet.training and next(unet.parameters()).dtype == torch.bfloat16
    assert any(isinstance(m, FastModule) for m in unet.modules())  # ops applied by the store
    assert components.source == {"source": "tiny:3"}
    assert Components.from_pretrained("tiny:3").source == {"source": "tiny:3"}
    copy = components.plain_copy("unet")
    assert not any(isinstance(m, FastModule) for m in copy.modules())
    assert copy.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()  # its own tensors


def test_tiny_source_matches_from_config():
    a, b = Components.from_pretrained("tiny"), Components.from_config("tiny", seed=0)
    assert torch.equal(run_unet(a), run_unet(b))
    assert not torch.equal(run_unet(Components.from_pretrained("tiny:1")), run_unet(b))


def test_stacked_adapters_fuse_to_the_closed_form(tmp_path):
    """A fused LoRA layer is W + sum_i scale_i * (alpha_i / rank_i) * B_i A_i, with alpha != rank."""
    first, weights1 = write_adapter(tmp_path / "a.safetensors", rank=2, alpha=3.0, seed=1)
    second, weights2 = write_adapter(tmp_path / "b.safetensors", rank=4, alpha=1.0, seed=2)
    components = Components.from_config("tiny", seed=0)
    base = components.plain_copy("unet")
    components.load_lora(first, scale=0.5).load_lora(second, scale=2.0)
    assert [(a.component, a.scale) for a in components.adapters] == [("unet", 0.5), ("unet", 2.0)]
    assert len(components.adapters[0].sha256) == 64
    stacked = run_unet(components)
    fused = components.plain_copy("unet")  # adapters merged into a copy; the store keeps them
    assert not lora.has_lora(fused) and lora.has_lora(components.module("unet"))
    target = lora.read_lora(first)[1]["targets"][0]
    expected = (dict(base.named_parameters())[f"{target}.weight"]
                + 0.5 * (3.0 / 2) * weights1[f"{target}.lora_B.weight"] @ weights1[f"{target}.lora_A.weight"]
                + 2.0 * (1.0 / 4) * weights2[f"{target}.lora_B.weight"] @ weights2[f"{target}.lora_A.weight"])
    torch.testing.assert_close(dict(fused.named_parameters())[f"{target}.weight"], expected, rtol=1e-6, atol=1e-6)
    components.fuse_lora()
    assert components.adapters == [] and not lora.has_lora(components.module("unet"))
    torch.testing.assert_close(run_unet(components), stacked, rtol=1e-5, atol=1e-5)


def test_unload_gives_back_the_base_exactly(tmp_path):
    path, _ = write_adapter(tmp_path / "a.safetensors")
    components = Components.from_config("tiny", seed=0)
    base = run_unet(components)
    components.load_lora(path)
    assert not torch.equal(run_unet(components), base)
    components.unload_lora()
    assert torch.equal(run_unet(components), base) and components.adapters == []


def test_a_failed_load_leaves_the_store_as_it_was(tmp_path):
    good, _ = write_adapter(tmp_path / "good.safetensors", seed=1)
    components = Components.from_config("tiny", seed=0).load_lora(good)
    before = run_unet(components)
    _, weights = write_adapter(tmp_path / "x.safetensors", seed=2)
    meta = {"format": lora.LORA_FORMAT, "component": "unet", "rank": "2", "alpha": "3.0",
            "targets": lora.read_lora(good)[1]["targets"].__repr__().replace("'", '"')}
    key = sorted(weights)[0]
    wrong_shape = dict(weights, **{key: torch.zeros(5, 7)})
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"), metadata=meta)
    wrong_rank = dict(meta, rank="3")
    save_file(weights, str(tmp_path / "rank.safetensors"), metadata=wrong_rank)
    for name, needle in (("shape.safetensors", r"has shape \(5, 7\)"), ("rank.safetensors", "rank 3")):
        with pytest.raises(ValueError, match=needle) as error:
            components.load_lora(tmp_path / name)
        assert name in str(error.value) and "\n" not in str(error.value)
        assert len(components.adapters) == 1 and lora.adapter_names(components.module("unet")) == ["adapter0"]
        assert torch.equal(run_unet(components), before)


def test_bad_adapter_files_are_one_value_error_naming_the_file(tmp_path):
    components = Components.from_config("tiny", seed=0)
    text = tmp_path / "notes.txt"
    text.write_text("not an adapter")
    prior_adapter, weights = write_adapter(tmp_path / "prior.safetensors", component="prior")
    meta = {"format": lora.LORA_FORMAT, "rank": "2", "alpha": "3.0", "targets": "[]"}
    save_file(weights, str(tmp_path / "no_component.safetensors"), metadata=meta)
    relabelled = dict(meta, component="unet", targets=str(lora.read_lora(prior_adapter)[1]["targets"]).replace("'", '"'))
    save_file(weights, str(tmp_path / "relabelled.safetensors"), metadata=relabelled)
    cases = {text: "not a readable safetensors file", tmp_path / "no_component.safetensors": "damaged LoRA metadata",
             tmp_path / "relabelled.safetensors": "is not a linear layer of this unet",
             tmp_path / "missing.safetensors": "no LoRA file there"}
    for path, needle in cases.items():
        with pytest.raises(ValueError, match=needle) as error:
            components.load_lora(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert components.adapters == [] and "unet" not in components.loaded() or not lora.has_lora(components.module("unet"))


def test_saving_writes_the_adapters_fused(tmp_path):
    path, _ = write_adapter(tmp_path / "a.safetensors")
    components = Components.from_config("tiny", seed=0).load_lora(path, scale=0.7)
    expected = run_unet(components)
    components.save_pretrained(tmp_path / "saved")
    reloaded = Components.from_pretrained(tmp_path / "saved")
    assert reloaded.adapters == []
    torch.testing.assert_close(run_unet(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_a_lora_training_folder_loads_with_its_adapter(tmp_path):
    base = tmp_path / "base"
    Components.from_config("tiny", seed=0).save_pretrained(base)
    run = tmp_path / "run"
    write_adapter(run / lora.LORA_FILE, seed=4)
    (run / "base.json").write_text('{"source": "../base"}')
    from_run = Components.from_pretrained(run)
    by_hand = Components.from_pretrained(base).load_lora(run)
    assert [a.sha256 for a in from_run.adapters] == [a.sha256 for a in by_hand.adapters]
    assert torch.equal(run_unet(from_run), run_unet(by_hand))
    assert not torch.equal(run_unet(from_run), run_unet(Components.from_pretrained(base)))


def test_without_peft_the_error_names_the_extra(tmp_path, monkeypatch):
    path, _ = write_adapter(tmp_path / "a.safetensors")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=r"kandinsky21\[train\]"):
        Components.from_config("tiny", seed=0).load_lora(path)


def test_replace_and_bad_names():
    components = Components.from_config("tiny", seed=0)
    with pytest.raises(ValueError, match="name: expected one of"):
        components.module("vae")
    with pytest.raises(ValueError, match="module: expected an nn.Module"):
        components.replace("unet", "not a module")
    other = Components.from_config("tiny", seed=1).plain_copy("unet")
    components.replace("unet", other)
    assert components.module("unet") is other and isinstance(other, UNet)


def test_offload_never_drops_a_module_that_carries_an_adapter(tmp_path):
    Components.from_config("tiny", seed=0).save_pretrained(tmp_path / "w")
    path, _ = write_adapter(tmp_path / "a.safetensors")
    components = Components.from_pretrained(tmp_path / "w", offload="sequential").load_lora(path)
    adapted = run_unet(components)
    components.module("prior")  # the decoder stage is released
    assert lora.has_lora(components.module("unet"))
    torch.testing.assert_close(run_unet(components), adapted, rtol=0, atol=0)


def test_images_record_their_adapters(tmp_path):
    from kandinsky.pipeline import Kandinsky21

    path, _ = write_adapter(tmp_path / "a.safetensors")
    pipe = Kandinsky21.from_config("tiny", seed=0, progress=False).load_lora(path, scale=0.25)
    image = pipe.text2img("a cat", height=64, width=64, num_inference_steps=1, prior_num_inference_steps=1,
                          generator=torch.Generator().manual_seed(0))[0]
    import json

    settings = json.loads(image.info["settings"])
    assert settings["adapters"] == [pipe.components.adapters[0].describe()]
    assert settings["adapters"][0]["scale"] == 0.25 and settings["weights"] == {"source": "tiny:0"}


def test_a_full_22_store_saves_and_reloads_bit_for_bit(tmp_path):
    """Kandinsky 2.2: prior, CLIP towers, the three UNets (ControlNet included), MoVQ and the decoder's scheduler
    config; from_pretrained tells the version from the folder (no M-CLIP), and the reloaded (lazy) store saves again
    over the folder it reads from."""
    from kandinsky import tiny
    from kandinsky.hub import Lazy, resolve

    scheduler = {"_class_name": "DDPMScheduler", "variance_type": "fixed_small", "steps_offset": 1}
    store = Components(**tiny.components_22(0), scheduler=scheduler)
    store.save_pretrained(tmp_path / "k22")
    reloaded = Components.from_pretrained(tmp_path / "k22")
    assert reloaded.names() == store.names() and "mclip" not in reloaded.names()
    assert reloaded.scheduler_config() == scheduler and set(resolve("tiny", model="2.2")) == set(store.names())
    for name in ("prior", "unet_controlnet", "movq", "clip_vision"):
        ours, theirs = store.module(name).state_dict(), reloaded.module(name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    Components.from_pretrained(tmp_path / "k22").save_pretrained(tmp_path / "k22", overwrite=True)
    again = Components.from_pretrained(tmp_path / "k22")
    assert torch.equal(again.module("unet_controlnet").conv_in.weight, store.module("unet_controlnet").conv_in.weight)
    assert again.scheduler_config() == scheduler
    lazy = Components(scheduler=Lazy(lambda: None))
    assert lazy.scheduler_config() is None and lazy.names() == []
    with pytest.raises(ValueError, match="scheduler: expected a diffusers scheduler config"):
        Components(scheduler={"steps_offset": 1})

"""The shared conversion machinery: strictness and error reporting; the way back (ours -> original and
diffusers layouts), exact, and the module map of the divergence tracer."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kandinsky.convert import (foreign_config, from_diffusers, from_original, module_map, official_original_config,
                               to_diffusers, to_layout, to_original)
from kandinsky.convert.core import Source, build_strict
from kandinsky.models import config_from_dict, model_class
from kandinsky.testing import randomize_


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


# ------------------------------------------------------------------------------------------------ ours -> foreign

ROOT = Path(__file__).resolve().parent.parent
CONVERTED = ("movq", "prior", "unet", "unet_inpaint")


def _tiny(component: str) -> nn.Module:
    name = "unet" if component == "unet_inpaint" else component
    values = json.loads((ROOT / "configs" / f"{name}_tiny.json").read_text())
    if component == "unet_inpaint":
        values["in_channels"] = 9
    return randomize_(model_class(component)(config_from_dict(component, values)), 0)


def _assert_same(module: nn.Module, expected: nn.Module) -> None:
    ours, theirs = module.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("component", CONVERTED)
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_round_trips_are_bit_identical(component, dtype):
    module = _tiny(component)
    expected = module if dtype is None else _tiny(component).to(dtype)
    config, state, extras = to_original(component, module, dtype=dtype)
    _assert_same(from_original(component, config, state, dtype=dtype, **extras), expected)
    config, state = to_diffusers(component, module, dtype=dtype)
    _assert_same(from_diffusers(component, config, state, dtype=None), expected)
    assert all(t.dtype == (dtype or torch.float32) for t in state.values())


@pytest.mark.parametrize("component", CONVERTED)
def test_official_size_original_export_is_the_released_checkpoint_layout(component):
    """Our official-size models (meta tensors: shapes only) written in the original layout have exactly the
    keys and shapes of the released checkpoints (the manifests) and the official constructor arguments."""
    manifest = json.loads((ROOT / "tests" / "fixtures" / "original" / f"manifest_{component}.json").read_text())
    cls = model_class(component)
    with torch.device("meta"):
        module = cls(type(_tiny(component).config)(**({"in_channels": 9} if component == "unet_inpaint" else {})))
    config, state, extras = to_original(component, module, dtype=torch.float16)
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in manifest["keys"].items()}
    assert config == official_original_config(component)
    assert list(extras) == (["clip_stats"] if component == "prior" else [])


@pytest.mark.parametrize("component", CONVERTED)
def test_official_size_diffusers_export_loads_strictly(component):
    diffusers = pytest.importorskip("diffusers")
    classes = {"movq": diffusers.VQModel, "prior": diffusers.PriorTransformer,
               "unet": diffusers.UNet2DConditionModel, "unet_inpaint": diffusers.UNet2DConditionModel}
    with torch.device("meta"):
        module = model_class(component)(type(_tiny(component).config)(
            **({"in_channels": 9} if component == "unet_inpaint" else {})))
        config, state = to_diffusers(component, module)
        theirs = classes[component](**config)
    theirs.load_state_dict(state, strict=True, assign=True)  # raises on any missing or unexpected key
    reference = json.loads((ROOT / "tests" / "fixtures" / "diffusers-configs" / {
        "movq": "kandinsky-2-1.movq.config.json", "prior": "kandinsky-2-1-prior.prior.config.json",
        "unet": "kandinsky-2-1.unet.config.json", "unet_inpaint": "kandinsky-2-1-inpaint.unet.config.json"}[component]
    ).read_text())
    for key, value in config.items():  # ours agrees with the official config.json wherever both say something
        assert reference.get(key, value) == value, key


def test_to_layout_converts_gradients_like_weights():
    """Any tensors keyed like our state dict (here: gradients) convert like the weights: the same linear maps."""
    module = _tiny("unet")
    grads = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, (k, v) in
             enumerate(module.state_dict().items())}
    foreign, _ = to_layout("unet", module.config, grads, "original")
    config = foreign_config("unet", module.config, "original")
    back = from_original("unet", config, foreign)
    assert all(torch.equal(back.state_dict()[k], grads[k]) for k in grads)
    with pytest.raises(ValueError, match="keys no layer covers"):
        to_layout("unet", module.config, {**grads, "extra.weight": torch.zeros(1)}, "original")
    with pytest.raises(ValueError, match="layout must be one of"):
        to_layout("unet", module.config, grads, "ours")


def test_module_map_pairs_modules_in_both_layouts():
    module = _tiny("unet")
    diffusers_map = module_map("unet", module.config, "diffusers")
    assert diffusers_map["down_blocks.2.res"] == "down_blocks.0.downsamplers.0"
    assert diffusers_map["mid_attn.proj_out"] == "mid_block.attentions.0.to_out.0"
    assert "down_blocks.3.attn.qkv" not in diffusers_map  # fused from to_q, to_k, to_v: no one counterpart
    original_map = module_map("unet", module.config, "original")
    assert original_map["down_blocks.2"] == "input_blocks.3" and original_map["up_blocks.0.res.conv1"] == \
        "output_blocks.0.0.in_layers.2"
    assert "mid_attn.proj_out" not in original_map  # a Conv1d: (B, C, T) against our (B, T, C)
    modules = dict(module.named_modules())
    assert all(path in modules for path in (*diffusers_map, *original_map))


# --------------------------------------------------------------------------------------------- from_diffusers audit
# Every field of diffusers' VQModel, PriorTransformer and UNet2DConditionModel configs is either read (a
# non-default value converts and computes what diffusers computes), ignored because it changes nothing for
# these models at inference (checked the same way), or refused by name. The configs are passed as sparse
# dicts: a config.json without a key means diffusers' default, which the converters know.

diffusers = pytest.importorskip("diffusers")

from kandinsky.parity import prior as prior_parity  # noqa: E402
from kandinsky.parity import unet as unet_parity  # noqa: E402
from kandinsky.testing import max_errors, randomize_  # noqa: E402

UNET_BASE = dict(in_channels=4, out_channels=8, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                 up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                 mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
                 encoder_hid_dim=24, encoder_hid_dim_type="text_image_proj", cross_attention_dim=32,
                 attention_head_dim=16, addition_embed_type="text_image", resnet_time_scale_shift="scale_shift")
ATTEND_FIRST = dict(down_block_types=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
                    up_block_types=("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"))
THREE_LEVELS = dict(block_out_channels=(32, 32, 64),
                    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
                    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"))


def _diffusers_model(cls, kwargs: dict, seed: int = 0, **overrides):
    return randomize_(cls(**kwargs), seed, overrides=overrides or None).eval()


@pytest.mark.parametrize("change", [
    {}, {"norm_num_groups": 16}, {"norm_num_groups": 8, "block_out_channels": (16, 32), "attention_head_dim": 8},
    {"layers_per_block": 2}, {"layers_per_block": [2, 2]}, {"attention_head_dim": 8}, {"attention_head_dim": [16, 16]},
    {"cross_attention_dim": 24}, {"encoder_hid_dim": 40}, {"out_channels": 4},
    {"in_channels": 9}, ATTEND_FIRST, THREE_LEVELS, {"time_embedding_dim": 128},
    {"only_cross_attention": [False, False], "mid_block_only_cross_attention": False},
    # read by diffusers, but for other block types or training only
    {"sample_size": 16, "dropout": 0.1, "downsample_padding": 0, "transformer_layers_per_block": 2,
     "dual_cross_attention": True, "use_linear_projection": True, "upcast_attention": True,
     "addition_embed_type_num_heads": 4, "addition_time_embed_dim": 8},
], ids=lambda change: ",".join(change) or "base")
def test_unet_from_diffusers_reproduces_every_config_it_accepts(change):
    kwargs = {**UNET_BASE, **change}
    theirs = _diffusers_model(diffusers.UNet2DConditionModel, kwargs)
    ours = from_diffusers("unet_inpaint" if kwargs["in_channels"] == 9 else "unet", kwargs, theirs.state_dict())
    batch = unet_parity.inputs(ours.config, height=16, width=16)
    with torch.no_grad():
        abs_err, rel_err = max_errors(unet_parity.run_ours(ours, batch), unet_parity.run_diffusers(theirs, batch))
    assert rel_err < unet_parity.TOLERANCE_DIFFUSERS, (abs_err, rel_err)  # float32, summation order: measured <= 1.5e-6


@pytest.mark.parametrize("key, value", [
    ("center_input_sample", True), ("flip_sin_to_cos", False), ("freq_shift", 1), ("act_fn", "gelu"),
    ("norm_eps", 1e-6), ("resnet_skip_time_act", True), ("resnet_out_scale_factor", 2.0),
    ("mid_block_scale_factor", 2), ("time_embedding_act_fn", "silu"), ("timestep_post_act", "silu"),
    ("time_cond_proj_dim", 8), ("conv_in_kernel", 5), ("conv_out_kernel", 5), ("cross_attention_norm", "group_norm"),
    ("class_embed_type", "timestep"), ("num_class_embeds", 10), ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "default"), ("only_cross_attention", True), ("mid_block_only_cross_attention", True),
    ("time_embedding_dim", 64), ("layers_per_block", [1, 2]), ("attention_head_dim", [8, 16]),
    ("norm_num_groups", 24), ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("encoder_hid_dim_type", None),
    ("addition_embed_type", None), ("num_attention_heads", 4), ("attention_type", "gated"),
])
def test_unet_from_diffusers_refuses_what_it_cannot_reproduce(key, value):
    with pytest.raises(ValueError, match=key):
        from_diffusers("unet", {**UNET_BASE, key: value}, {})


def test_unet_from_diffusers_takes_diffusers_defaults_for_absent_keys():
    """The official config.json lists every key; a sparse one means diffusers' defaults (here: the default
    resnet_time_scale_shift "default", which Kandinsky 2.1 is not)."""
    kwargs = {k: v for k, v in UNET_BASE.items() if k != "resnet_time_scale_shift"}
    with pytest.raises(ValueError, match="resnet_time_scale_shift must be 'scale_shift'.*got 'default'"):
        from_diffusers("unet", kwargs, {})


MOVQ_BASE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                 up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), in_channels=3, out_channels=3,
                 latent_channels=4, layers_per_block=1, norm_type="spatial", num_vq_embeddings=12, vq_embed_dim=4)


def _movq_outputs(ours, theirs, in_channels: int = 3):
    images = torch.rand(1, in_channels, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = theirs.encode(images).latents
        return ((ours.encode(images), latents),
                (ours.decode(latents), theirs.decode(latents, force_not_quantize=True).sample))


@pytest.mark.parametrize("change", [
    {}, {"layers_per_block": 2}, {"latent_channels": 3, "vq_embed_dim": None}, {"num_vq_embeddings": 16},
    {"in_channels": 4, "out_channels": 1}, {"norm_num_groups": 16}, {"norm_num_groups": 8},
    {"block_out_channels": (32, 32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2 + ("AttnDownEncoderBlock2D",),
     "up_block_types": ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 2},
    {"down_block_types": ("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
     "up_block_types": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")},
    # unused by the Kandinsky pipelines' encode / decode(force_not_quantize=True)
    {"sample_size": 64, "scaling_factor": 0.5, "force_upcast": True},
], ids=lambda change: ",".join(change) or "base")
def test_movq_from_diffusers_reproduces_every_config_it_accepts(change):
    kwargs = {**MOVQ_BASE, **change}
    theirs = _diffusers_model(diffusers.VQModel, kwargs)
    ours = from_diffusers("movq", kwargs, theirs.state_dict())
    for mine, reference in _movq_outputs(ours, theirs, kwargs["in_channels"]):
        abs_err, rel_err = max_errors(mine, reference)
        assert rel_err < 1e-4, (abs_err, rel_err)  # float32, summation order: measured <= 1.4e-5


@pytest.mark.parametrize("key, value", [
    ("lookup_from_codebook", True), ("vq_embed_dim", 3), ("norm_type", "group"),
    ("act_fn", "relu"), ("mid_block_add_attention", False), ("layers_per_block", [1, 1]),
])
def test_movq_from_diffusers_refuses_what_it_cannot_reproduce(key, value):
    with pytest.raises(ValueError, match=key):
        from_diffusers("movq", {**MOVQ_BASE, key: value}, {})
    with pytest.raises(ValueError, match="norm_type"):  # absent: diffusers' default "group"
        from_diffusers("movq", {k: v for k, v in MOVQ_BASE.items() if k != "norm_type"}, {})


def test_movq_norm_num_groups_is_the_encoders_only():
    """diffusers' VQModel uses norm_num_groups in the encoder only; its decoder's spatial norms always have 32
    groups. Ours takes the two counts apart (norm_groups, decoder_norm_groups): one count for both could not
    reproduce it either way (16 everywhere decodes 0.7 of the output's scale away, 32 everywhere encodes 0.5 away)."""
    from kandinsky.convert.core import Source, build_strict, read_layers
    from kandinsky.convert.movq import layers
    from kandinsky.models.movq import MoVQ, MoVQConfig

    theirs = _diffusers_model(diffusers.VQModel, {**MOVQ_BASE, "norm_num_groups": 16})
    errors = {}
    for encoder, decoder in ((16, 16), (32, 32), (16, 32)):
        config = MoVQConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), z_channels=4,
                            embed_dim=4, n_embed=12, norm_groups=encoder, decoder_norm_groups=decoder)
        source = Source(theirs.state_dict(), "diffusers")
        ours = build_strict("movq", lambda c=config: MoVQ(c), read_layers(source, layers("diffusers", config)), source)
        (encoded, reference_latents), (decoded, reference) = _movq_outputs(ours, theirs)
        errors[encoder, decoder] = (max_errors(encoded, reference_latents)[1], max_errors(decoded, reference)[1])
    assert errors[16, 16][1] > 0.1 and errors[32, 32][0] > 0.1
    assert max(errors[16, 32]) < 1e-4  # what from_diffusers builds
    assert from_diffusers("movq", {**MOVQ_BASE, "norm_num_groups": 16}, theirs.state_dict()).config.norm_groups == 16


PRIOR_BASE = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=24, num_embeddings=77,
                  additional_embeddings=4)


def _positive(param, generator):
    param.copy_(0.5 + torch.rand(param.shape, generator=generator))


@pytest.mark.parametrize("change", [
    {}, {"num_attention_heads": 4, "attention_head_dim": 8}, {"num_layers": 1}, {"embedding_dim": 16},
    {"num_embeddings": 12}, {"time_embed_dim": 32, "embedding_proj_dim": 24, "clip_embed_dim": 24},
    {"time_embed_act_fn": "silu", "encoder_hid_proj_type": "linear", "added_emb_type": "prd"},
    {"dropout": 0.1},  # training only
], ids=lambda change: ",".join(change) or "base")
def test_prior_from_diffusers_reproduces_every_config_it_accepts(change):
    kwargs = {**PRIOR_BASE, **change}
    theirs = _diffusers_model(diffusers.PriorTransformer, kwargs, clip_std=_positive)
    ours = from_diffusers("prior", kwargs, theirs.state_dict())
    batch = prior_parity.inputs(ours.config, batch=3)
    with torch.no_grad():
        abs_err, rel_err = max_errors(prior_parity.run_ours(ours, batch), prior_parity.run_diffusers(theirs, batch))
        denormalized = max_errors(ours.denormalize(batch["x"]), theirs.post_process_latents(batch["x"]))[1]
    assert rel_err < 1e-4 and denormalized < 1e-6, (abs_err, rel_err, denormalized)  # float32, same ops: measured 0


@pytest.mark.parametrize("key, value", [
    ("additional_embeddings", 3), ("time_embed_act_fn", "gelu"), ("norm_in_type", "layer"),
    ("embedding_proj_norm_type", "layer"), ("encoder_hid_proj_type", None), ("added_emb_type", None),
    ("time_embed_dim", 64), ("embedding_proj_dim", 16), ("clip_embed_dim", 16),
])
def test_prior_from_diffusers_refuses_what_it_cannot_reproduce(key, value):
    with pytest.raises(ValueError, match=key):
        from_diffusers("prior", {**PRIOR_BASE, key: value}, {})


# --------------------------------------------------------------------------------------------- Kandinsky 2.2 UNets

UNET_22_BASE = {**UNET_BASE, "encoder_hid_dim_type": "image_proj", "addition_embed_type": "image", "encoder_hid_dim": 40}


@pytest.mark.parametrize("change, component, conditioning", [
    ({}, "unet", "image"), ({"in_channels": 9}, "unet_inpaint", "image"),
    ({"in_channels": 8, "addition_embed_type": "image_hint"}, "unet", "image_hint"),
    ({"cross_attention_dim": 24, **THREE_LEVELS}, "unet", "image"),
], ids=["decoder", "inpaint", "controlnet", "three-levels"])
def test_unet_22_from_diffusers_tells_the_variants_apart_and_converts_back(change, component, conditioning):
    """One converter for every UNet: the config's encoder_hid_dim_type / addition_embed_type pick the conditioning;
    the way back (to_diffusers) gives diffusers' config and state dict exactly."""
    kwargs = {**UNET_22_BASE, **change}
    theirs = _diffusers_model(diffusers.UNet2DConditionModel, kwargs)
    ours = from_diffusers(component, kwargs, theirs.state_dict())
    assert ours.config.conditioning == conditioning and ours.config.image_embed_dim == 40
    assert ours.config.num_image_tokens == 32  # diffusers' ImageProjection default, not a config key
    config, state = to_diffusers(component, ours)
    assert {k: v for k, v in config.items() if k in kwargs} == {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in kwargs.items()}
    reference = theirs.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    _assert_same(from_diffusers(component, config, state), ours)


@pytest.mark.parametrize("change, component, message", [
    ({"addition_embed_type": "text_image"}, "unet", r"\(encoder_hid_dim_type, addition_embed_type\) must be one of"),
    ({"encoder_hid_dim_type": "text_image_proj", "addition_embed_type": "image"}, "unet", "must be one of"),
    ({"addition_embed_type": "image_hint"}, "unet", "component 'unet' expects in_channels 8, got 4"),
    ({"addition_embed_type": "image_hint", "in_channels": 13}, "unet_inpaint", "converted as component 'unet'"),
    ({"in_channels": 8}, "unet", "component 'unet' expects in_channels 4, got 8"),
    ({"encoder_hid_dim": None}, "unet", r"lacks \['encoder_hid_dim'\] \(encoder_hid_dim_type 'image_proj'"),
])
def test_unet_22_from_diffusers_refuses_mixed_configs(change, component, message):
    with pytest.raises(ValueError, match=message):
        from_diffusers(component, {**UNET_22_BASE, **change}, {})


def test_unet_22_has_no_original_layout_and_maps_its_hint_encoder():
    ours = from_diffusers("unet", {**UNET_22_BASE, "in_channels": 8, "addition_embed_type": "image_hint"},
                          _diffusers_model(diffusers.UNet2DConditionModel, {**UNET_22_BASE, "in_channels": 8,
                                                                              "addition_embed_type": "image_hint"}
                                           ).state_dict())
    with pytest.raises(ValueError, match="no original layout"):
        to_original("unet", ours)
    mapped = module_map("unet", ours.config, "diffusers")
    assert mapped["hint_encoder.14"] == "add_embedding.input_hint_block.14"
    assert mapped["image_tokens_norm"] == "encoder_hid_proj.norm"


def test_a_fused_pair_of_the_wrong_shapes_is_in_the_strict_listing():
    """A wrongly shaped tensor of a fused group (diffusers' to_q / to_k / to_v) is named with its shape in the
    converter's one error, not a raw torch.cat traceback."""
    theirs = _diffusers_model(diffusers.UNet2DConditionModel, UNET_BASE)
    state = dict(theirs.state_dict())
    key = next(k for k in state if k.endswith("attn1.to_k.weight") or k.endswith(".to_k.weight"))
    state[key] = state[key][:, :-1]
    with pytest.raises(ValueError, match="tensors whose shapes do not combine") as error:
        from_diffusers("unet", UNET_BASE, state)
    assert key in str(error.value) and "RuntimeError" not in str(error.value)


@pytest.mark.parametrize("component, key, ours", [("unet", "num_channels", "model_channels"),
                                                  ("unet", "num_res_blocks", "num_res_blocks")])
def test_a_negative_count_in_a_config_is_one_value_error_naming_it(component, key, ours):
    """kandinsky convert --config: a negative count is refused by our config, before any layer is built."""
    from kandinsky.convert import official_original_config

    config = {**official_original_config(component), key: -1}
    with pytest.raises(ValueError, match=f"{ours}: expected a positive integer, got -1"):
        from_original(component, config, {})


def test_model_configs_refuse_counts_below_one():
    from kandinsky.models.movq import MoVQConfig
    from kandinsky.models.prior import PriorConfig
    from kandinsky.models.unet import UNetConfig

    for make, key in ((UNetConfig, "norm_groups"), (PriorConfig, "heads"), (MoVQConfig, "channels")):
        with pytest.raises(ValueError, match=f"^{key}: expected a positive integer"):
            make(**{key: 0})
    with pytest.raises(ValueError, match="^channel_mult: expected a tuple of integers >= 1"):
        UNetConfig(channel_mult=(1, -2))
    assert MoVQConfig(attention_levels=()).attention_levels == ()  # levels may be none, or level 0

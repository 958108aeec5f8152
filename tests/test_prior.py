"""The image prior: original fixture, diffusers PriorTransformer, converters, masking, dtypes, bad input."""

import json
from pathlib import Path

import pytest
import torch

from kandinsky import ops
from kandinsky.convert import from_diffusers, from_original
from kandinsky.convert.core import Source
from kandinsky.convert.prior import OFFICIAL_ORIGINAL_CONFIGS, head_major_to_qkv_major, original
from kandinsky.models import config_from_dict, config_to_dict
from kandinsky.models.prior import Prior, PriorConfig
from kandinsky.parity.prior import (checks, diffusers_prior, inputs, original_fixture_output, run_diffusers,
                                    run_ours)
from kandinsky.testing import max_errors, prefixed, randomize_

ROOT = Path(__file__).resolve().parent.parent
TINY = config_from_dict("prior", json.loads((ROOT / "configs" / "prior_tiny.json").read_text()))


def _tiny(seed=0) -> Prior:
    prior = randomize_(Prior(TINY), seed).eval()
    prior.clip_mean.normal_(generator=torch.Generator().manual_seed(seed))
    prior.clip_std.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 1))
    return prior


def test_configs_are_the_defaults_and_official():
    assert config_from_dict("prior", json.loads((ROOT / "configs" / "prior.json").read_text())) == PriorConfig()
    hparams = OFFICIAL_ORIGINAL_CONFIGS["prior"]["model"]["hparams"]
    assert (hparams["xf_width"], hparams["xf_layers"], hparams["xf_heads"]) == (2048, 20, 32)
    assert config_to_dict(TINY)["width"] == 64


def test_original_fixture_forward():
    ours, reference = original_fixture_output()
    abs_err, _ = max_errors(ours, reference)
    # float32, same math; the fixture's thread-count rerun noise floor is ~5e-6
    assert abs_err < 1e-5, abs_err
    # the bound means something: the original's output is O(1) and varies (measured max 3.0, std 1.0)
    assert float(reference.abs().max()) > 1 and float(reference.std()) > 0.1


def test_matches_diffusers_tiny():
    theirs, ours = diffusers_prior(TINY, seed=3)
    batch = inputs(TINY, batch=3)
    with torch.no_grad():
        out, reference = run_ours(ours, batch), run_diffusers(theirs, batch)
    _, rel = max_errors(out, reference)
    assert rel < 1e-4, rel  # float32 both sides, same operations: summation order only
    # the normalisation statistics came through the diffusers converter
    torch.testing.assert_close(ours.clip_std, theirs.clip_std.reshape(-1), rtol=0, atol=0)
    embeds = torch.randn(2, TINY.clip_dim)
    torch.testing.assert_close(ours.denormalize(ours.normalize(embeds)), embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.denormalize(out), theirs.post_process_latents(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_parity_report_checks_pass():
    """The full official configuration against diffusers (fp32, the pipeline's CPU path, bf16) and the original
    fixture: the parity report's prior checks, whose tolerances live in kandinsky/parity/prior.py."""
    rows = list(checks())
    failed = [row for row in rows if not row.passed]
    assert len(rows) >= 3 and not failed, failed


@pytest.mark.slow
def test_22_parity_report_checks_pass():
    """Kandinsky 2.2's official prior (configs/prior_22.json: 1280-wide CLIP embeddings) against diffusers'
    PriorTransformer at embedding_dim 1280: fp32, the pipeline's CPU path, bf16 (the report's 2.2 rows)."""
    from kandinsky.parity.prior import CONFIG_22

    assert config_from_dict("prior", json.loads((ROOT / "configs" / "prior_22.json").read_text())) == CONFIG_22
    rows = list(checks(model="2.2"))
    failed = [row for row in rows if not row.passed]
    assert len(rows) == 3 and not failed, failed
    print("\n".join(f"{row.check}: max rel {row.max_rel:.3e}" for row in rows))


def test_padding_tokens_do_not_matter():
    prior, batch = _tiny(), inputs(TINY)
    with torch.no_grad():
        out = run_ours(prior, batch)
        changed = dict(batch, text_hidden_states=batch["text_hidden_states"].clone())
        changed["text_hidden_states"][~batch["text_mask"]] = 100.0
        torch.testing.assert_close(run_ours(prior, changed), out, rtol=0, atol=1e-6)
        changed["text_hidden_states"][0, 0] += 1.0  # a real token does matter
        assert (run_ours(prior, changed)[0] - out[0]).abs().max() > 1e-3
        # no mask = every token real
        full = dict(batch, text_mask=torch.ones_like(batch["text_mask"]))
        torch.testing.assert_close(run_ours(prior, dict(batch, text_mask=None)), run_ours(prior, full))
        # a row with no real text token stays finite (each token may attend to itself)
        empty = dict(batch, text_mask=torch.zeros_like(batch["text_mask"]))
        assert torch.isfinite(run_ours(prior, empty)).all()


def test_scalar_timestep_broadcasts():
    prior, batch = _tiny(), inputs(TINY)
    with torch.no_grad():
        scalar = run_ours(prior, dict(batch, timesteps=torch.tensor(7)))
        vector = run_ours(prior, dict(batch, timesteps=torch.tensor([7, 7])))
        python_int = run_ours(prior, dict(batch, timesteps=7))
    torch.testing.assert_close(scalar, vector, rtol=0, atol=0)
    torch.testing.assert_close(python_int, vector, rtol=0, atol=0)


def test_bfloat16_close_to_float32():
    prior, batch = _tiny(), inputs(TINY)
    with torch.no_grad():
        reference = run_ours(prior, batch)
        bf16 = prior.to(torch.bfloat16)
        out = run_ours(bf16, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()})
    assert out.dtype == torch.bfloat16 and bf16.clip_std.dtype == torch.bfloat16
    _, rel = max_errors(out.float(), reference)
    # bf16 has an 8-bit mantissa (~4e-3 relative per rounding); two blocks and a few GEMMs: a few 1e-2
    assert rel < 5e-2, rel


def test_buffers_are_persistent_and_no_meta_leftovers(original_fixture):
    """The converters build the prior on the meta device and fill it from the state dict: a buffer missing
    from the state dict would stay unallocated. The CLIP statistics arrive from either source."""
    prior = Prior(TINY)
    assert {"clip_mean", "clip_std"} <= {name for name, _ in prior.named_buffers()} <= set(prior.state_dict())
    tensors, meta = original_fixture("prior")
    stats = (tensors["input.clip_mean"], tensors["input.clip_std"])
    from_fixture = from_original("prior", meta["original_config"], prefixed(tensors, "state_dict."), clip_stats=stats)
    theirs, from_diffusers_prior = diffusers_prior(TINY, seed=3)
    for model, (mean, std) in ((from_fixture, stats), (from_diffusers_prior, (theirs.clip_mean, theirs.clip_std))):
        assert not [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        assert torch.equal(model.clip_mean, mean.reshape(-1)) and torch.equal(model.clip_std, std.reshape(-1))


def _bad(batch, **changes):
    return dict(batch, **changes)


@pytest.mark.parametrize("name,value,match", [
    ("x", torch.randn(2, 31), "x: expected"),
    ("x", torch.zeros(2, 32, dtype=torch.long), "x: expected"),
    ("timesteps", torch.tensor([1.0, 2.0]), "timesteps"),
    ("timesteps", torch.tensor([1, 2, 3]), "timesteps"),
    ("text_embeds", torch.randn(3, 32), "text_embeds"),
    ("text_hidden_states", torch.randn(2, 76, 32), "text_hidden_states"),
    ("text_mask", torch.ones(2, 77, dtype=torch.long), "text_mask"),
    ("text_mask", torch.ones(2, 70, dtype=torch.bool), "text_mask"),
])
def test_bad_inputs(name, value, match):
    prior, batch = _tiny(), inputs(TINY)
    with pytest.raises(ValueError, match=match):
        run_ours(prior, _bad(batch, **{name: value}))


def test_qkv_permutation():
    heads, head_dim = 2, 3
    # original rows: head-major [h0: q0 q1 q2 k0 k1 k2 v0 v1 v2 | h1: ...]; encode (head, part, index) in the value
    rows = torch.tensor([100 * h + 10 * part + i for h in range(heads) for part in range(3) for i in range(head_dim)])
    ours = head_major_to_qkv_major(rows, heads)
    expected = torch.tensor([100 * h + 10 * part + i for part in range(3) for h in range(heads) for i in range(head_dim)])
    assert torch.equal(ours, expected)
    assert head_major_to_qkv_major(torch.randn(18, 5), heads).shape == (18, 5)


def test_original_converter_errors(original_fixture):
    tensors, meta = original_fixture("prior")
    state = prefixed(tensors, "state_dict.")
    stats = (tensors["input.clip_mean"], tensors["input.clip_std"])
    with pytest.raises(ValueError, match="clip_stats"):
        from_original("prior", meta["original_config"], state)
    with pytest.raises(ValueError, match="clip_stats"):
        from_original("prior", meta["original_config"], state, clip_stats=(stats[0][:5], stats[1]))
    padded = json.loads(json.dumps(meta["original_config"]))
    padded["model"]["hparams"]["xf_padding"] = True
    with pytest.raises(ValueError, match="xf_padding"):
        from_original("prior", padded, state, clip_stats=stats)
    broken = {k: v for k, v in state.items() if k != "model.final_ln.bias"}
    broken["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        from_original("prior", meta["original_config"], broken, clip_stats=stats)
    assert "model.extra.weight" in str(info.value) and "final_norm.bias" in str(info.value)
    # (1, dim) statistics, as PriorDiffusionModel stores them, are accepted too
    prior = from_original("prior", meta["original_config"], state, clip_stats=(stats[0][None], stats[1][None]))
    torch.testing.assert_close(prior.clip_mean, stats[0], rtol=0, atol=0)


def test_diffusers_converter_rejects_unsupported_options():
    theirs, _ = diffusers_prior(TINY)
    config = {"num_attention_heads": 4, "attention_head_dim": 16, "num_layers": 2, "embedding_dim": 32,
              "num_embeddings": 77, "norm_in_type": "layer"}
    with pytest.raises(ValueError, match="norm_in_type"):
        from_diffusers("prior", config, theirs.state_dict())


def test_official_manifest_shapes():
    """Every key of the official prior_fp16.ckpt (manifest, 1.02 B parameters) converts to the right shape.

    A zeros state dict of the full shapes would be 4 GB: the manifest is replayed with meta tensors
    (shapes only) through the converter, then compared with our module built on the meta device.
    """
    manifest = json.loads((ROOT / "tests" / "fixtures" / "original" / "manifest_prior.json").read_text())
    state = {k: torch.empty(v["shape"], device="meta") for k, v in manifest["keys"].items()}
    source = Source(state, "original")
    stats = (torch.empty(768, device="meta"), torch.empty(768, device="meta"))
    config, converted = original("prior", OFFICIAL_ORIGINAL_CONFIGS["prior"], source, clip_stats=stats)
    assert config == PriorConfig()
    assert source.unused() == [] and source.missing == []
    with torch.device("meta"):
        expected = Prior(config).state_dict()
    assert sorted(converted) == sorted(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    parameters = sum(v.numel() for k, v in expected.items() if k not in ("clip_mean", "clip_std"))
    assert parameters == manifest["total_parameter_count"] == 1_022_028_544


def test_optimized_matches_diffusers_tiny():
    """The prior as the pipeline runs it on CPU (``ops.optimize``: oneDNN GEMMs, the last block for the prd
    token only), in float32 and in bfloat16."""
    theirs, ours = diffusers_prior(TINY, seed=3)
    batch = inputs(TINY, batch=3)
    with torch.no_grad():
        reference = run_diffusers(theirs, batch)
        out = run_ours(ops.optimize(ours, "cpu", torch.float32), batch)
        # float32, the same function in another summation order (measured 6e-7 relative)
        assert max_errors(out, reference)[1] < 1e-5
        ops.optimize(ours.to(torch.bfloat16), "cpu", torch.bfloat16)
        bf16 = run_ours(ours, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()})
    # bf16 tolerance, as test_bfloat16_close_to_float32 (measured 1.5e-2)
    assert bf16.dtype == torch.bfloat16 and max_errors(bf16.float(), reference)[1] < 5e-2


def _prefix(prior, batch):
    return prior.encode_text(text_embeds=batch["text_embeds"], text_hidden_states=batch["text_hidden_states"],
                             text_mask=batch["text_mask"])


@pytest.mark.parametrize("optimized", [False, True])
def test_text_prefix_gives_the_full_forward_at_every_step(optimized):
    """encode_text once, then any x and timestep: the full forward's output (with padding tokens, and through
    the ops' last-query block). The same float32 sums of products in other GEMM shapes (measured ~1e-6
    relative)."""
    prior, batch = _tiny(), inputs(TINY, batch=3)
    assert not batch["text_mask"].all()  # padding keys are masked in the cached rows too
    if optimized:
        ops.optimize(prior, "cpu", torch.float32)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        prefix = _prefix(prior, batch)
        for timesteps in (torch.tensor([999, 500, 0]), 17):
            x = torch.randn(batch["x"].shape, generator=generator)
            full = run_ours(prior, dict(batch, x=x, timesteps=timesteps))
            cached = prior(x, timesteps, text_prefix=prefix)
            assert cached.shape == full.shape
            assert max_errors(cached, full)[1] < 1e-5
        # the prefix is the text's: another prompt's prefix gives another output
        other = _prefix(prior, dict(batch, text_embeds=batch["text_embeds"] + 1.0))
        assert (prior(x, 17, text_prefix=other) - cached).abs().max() > 1e-3


def test_text_prefix_bad_inputs():
    prior, batch = _tiny(), inputs(TINY)
    with torch.no_grad():
        prefix = _prefix(prior, batch)
        with pytest.raises(ValueError, match="text_prefix: give either"):
            prior(batch["x"], batch["timesteps"], text_prefix=prefix, text_embeds=batch["text_embeds"])
        with pytest.raises(ValueError, match="text_prefix: encoded for batch 2, but x has 3 rows"):
            prior(torch.zeros(3, TINY.clip_dim), 5, text_prefix=prefix)
        with pytest.raises(ValueError, match="text_prefix: expected a TextPrefix"):
            prior(batch["x"], 5, text_prefix=(batch["text_embeds"],))
        with pytest.raises(ValueError, match="text_embeds: expected a float tensor"):
            prior.encode_text(text_embeds=batch["text_embeds"][:, :3], text_hidden_states=batch["text_hidden_states"])
        with pytest.raises(ValueError, match="text_mask: expected a bool tensor"):
            prior.encode_text(text_embeds=batch["text_embeds"], text_hidden_states=batch["text_hidden_states"],
                              text_mask=batch["text_mask"].float())


def test_official_diffusers_config_shapes():
    """kandinsky-community/kandinsky-2-1-prior prior/config.json, replayed on the meta device (shapes only)."""
    from diffusers import PriorTransformer

    from kandinsky.convert.prior import diffusers

    config = {"_class_name": "PriorTransformer", "additional_embeddings": 4, "attention_head_dim": 64, "dropout": 0.0,
              "embedding_dim": 768, "num_attention_heads": 32, "num_embeddings": 77, "num_layers": 20}
    with torch.device("meta"):
        state = PriorTransformer(**{k: v for k, v in config.items() if k != "_class_name"}).state_dict()
        expected = Prior(PriorConfig()).state_dict()
    source = Source(state, "diffusers")
    ours, converted = diffusers("prior", config, source)
    assert ours == PriorConfig() and source.unused() == [] and source.missing == []
    assert sorted(converted) == sorted(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


# ------------------------------------------------------------------------------------------------ Kandinsky 2.2


def test_22_prior_is_the_same_class_at_vit_bigg_widths():
    """Kandinsky 2.2's prior differs from 2.1's only in its CLIP widths (ViT-bigG: 1280 in and out, over the same
    2048-wide transformer): a config choice. The tiny 2.2 prior (48 over 64) against diffusers' PriorTransformer."""
    assert config_from_dict("prior", json.loads((ROOT / "configs" / "prior_22.json").read_text())) == \
        PriorConfig(clip_dim=1280, text_width=1280)
    tiny_22 = config_from_dict("prior", json.loads((ROOT / "configs" / "prior_22_tiny.json").read_text()))
    assert (tiny_22.clip_dim, tiny_22.width) == (48, 64)
    theirs, ours = diffusers_prior(tiny_22, seed=5)
    batch = inputs(tiny_22, batch=3)
    with torch.no_grad():
        out, reference = run_ours(ours, batch), run_diffusers(theirs, batch)
    assert out.shape == (3, 48)
    assert max_errors(out, reference)[1] < 1e-4  # float32, same operations: measured 0
    torch.testing.assert_close(ours.denormalize(out), theirs.post_process_latents(reference), rtol=1e-5, atol=1e-5)


def test_official_22_diffusers_config_shapes():
    """kandinsky-community/kandinsky-2-2-prior prior/config.json (embedding_dim 1280), on the meta device."""
    from diffusers import PriorTransformer

    from kandinsky.convert.prior import diffusers

    config = {"additional_embeddings": 4, "attention_head_dim": 64, "dropout": 0.0, "embedding_dim": 1280,
              "num_attention_heads": 32, "num_embeddings": 77, "num_layers": 20}
    with torch.device("meta"):
        state = PriorTransformer(**config).state_dict()
        expected = Prior(PriorConfig(clip_dim=1280, text_width=1280)).state_dict()
    source = Source(state, "diffusers")
    ours, converted = diffusers("prior", config, source)
    assert ours == PriorConfig(clip_dim=1280, text_width=1280) and source.unused() == [] and source.missing == []
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}

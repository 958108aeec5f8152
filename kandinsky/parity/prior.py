"""Prior parity: the full official configuration against diffusers 0.42.1 ``PriorTransformer`` (same
random weights, converted with our diffusers converter) and the original implementation's fixture; with
``checks(model="2.2")`` Kandinsky 2.2's prior (:data:`CONFIG_22`: the same transformer over ViT-bigG's 1280-wide
embeddings; no original fixture: 2.2 has no original implementation of its own).

Also the helpers the prior tests and benchmark share: :func:`diffusers_prior`, :func:`inputs`.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import torch

from kandinsky import ops
from kandinsky.models.prior import PriorConfig
from kandinsky.parity import Row, compare
from kandinsky.testing import load_original_fixture, prefixed, randomize_

CONFIG_22 = PriorConfig(clip_dim=1280, text_width=1280)  # = configs/prior_22.json
MODELS = ("2.1", "2.2")


def _positive_std(param: torch.Tensor, generator: torch.Generator) -> None:
    param.copy_(0.5 + torch.rand(param.shape, generator=generator))  # like the fixtures' clip_std


def diffusers_prior(config: PriorConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(diffusers ``PriorTransformer`` with seeded random weights, ours converted from it), eval mode."""
    from diffusers import PriorTransformer

    from kandinsky.convert import from_diffusers

    if config.text_width != config.clip_dim:
        raise ValueError("diffusers' PriorTransformer needs text_width == clip_dim")
    diffusers_config = {"num_attention_heads": config.heads, "attention_head_dim": config.width // config.heads,
                        "num_layers": config.layers, "embedding_dim": config.clip_dim, "num_embeddings": config.text_ctx,
                        "additional_embeddings": 4, "dropout": 0.0}
    with torch.device("meta"):  # skip diffusers' own (slow, full-size) initialisation
        theirs = PriorTransformer(**diffusers_config)
    theirs = theirs.to_empty(device="cpu")
    theirs.causal_attention_mask = torch.full_like(theirs.causal_attention_mask, -10000.0).triu_(1)  # non-persistent
    randomize_(theirs, seed, overrides={"clip_std": _positive_std})
    ours = from_diffusers("prior", diffusers_config, theirs.state_dict(), dtype=dtype)
    return (theirs if dtype == torch.float32 else theirs.to(dtype)).eval(), ours


def inputs(config: PriorConfig, batch: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """Random prior inputs: ``x``, ``timesteps``, ``text_embeds``, ``text_hidden_states``, ``text_mask``
    (prefix masks with 5, 12, ... real tokens, as the fixture)."""
    generator = torch.Generator().manual_seed(seed)
    valid = torch.tensor([5 + 7 * i for i in range(batch)]).clamp(max=config.text_ctx)
    return {
        "x": torch.randn(batch, config.clip_dim, generator=generator).to(dtype),
        "timesteps": torch.randint(0, 1000, (batch,), generator=generator),
        "text_embeds": torch.randn(batch, config.clip_dim, generator=generator).to(dtype),
        "text_hidden_states": torch.randn(batch, config.text_ctx, config.text_width, generator=generator).to(dtype),
        "text_mask": torch.arange(config.text_ctx)[None] < valid[:, None],
    }


def run_ours(prior, batch: dict) -> torch.Tensor:
    return prior(batch["x"], batch["timesteps"], text_embeds=batch["text_embeds"],
                 text_hidden_states=batch["text_hidden_states"], text_mask=batch["text_mask"])


def run_diffusers(model, batch: dict) -> torch.Tensor:
    """diffusers' call convention: ``proj_embedding`` = pooled text embedding, ``encoder_hidden_states``
    = text states, ``attention_mask`` = bool text mask; it works in the normalised space like ours."""
    return model(batch["x"], timestep=batch["timesteps"], proj_embedding=batch["text_embeds"],
                 encoder_hidden_states=batch["text_hidden_states"], attention_mask=batch["text_mask"]
                 ).predicted_image_embedding


def original_fixture_output(prior=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, original) outputs on the original fixture ``prior``."""
    from kandinsky.convert import from_original

    tensors, meta = load_original_fixture("prior")
    if prior is None:
        prior = from_original("prior", meta["original_config"], prefixed(tensors, "state_dict."),
                              clip_stats=(tensors["input.clip_mean"], tensors["input.clip_std"]))
    with torch.no_grad():
        ours = prior(tensors["input.x"], tensors["input.timesteps"], text_embeds=tensors["input.text_emb"],
                     text_hidden_states=tensors["input.text_enc"], text_mask=tensors["input.mask"])
    return ours, tensors["output.out"]


def checks(model: str = "2.1") -> Iterator[Row]:
    """The original fixture (2.1), then the full official prior of ``model`` against diffusers: float32, as the
    pipeline runs it on CPU, and ours in bfloat16."""
    if model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {model!r}")
    label = "" if model == "2.1" else "2.2 "
    if model == "2.1":
        ours, reference = original_fixture_output()
        # float32, same math, other summation order: the fixture's thread-count noise is ~5e-6
        yield compare("prior", "original fixture (tiny, fp32) abs", ours, reference, 1e-5, metric="abs")

    config = PriorConfig() if model == "2.1" else CONFIG_22
    theirs, ours = diffusers_prior(config, seed=0)
    batch = inputs(config)
    with torch.no_grad():
        reference = run_diffusers(theirs, batch)
        del theirs
        gc.collect()
        # 20 float32 layers of width 2048 with separate vs fused GEMMs: summation-order noise only
        yield compare("prior", f"{label}diffusers full config, fp32, batch 2", run_ours(ours, batch), reference, 1e-4)
        yield compare("prior", f"{label}same, ours as the pipeline runs it (ops.optimize, CPU)",
                      run_ours(ops.optimize(ours, "cpu", torch.float32), batch), reference, 1e-4)
        ops.plain(ours)
        bf16 = ours.to(torch.bfloat16)
        out = run_ours(bf16, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()})
        # bf16 weights and activations (8-bit mantissa) through 20 layers: ~1e-2 relative is the expected drift
        yield compare("prior", f"{label}ours bf16 vs diffusers fp32, full config", out.float(), reference, 5e-2)
    del ours, bf16
    gc.collect()

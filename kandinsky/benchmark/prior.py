"""Prior benchmark: one forward of the full official prior (batch 2) against diffusers 0.42.1
``PriorTransformer`` with identical weights, interleaved, in float32 or bfloat16 (``args.dtype``).

Rows of one forward: ours as the pipeline runs it (``ops.optimize`` for the CPU: oneDNN GEMMs, the last block
for the prd token only, the text positions that are padding in both rows left out), the same on prompts that
fill all 77 text positions (nothing to leave out: the longest prompts), and the plain model (``ops.plain``).
Peak memory is measured per side in a fresh process. A last row times the model's share of a prior sampling
loop, :data:`SAMPLING_STEPS` forwards of batch 2 over one prompt batch: ours as the pipeline runs it
(``encode_text`` once, then each step only the three per-step positions against the text's cached keys and
values), diffusers a whole forward per step, as its pipeline does.
``--model 2.2``: Kandinsky 2.2's prior (the same transformer over 1280-wide CLIP embeddings).
"""

from __future__ import annotations

import gc

import torch

from kandinsky import ops
from kandinsky.benchmark import Result, count_flops, interleaved, peak_rss_gib
from kandinsky.models.prior import Prior, PriorConfig
from kandinsky.parity.prior import CONFIG_22, diffusers_prior, inputs, run_diffusers, run_ours

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODELS = ("2.1", "2.2")
SAMPLING_STEPS = 25  # the pipelines' default prior steps


def prior_config(model: str = "2.1") -> PriorConfig:
    """The official prior of Kandinsky ``model``."""
    if model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {model!r}")
    return PriorConfig() if model == "2.1" else CONFIG_22


def memory_probe(side: str, dtype_name: str, optimized: str = "1", model_name: str = "2.1") -> None:
    """Build one side at the full config of Kandinsky ``model_name`` (weights left at zero: values do not change
    memory) and run one forward, batch 2. Called in a separate process by :func:`kandinsky.benchmark.peak_rss_gib`."""
    dtype, config = _DTYPES[dtype_name], prior_config(model_name)
    batch = inputs(config, dtype=dtype)
    with torch.device("meta"):
        if side == "ours":
            model = Prior(config)
        else:
            from diffusers import PriorTransformer

            # its defaults are the Kandinsky 2.1 prior; 2.2's differs in the CLIP width only
            model = PriorTransformer(embedding_dim=config.clip_dim)
    model = model.to(dtype).to_empty(device="cpu")  # cast on the meta device: allocate once, in dtype
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    with torch.inference_mode():
        if side == "ours":
            run_ours(ops.optimize(model, "cpu", dtype) if optimized == "1" else model, batch)
        else:
            run_diffusers(model, batch)


def run(args) -> list[Result]:
    dtype = _DTYPES[args.dtype]
    model = getattr(args, "model", "2.1") or "2.1"
    memory = {}
    if not getattr(args, "no_memory", False):
        # before any model exists here: a child's ru_maxrss starts from this process's RSS at fork time
        memory = {side_key: peak_rss_gib("kandinsky.benchmark.prior:memory_probe", side, args.dtype, "1", model)
                  for side_key, side in (("peak_rss_gib_ours", "ours"), ("peak_rss_gib_diffusers", "diffusers"))}
    config = prior_config(model)
    theirs, ours = diffusers_prior(config, seed=0, dtype=dtype)
    batch = inputs(config, batch=2, dtype=dtype)

    def optimized():
        return run_ours(ops.optimize(ours, "cpu", dtype), batch)

    def plain():
        return run_ours(ops.plain(ours), batch)

    def reference():
        return run_diffusers(theirs, batch)

    long_prompts = dict(batch, text_mask=torch.ones_like(batch["text_mask"]))

    def optimized_long():
        return run_ours(ops.optimize(ours, "cpu", dtype), long_prompts)

    def reference_long():
        return run_diffusers(theirs, long_prompts)

    # our arithmetic with the GEMMs through F.linear, which the flop counter sees (oneDNN's it does not)
    ops.generic.optimize(ops.plain(ours))
    gflop = {"ours": count_flops(lambda: run_ours(ours, batch)) / 1e9, "diffusers": count_flops(reference) / 1e9,
             "ours_long": count_flops(lambda: run_ours(ours, long_prompts)) / 1e9,
             "ours_plain": count_flops(lambda: run_ours(ops.plain(ours), batch)) / 1e9}
    times = interleaved({"ours": optimized, "ours_plain": plain, "diffusers": reference,
                         "ours_long": optimized_long, "diffusers_long": reference_long}, repeats=args.repeats, warmup=1)
    timesteps = torch.linspace(999, 0, SAMPLING_STEPS).long()

    def sampling_ours():
        model = ops.optimize(ours, "cpu", dtype)
        text_prefix = model.encode_text(text_embeds=batch["text_embeds"], text_hidden_states=batch["text_hidden_states"],
                                        text_mask=batch["text_mask"])
        return [model(batch["x"], t, text_prefix=text_prefix) for t in timesteps]

    def sampling_diffusers():
        return [run_diffusers(theirs, dict(batch, timesteps=t.expand(2))) for t in timesteps]

    # warmed up by the forwards above
    times.update(interleaved({"sampling_ours": sampling_ours, "sampling_diffusers": sampling_diffusers},
                             repeats=args.repeats, warmup=0))
    del theirs, ours
    gc.collect()

    extra = {"dtype": args.dtype, "batch": 2, "gflop_ours": gflop["ours"], "gflop_diffusers": gflop["diffusers"]}
    label = "" if model == "2.1" else "Kandinsky 2.2, "
    return [
        Result("prior", f"{label}forward, full config, batch 2, {args.dtype}", times["ours"], times["diffusers"],
               {**extra, **memory}),
        Result("prior", f"{label}forward, full config, batch 2, {args.dtype}, prompts of 77 tokens (no padding)",
               times["ours_long"], times["diffusers_long"], dict(extra, gflop_ours=gflop["ours_long"])),
        Result("prior", f"{label}forward, full config, batch 2, {args.dtype}, plain model (no ops)",
               times["ours_plain"], times["diffusers"], dict(extra, gflop_ours=gflop["ours_plain"])),
        Result("prior", f"{label}sampling loop: {SAMPLING_STEPS} forwards, batch 2, {args.dtype} (ours: the text "
               "encoded once)", times["sampling_ours"], times["sampling_diffusers"], {**extra, "steps": SAMPLING_STEPS}),
    ]

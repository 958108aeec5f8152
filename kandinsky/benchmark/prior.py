"""Prior benchmark: one forward of the full official prior (batch 2) against diffusers 0.42.1
``PriorTransformer`` with identical weights, interleaved, in float32 or bfloat16 (``args.dtype``).

Two rows: our default path (``F.linear``, i.e. MKL on CPU) and ``prior.use_onednn()`` (the same GEMMs
through oneDNN). Peak memory is measured per side in a fresh process.
"""

from __future__ import annotations

import gc

import torch

from kandinsky.benchmark import Result, count_flops, interleaved, peak_rss_gib
from kandinsky.models.prior import Prior, PriorConfig
from kandinsky.parity.prior import diffusers_prior, inputs, run_diffusers, run_ours

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def memory_probe(side: str, dtype_name: str, onednn: str = "0") -> None:
    """Build one side at the full config (weights left at zero: values do not change memory) and run
    one forward, batch 2. Called in a separate process by :func:`kandinsky.benchmark.peak_rss_gib`."""
    dtype, config = _DTYPES[dtype_name], PriorConfig()
    batch = inputs(config, dtype=dtype)
    with torch.device("meta"):
        if side == "ours":
            model = Prior(config)
        else:
            from diffusers import PriorTransformer

            model = PriorTransformer()  # its defaults are the Kandinsky 2.1 prior
    model = model.to(dtype).to_empty(device="cpu")  # cast on the meta device: allocate once, in dtype
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    with torch.inference_mode():
        if side == "ours":
            run_ours(model.use_onednn(onednn == "1"), batch)
        else:
            run_diffusers(model, batch)


def run(args) -> list[Result]:
    dtype = _DTYPES[args.dtype]
    memory = {}
    if not getattr(args, "no_memory", False):
        # before any model exists here: a child's ru_maxrss starts from this process's RSS at fork time
        memory = {"peak_rss_gib_ours": peak_rss_gib("kandinsky.benchmark.prior:memory_probe", "ours", args.dtype, "0"),
                  "peak_rss_gib_diffusers": peak_rss_gib("kandinsky.benchmark.prior:memory_probe", "diffusers", args.dtype)}
    config = PriorConfig()
    theirs, ours = diffusers_prior(config, seed=0, dtype=dtype)
    batch = inputs(config, batch=2, dtype=dtype)

    def plain():
        return run_ours(ours.use_onednn(False), batch)

    def onednn():
        return run_ours(ours.use_onednn(True), batch)

    def reference():
        return run_diffusers(theirs, batch)

    gflop = {"ours": count_flops(plain) / 1e9, "diffusers": count_flops(reference) / 1e9}
    times = interleaved({"ours": plain, "ours_onednn": onednn, "diffusers": reference}, repeats=args.repeats, warmup=1)
    del theirs, ours
    gc.collect()

    extra = {"dtype": args.dtype, "batch": 2, "gflop_ours": gflop["ours"], "gflop_diffusers": gflop["diffusers"]}
    return [
        Result("prior", f"forward, full config, batch 2, {args.dtype}", times["ours"], times["diffusers"],
               {**extra, **memory}),
        Result("prior", f"forward, full config, batch 2, {args.dtype}, use_onednn()", times["ours_onednn"],
               times["diffusers"], dict(extra)),
    ]

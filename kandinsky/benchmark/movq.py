"""MoVQ benchmark: ours vs diffusers 0.42.1 ``VQModel`` at the full official config with identical
(random, converted) weights, in one process (same allocator, interleaved repeats).

Cases: ``decode`` of a (1,4,64,64) latent (a 512x512 image) and ``encode`` of a (1,3,512,512) image.
Peak memory of each side is measured in a fresh process (:func:`memory_probe`).
"""

from __future__ import annotations

import gc

import torch

from kandinsky import ops
from kandinsky.benchmark import Result, count_flops, interleaved, peak_rss_gib
from kandinsky.convert.movq import to_diffusers_config
from kandinsky.models.movq import MoVQ, MoVQConfig
from kandinsky.testing import randomize_

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _inputs(case: str, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if case == "decode":
        return torch.randn(1, 4, 64, 64, generator=generator).to(dtype)
    return (torch.rand(1, 3, 512, 512, generator=generator) * 2 - 1).to(dtype)


def _call(side: str, model: torch.nn.Module, case: str, x: torch.Tensor):
    if side == "ours":
        return model.decode(x) if case == "decode" else model.encode(x)
    return model.decode(x, force_not_quantize=True).sample if case == "decode" else model.encode(x).latents


def memory_probe(side: str, case: str, dtype: str = "float32") -> None:
    """Build one side at the full config, run one case once (run by ``peak_rss_gib`` in its own process)."""
    torch_dtype = _DTYPES[dtype]
    if side == "ours":
        model = ops.optimize(randomize_(MoVQ(MoVQConfig()), 0), "cpu", torch_dtype)  # as Kandinsky21 loads it
    else:
        from diffusers import VQModel

        model = randomize_(VQModel(**to_diffusers_config(MoVQConfig())), 0)
    model = model.eval().to(torch_dtype)
    with torch.inference_mode():
        _call(side, model, case, _inputs(case, torch_dtype))


def run(args) -> list[Result]:
    """Timings (and, unless ``args.no_memory``, peak memory) of decode and encode, ours vs diffusers."""
    from diffusers import VQModel

    from kandinsky.convert import from_diffusers

    dtype = _DTYPES[args.dtype]
    reference = randomize_(VQModel(**to_diffusers_config(MoVQConfig())), 0).eval().to(dtype)
    ours = ops.optimize(from_diffusers("movq", dict(reference.config), reference.state_dict(), dtype=dtype),
                        "cpu", dtype)  # as Kandinsky21 loads it
    models = {"ours": ours, "diffusers": reference}
    results = []
    for case in ("decode", "encode"):
        x = _inputs(case, dtype)
        times = interleaved({side: (lambda s=side: _call(s, models[s], case, x)) for side in models},
                            repeats=args.repeats, warmup=1)
        flops = count_flops(lambda: _call("diffusers", reference, case, x))
        extra = {"dtype": args.dtype, "input": "x".join(map(str, x.shape)), "diffusers_gflop": flops / 1e9,
                 "ours_gflop_per_s": flops / 1e9 / min(times["ours"]),
                 "diffusers_gflop_per_s": flops / 1e9 / min(times["diffusers"]), "threads": torch.get_num_threads()}
        name = f"{case} {extra['input']} {args.dtype}"
        results.append(Result("movq", name, times["ours"], times["diffusers"], extra))
    del reference, ours, models
    gc.collect()
    if not args.no_memory:
        for result, case in zip(results, ("decode", "encode")):
            for side in ("ours", "diffusers"):
                result.extra[f"{side}_peak_rss_gib"] = peak_rss_gib("kandinsky.benchmark.movq:memory_probe",
                                                                     side, case, args.dtype)
    return results


def tiled_memory_probe(size: str = "192", tile: str = "64", overlap: str = "16") -> None:
    """Our full-config ``decode_tiled`` of a (1, 4, size, size) latent (192 = a 1536 px image), for
    ``peak_rss_gib("kandinsky.benchmark.movq:tiled_memory_probe", "192", "64", "16")``; ``tile="0"`` runs the
    untiled ``decode`` instead (several GiB more at 1536 px)."""
    model = ops.optimize(randomize_(MoVQ(MoVQConfig()), 0).eval(), "cpu", torch.float32)
    latents = torch.randn(1, 4, int(size), int(size), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if int(tile):
            model.decode_tiled(latents, tile=int(tile), overlap=int(overlap))
        else:
            model.decode(latents)

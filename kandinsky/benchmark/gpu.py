"""GPU benchmark: text2img at 768 px on CUDA, our :class:`~kandinsky.pipeline.Kandinsky21` against diffusers
0.42.1 (``KandinskyCombinedPipeline``) with the same random weights at the full official configurations, both
in float16 (``--dtype bfloat16`` or ``float32`` to change), both resident in one process, interleaved rounds.

What is measured (``kandinsky bench gpu``):

* text2img at 768 px with 25 prior + 50 decoder steps, timed whole (a GPU runs it in seconds),
  and the largest pixel difference between the two images (same seed, same noise);
* the pieces: one decoder step (UNet, batch 2, 96x96 latents, with achieved TFLOP/s), one prior step
  (batch 2), one MoVQ decode, each with the relative difference of the outputs. Timed as single calls
  waited for, and "back-to-back" (calls queued without waiting, as in a sampling loop that never
  synchronises: on a fast GPU the host's kernel launches can take longer than the kernels);
* GPU memory: each side's weights, and the peak of its text2img above them (``max_memory_allocated``);
* host syncs: the synchronising CUDA calls (``torch.cuda.set_sync_debug_mode``) inside our sampling loops,
  and in each side's whole text2img call;
* :meth:`Kandinsky21.compile_unet` (inductor, default mode): the first call (compilation included), the
  compiled text2img against diffusers with ``pipe.unet = torch.compile(pipe.unet)``, and how far the compiled
  image moves from the eager one. Skipped when ``--budget`` seconds have already been spent.

Results are printed as they come (a lent GPU machine may be taken back) and written by ``kandinsky bench``.
``config="tiny"`` with ``device="cpu"`` runs the same code on tiny components, for the tests.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from kandinsky.benchmark import Result, count_flops, interleaved
from kandinsky.benchmark.pipeline import check_config, diffusers_pipelines, text2img_diffusers, text2img_ours
from kandinsky.testing import max_errors

SIZES = {"full": 768, "tiny": 64}
STEPS = {"full": (25, 50), "tiny": (2, 3)}  # (prior, decoder); full: what issue #17's GPU target specifies
PIECE_REPEATS = 10  # a UNet step is milliseconds on a GPU: more rounds for a stable median
SYNC_WARNING = "called a synchronizing CUDA operation"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation, so that a host clock around it times the GPU work."""
    def call():
        out = fn()
        _synchronize(device)
        return out
    return call


def back_to_back(fn: Callable[[], object], device: torch.device, calls: int = 10, rounds: int = 3) -> float:
    """Median seconds per call of ``calls`` calls queued without waiting in between, over ``rounds`` rounds:
    what a sampling loop that never synchronises sees (host work overlaps the GPU's)."""
    times = []
    with torch.inference_mode():
        for _ in range(rounds):
            _synchronize(device)
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            _synchronize(device)
            times.append((time.perf_counter() - begin) / calls)
    return statistics.median(times)


def build(config: str = "full", device: str | torch.device = "cuda", dtype: torch.dtype = torch.float16,
          seed: int = 0):
    """(diffusers' prior pipeline, decoder pipeline, combined pipeline, our ``Kandinsky21``) with one set of
    seeded random weights, everything on ``device`` in ``dtype``. The CLIP towers are the same objects on
    both sides; ours converts the prior, UNet, MoVQ (copies) and M-CLIP (shared tensors)."""
    from kandinsky.pipeline import Kandinsky21

    prior_pipe, decoder_pipe, combined = diffusers_pipelines(check_config(config), seed)
    combined.to(device=device, dtype=dtype)  # its components are the two pipelines' objects
    ours = Kandinsky21.from_diffusers(prior_pipe, decoder_pipe, device=device, dtype=dtype, progress=False)
    return prior_pipe, decoder_pipe, combined, ours


def weights_gib(modules: list[nn.Module]) -> float:
    """GiB of the distinct tensors (parameters and buffers) of ``modules``."""
    seen, total = set(), 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
    return total / 2**30


def peak_gib(fn: Callable[[], object], device: torch.device) -> float:
    """GiB of device memory ``fn`` allocated at its peak above what was allocated before it."""
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def count_syncs(fn: Callable[[], object], sampling_loops_only: bool = False) -> int:
    """Synchronising CUDA calls while ``fn`` runs (``torch.cuda.set_sync_debug_mode("warn")``), or only
    inside :func:`kandinsky.schedulers.sample` (our sampling loops) with ``sampling_loops_only``."""
    from kandinsky import schedulers

    sample = schedulers.sample

    def watched_sample(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return sample(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sampling_loops_only:
            schedulers.sample = watched_sample
        else:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.inference_mode():
                fn()
        finally:
            schedulers.sample = sample
            torch.cuda.set_sync_debug_mode("default")
    return sum(SYNC_WARNING in str(w.message) for w in caught)


def _pieces(prior_pipe, decoder_pipe, ours, size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """name -> (ours callable, diffusers callable): one step of each model on the same inputs."""
    from kandinsky.parity import prior as prior_parity
    from kandinsky.parity import unet as unet_parity

    def on_device(batch: dict) -> dict:
        return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}

    latent = size // ours.module("movq").config.downsample_factor
    unet_batch = on_device(unet_parity.inputs(ours.module("unet").config, batch=2, height=latent, width=latent))
    prior_batch = on_device(prior_parity.inputs(ours.module("prior").config, batch=2))
    latents = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    return {
        f"decoder step (UNet, batch 2, 4x{latent}x{latent})": (
            lambda: unet_parity.run_ours(ours.module("unet"), unet_batch),
            lambda: unet_parity.run_diffusers(decoder_pipe.unet, unet_batch)),
        "prior step (batch 2)": (
            lambda: prior_parity.run_ours(ours.module("prior"), prior_batch),
            lambda: prior_parity.run_diffusers(prior_pipe.prior, prior_batch)),
        f"MoVQ decode 1x4x{latent}x{latent}": (
            lambda: ours.module("movq").decode(latents),
            lambda: decoder_pipe.movq.decode(latents, force_not_quantize=True).sample),
    }


def _report(result: Result) -> Result:
    """Print one result as soon as it is measured (a lent machine may go away before the table is written)."""
    extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.extra.items())
    print(f"[gpu] {result.case}: ours {statistics.median(result.ours):.4f}, diffusers "
          f"{statistics.median(result.diffusers):.4f}, ratio {result.ratio:.3f}; {extra}", flush=True)
    return result


def run(args, config: str | None = None) -> list[Result]:
    """All measurements (see the module docstring); ``args``: ``repeats``, ``dtype`` (default float16) and
    optionally ``config`` ("full" or "tiny"), ``device`` (default "cuda"), ``budget`` (seconds after which
    the compile measurements are skipped; default 420) and ``no_compile``."""
    start = time.perf_counter()
    config = check_config(getattr(args, "config", None) or config or "full")
    device = torch.device(getattr(args, "device", None) or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("kandinsky bench gpu: no CUDA device is available (torch.cuda.is_available() is False)")
    dtype = getattr(torch, args.dtype or "float16")
    budget = getattr(args, "budget", None) or 420.0
    size, steps = SIZES[config], STEPS[config]
    label = str(dtype).removeprefix("torch.")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32

    prior_pipe, decoder_pipe, combined, ours = build(config, device, dtype)
    print(f"[gpu] built in {time.perf_counter() - start:.0f} s", flush=True)
    results: list[Result] = []

    # ---- pieces: one step of each model
    for name, (ours_fn, diffusers_fn) in _pieces(prior_pipe, decoder_pipe, ours, size, device, dtype).items():
        with torch.inference_mode():
            difference = max_errors(ours_fn().float(), diffusers_fn().float())[1]
        times = interleaved({"ours": _synced(ours_fn, device), "diffusers": _synced(diffusers_fn, device)},
                            repeats=max(args.repeats, PIECE_REPEATS), warmup=2)
        extra = {"output max rel diff": difference, "ours back-to-back s": back_to_back(ours_fn, device),
                 "diffusers back-to-back s": back_to_back(diffusers_fn, device)}
        if name.startswith("decoder step"):
            flops = count_flops(diffusers_fn)
            extra.update({"TFLOP": flops / 1e12, "ours TFLOP/s": flops / 1e12 / statistics.median(times["ours"]),
                          "diffusers TFLOP/s": flops / 1e12 / statistics.median(times["diffusers"])})
        results.append(_report(Result("gpu", f"{name}, {label}", times["ours"], times["diffusers"], extra)))

    # ---- text2img, whole
    images: dict[str, object] = {}

    def text2img(side: str) -> Callable[[], None]:
        def call():
            if side == "diffusers":
                images[side] = text2img_diffusers(combined, size, steps)
            else:
                images[side] = text2img_ours(ours, size, steps)
        return call

    times = interleaved({side: text2img(side) for side in ("ours", "diffusers")}, repeats=args.repeats, warmup=1)
    extra = {"image max abs diff (0..1)": max_errors(torch.as_tensor(images["ours"]),
                                                      torch.as_tensor(images["diffusers"]))[0]}
    if cuda:
        extra.update({"ours weights GiB": weights_gib([ours.module(n) for n in
                                                       ("clip_text", "clip_vision", "prior", "mclip", "unet", "movq")]),
                      "diffusers weights GiB": weights_gib([m for m in combined.components.values()
                                                            if isinstance(m, nn.Module)])})
        with torch.inference_mode():
            extra["ours peak GiB above weights"] = peak_gib(text2img("ours"), device)
            extra["diffusers peak GiB above weights"] = peak_gib(text2img("diffusers"), device)
        extra["ours syncs in sampling loops"] = count_syncs(text2img("ours"), sampling_loops_only=True)
        extra["ours syncs in text2img"] = count_syncs(text2img("ours"))
        extra["diffusers syncs in text2img"] = count_syncs(text2img("diffusers"))
    case = f"text2img {size}px, {steps[0]} + {steps[1]} steps, {label}"
    results.append(_report(Result("gpu", case, times["ours"], times["diffusers"], extra)))

    # ---- compiled UNet on both sides
    if getattr(args, "no_compile", False) or time.perf_counter() - start > budget:
        print(f"[gpu] compile measurements skipped ({time.perf_counter() - start:.0f} s spent, budget {budget:.0f} s)",
              flush=True)
        return results
    eager_image = torch.as_tensor(images["ours"])
    options = {} if cuda else {"backend": "eager"}  # the CPU test checks the plumbing, not inductor
    eager_unet = combined.decoder_pipe.unet  # what KandinskyCombinedPipeline calls
    ours.compile_unet(**options)
    combined.decoder_pipe.unet = torch.compile(eager_unet, **options)
    try:
        first = {}
        for side in ("ours", "diffusers"):
            begin = time.perf_counter()
            with torch.inference_mode():
                text2img(side)()
            first[side] = time.perf_counter() - begin
        times = interleaved({side: text2img(side) for side in ("ours", "diffusers")}, repeats=args.repeats, warmup=0)
        extra = {"ours first call s (compiles)": first["ours"], "diffusers first call s (compiles)": first["diffusers"],
                 "ours compiled vs eager image max abs diff": max_errors(torch.as_tensor(images["ours"]), eager_image)[0]}
        results.append(_report(Result("gpu", f"{case}, UNet compiled on both sides", times["ours"], times["diffusers"],
                                      extra)))
    finally:
        ours.compile_unet(disable=True)
        combined.decoder_pipe.unet = eager_unet
    return results

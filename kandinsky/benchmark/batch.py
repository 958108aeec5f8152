"""Throughput of ``kandinsky batch`` against diffusers 0.42.1's ``KandinskyCombinedPipeline`` called once per
prompt: images per hour at 512 px with reduced step counts, identical weights (full official configurations,
random weights).

Both sides start from the same weights on disk (:func:`kandinsky.benchmark.pipeline.write_folders`: ours
converted, diffusers' ``save_pretrained``) and each runs alone in a fresh process, the sides alternating
(ours, diffusers, ours, ...) ``repeats`` times so that their memory never adds up and machine noise hits both:

* ours: the real command, ``python -m kandinsky batch PROMPTS --weights FOLDER/ours --batch-size BATCH_SIZE``;
* diffusers: ``KandinskyCombinedPipeline`` built from the saved folders, one call per prompt with that item's
  generator (seed + index, as ``kandinsky batch`` seeds it), every image saved as a PNG.

Per side and repeat: the generation time (ours: the manifest's per-image seconds summed; diffusers: its pipeline
calls) and the process's wall time (Python start, loading, generating and writing). Images per hour come from
the generation time; the wall time shows what loading costs a run this short. Both sides use every core in
float32 on the CPU (``--dtype`` and a CUDA device when one is present change both sides alike).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kandinsky.benchmark import Result
from kandinsky.benchmark.pipeline import check_config, image_size, write_folders

PROMPTS = ("red cat, 4k photo", "a lighthouse on a cliff at dusk", "portrait of an old sailor, oil painting",
           "a bowl of ramen, studio lighting", "isometric city block, pixel art", "a fox in the snow",
           "a glass of lemonade on a wooden table", "mountains reflected in a lake at sunrise")
STEPS = (5, 10)  # (prior, decoder): a fifth and a tenth of the defaults (25, 100)
BATCH_SIZE = 4
SEED = 0
CONFIG = "full"  # the tests set "tiny"


def run_diffusers(folder: str, prompts_file: str, output: str, size: int, steps: tuple[int, int], dtype: str,
                  device: str, timing_file: str) -> None:
    """The diffusers side, in its own process: ``KandinskyCombinedPipeline`` from ``folder``'s
    ``diffusers-prior`` and ``diffusers-decoder``, one call per line of ``prompts_file`` with (prior, decoder)
    ``steps``; the seconds spent in the calls go to ``timing_file`` (JSON)."""
    from diffusers import KandinskyCombinedPipeline, KandinskyPipeline, KandinskyPriorPipeline

    root = Path(folder)
    torch_dtype = getattr(torch, dtype)
    prior = KandinskyPriorPipeline.from_pretrained(str(root / "diffusers-prior"), torch_dtype=torch_dtype)
    decoder = KandinskyPipeline.from_pretrained(str(root / "diffusers-decoder"), torch_dtype=torch_dtype)
    combined = KandinskyCombinedPipeline(**decoder.components, **{f"prior_{k}": v for k, v in prior.components.items()})
    combined.to(device)
    combined.set_progress_bar_config(disable=True)
    prompts = Path(prompts_file).read_text().splitlines()
    seconds = 0.0
    with torch.inference_mode():
        for index, prompt in enumerate(prompts):
            start = time.perf_counter()
            image = combined(prompt, prior_num_inference_steps=steps[0], num_inference_steps=steps[1], height=size,
                             width=size, generator=torch.Generator().manual_seed(SEED + index)).images[0]
            if device == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            image.save(Path(output) / f"{index:06d}.png")
    Path(timing_file).write_text(json.dumps({"seconds": seconds}))


def _ours(folder: Path, prompts_file: Path, output: Path, size: int, dtype: str, device: str) -> float:
    """Run ``kandinsky batch`` in a fresh process; the generation seconds from its manifest."""
    command = [sys.executable, "-m", "kandinsky", "batch", str(prompts_file), "-o", str(output), "--weights",
               str(folder / "ours"), "--batch-size", str(BATCH_SIZE), "--prior-steps", str(STEPS[0]), "--steps",
               str(STEPS[1]), "--height", str(size), "--width", str(size), "--seed", str(SEED), "--dtype", dtype,
               "--device", device, "--no-progress"]
    _check(subprocess.run(command, capture_output=True, text=True, env=os.environ.copy()), "kandinsky batch")
    records = [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]
    return sum(record["seconds"] for record in records)


def _diffusers(folder: Path, prompts_file: Path, output: Path, size: int, dtype: str, device: str) -> float:
    timing = output / "timing.json"
    code = (f"from kandinsky.benchmark.batch import run_diffusers; run_diffusers({str(folder)!r}, "
            f"{str(prompts_file)!r}, {str(output)!r}, {size}, {STEPS!r}, {dtype!r}, {device!r}, {str(timing)!r})")
    _check(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy()),
           "diffusers")
    return json.loads(timing.read_text())["seconds"]


def _check(done: subprocess.CompletedProcess, side: str) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{side} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def run(args, config: str | None = None) -> list[Result]:
    """Images per hour of both sides (see the module docstring); ``args``: ``repeats``, ``dtype`` and optionally
    ``config`` ("full" or "tiny"; default :data:`CONFIG`)."""
    config = check_config(getattr(args, "config", None) or config or CONFIG)
    size, dtype = image_size(config), args.dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(tempfile.mkdtemp(prefix="kandinsky-bench-batch-"))
    try:
        if config == "full":  # a child writes the weights, so that this process stays small while the sides run
            code = f"from kandinsky.benchmark.pipeline import write_folders; write_folders({str(root)!r}, {config!r})"
            _check(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env=os.environ.copy()), "write_folders")
        else:
            write_folders(str(root), config)
        prompts_file = root / "prompts.txt"
        prompts_file.write_text("\n".join(PROMPTS) + "\n")
        generation: dict[str, list[float]] = {"ours": [], "diffusers": []}
        wall: dict[str, list[float]] = {"ours": [], "diffusers": []}
        sides = {"ours": _ours, "diffusers": _diffusers}
        for repeat in range(args.repeats):
            for side, measure in sides.items():
                output = root / f"{side}-{repeat}"
                shutil.rmtree(output, ignore_errors=True)
                output.mkdir()
                start = time.perf_counter()
                generation[side].append(measure(root, prompts_file, output, size, dtype, device))
                wall[side].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    count = len(PROMPTS)
    per_hour = {side: count * 3600 / statistics.median(times) for side, times in generation.items()}
    label = (f"{count} prompts, {size}px, {STEPS[0]} + {STEPS[1]} steps, {dtype} on {device}, ours --batch-size "
             f"{BATCH_SIZE}, diffusers one call per prompt")
    return [
        Result("batch", f"generation s ({label})", generation["ours"], generation["diffusers"],
               {"ours images/hour": per_hour["ours"], "diffusers images/hour": per_hour["diffusers"],
                "throughput ours / diffusers": per_hour["ours"] / per_hour["diffusers"]}),
        Result("batch", f"process wall s, loading included ({label})", wall["ours"], wall["diffusers"],
               {"ours images/hour": count * 3600 / statistics.median(wall["ours"]),
                "diffusers images/hour": count * 3600 / statistics.median(wall["diffusers"])}),
    ]

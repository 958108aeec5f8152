"""Benchmarks of our modules against diffusers 0.42.1 with identical weights, measured in the same
process and interleaved (ours, theirs, ours, ...) so that machine noise hits both sides alike.

Each ``kandinsky/benchmark/<component>.py`` defines ``run(args) -> list[Result]``. Results are printed
as a table and written as JSON and Markdown under ``--results`` (default ``docs/results/``).
Run: ``kandinsky bench movq`` or ``python scripts/benchmark.py movq``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

COMPONENTS = ("movq", "prior", "unet", "text_encoder", "pipeline", "batch", "train", "profile", "gpu")
MODELS = ("2.1", "2.2")
COMPONENTS_22 = ("prior", "unet")  # the benchmarks with a Kandinsky 2.2 variant (--model 2.2)
# what runs when no component is named: "profile" only when named (it repeats unet's forwards under the
# profiler), "gpu" needs CUDA
CPU_COMPONENTS = tuple(c for c in COMPONENTS if c not in ("profile", "gpu"))


@dataclass
class Result:
    """Timings (seconds) of one case for both sides; ``ratio`` = median ours / median diffusers."""

    component: str
    case: str
    ours: list[float]
    diffusers: list[float]
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ours) / statistics.median(self.diffusers)

    def as_dict(self) -> dict:
        return {**asdict(self), "ours_median": statistics.median(self.ours),
                "diffusers_median": statistics.median(self.diffusers), "ratio": self.ratio}


def interleaved(cases: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, alternating between them; ``warmup`` untimed rounds first."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(warmup + repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call, counted by ``torch.utils.flop_counter``, with a formula for the
    CPU's fused attention kernel, which the counter lacks (it would count the attention as zero)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    custom = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value))
    with FlopCounterMode(display=False, custom_mapping=custom) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops()


def peak_rss_gib(target: str, *args: str) -> float:
    """Peak resident memory (GiB) of ``target`` (``"package.module:function"``) called with string
    ``args`` in a fresh Python process, so that each side is measured alone."""
    module, function = target.split(":")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a big parent would report the parent's peak.
    code = (f"import importlib, re; importlib.import_module({module!r}).{function}(*{list(args)!r}); "
            "print('RSS_KIB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {target}{args} failed:\n{done.stderr[-2000:]}")
    kib = int(next(line for line in done.stdout.splitlines() if line.startswith("RSS_KIB")).split()[1])
    return kib / 2**20


def _cpu() -> dict:
    """The CPU model and the vector extensions that decide our CPU kernels (Linux; empty elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {"cpu_model": model, "cpu_extensions": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), **_cpu(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "MALLOC_MMAP_MAX_": os.environ.get("MALLOC_MMAP_MAX_"),
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
            **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {})}


def _table(results: list[Result]) -> str:
    lines = ["| component | case | ours median (s) | diffusers median (s) | ratio | ours min/max | diffusers min/max | extra |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
        lines.append(f"| {r.component} | {r.case} | {statistics.median(r.ours):.3f} | {statistics.median(r.diffusers):.3f} "
                     f"| {r.ratio:.2f} | {min(r.ours):.3f}/{max(r.ours):.3f} | {min(r.diffusers):.3f}/{max(r.diffusers):.3f} | {extra} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kandinsky bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("components", nargs="*", help=f"subset of {', '.join(COMPONENTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per side (default 3)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="CPU components: float32 (default) or bfloat16; gpu: float16 (default), bfloat16 or float32")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="gpu: seconds after which the torch.compile measurements are skipped (default 420)")
    parser.add_argument("--no-compile", action="store_true", help="gpu: skip the torch.compile measurements")
    parser.add_argument("--no-memory", action="store_true", help="skip the separate-process peak-memory probes")
    parser.add_argument("--results", default="docs/results", help="folder for the JSON and Markdown tables")
    parser.add_argument("--model", default="2.1", choices=MODELS,
                        help=f"the Kandinsky version of the models (default: 2.1); 2.2 for {', '.join(COMPONENTS_22)}: "
                             "its prior (1280-wide CLIP embeddings) and its UNet (image conditioning only)")
    parser.add_argument("--controlnet", action="store_true",
                        help="unet with --model 2.2: the ControlNet UNet (a depth hint besides the image embedding)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, metavar="LATENT",
                        help="unet: latent sides to time (default: 64 96, i.e. 512 and 768 px images)")
    args = parser.parse_args(argv)
    available = [c for c in COMPONENTS if importlib.util.find_spec(f"kandinsky.benchmark.{c}") is not None]
    if args.model == "2.2":
        components = args.components or [c for c in available if c in COMPONENTS_22]
        if [c for c in components if c not in COMPONENTS_22]:
            parser.error(f"--model 2.2: expected components among {list(COMPONENTS_22)}, got {components}")
    else:
        components = args.components or [c for c in available if c in CPU_COMPONENTS]
    unknown = [c for c in components if c not in available]
    if unknown:
        parser.error(f"unknown component(s) {unknown}; available: {available}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.controlnet and (args.model != "2.2" or components != ["unet"]):
        parser.error(f"--controlnet: only for the unet component with --model 2.2, got {components} with "
                     f"--model {args.model}")
    if args.sizes is not None and (components != ["unet"] or min(args.sizes) < 8 or any(s % 8 for s in args.sizes)):
        parser.error(f"--sizes: latent sides, multiples of 8, for the unet component alone; got {args.sizes} for "
                     f"{components}")

    if "gpu" in components and not torch.cuda.is_available():
        parser.error("the gpu component needs a CUDA device (torch.cuda.is_available() is False)")
    if args.dtype == "float16" and any(c != "gpu" for c in components):
        parser.error("--dtype float16 is for the gpu component; the CPU components run float32 or bfloat16")

    results: list[Result] = []
    for component in components:
        dtype = args.dtype or ("float16" if component == "gpu" else "float32")
        results += importlib.import_module(f"kandinsky.benchmark.{component}").run(
            argparse.Namespace(**{**vars(args), "dtype": dtype}))
    table = _table(results)
    print(table)
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "-".join(components) + ("" if args.model == "2.1" else "-22" + ("-controlnet" if args.controlnet else ""))
    (folder / f"{name}-{stamp}.json").write_text(json.dumps(
        {"machine": machine(), "results": [r.as_dict() for r in results]}, indent=2))
    (folder / f"{name}-{stamp}.md").write_text(f"{json.dumps(machine())}\n\n{table}\n")
    return 0

"""Where the UNet's time goes, against what the machine can do: the measured peaks of this CPU and a
per-category profile of one UNet forward, ours (``ops.optimize`` applied, as the pipeline loads it) and
diffusers 0.42.1 with the same weights.

* Peaks, measured in the same run: a large GEMM (``torch.mm``) and oneDNN's direct 3x3 convolution at the
  UNet's level-0 shape (channels-last), float32 and, where the CPU computes it natively, bfloat16.
* Profile (``torch.profiler``, after a warm-up, ``--repeats`` interleaved rounds): the self CPU time of
  every operator, grouped into categories (:data:`CATEGORIES`). Each operator is grouped by the layer it
  runs in (3x3 and 1x1 convolutions, linear layers and norms are labelled from module hooks, so that the
  Winograd path's ``bmm`` and additions count as convolution, not attention or elementwise work) and
  otherwise by the operator the Python code called (``scaled_dot_product_attention`` with everything it
  runs inside is attention).
* FLOPs: the direct-convolution count of the whole forward (:func:`count_flops` on diffusers' model) and
  of the 3x3 convolutions and linear layers (from their shapes); attention is the rest. Ours computes the
  wide 3x3 convolutions by Winograd with fewer multiplications, so its FLOP/s are direct-equivalent.

The per-operator table (top :data:`TOP_OPS` by self time, each side) goes to ``profile-<stamp>.txt`` in
``--results``. ``CONFIG = "tiny"`` (the tests) profiles a tiny UNet at small shapes.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function

from kandinsky import ops
from kandinsky.benchmark import Result, count_flops
from kandinsky.benchmark.train import unet_config
from kandinsky.ops.cpu import native_half
from kandinsky.parity.unet import diffusers_unet, inputs, run_diffusers, run_ours

CONFIGS = ("full", "tiny")
CONFIG = "full"  # what `kandinsky bench profile` measures (the tests set "tiny")
TOP_OPS = 25
PEAK_REPEATS = 5  # timed calls per peak measurement (median), after one warm-up

# Rows of the result table, in order; the first four are the 3x3 convolutions' paths (one row in the table).
CONV3X3 = ("3x3 conv: direct", "3x3 conv: Winograd GEMM (bmm)", "3x3 conv: Winograd transforms", "3x3 conv: GEMM path")
CATEGORIES = (*CONV3X3, "1x1 conv + linear", "attention", "group/layer norm", "elementwise", "other ops",
              "Python between ops")
ROWS = {"3x3 convolutions": CONV3X3, "1x1 conv + linear": ("1x1 conv + linear",), "attention": ("attention",),
        "group/layer norm": ("group/layer norm",), "elementwise": ("elementwise",),
        "other": ("other ops", "Python between ops")}

_LABEL = "kandinsky.profile::"  # prefix of the record_function ranges of this module
_ROOT = _LABEL + "forward"
# Operators as the Python code calls them (outermost aten op), without "aten::" and a trailing "_".
_ATTENTION_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_attention_math", "bmm", "baddbmm", "softmax", "_softmax", "_safe_softmax"}
_MATMUL_OPS = {"linear", "addmm", "mm", "matmul", "einsum", "_linear_pointwise"}
_NORM_OPS = {"group_norm", "native_group_norm", "layer_norm", "native_layer_norm"}
_ELEMENTWISE_OPS = {"add", "sub", "rsub", "mul", "div", "neg", "silu", "gelu", "sigmoid", "exp", "sin", "cos",
                    "pow", "sqrt", "rsqrt", "copy", "clone", "contiguous", "to", "_to_copy", "cat", "stack",
                    "constant_pad_nd", "pad", "upsample_nearest2d", "_upsample_nearest_exact2d", "fill", "zero",
                    "where", "masked_fill", "addcmul", "lerp", "mean", "sum", "repeat", "expand_as", "index"}


def check_config(config: str) -> str:
    if config not in CONFIGS:
        raise ValueError(f"config: expected one of {list(CONFIGS)}, got {config!r}")
    return config


def latent_size(config: str) -> int:
    """64 (512 px images) at the full config; 32 for the tiny one (level 0 direct, level 1 GEMM path)."""
    return 64 if check_config(config) == "full" else 32


def _median_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def peaks(config: str, repeats: int = PEAK_REPEATS) -> tuple[list[Result], dict[tuple[str, str], float]]:
    """The machine's GEMM and direct 3x3 convolution speed, one row each per dtype it computes natively
    (the same times fill both columns: a machine measurement, not a comparison), and the GFLOP/s by
    (dtype name, ``"gemm"`` or ``"conv"``)."""
    unet = unet_config(config)
    n = 2048 if config == "full" else 256
    batch, channels, size = 2, unet.model_channels, latent_size(config)
    dtypes = [torch.float32] + ([torch.bfloat16] if native_half(torch.bfloat16) else [])
    results, gflops = [], {}
    generator = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        a, b = (torch.randn(n, n, generator=generator).to(dtype) for _ in range(2))
        out = torch.empty(n, n, dtype=dtype)
        with torch.inference_mode():
            times = _median_seconds(lambda: torch.mm(a, b, out=out), repeats)
        flops = 2 * n ** 3
        gflops[name, "gemm"] = flops / 1e9 / statistics.median(times)
        results.append(Result("profile", f"peak: torch.mm {n}x{n}x{n} {name}", times, times,
                               {"GFLOP/s": flops / 1e9 / statistics.median(times), "GFLOP": flops / 1e9}))
        x = torch.randn(batch, channels, size, size, generator=generator).to(dtype, memory_format=torch.channels_last)
        weight = torch.randn(channels, channels, 3, 3, generator=generator).to(dtype, memory_format=torch.channels_last)
        bias = torch.randn(channels, generator=generator).to(dtype)
        with torch.inference_mode():
            times = _median_seconds(lambda: F.conv2d(x, weight, bias, padding=1), repeats)
        flops = 2 * batch * channels * channels * 9 * size * size
        gflops[name, "conv"] = flops / 1e9 / statistics.median(times)
        results.append(Result("profile", f"peak: direct conv3x3 {batch}x{channels}->{channels}x{size}x{size} "
                               f"channels-last {name}", times, times,
                               {"GFLOP/s": flops / 1e9 / statistics.median(times), "GFLOP": flops / 1e9}))
        del a, b, out, x, weight
    return results, gflops


@contextmanager
def labelled_layers(model: nn.Module, flops: Counter):
    """Wrap every convolution, linear layer and norm of ``model`` in a ``record_function`` range named by
    its kind (``conv3x3``, ``conv1x1``, ``conv``, ``linear``, ``norm``), and add each call's
    direct-convolution / GEMM FLOPs to ``flops[kind]``. The fused residual blocks call their convolutions'
    ``convolve_activated``, which runs no hooks: it is wrapped too, for the time of the profile."""
    stack = []
    fused = set()  # the layers inside a wrapped ``convolve_activated`` call, whose forward (if it runs) is part of it

    def kind_of(module: nn.Module) -> str | None:
        if isinstance(module, nn.Conv2d):
            return {(3, 3): "conv3x3", (1, 1): "conv1x1"}.get(tuple(module.kernel_size), "conv")
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            return "norm"
        return None

    def enter(kind: str):
        def hook(module, args):
            if module not in fused:
                stack.append(record_function(_LABEL + kind).__enter__())
        return hook

    def leave(kind: str):
        def hook(module, args, output):
            if module in fused:
                return
            stack.pop().__exit__(None, None, None)
            if kind.startswith("conv"):
                flops[kind] += 2 * output.numel() * module.in_channels // module.groups * module.weight[0, 0].numel()
            elif kind == "linear":
                flops[kind] += 2 * output.numel() * module.in_features
        return hook

    def labelled(module: nn.Module, method: Callable) -> Callable:
        def call(*args):
            enter("conv3x3")(module, args)
            fused.add(module)
            try:
                output = method(*args)
            finally:
                fused.discard(module)
            leave("conv3x3")(module, args, output)
            return output
        return call

    handles, wrapped = [], []
    for module in model.modules():
        kind = kind_of(module)
        if kind is not None:
            handles += [module.register_forward_pre_hook(enter(kind)), module.register_forward_hook(leave(kind))]
        if kind == "conv3x3" and hasattr(module, "convolve_activated"):
            module.convolve_activated = labelled(module, module.convolve_activated)
            wrapped.append(module)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in wrapped:
            del module.convolve_activated


def _op(name: str) -> str:
    return name.rsplit("::", 1)[-1].rstrip("_")  # aten::add_ -> add, mkldnn::_linear_pointwise -> _linear_pointwise


def _category_by_op(op: str) -> str:
    if op in _ATTENTION_OPS:
        return "attention"
    if op in _MATMUL_OPS:
        return "1x1 conv + linear"
    if op in _NORM_OPS:
        return "group/layer norm"
    if op in _ELEMENTWISE_OPS:
        return "elementwise"
    return "other ops"


def categorize(events) -> tuple[dict[str, float], list[tuple[str, str, float]], float]:
    """Self CPU seconds per category of a profile recorded under :func:`labelled_layers` with the forward
    in a ``_ROOT`` range; also (category, op, self seconds) per event, and the root range's total seconds.

    An event's category: in a labelled layer, the layer's kind (a 3x3 convolution's path is told by the
    operator it calls: ``bmm`` = Winograd, a matmul = GEMM over shifted windows, else direct);
    elsewhere the outermost operator above it (what the Python code called). The self time of the
    ranges themselves is Python running between operators."""
    events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    roots = [e for e in events if e.name == _ROOT]
    if len(roots) != 1:
        raise RuntimeError(f"expected one {_ROOT} range in the profile, found {len(roots)}")
    root = roots[0]

    def ancestors(event):
        parent = event.cpu_parent
        while parent is not None:
            yield parent
            parent = parent.cpu_parent

    def outermost_op(event):
        op = event
        for parent in ancestors(event):
            if parent.name.startswith(_LABEL):
                break
            op = parent
        return op

    def conv3x3_path(layer) -> str:
        called = {_op(child.name) for child in layer.cpu_children}
        if "bmm" in called:
            return "winograd"
        return "gemm" if called & {"mm", "addmm", "matmul", "_linear_pointwise"} else "direct"

    paths = {}
    rows = []
    for event in events:
        chain = list(ancestors(event))
        if event is not root and not any(p is root for p in chain):
            continue  # outside the forward (the profiler's own bookkeeping)
        seconds = event.self_cpu_time_total / 1e6
        if event.name.startswith(_LABEL):
            layer, op = event, "(Python)"
        else:
            layer = next((p for p in chain if p.name.startswith(_LABEL)), root)
            op = _op(outermost_op(event).name)
        kind = layer.name.removeprefix(_LABEL)
        if layer is root:
            category = "Python between ops" if event is root else _category_by_op(op)
        elif kind == "conv3x3":
            if id(layer) not in paths:
                paths[id(layer)] = conv3x3_path(layer)
            path = paths[id(layer)]
            if path == "winograd":
                category = "3x3 conv: Winograd GEMM (bmm)" if op == "bmm" else "3x3 conv: Winograd transforms"
            else:
                category = "3x3 conv: GEMM path" if path == "gemm" else "3x3 conv: direct"
        elif kind in ("conv1x1", "linear"):
            category = "1x1 conv + linear"
        elif kind == "norm":
            category = "group/layer norm"
        else:  # a convolution of another kernel size
            category = "other ops"
        rows.append((category, _op(event.name) if op != "(Python)" else f"{kind} (Python)", seconds))
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for category, _, seconds in rows:
        totals[category] += seconds
    return totals, rows, root.cpu_time_total / 1e6


def profile_forward(forward: Callable[[], object], model: nn.Module) -> dict:
    """One forward under the profiler: category seconds, per-op rows, total and wall seconds, FLOPs by kind."""
    flops = Counter()
    with labelled_layers(model, flops), torch.inference_mode(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        with record_function(_ROOT):
            forward()
        wall = time.perf_counter() - start
    categories, rows, total = categorize(profiler.events())
    return {"categories": categories, "rows": rows, "total": total, "wall": wall, "flops": flops}


def _top_ops(profiles: list[dict], limit: int = TOP_OPS) -> list[tuple[str, str, int, float]]:
    """(op, category, calls per forward, self seconds per forward), the ``limit`` largest."""
    seconds, calls = defaultdict(float), Counter()
    for p in profiles:
        for category, op, s in p["rows"]:
            seconds[op, category] += s / len(profiles)
            calls[op, category] += 1
    top = sorted(seconds.items(), key=lambda item: -item[1])[:limit]
    return [(op, category, calls[op, category] // len(profiles), s) for (op, category), s in top]


def report(case: str, peak_rows: list[Result], rows: list[Result], profiles: dict[str, list[dict]],
           total_flops: int) -> str:
    """The text of ``profile-<stamp>.txt``: peaks, categories of both sides, the result rows' FLOP/s and
    shares, then the top operators."""
    lines = [f"UNet forward profile: {case}", "", "Machine peaks (median GFLOP/s):"]
    lines += [f"  {r.case}: {r.extra['GFLOP/s']:.1f}" for r in peak_rows]
    lines += ["", f"FLOPs (direct-convolution count): {total_flops / 1e9:.1f} GFLOP", "",
              f"{'category':34} {'ours s':>9} {'ours %':>7} {'diffusers s':>12} {'diffusers %':>12}"]
    medians = {side: {c: statistics.median(p["categories"][c] for p in ps) for c in CATEGORIES}
               for side, ps in profiles.items()}
    totals = {side: statistics.median(p["total"] for p in ps) for side, ps in profiles.items()}
    for category in CATEGORIES:
        o, d = medians["ours"][category], medians["diffusers"][category]
        lines.append(f"{category:34} {o:9.3f} {100 * o / totals['ours']:7.1f} "
                     f"{d:12.3f} {100 * d / totals['diffusers']:12.1f}")
    lines.append(f"{'total (profiled forward)':34} {totals['ours']:9.3f} {100.0:7.1f} "
                 f"{totals['diffusers']:12.3f} {100.0:12.1f}")
    lines.append("")
    for row in rows:
        lines.append(f"{row.case}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in row.extra.items()))
    for side, ps in profiles.items():
        lines += ["", f"Top {TOP_OPS} operators by self CPU time, {side} (seconds per forward):",
                  f"  {'operator':48} {'category':32} {'calls':>6} {'self s':>9} {'%':>6}"]
        lines += [f"  {op[:48]:48} {category:32} {calls:6d} {s:9.4f} {100 * s / totals[side]:6.1f}"
                  for op, category, calls, s in _top_ops(ps)]
    return "\n".join(lines) + "\n"


def run(args, config: str | None = None) -> list[Result]:
    """Peaks, then ``args.repeats`` profiled rounds of each side (after one unprofiled warm-up each). Writes
    ``profile-<stamp>.txt`` to ``args.results`` when it is set."""
    config = check_config(config or getattr(args, "config", None) or CONFIG)
    if args.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype: the profile runs float32 or bfloat16, got {args.dtype!r}")
    dtype = getattr(torch, args.dtype)
    repeats = max(1, args.repeats)
    peak_rows, peak = peaks(config)
    results = list(peak_rows)
    # a dtype this CPU does not compute natively runs at float32 speed (ops.optimize upcasts)
    peak_dtype = args.dtype if (args.dtype, "gemm") in peak else "float32"

    unet = unet_config(config)
    theirs, ours = diffusers_unet(unet, seed=0)
    if dtype != torch.float32:  # diffusers' bf16 = its weights cast, as a user would do
        theirs, ours = theirs.to(dtype), ours.to(dtype)
    ops.optimize(ours, "cpu", dtype)  # as Kandinsky21 loads it
    gc.collect()
    size = latent_size(config)
    batch = inputs(unet, batch=2, height=size, width=size, dtype=dtype)
    # the direct-convolution count: ours does fewer multiplications (Winograd) for the same result
    total_flops = count_flops(lambda: run_diffusers(theirs, batch))
    sides = {"ours": (ours, lambda: run_ours(ours, batch)), "diffusers": (theirs, lambda: run_diffusers(theirs, batch))}
    with torch.inference_mode():
        for _, forward in sides.values():
            forward()
    profiles = {side: [] for side in sides}
    for _ in range(repeats):  # interleaved, so that machine noise hits both sides alike
        for side, (model, forward) in sides.items():
            profiles[side].append(profile_forward(forward, model))
    del theirs, ours, sides
    gc.collect()

    case = f"UNet 2x{unet.in_channels}x{size}x{size} {args.dtype}"
    totals = {side: [p["total"] for p in ps] for side, ps in profiles.items()}
    flops = {kind: profiles["diffusers"][0]["flops"][kind] for kind in ("conv3x3", "conv1x1", "linear")}
    gemm_peak, conv_peak = peak[peak_dtype, "gemm"], peak[peak_dtype, "conv"]
    achieved = {side: total_flops / 1e9 / statistics.median(totals[side]) for side in totals}
    results.append(Result("profile", f"{case}: total (profiled)", totals["ours"], totals["diffusers"], {
        "GFLOP (direct count)": total_flops / 1e9,
        "ours GFLOP/s (direct-equivalent)": achieved["ours"], "diffusers GFLOP/s": achieved["diffusers"],
        "ours % of conv peak": 100 * achieved["ours"] / conv_peak,
        "diffusers % of conv peak": 100 * achieved["diffusers"] / conv_peak,
        "ours wall s": statistics.median(p["wall"] for p in profiles["ours"]),
        "diffusers wall s": statistics.median(p["wall"] for p in profiles["diffusers"])}))
    row_flops = {"3x3 convolutions": flops["conv3x3"], "1x1 conv + linear": flops["conv1x1"] + flops["linear"],
                 # the rest: the linear layers' GEMMs may run as bmm (3-D inputs), so bmm is not all attention
                 "attention": max(0, total_flops - sum(flops.values()))}
    row_peak = {"3x3 convolutions": conv_peak, "1x1 conv + linear": gemm_peak, "attention": gemm_peak}
    for row, categories in ROWS.items():
        times = {side: [sum(p["categories"][c] for c in categories) for p in ps] for side, ps in profiles.items()}
        if statistics.median(times["diffusers"]) == 0:  # cannot form a ratio; the text file still has it
            continue
        extra = {f"{side} %": 100 * statistics.median(times[side]) / statistics.median(totals[side]) for side in times}
        if row in row_flops:
            extra["GFLOP"] = row_flops[row] / 1e9
            for side in times:
                seconds = statistics.median(times[side])
                if seconds > 0:
                    winograd = side == "ours" and categories == CONV3X3  # fewer multiplications than counted
                    key = f"{side} GFLOP/s" + (" (direct-equivalent)" if winograd else "")
                    extra[key] = row_flops[row] / 1e9 / seconds
            extra["peak GFLOP/s"] = row_peak[row]
        if len(categories) > 1:
            extra.update({f"ours {c} s": statistics.median(p["categories"][c] for p in profiles["ours"])
                          for c in categories})
        results.append(Result("profile", f"{case}: {row}", times["ours"], times["diffusers"], extra))

    folder = getattr(args, "results", None)
    if folder:
        path = Path(folder) / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report(case, peak_rows, results[len(peak_rows):], profiles, total_flops))
        print(f"profile: per-operator table written to {path}")
    return results

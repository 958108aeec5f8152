"""The compiled Winograd transforms (``winograd.c``: of the inputs, outputs and kernels, with the GroupNorm moments
and the GEMM convolution's columns), built with the system's C compiler on first use.

``library()`` returns the loaded library, or None where there is no C compiler (``$CC``, else ``cc``), the build
fails (a warning says why), or ``KANDINSKY21_NATIVE=0``: :mod:`kandinsky.ops.cpu` then runs the same transforms
as torch operations. Built once per machine in about a second.

The shared object is cached in ``native/`` of the weights cache (``$KANDINSKY21_CACHE``, else
``~/.cache/kandinsky21``), named by a hash of
the source, the compiler command and the CPU's instruction-set flags: ``-march=native`` code from one CPU must
never run on another (the home directory may be shared across machines). It is written to a temporary name
and renamed, so concurrent first uses (torchrun's processes) never load a half-written file. It links
OpenMP: loaded after torch, it shares torch's OpenMP runtime and thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

ENV = "KANDINSKY21_NATIVE"  # "0": never build or load the compiled transforms
SOURCE = Path(__file__).with_name("winograd.c")
# -fno-trapping-math: without it gcc leaves the fused activation's loop scalar (the clamp of exp's argument, a
# comparison that could trap, is not turned into a vector select); no result changes
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("KANDINSKY21_CACHE") or Path.home() / ".cache" / "kandinsky21"
    return Path(root) / "native"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()]))
    target = _cache_dir() / f"winograd-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed:\n{result.stderr.strip()}")
        os.replace(built, target)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i32, i64, ptr = ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p
    lib.winograd_input.argtypes = [i32, ptr, i64, i64, i64, i32, i32, i32, i32, i32, i32, ptr, ptr, i32, i32, ptr]
    lib.channel_moments.argtypes = [ptr, i64, i64, i64, i32, i32, i32, i32, ptr]
    lib.winograd_output.argtypes = [i32, ptr, ptr, i32, i32, i32, i32, i32, ptr, i64, i64, i64]
    lib.winograd_output_adjoint.argtypes = [i32, ptr, i64, i64, i64, i32, i32, i32, i32, i32, ptr]
    lib.columns3x3.argtypes = [ptr, i64, i64, i64, i32, i32, i32, i32, ptr]
    lib.winograd_kernel.argtypes = [i32, ptr, ptr, i32, i32, i32, ptr]
    for fn in (lib.winograd_input, lib.winograd_output, lib.winograd_output_adjoint, lib.channel_moments,
               lib.columns3x3, lib.winograd_kernel):
        fn.restype = None
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled transforms, or None (see the module docstring); built at most once per process."""
    if os.environ.get(ENV, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        return _declare(ctypes.CDLL(str(_build(compiler))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"kandinsky.ops: the compiled Winograd transforms are unavailable, using torch's "
                      f"operations ({error})", RuntimeWarning, stacklevel=2)
        return None


def _map_strides(map: torch.Tensor) -> tuple[int, int, int]:
    """(batch, row, pixel) strides of a (B, C, H, W) tensor whose channels are contiguous."""
    if map.dtype != torch.float32 or map.device.type != "cpu" or map.stride(1) != 1:
        raise ValueError(f"expected a float32 CPU map with contiguous channels, got {map.dtype} on "
                         f"{map.device} with strides {map.stride()}")
    return map.stride(0), map.stride(2), map.stride(3)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def input_tiles(map: torch.Tensor, tile: int, row0: int, rows: int, out: torch.Tensor,
                activation: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``out`` (T, T, B, rows, W/tile, C), contiguous: the transformed input tiles of tile rows
    ``[row0, row0 + rows)`` of the zero-padded (B, C, H, W) ``map`` (channels contiguous). ``activation``:
    ``(scale, shift)``, contiguous float32 (B, h, w, C) each with h dividing H and w dividing W: the tiles of
    ``silu(map * scale + shift)``, each pixel taking the scale and shift of its (H/h, W/w) block (h = w = 1: per
    sample and channel), zero-padded after the activation."""
    b, c, height, width = map.shape
    scale, shift = activation or (None, None)
    scale_height, scale_width = (1, 1) if scale is None else scale.shape[1:3]
    if activation is not None and not all(
            t.dim() == 4 and t.shape == (b, scale_height, scale_width, c) and t.dtype == torch.float32
            and t.is_contiguous() and height % scale_height == 0 and width % scale_width == 0 for t in activation):
        raise ValueError(f"activation: expected contiguous float32 (B, h, w, C) scale and shift with B = {b}, "
                         f"C = {c} and h, w dividing {height}, {width}, got "
                         f"{[(tuple(t.shape), t.dtype) for t in activation]}")
    library().winograd_input(tile, map.data_ptr(), *_map_strides(map), b, height, width, c, row0, rows,
                             _pointer(scale), _pointer(shift), scale_height, scale_width, out.data_ptr())


MAX_MOMENT_CHANNELS = 4096  # (the C kernel's per-thread accumulators)


def channel_moments(map: torch.Tensor) -> torch.Tensor:
    """(B, 2, C) float64: per sample and channel, the sums of ``map`` and of its squares over the pixels, in one
    read of a (B, C, H, W) float32 map with contiguous channels."""
    b, c, height, width = map.shape
    if c > MAX_MOMENT_CHANNELS:
        raise ValueError(f"map: at most {MAX_MOMENT_CHANNELS} channels, got {c}")
    out = torch.empty(b, 2, c, dtype=torch.float64)
    library().channel_moments(map.data_ptr(), *_map_strides(map), b, height, width, c, out.data_ptr())
    return out


def columns3x3(map: torch.Tensor) -> torch.Tensor:
    """(B*H*W, C*9) float32: the columns of a 3x3 convolution with zero padding 1 of the (B, C, H, W) ``map``
    (channels contiguous), ordered [C, kh, kw] as a contiguous (K, C, 3, 3) kernel: ``columns @ kernel.view(K,
    C*9).T`` is the convolution."""
    b, c, height, width = map.shape
    out = torch.empty(b * height * width, c * 9, dtype=torch.float32)
    library().columns3x3(map.data_ptr(), *_map_strides(map), b, height, width, c, out.data_ptr())
    return out


def output_tiles(products: torch.Tensor, bias: torch.Tensor | None, tile: int, row0: int, out: torch.Tensor) -> None:
    """The output transform of (T, T, B, rows, cols, K) contiguous ``products`` (plus ``bias``) into tile rows
    ``[row0, row0 + rows)`` of ``out``, (B, K, H, W) with contiguous channels."""
    _, _, b, rows, cols, k = products.shape
    bias = None if bias is None else bias.contiguous()  # (kept alive through the call)
    library().winograd_output(tile, products.data_ptr(), _pointer(bias),
                              b, row0, rows, cols, k, out.data_ptr(), *_map_strides(out))


def output_adjoint_tiles(grad: torch.Tensor, tile: int, row0: int, rows: int, out: torch.Tensor) -> None:
    """``out`` (T, T, B, rows, W/tile, K), contiguous: ``A dY A^T`` of tile rows ``[row0, row0 + rows)`` of the
    (B, K, H, W) output gradient ``grad`` (channels contiguous)."""
    b, k, _, width = grad.shape
    library().winograd_output_adjoint(tile, grad.data_ptr(), *_map_strides(grad), b, row0, rows, width // tile, k,
                                      out.data_ptr())


def winograd_kernel(weight: torch.Tensor, transform: torch.Tensor, flip: bool, out: torch.Tensor) -> None:
    """``out`` (T*T, K, C), contiguous float32: ``G w G^T`` for every (output, input) channel pair of a contiguous
    float32 (K, C, 3, 3) ``weight`` and the (T, 3) kernel transform ``G`` (T at most 6); ``flip``: of each kernel
    rotated by 180 degrees (the transposed convolution's)."""
    k, c = weight.shape[:2]
    t = transform.shape[0]
    if not (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous()
            and weight.shape[2:] == (3, 3)):
        raise ValueError(f"weight: expected a contiguous float32 CPU (K, C, 3, 3) kernel, got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    if transform.dtype != torch.float32 or transform.shape[1:] != (3,) or not 1 <= t <= 6:
        raise ValueError(f"transform: expected a float32 (T, 3) matrix with T <= 6, got {tuple(transform.shape)} "
                         f"{transform.dtype}")
    if out.dtype != torch.float32 or out.shape != (t * t, k, c) or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous float32 {(t * t, k, c)} tensor, got {tuple(out.shape)} "
                         f"{out.dtype}")
    transform = transform.contiguous()  # (kept alive through the call)
    library().winograd_kernel(t, transform.data_ptr(), weight.data_ptr(), k, c, int(flip), out.data_ptr())

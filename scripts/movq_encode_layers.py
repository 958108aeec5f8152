"""Per-layer times of the MoVQ encoder (1x3x512x512, float32), ours (``ops.optimize`` applied) against diffusers
0.42.1 with the same random weights: forward hooks on every convolution, norm and linear layer, 1 warm-up + 3
rounds, medians, grouped by layer kind and input map size. ``python scripts/movq_encode_layers.py``

Our norms are ``EncoderNorm`` (GroupNorm with the following SiLU), diffusers' plain ``GroupNorm``: those rows
have no ratio.
"""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import VQModel
from torch import nn

from kandinsky import ops
from kandinsky.convert import from_diffusers
from kandinsky.convert.movq import to_diffusers_config
from kandinsky.models.movq import MoVQConfig
from kandinsky.testing import randomize_

ROUNDS = 3


def layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d):
        kernel, stride = layer.kernel_size, layer.stride[0]
        return f"conv{kernel[0]}x{kernel[1]}/s{stride} {layer.in_channels}->{layer.out_channels}"
    return type(layer).__name__


def layer_times(model: nn.Module, call: Callable[[], object], rounds: int = ROUNDS):
    """({(layer kind, input map size): median seconds per call of ``call``}, median seconds of the whole call)."""
    per_round = collections.defaultdict(list)
    current = collections.Counter()
    started = {}

    def before(layer, inputs):
        started[layer] = time.perf_counter()

    def after(layer, inputs, output):
        current[layer_kind(layer), tuple(inputs[0].shape[-2:])] += time.perf_counter() - started[layer]

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.Linear))]
    hooks = [hook for layer in layers
             for hook in (layer.register_forward_pre_hook(before), layer.register_forward_hook(after))]
    whole = []
    try:
        with torch.inference_mode():
            call()  # warm-up
            for _ in range(rounds):
                current.clear()
                start = time.perf_counter()
                call()
                whole.append(time.perf_counter() - start)
                for key, seconds in current.items():
                    per_round[key].append(seconds)
    finally:
        for hook in hooks:
            hook.remove()
    return {key: statistics.median(times) for key, times in per_round.items()}, statistics.median(whole)


def main() -> None:
    reference = randomize_(VQModel(**to_diffusers_config(MoVQConfig())), 0).eval()
    ours = ops.optimize(from_diffusers("movq", dict(reference.config), reference.state_dict(), dtype=torch.float32),
                        "cpu", torch.float32)
    images = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours_layers, ours_whole = layer_times(ours, lambda: ours.encode(images))
    theirs_layers, theirs_whole = layer_times(reference, lambda: reference.encode(images).latents)
    print(f"whole encode: ours {ours_whole:.2f} s, diffusers {theirs_whole:.2f} s, "
          f"ratio {ours_whole / theirs_whole:.2f}")
    print(f"{'layer kind':40s} {'map':>10s} {'ours s':>8s} {'diff s':>8s} {'ratio':>6s}")
    for key in sorted(set(ours_layers) | set(theirs_layers), key=lambda k: -theirs_layers.get(k, 0)):
        both = key in ours_layers and key in theirs_layers
        ratio = f"{ours_layers[key] / theirs_layers[key]:6.2f}" if both else f"{'-':>6s}"
        print(f"{key[0]:40s} {str(key[1]):>10s} {ours_layers.get(key, 0):8.3f} {theirs_layers.get(key, 0):8.3f} {ratio}")
    print(f"{'sum of layers':40s} {'':>10s} {sum(ours_layers.values()):8.3f} {sum(theirs_layers.values()):8.3f}")


if __name__ == "__main__":
    main()

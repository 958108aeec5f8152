"""Per-layer times of the MoVQ encoder (1x3x512x512, float32), ours (ops.optimize applied) against diffusers 0.42.1
with the same random weights: forward hooks on every convolution, norm and linear layer, 1 warm-up + 3 rounds,
medians, grouped by layer kind and input map size. `python scripts/movq_encode_layers.py`
"""
import time, statistics, collections, torch
from torch import nn
from diffusers import VQModel
from kandinsky import ops
from kandinsky.convert import from_diffusers
from kandinsky.convert.movq import to_diffusers_config
from kandinsky.models.movq import MoVQConfig
from kandinsky.testing import randomize_

ref = randomize_(VQModel(**to_diffusers_config(MoVQConfig())), 0).eval()
ours = ops.optimize(from_diffusers("movq", dict(ref.config), ref.state_dict(), dtype=torch.float32), "cpu", torch.float32)
x = (torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1)

def kind(m):
    if isinstance(m, nn.Conv2d):
        return f"conv{m.kernel_size[0]}x{m.kernel_size[1]}/s{m.stride[0]} {m.in_channels}->{m.out_channels}"
    return type(m).__name__

def timed(model, call, rounds=3):
    totals = collections.defaultdict(list)
    leaves = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.Linear))]
    acc = collections.Counter(); start = {}
    def pre(m, a): start[id(m)] = time.perf_counter()
    def post(m, a, o):
        key = (kind(m), tuple(a[0].shape[-2:]))
        acc[key] += time.perf_counter() - start[id(m)]
    hs = [h for m in leaves for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    whole = []
    with torch.inference_mode():
        call()
        for _ in range(rounds):
            acc.clear(); t = time.perf_counter(); call(); whole.append(time.perf_counter() - t)
            for k, v in acc.items(): totals[k].append(v)
    for h in hs: h.remove()
    return {k: statistics.median(v) for k, v in totals.items()}, statistics.median(whole)

o, ow = timed(ours, lambda: ours.encode(x))
d, dw = timed(ref, lambda: ref.encode(x).latents)
print(f"whole encode: ours {ow:.2f} s, diffusers {dw:.2f} s, ratio {ow/dw:.2f}")
print(f"{'layer kind':40s} {'map':>10s} {'ours s':>8s} {'diff s':>8s} {'ratio':>6s}")
for k in sorted(set(o) | set(d), key=lambda k: -d.get(k, 0)):
    ratio = f"{o[k] / d[k]:6.2f}" if k in o and k in d else f"{'-':>6s}"  # norms: ours EncoderNorm (with SiLU), theirs GroupNorm
    print(f"{k[0]:40s} {str(k[1]):>10s} {o.get(k, 0):8.3f} {d.get(k, 0):8.3f} {ratio}")
print(f"{'sum of layers':40s} {'':>10s} {sum(o.values()):8.3f} {sum(d.values()):8.3f}")

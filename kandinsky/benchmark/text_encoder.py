"""Text encoder benchmark: M-CLIP (XLM-RoBERTa large + pooling + projection) at the full configuration,
batch 2 x 77 tokens, ours against diffusers 0.42.1 ``MultilingualCLIP`` with identical weights.

Both run the same transformers modules; ours uses transformers' SDPA attention where diffusers' class
falls back to the eager implementation.
"""

from __future__ import annotations

import gc

import torch

from kandinsky.benchmark import Result, interleaved
from kandinsky.parity.text_encoder import CONFIGS, diffusers_pair, token_inputs


def run(args) -> list[Result]:
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    ours, theirs = diffusers_pair(CONFIGS["full"])
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    ids, mask = token_inputs(CONFIGS["full"]["vocab_size"])
    times = interleaved({"ours": lambda: ours(ids, mask), "diffusers": lambda: theirs(input_ids=ids, attention_mask=mask)},
                        repeats=args.repeats, warmup=1)
    del ours, theirs
    gc.collect()
    return [Result("text_encoder", f"M-CLIP forward, full config, batch 2 x 77, {args.dtype}", times["ours"],
                   times["diffusers"], {"dtype": args.dtype})]

"""``kandinsky train``: the command line of the fine-tuning loop (:func:`kandinsky.training.loop.train`), one option
per :class:`~kandinsky.training.config.TrainConfig` field; see docs/training.md."""

from __future__ import annotations

import argparse
import os
import sys

from kandinsky import distributed
from kandinsky.settings import MODELS
from kandinsky.training.config import (
    DEFAULT_IMAGE_DROPOUT,
    DEFAULT_LORA_LR,
    DEFAULT_LR,
    DEFAULT_PREFETCH_FACTOR,
    FREEZE,
    OPTIMIZERS,
    PRECISIONS,
    TASKS,
    ConfigError,
    TrainConfig,
)
from kandinsky.training.loop import describe, train
from kandinsky.training.losses import OBJECTIVES


def build_parser(prog: str = "kandinsky train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune the prior, the decoder UNet or the inpainting UNet of Kandinsky 2.1 or 2.2 "
        "(full or LoRA), on one process or many: torchrun --nproc_per_node=N -m kandinsky train ...; see "
        "docs/training.md.")
    parser.add_argument("task", choices=list(TASKS), help="what to train: prior, decoder (UNet) or inpaint (UNet)")
    parser.add_argument("--weights", required=True, help="the base: a hub repository id or a folder (diffusers, "
                        "original or our layout, or a previous run's output)")
    parser.add_argument("--data", required=True, help="a folder (metadata.jsonl or same-stem .txt captions) or a CSV "
                        "file (image_name, caption)")
    parser.add_argument("--output", required=True, help="output folder: trained weights, checkpoints, log")
    parser.add_argument("--model", default=None, choices=MODELS,
                        help="the Kandinsky version of --weights (default: detected from its UNet's config; tiny is "
                        "2.1 unless --model 2.2; a hub repository is 2.2 when its name has 2-2)")
    run = parser.add_argument_group("optimisation")
    run.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    run.add_argument("--batch-size", type=int, default=1, help="GLOBAL batch per optimizer step, split across "
                     "processes and accumulation steps (default 1)")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process and step (default 1)")
    run.add_argument("--lr", type=float, default=None, help=f"learning rate (default {DEFAULT_LR}, "
                     f"{DEFAULT_LORA_LR} with --lora-rank)")
    run.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                     help="adamw (default) or adafactor (transformers', as the original trainers)")
    run.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (default 0)")
    run.add_argument("--lr-warmup", type=int, default=0, help="steps of linear learning-rate warmup (default 0)")
    run.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm (default: no clipping)")
    run.add_argument("--seed", type=int, default=0, help="seed of the data order, timesteps, noise, dropout, masks")
    run.add_argument("--objective", choices=OBJECTIVES, default=None,
                     help="decoders: original (MSE + variational bound, as the original; the 2.1 default) or eps "
                     "(MSE only; 2.2's only objective, as diffusers' 2.2 decoder example)")
    run.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR weighting gamma (with --objective eps)")
    run.add_argument("--ema", type=float, default=None, metavar="DECAY",
                     help="keep an exponential moving average of the weights (e.g. 0.9999); exported instead of them")
    run.add_argument("--skip-nonfinite-steps", action="store_true",
                     help="skip the optimizer step of a batch whose loss is not finite (counted in the log as "
                     "skipped_steps) instead of stopping the run")
    model = parser.add_argument_group("what is trained")
    model.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank on the "
                       "attention projections instead of all weights")
    model.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling alpha (default: the rank)")
    model.add_argument("--freeze", choices=FREEZE, action="append", default=[],
                       help="decoders: freeze the residual blocks or the attention projections (repeatable)")
    data = parser.add_argument_group("data")
    data.add_argument("--resolution", type=int, default=512, help="decoders: training image size (default 512; "
                      "the original fine-tuned at 768)")
    data.add_argument("--cache", nargs="?", const="", default=None, metavar="DIR",
                      help="encode every image once with the frozen encoders into safetensors shards (default DIR: "
                      "OUT/cache), then train from them")
    data.add_argument("--text-dropout", type=float, default=None,
                      help="probability of an empty caption (default 0.5 decoders, 0.1 prior; the 2.2 decoder reads "
                      "no text)")
    data.add_argument("--image-dropout", type=float, default=DEFAULT_IMAGE_DROPOUT,
                      help="decoders: probability of the zero-image CLIP embedding (default 0.1)")
    data.add_argument("--num-workers", type=int, default=None, metavar="N",
                      help="data-loader worker processes per training process, preparing the next micro-batches "
                      "while a step computes (default: min(4, its cores - 1); 0: read in the training process)")
    data.add_argument("--prefetch-factor", type=int, default=None, metavar="N",
                      help=f"micro-batches each worker prepares ahead (default {DEFAULT_PREFETCH_FACTOR})")
    data.add_argument("--allow-outside-paths", action="store_true",
                      help="accept image paths outside the data folder (absolute paths, '..', symbolic links out "
                      "of it); by default such rows are refused")
    system = parser.add_argument_group("precision, memory, processes")
    system.add_argument("--mixed-precision", choices=PRECISIONS, default="no",
                        help="autocast to bf16 or fp16 (fp16 with a gradient scaler); weights stay float32")
    system.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward pass (less memory, ~1/3 more time)")
    system.add_argument("--strategy", choices=distributed.STRATEGIES, default="ddp",
                        help="with several processes: ddp (default) or fsdp (FSDP2: shard weights, gradients and "
                        "optimizer states)")
    system.add_argument("--device", default=None, help="default: cuda:<local rank> if available, else cpu")
    run_control = parser.add_argument_group("checkpoints")
    run_control.add_argument("--save-every", type=int, default=1000,
                             help="write a checkpoint and the outputs every N steps (0: only at the end)")
    run_control.add_argument("--keep-checkpoints", type=int, default=1, help="newest checkpoints kept (default 1)")
    run_control.add_argument("--resume", action="store_true", help="continue the run in --output from its newest "
                             "checkpoint (starts afresh if there is none)")
    run_control.add_argument("--stop-after", type=int, default=None, metavar="N",
                             help="end this invocation after N steps with a checkpoint (e.g. a job's time limit); "
                             "--resume continues")
    weights = parser.add_argument_group("base weights")
    weights.add_argument("--revision", default=None, help="hub revision of --weights")
    weights.add_argument("--cache-dir", default=None, help="converted-weights cache (default: $KANDINSKY21_CACHE "
                         "or ~/.cache/kandinsky21)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--profile-steps", type=int, default=0, metavar="N",
                        help="profile N steps after the first with torch.profiler: prints the fraction of the step "
                        "time spent waiting for data, writes OUT/profile/ (summary.json, trace.json)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values["freeze"] = tuple(dict.fromkeys(values["freeze"]))
    values["progress"] = not values.pop("no_progress")
    return TrainConfig(**values)


def main(argv: list[str] | None = None, prog: str = "kandinsky train") -> int:
    """``kandinsky train``: returns the exit code (0 done, 1 runtime error, 2 bad settings, 130 interrupted)."""
    args = build_parser(prog).parse_args(argv)
    first = os.environ.get("RANK", "0") == "0"
    try:
        out = train(config_from_args(args))
    except KeyboardInterrupt:
        print("kandinsky: interrupted", file=sys.stderr)
        return 130
    except ConfigError as error:
        if first:
            print(f"kandinsky: error: {describe(error)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        if first or not getattr(error, "agreed", False):  # an error every process stopped on: said once
            print(f"kandinsky: error: {describe(error)}", file=sys.stderr)
        return 1
    if first:
        print(out)
    return 0

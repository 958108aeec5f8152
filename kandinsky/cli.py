"""The ``kandinsky`` command: generate, img2img, inpaint, mix, batch, eval, convert; parity, bench (delegated).

    kandinsky generate "red cat, 4k photo" -o cat.png --seed 0
    kandinsky img2img "a frog" --image cat.png --strength 0.3 -o frog.png
    kandinsky inpaint "a hat" --image cat.png --mask mask.png -o hat.png
    kandinsky mix "a cat" starry_night.png --ratios 0.3 0.7 -o mix.png --grid mix-grid.png
    kandinsky controlnet "a robot" --hint depth.png --weights k22/ -o robot.png        (Kandinsky 2.2)
    kandinsky controlnet "a robot" --depth-from room.jpg --image room.jpg --strength 0.5 --weights k22/
    kandinsky convert movq movq_final.ckpt weights/movq
    kandinsky convert pipeline kandinsky-community/kandinsky-2-1 k21-original --to original
    kandinsky export unet --format onnx --output unet.onnx --weights weights/
    kandinsky export unet_controlnet --output controlnet.onnx --weights k22/                 (Kandinsky 2.2)
    kandinsky batch prompts.jsonl -o out/ --batch-size 8      (also under torchrun --nproc_per_node=N -m kandinsky)
    kandinsky batch depth.jsonl -o out/ --task controlnet --weights k22/     (2.2; rows give a hint image)
    kandinsky eval --generated out/ --reference coco30k/reference

Images are PNGs carrying the prompt, seed and settings in their text metadata, written atomically (a
temporary file renamed into place). Existing files are never replaced without ``--overwrite``, and
``--overwrite`` replaces only folders this package wrote. Every error is one line on stderr,
``kandinsky: error: ...``. Exit codes: 0 success, 1 runtime error, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
from pathlib import Path

PROG = "kandinsky"
DELEGATED = {
    "parity": ("kandinsky.parity", "main", "parity report against diffusers and the original fixtures"),
    "bench": ("kandinsky.benchmark", "main", "benchmarks against diffusers"),
    "train": ("kandinsky.training.cli", "main", "fine-tune the prior or a decoder UNet of Kandinsky 2.1 or 2.2 "
                                                "(full or LoRA, torchrun)"),
}
NEEDS_DIFFUSERS = ("parity", "bench")  # delegated commands that compare against diffusers
DTYPES = ("auto", "float32", "float16", "bfloat16")
# = kandinsky.schedulers.SAMPLERS without "unclip", kandinsky.convert.COMPONENTS, kandinsky.export.FORMATS and
# TARGETS, kandinsky.validation.MAX_IMAGE_SIDE: spelled out so that --help does not import torch (a test compares)
SAMPLERS = ("p_sampler", "ddim", "plms", "ddpm", "dpmpp_2m", "euler_a")
CONVERTED = ("movq", "prior", "unet", "unet_inpaint", "unet_controlnet")
EXPORT_FORMATS = ("pt2", "onnx")
EXPORT_TARGETS = ("movq_decode", "movq_encode", "prior", "unet", "unet_inpaint", "unet_controlnet")
MAX_IMAGE_SIDE = 4096
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
DEFAULT_WEIGHTS = "kandinsky-community/kandinsky-2-1"  # = kandinsky.hub.DEFAULT_SOURCE, without importing
DEFAULT_WEIGHTS_22 = "kandinsky-community/kandinsky-2-2-decoder"  # with --model 2.2 and for `controlnet`
MODEL_OF = {"controlnet": "2.2"}  # commands of one Kandinsky version
WEIGHTS_DEFAULTS = f"default: {DEFAULT_WEIGHTS}; with --model 2.2 or for controlnet: {DEFAULT_WEIGHTS_22}"
# transformers (2+ s) just to print --help
MODELS = ("2.1", "2.2")  # = kandinsky.settings.MODELS
DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"  # diffusers' example for kandinsky-2-2-controlnet-depth
TINY = re.compile(r"^tiny(?::(\d+))?$")  # = kandinsky.hub.TINY


class CommandError(Exception):
    """A runtime error reported as one line on stderr with exit code 1."""


class UsageError(CommandError):
    """A wrong argument found after parsing: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line errors of the rest of the command (``kandinsky: error: ...``, exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _seed(text: str) -> int:
    """``--seed``: an integer in [0, 2**64 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64 - 1], got {text}")
    return value


def _common(parser: argparse.ArgumentParser, steps: int, guidance: float | None,
            guidance_help: str | None = None) -> None:
    parser.add_argument("-o", "--output", default="out.png",
                        help="output PNG (default: out.png); several images are written as NAME-0.png, NAME-1.png, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    sampling = _model_options(parser, steps, guidance, guidance_help=guidance_help, model=True)
    sampling.add_argument("--seed", type=_seed, default=None, help="random seed (default: a random one, printed)")
    sampling.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")


def _model_options(parser: argparse.ArgumentParser, steps: int, guidance: float | None, *,
                   guidance_help: str | None = None, model: bool = False):
    """The weights, device and sampling options of every generating command; returns the sampling group.
    ``model``: with ``--model 2.1|2.2``."""
    weights = parser.add_argument_group("weights and device")
    weights.add_argument("--weights", default=None,
                         help=f"hub repository (diffusers or original layout), local folder or tiny[:SEED] "
                              f"({WEIGHTS_DEFAULTS})")
    if model:
        weights.add_argument("--model", default=None, choices=MODELS,
                             help="the Kandinsky version of --weights (default: detected: 2.2 for a folder of 2.2 "
                                  "UNets or a hub repository named *2-2*, else 2.1; tiny[:SEED] is 2.1 unless "
                                  "--model 2.2; --from-png: the image's)")
    weights.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to pin")
    weights.add_argument("--cache-dir", default=None, help="converted-weights cache (default: $KANDINSKY21_CACHE "
                                                            "or ~/.cache/kandinsky21)")
    weights.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    weights.add_argument("--dtype", default="auto", choices=DTYPES,
                         help="weight dtype (default auto: float16 on CUDA, float32 on CPU)")
    weights.add_argument("--offload", action="store_true",
                         help="keep only the prior or the decoder in memory at a time")
    _lora_option(weights)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=steps, help=f"decoder steps (default: {steps})")
    sampling.add_argument("--guidance", type=float, default=guidance, help="decoder guidance scale (default: "
                          f"{guidance if guidance is not None else guidance_help or '7 for img2img, else 4'})")
    sampling.add_argument("--prior-steps", type=int, default=25, help="prior steps (default: 25)")
    sampling.add_argument("--prior-guidance", type=float, default=4.0, help="prior guidance scale (default: 4.0)")
    for side in ("height", "width"):
        sampling.add_argument(f"--{side}", type=int, default=512, help=f"{side} in px, at most {MAX_IMAGE_SIDE}, "
                              "rounded up to a multiple of 64 (default: 512)")
    sampling.add_argument("--crop", action="store_true", help="crop the result back to --height x --width")
    sampling.add_argument("--sampler", default="ddim", choices=SAMPLERS,
                          help="decoder sampler (default: ddim)")
    sampling.add_argument("--negative-prompt", default=None, help="what the image should not show")
    sampling.add_argument("--no-progress", action="store_true", help="no progress bars (loading bars included)")
    return sampling


def _lora(text: str) -> tuple[str, float]:
    """``--lora PATH[:SCALE]``: an adapter file or training output folder, and its scale (default 1)."""
    path, _, scale = text.rpartition(":")
    if path and not Path(text).exists():
        try:
            value = float(scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected PATH or PATH:SCALE with a number SCALE, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"SCALE: expected a finite number, got {scale!r}")
        return path, value
    return text, 1.0


def _lora_option(parser) -> None:
    parser.add_argument("--lora", type=_lora, action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA adapter (lora.safetensors or a training output folder) and its scale "
                             "(default 1); repeat to stack adapters")


def build_parser() -> argparse.ArgumentParser:
    from kandinsky import __version__

    parser = _Parser(prog=PROG, description="Kandinsky 2.1 and 2.2 text-to-image, image-to-image, "
                     "inpainting, mixing and (2.2) ControlNet (a PyTorch reimplementation).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate = commands.add_parser("generate", help="text to image")
    generate.add_argument("prompt", nargs="?", default=None, help="what to draw (optional with --from-png)")
    generate.add_argument("--from-png", default=None, metavar="IMAGE.png",
                          help="regenerate IMAGE.png: its prompt, seed, settings, weights and adapters (see "
                               "`kandinsky info`); flags given explicitly override them")
    _common(generate, steps=100, guidance=4.0)
    img2img = commands.add_parser("img2img", help="repaint an image towards a prompt")
    img2img.add_argument("prompt")
    img2img.add_argument("--image", required=True, help="input image")
    img2img.add_argument("--strength", type=float, default=0.3, help="how much to change, in (0, 1] (default: 0.3)")
    _common(img2img, steps=100, guidance=None, guidance_help="7 with 2.1 weights, 4 with 2.2 weights")
    inpaint = commands.add_parser("inpaint", help="repaint the masked part of an image")
    inpaint.add_argument("prompt")
    inpaint.add_argument("--image", required=True, help="input image")
    inpaint.add_argument("--mask", required=True,
                         help="mask image, same size as --image: white = repaint, black = keep")
    inpaint.add_argument("--legacy-mask", action="store_true",
                         help="the original code's convention: black = repaint, white = keep")
    _common(inpaint, steps=100, guidance=4.0)
    mix = commands.add_parser("mix", help="an image from a weighted mix of prompts and images")
    mix.add_argument("items", nargs="+", help="prompts and image files (an existing file is an image)")
    mix.add_argument("--ratios", type=float, nargs="+", default=None,
                     help="one weight per item (default: equal weights summing to 1)")
    mix.add_argument("--grid", default=None, help="also write a PNG grid: the inputs, then the result")
    _common(mix, steps=100, guidance=4.0)
    _controlnet_parser(commands)
    info = commands.add_parser("info", help="how a PNG of ours was made: prompt, seed, settings, weights, adapters")
    info.add_argument("image", help="a PNG written by kandinsky (generate, batch, the Python API or the web UI)")
    info.add_argument("--json", action="store_true", help="print the metadata as one JSON object")
    _batch_parser(commands)
    _eval_parser(commands)
    _convert_parser(commands)
    _export_parser(commands)
    _ui_parser(commands)
    for name, (_, _, description) in DELEGATED.items():
        commands.add_parser(name, help=description, add_help=False)
    return parser


def _controlnet_parser(commands) -> None:
    controlnet = commands.add_parser(
        "controlnet", help="text to image following a depth map (Kandinsky 2.2)",
        description="Kandinsky 2.2's ControlNet: an image of the prompt that follows a depth map (--hint, or one "
                    "estimated from --depth-from IMAGE); with --image, that image repainted (controlnet_img2img). "
                    "Needs 2.2 weights (--model 2.2 for tiny).")
    controlnet.add_argument("prompt")
    hints = controlnet.add_mutually_exclusive_group(required=True)
    hints.add_argument("--hint", default=None, metavar="DEPTH.png",
                       help="the hint: a depth map (white = near), resized to the image size")
    hints.add_argument("--depth-from", default=None, metavar="IMAGE",
                       help="estimate the hint from IMAGE with --depth-model (transformers' depth-estimation)")
    controlnet.add_argument("--depth-model", default=None, metavar="ID_OR_DIR",
                            help=f"with --depth-from: a transformers depth model (default: {DEFAULT_DEPTH_MODEL})")
    controlnet.add_argument("--image", default=None, help="start from this image (controlnet_img2img)")
    controlnet.add_argument("--strength", type=float, default=None,
                            help="with --image: how much to change, in (0, 1] (default: 0.3)")
    _common(controlnet, steps=100, guidance=4.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kandinsky`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATED:
            return _delegate(argv[0], argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "device", None) is not None:
            from kandinsky.validation import check_device

            try:
                check_device("--device", args.device)
            except ValueError as error:
                raise UsageError(str(error)) from None
        if getattr(args, "from_png", None) is not None:
            _apply_png(args, _explicit(parser, args.command, argv))
        _default_weights(args)
        if args.command == "generate" and args.prompt is None:
            raise UsageError("prompt: expected a prompt (or --from-png IMAGE.png)")
        handlers = {"convert": _convert, "export": _export, "batch": _batch, "eval": _evaluate, "info": _info,
                    "ui": _ui}
        with _progress_bars(not getattr(args, "no_progress", False)):
            return handlers[args.command](args) if args.command in handlers else _run(args, parser)
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError) as error:
        command = next((a for a in argv if not a.startswith("-")), None)
        hint = f" (see `{PROG} {command} --help`)" if isinstance(error, UsageError) and command else ""
        print(f"{PROG}: error: {_message(error)}{hint}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1


def _default_weights(args) -> None:
    """``--weights`` left out: the official 2.2 decoder repository with ``--model 2.2`` or for a 2.2-only command,
    else 2.1's."""
    if "weights" in args and args.weights is None:
        model = getattr(args, "model", None) or MODEL_OF.get(args.command)
        args.weights = DEFAULT_WEIGHTS_22 if model == "2.2" else DEFAULT_WEIGHTS


def _message(error: Exception) -> str:
    """An error as one line that names its file: an OSError as "FILE: what happened" (not "[Errno 21] ...")."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        other = f" -> {error.filename2}" if error.filename2 is not None else ""
        return f"{error.filename}{other}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def _explicit(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> set[str]:
    """The destinations of the options of ``command`` that ``argv`` gives explicitly."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    given = set()
    for action in sub._actions:
        for option in action.option_strings:
            if any(token == option or token.startswith(option + "=") for token in argv):
                given.add(action.dest)
    return given


# settings of the PNG schema (kandinsky.png) -> the generating commands' options
PNG_OPTIONS = {"num_inference_steps": "steps", "guidance_scale": "guidance", "prior_num_inference_steps": "prior_steps",
               "prior_guidance_scale": "prior_guidance", "height": "height", "width": "width", "sampler": "sampler",
               "crop": "crop", "num_images_per_prompt": "num_images", "dtype": "dtype"}


def _apply_png(args, explicit: set[str]) -> None:
    """``--from-png``: the stored prompt, seed, settings, weights and adapters, under the explicit flags."""
    from kandinsky.png import read_png_metadata

    try:
        stored = read_png_metadata(args.from_png)
    except ValueError as error:
        raise UsageError(f"--from-png: {error}") from None
    settings = stored["settings"]
    task = {"generate": "text2img"}.get(args.command, args.command)
    if settings.get("task") != task:
        raise UsageError(f"--from-png: {args.from_png} was made by the {settings.get('task')!r} task, not {task!r}")
    values = {option: settings[key] for key, option in PNG_OPTIONS.items() if key in settings}
    values.update(prompt=stored["prompt"], negative_prompt=stored["negative_prompt"], seed=stored["seed"])
    weights = settings.get("weights") or {}
    values.update(weights=weights.get("source"), revision=weights.get("revision"),
                  lora=[(a["path"], a["scale"]) for a in settings.get("adapters", [])])
    if "weights" not in explicit or TINY.match(str(args.weights)):  # other weights explicitly: their own model
        values["model"] = weights.get("model")
    for option, value in values.items():
        if option not in explicit and value is not None and not (option == "prompt" and args.prompt is not None):
            setattr(args, option, value)
    if "num_images" not in explicit and settings.get("num_images_per_prompt", 1) > 1:
        args.only_image = stored["image_index"]  # the call's other images are made, not written


def _info(args) -> int:
    from kandinsky.png import read_png_metadata

    metadata = read_png_metadata(args.image)
    if args.json:
        print(json.dumps(metadata, sort_keys=True))
        return 0
    settings = metadata.pop("settings")
    for key, value in [*metadata.items(), *sorted(settings.items())]:
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    """``parity``, ``bench``, ``train``: their own parsers, in the modules that implement them."""
    import importlib

    if command in NEEDS_DIFFUSERS and not {"-h", "--help"} & set(argv):
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise CommandError(f"{command} compares against diffusers, which is not installed: "
                               "pip install 'kandinsky21[test]'") from None
    module, function, _ = DELEGATED[command]
    return int(getattr(importlib.import_module(module), function)(argv) or 0)


class _progress_bars:
    """Within it, transformers' and huggingface_hub's bars (loading, downloads) are on or off as asked;
    their previous state comes back afterwards."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
            from transformers.utils import logging

            self.previous = (logging.is_progress_bar_enabled(), are_progress_bars_disabled())
            logging.disable_progress_bar()
            disable_progress_bars()
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            from huggingface_hub.utils import enable_progress_bars
            from transformers.utils import logging

            transformers_enabled, hub_disabled = self.previous
            if transformers_enabled:
                logging.enable_progress_bar()
            if not hub_disabled:
                enable_progress_bars()
        return False


def _batch_parser(commands) -> None:
    from kandinsky.batch import TASKS  # torch-free

    batch = commands.add_parser(
        "batch", help="one image per line of a prompt file (batched, resumable, torchrun)",
        description="Generate one PNG per item of a prompt file (.txt: a prompt a line; .jsonl / .csv: prompt, id, "
                    "seed, negative_prompt, image, mask, hint and per-item settings) and OUTPUT/manifest.jsonl. A "
                    "rerun skips the finished images. Under `torchrun --nproc_per_node=N -m kandinsky batch ...` the "
                    "processes share the items. Kandinsky 2.1 or 2.2 (--model); 2.2 adds the ControlNet tasks.")
    batch.add_argument("prompts", help="prompt file: .txt, .jsonl or .csv")
    batch.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    batch.add_argument("--task", default="text2img", choices=TASKS,
                       help="text2img (default), or img2img / inpaint with image (and mask) paths in the file; "
                            "Kandinsky 2.2: controlnet (hint paths) / controlnet_img2img (image and hint paths)")
    batch.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (default: 4)")
    batch.add_argument("--strength", type=float, default=0.3,
                       help="img2img, controlnet_img2img: how much to change (default: 0.3)")
    batch.add_argument("--legacy-mask", action="store_true",
                       help="inpaint: black = repaint (the original's convention)")
    batch.add_argument("--allow-outside-paths", action="store_true",
                       help="accept image / mask / hint paths outside the prompt file's folder (absolute or with ..)")
    sampling = _model_options(batch, steps=100, guidance=None, guidance_help="7 for img2img with 2.1 weights, else 4",
                              model=True)
    sampling.add_argument("--seed", type=_seed, default=0,
                          help="item i without a seed of its own uses SEED + i (default: 0)")


def _batch(args) -> int:
    from kandinsky import batch
    from kandinsky.distributed import start

    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    model = _model(args)
    if args.task in batch.CONTROLNET_TASKS and model != "2.2":
        raise UsageError(f"--task {args.task}: needs Kandinsky 2.2 weights; {args.weights} are 2.1 "
                         "(--model 2.2 if they are 2.2, e.g. with tiny)")
    settings = batch.Settings(task=args.task, steps=args.steps, guidance=args.guidance, prior_steps=args.prior_steps,
                              prior_guidance=args.prior_guidance, height=args.height, width=args.width,
                              sampler=args.sampler, strength=args.strength, negative_prompt=args.negative_prompt,
                              crop=args.crop, mask_convention="legacy" if args.legacy_mask else "repaint", model=model)
    # every row checked before any work
    items = batch.read_prompt_file(args.prompts, settings, seed=args.seed, allow_outside=args.allow_outside_paths)
    processes = start(args.device)
    try:
        run_info = {"command": "batch", "prompts": args.prompts, "device": processes.device.type,
                    "batch_size": args.batch_size}
        options = argparse.Namespace(**{**vars(args), "device": str(processes.device), "no_progress": True})
        summary = batch.run(items, args.output, lambda: _pipeline(options), batch_size=args.batch_size,
                            processes=processes, run_info=run_info, progress=not args.no_progress)
    finally:
        processes.close()
    if processes.main:
        print(f"{args.output}: {summary.manifest_records} of {len(items)} images in {batch.MANIFEST} "
              f"({summary.written} made by this process, {summary.skipped} already there)")
    return 0


def _eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="FID, KID and CLIP score of a folder of images",
        description="FID and KID of --generated against --reference, and the CLIP score of the generated images "
                    "against their prompts (from manifest.jsonl), with torchmetrics. Both folders are centre-cropped "
                    "and resized to --size px. With --prepare-coco: write the COCO-30k prompts and reference set "
                    "instead (see docs/generation.md).")
    evaluate.add_argument("--generated", help="folder of generated images (with manifest.jsonl)")
    evaluate.add_argument("--reference", default=None, help="folder of reference images (none: CLIP score only)")
    evaluate.add_argument("--output", default=None, help="JSON file of the results (default: GENERATED/eval.json)")
    evaluate.add_argument("--size", type=int, default=256, help="image side for FID and KID (default: 256)")
    evaluate.add_argument("--batch-size", type=int, default=50, help="images per feature batch (default: 50)")
    evaluate.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    evaluate.add_argument("--inception-weights", metavar="FILE", default=None,
                          help="FID Inception weights, torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                               "(default: in torch's hub cache, downloaded there if missing unless HF_HUB_OFFLINE=1)")
    evaluate.add_argument("--clip-model", metavar="DIR_OR_ID", default="openai/clip-vit-large-patch14",
                          help="CLIP model for the CLIP score: a folder with a transformers CLIPModel and its "
                               "CLIPProcessor (save_pretrained), or a hub id read from the hub cache (default: "
                               "%(default)s)")
    evaluate.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    evaluate.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default: 100)")
    evaluate.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default: 1000)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    coco = evaluate.add_argument_group("COCO-30k inputs (instead of evaluating)")
    coco.add_argument("--prepare-coco", metavar="DIR", default=None,
                      help="write DIR/prompts.jsonl and DIR/reference/ from --coco-captions and --coco-images")
    coco.add_argument("--coco-captions", default=None, help="annotations/captions_val2014.json")
    coco.add_argument("--coco-images", default=None, help="the val2014 image folder")
    coco.add_argument("--coco-count", type=int, default=30000, help="images (default: 30000)")
    coco.add_argument("--coco-seed", type=int, default=0, help="seed of the random choice (default: 0)")


def _evaluate(args) -> int:
    if args.prepare_coco is not None:
        if not (args.coco_captions and args.coco_images):
            raise UsageError("--prepare-coco needs --coco-captions and --coco-images")
        from kandinsky.eval import prepare_coco

        for path in prepare_coco(args.coco_captions, args.coco_images, args.prepare_coco, args.coco_count,
                                 args.coco_seed):
            print(path)
        return 0
    if args.generated is None:
        raise UsageError("--generated is required (or --prepare-coco)")
    output = Path(args.output) if args.output else Path(args.generated) / "eval.json"
    if args.output and output.exists() and not args.overwrite:  # before the (slow) evaluation
        raise CommandError(f"refusing to overwrite {output} (use --overwrite)")
    try:
        from kandinsky.eval import evaluate

        result = evaluate(args.generated, args.reference, inception_weights=args.inception_weights,
                          clip_source=None if args.no_clip else args.clip_model, size=args.size,
                          batch_size=args.batch_size, device=args.device, kid_subsets=args.kid_subsets,
                          kid_subset_size=args.kid_subset_size, progress=not args.no_progress)
    except ImportError as error:  # the metrics are an optional extra
        hint = "" if "kandinsky21[eval]" in str(error) else " (pip install 'kandinsky21[eval]')"
        raise CommandError(f"{error}{hint}") from None
    partial = output.with_name(f".{output.name}.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, output)
    for key in ("fid", "kid_mean", "kid_std", "clip_score"):
        if key in result:
            print(f"{key}: {result[key]:.6g}")
    print(output)
    return 0


def _convert_parser(commands) -> None:
    convert = commands.add_parser("convert", help="convert weights between this package's, diffusers' and the "
                                  "original layouts",
                                  description="Convert Kandinsky 2.1 or 2.2 weights between layouts: into this package's "
                                  "format (default), or out of it into the diffusers or the original layout (--to). "
                                  "COMPONENT 'pipeline' converts a whole pipeline (SOURCE: hub repository or folder).")
    convert.add_argument("component", choices=(*CONVERTED, "pipeline"))
    convert.add_argument("source", help="original checkpoint file (.ckpt/.pt/.safetensors), diffusers component folder "
                                        "or converted folder; for 'pipeline' a hub repository or folder in any layout")
    convert.add_argument("output", help="output folder (written atomically)")
    convert.add_argument("--to", default="ours", choices=["ours", "diffusers", "original"],
                         help="layout to write (default ours: model.safetensors + config.json)")
    convert.add_argument("--layout", default="auto", choices=["auto", "original", "diffusers", "ours"],
                         help="layout of SOURCE (default auto: a converted folder is ours, another folder "
                              "diffusers, a file original)")
    convert.add_argument("--revision", default=None, help="hub revision of a 'pipeline' SOURCE")
    convert.add_argument("--cache-dir", default=None, help="converted-weights cache of a 'pipeline' SOURCE")
    convert.add_argument("--config", type=_json_object, default=None,
                         help="original constructor kwargs / diffusers config (JSON file or inline JSON); "
                              "default: the official one / the folder's config.json")
    convert.add_argument("--clip-stats", default=None, help="ViT-L-14_stats.th (original prior only)")
    convert.add_argument("--dtype", default=None, choices=[d for d in DTYPES if d != "auto"],
                         help="cast the weights (default: keep the checkpoint's dtype; float16 with --to original, "
                              "as released)")
    _lora_option(convert)
    convert.add_argument("--lora-mode", default="fuse", choices=["fuse", "separate"],
                         help="adapters (--lora, or those of a LoRA training output), --to diffusers: fused into the "
                              "weights (default) or as separate adapter files")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace an existing output folder, if this package wrote it (never SOURCE)")
    convert.add_argument("--no-progress", action="store_true", help="no progress bars (loading and download bars)")


def _json_object(value: str) -> dict:
    """``--config``: a JSON file path or an inline JSON object."""
    try:
        text = Path(value).read_text()
    except OSError:  # not a file (an inline object may also be too long for a file name)
        text = value
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not a JSON file or JSON object: {error}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(parsed).__name__}")
    return parsed


def _convert(args) -> int:
    from kandinsky.hub import ALL_COMPONENTS
    from kandinsky.weights import check_not_source, check_output, convert_files

    # before any (slow) reading: an existing output only with --overwrite and only if ours, never SOURCE
    check_not_source(args.output, args.source)
    if args.component == "pipeline" and args.to == "ours":  # a folder of component folders, each replaced alone
        outputs = {name: Path(args.output) / name for name in ALL_COMPONENTS}
    else:
        outputs = {None if args.component == "pipeline" else args.component: Path(args.output)}
    for component, output in outputs.items():
        if output.exists() and not args.overwrite:
            raise CommandError(f"output folder {output} already exists (use --overwrite)")
        check_output(output, overwrite=args.overwrite, component=component)
    if args.component == "pipeline":
        folder = _convert_pipeline(args)
    elif args.to == "ours" and args.layout != "ours" and not args.lora:
        try:
            folder = convert_files(args.component, args.source, args.output, layout=args.layout, config=args.config,
                                   clip_stats=args.clip_stats, overwrite=args.overwrite, dtype=args.dtype)
        except KeyError as error:  # a converter indexing a --config that lacks an entry
            raise CommandError(f"--config: missing entry {error.args[0]!r}") from None
    else:
        folder = _export_component(args)
    print(folder)
    return 0


def _source_layout(args) -> str:
    from kandinsky.weights import is_converted

    if args.layout != "auto":
        return args.layout
    return "ours" if is_converted(args.source) else ("diffusers" if Path(args.source).is_dir() else "original")


def _export_component(args) -> Path:
    """convert COMPONENT --to diffusers|original (or an 'ours' SOURCE --to ours, a copy with another dtype)."""
    from kandinsky.layouts import export_component
    from kandinsky.weights import load_converted, read_official

    layout = _source_layout(args)
    if layout == "ours":
        if args.config is not None or args.clip_stats is not None:
            raise UsageError("--config/--clip-stats: only for original or diffusers sources")
        module, info = load_converted(args.source), {"layout": "ours"}
    else:
        try:
            module, info = read_official(args.component, args.source, layout=layout, config=args.config,
                                         clip_stats=args.clip_stats)
        except KeyError as error:
            raise CommandError(f"--config: missing entry {error.args[0]!r}") from None
    if args.lora:
        module = _with_adapters(args.component, module, args.lora, fuse=args.to == "ours" or args.lora_mode == "fuse")
    if args.to == "ours" and args.dtype:
        import torch

        module = module.to(getattr(torch, args.dtype))
    provenance = {"source": str(Path(args.source).resolve()), "source_layout": info.get("layout", layout)}
    options = {} if args.to == "ours" else {"dtype": args.dtype or "default", "lora": args.lora_mode}
    return export_component(args.component, module, args.output, layout=args.to, overwrite=args.overwrite,
                            provenance=provenance, **options)


def _with_adapters(component: str, module, adapters: list[tuple[str, float]], fuse: bool):
    """``module`` with the ``--lora`` adapters for ``component`` loaded (and fused into it when ``fuse``)."""
    from kandinsky import lora

    for index, (path, scale) in enumerate(adapters):
        try:
            weights, meta = lora.read_lora(path)
            if meta["component"] != component:
                raise ValueError(f"{path}: an adapter for {meta['component']!r}, not {component!r}")
            lora.load_lora_weights(module, weights, meta, scale, adapter=f"adapter{index}", source=path)
        except ValueError as error:
            raise CommandError(f"--lora: {error}") from None
    return lora.fuse_lora(module) if fuse else module


def _convert_pipeline(args) -> Path:
    """convert pipeline SOURCE OUTPUT --to ours|diffusers|original: every component SOURCE has, with its adapters."""
    from kandinsky.components import Components

    if args.config is not None or args.clip_stats is not None:
        raise UsageError("--config/--clip-stats: only for one component; a pipeline uses the official configs")
    if args.to == "ours" and args.dtype is not None:
        raise UsageError("--dtype: with --to ours a pipeline is written as stored; convert one component to cast it")
    layout = None if args.layout == "auto" else args.layout
    components = Components.from_pretrained(args.source, revision=args.revision, cache_dir=args.cache_dir,
                                            **({"layout": layout} if layout else {}))
    _load_adapters(components, args.lora)
    if args.to == "ours":
        components.save_pretrained(args.output, overwrite=args.overwrite)
    else:
        components.save_pretrained(args.output, overwrite=args.overwrite, layout=args.to, dtype=args.dtype or "default",
                                   lora=args.lora_mode, provenance={"source": args.source, "revision": args.revision})
    return Path(args.output)


def _export_parser(commands) -> None:
    export = commands.add_parser("export", help="torch.export (.pt2) or ONNX export of one model",
                                 description="Export one model as a torch.export program (.pt2) or an ONNX graph "
                                 "(+ FILE.data, the weights), with a dynamic batch and latent size.")
    export.add_argument("target", choices=EXPORT_TARGETS,
                        help="the model and method to export (unet_controlnet: Kandinsky 2.2's ControlNet UNet)")
    export.add_argument("--format", default=None, choices=EXPORT_FORMATS, help="default: from the --output suffix")
    export.add_argument("-o", "--output", required=True, help="output file (.pt2 or .onnx)")
    export.add_argument("--weights", default=None,
                        help="hub repository, pipeline folder (any layout) or one converted component folder "
                             f"({WEIGHTS_DEFAULTS})")
    export.add_argument("--model", default=None, choices=MODELS,
                        help="the Kandinsky version of --weights (default: detected; tiny[:SEED] is 2.1 unless "
                             "--model 2.2); a 2.2 UNet's inputs have no text (and the ControlNet's a hint)")
    export.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to pin")
    export.add_argument("--cache-dir", default=None, help="converted-weights cache")
    export.add_argument("--dtype", default="float32", choices=[d for d in DTYPES if d != "auto"],
                        help="weight dtype of the exported model (default: float32)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    export.add_argument("--no-progress", action="store_true", help="no progress bars (loading and download bars)")
    _lora_option(export)


def _ui_parser(commands) -> None:
    ui = commands.add_parser("ui", help="a web page for every task (Gradio, on http://127.0.0.1:7860)",
                             description="Serve a web page (Gradio) for text to image, image to image, inpainting "
                                         "and mixing, on one pipeline loaded once. Local only unless --host / --share "
                                         "say otherwise. Needs gradio: pip install 'kandinsky21[ui]'.")
    ui.add_argument("--weights", default=None,
                    help=f"hub repository, local folder or tiny[:SEED] ({WEIGHTS_DEFAULTS})")
    ui.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ui.add_argument("--dtype", default="auto", choices=DTYPES, help="weight dtype (default auto: float16 on CUDA)")
    ui.add_argument("--model", default=None, choices=MODELS,
                    help="the Kandinsky version of --weights (default: detected; tiny is 2.1 unless --model 2.2); "
                         "2.2 adds a ControlNet tab")
    _lora_option(ui)
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    ui.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    ui.add_argument("--output-dir", default=None, help="where the images are written (default: a new temporary folder)")


def _ui(args) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port: expected a port in 1..65535, got {args.port}")
    _check_adapters(args.lora)  # before the (slow) loading
    try:
        from kandinsky.ui.app import launch  # imports gradio
    except ImportError as error:
        raise CommandError(f"kandinsky ui needs gradio ({error}): pip install 'kandinsky21[ui]'") from None
    options = {} if args.model is None else {"model": args.model}
    launch(args.weights, adapters=args.lora, host=args.host, port=args.port, share=args.share, device=args.device,
           dtype=args.dtype, output_dir=args.output_dir, **options)
    return 0


def _export(args) -> int:
    import torch

    from kandinsky.components import Components
    from kandinsky.export import FORMATS, TARGETS, export
    from kandinsky.hub import Lazy
    from kandinsky.weights import is_converted, load_converted

    output = Path(args.output)
    format = args.format or output.suffix.lstrip(".").lower()
    if format not in FORMATS:
        raise CommandError(f"--format: expected one of {list(FORMATS)} (or an --output ending in .pt2 / .onnx), "
                           f"got {args.output!r}")
    if output.exists() and not args.overwrite:  # before the (slow) loading
        raise CommandError(f"refusing to overwrite {output} (use --overwrite)")
    component = TARGETS[args.target].component
    if is_converted(args.weights):
        stored = json.loads((Path(args.weights) / "config.json").read_text()).get("component")
        if stored != component:
            raise CommandError(f"--weights: {args.weights} holds a {stored}; {args.target} needs a {component}")
        components = Components(**{component: Lazy(lambda: load_converted(args.weights))})
    else:
        if component == "unet_controlnet" and _model(args) != "2.2":
            raise UsageError(f"unet_controlnet: Kandinsky 2.2's ControlNet UNet; {args.weights} are 2.1 weights "
                             "(--model 2.2 if they are 2.2, e.g. with tiny)")
        components = _store(args)
    _load_adapters(components, args.lora)
    model = components.plain_copy(component).to(getattr(torch, args.dtype))  # adapters fused
    print(export(args.target, model, output, format=format, overwrite=args.overwrite))
    return 0


def _store(args):
    """The components of ``--weights`` for the model ``--model`` names or :func:`detect_model` finds, loaded lazily
    (Kandinsky 2.2's as :class:`~kandinsky.pipeline.Kandinsky22` reads them)."""
    from kandinsky.components import Components

    if _model(args) != "2.2":
        return Components.from_pretrained(args.weights, revision=args.revision, cache_dir=args.cache_dir)
    from kandinsky.pipeline import Kandinsky22

    extra = {} if TINY.match(str(args.weights)) else dict(revision=args.revision, cache_dir=args.cache_dir)
    try:
        return Kandinsky22.from_pretrained(args.weights, progress=False, **extra).components
    except NotImplementedError as error:
        raise CommandError(f"--weights: {error}") from None


def _outputs(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise CommandError(f"--output: expected a .png file name, got {output!r}")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def _check_free(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise CommandError(f"refusing to overwrite {', '.join(existing)} (use --overwrite)")
    for path in paths:
        if not path.parent.is_dir():
            raise CommandError(f"output folder {path.parent} does not exist")


def _open_image(path: str, option: str, mode: str = "RGB"):
    """An input image, read as training and batch read theirs (:func:`kandinsky.images.load_image`)."""
    from kandinsky.images import load_image

    if not Path(path).is_file():
        raise CommandError(f"{option}: no such file {path!r}")
    try:
        return load_image(path, mode)
    except ValueError as error:
        raise CommandError(f"{option}: {error}") from None


def _mix_item(item: str):
    """A ``mix`` item: an existing file is an image, a missing one with an image file extension is an error
    (a typo would otherwise be mixed in as a text prompt), anything else a prompt."""
    from PIL import Image

    if Path(item).is_file():
        return _open_image(item, "items")
    Image.init()
    readable = {suffix for suffix, format in Image.registered_extensions().items() if format in Image.OPEN}
    if Path(item).suffix.lower() in readable:
        raise CommandError(f"items: no such image file {item!r} (a prompt cannot end in an image file extension)")
    return item


def detect_model(weights: str | os.PathLike) -> str:
    """The Kandinsky version ("2.1" or "2.2") of a ``--weights`` value, without loading anything
    (:func:`kandinsky.hub.detect_model`: UNet configs, ``base.json``, a hub id's ``2-2``)."""
    from kandinsky.hub import detect_model as from_configs

    return from_configs(weights)


def _model(args) -> str:
    """The Kandinsky version the command runs (``--model``, else :func:`detect_model` of ``--weights``)."""
    if getattr(args, "model", None) not in MODELS:
        args.model = detect_model(args.weights)
    return args.model


def _pipeline(args):
    import torch

    from kandinsky.pipeline import Kandinsky21, Kandinsky22

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float16" if torch.device(device).type == "cuda" else "float32"
    options = dict(device=device, dtype=getattr(torch, dtype), offload="sequential" if args.offload else None,
                   progress=not args.no_progress)
    if _model(args) == "2.2":
        extra = {} if TINY.match(str(args.weights)) else dict(revision=args.revision, cache_dir=args.cache_dir)
        try:
            pipe = Kandinsky22.from_pretrained(args.weights, **options, **extra)
        except NotImplementedError as error:
            raise CommandError(f"--weights: {error}") from None
    else:
        pipe = Kandinsky21.from_pretrained(args.weights, revision=args.revision, cache_dir=args.cache_dir, **options)
    _load_adapters(pipe.components, args.lora)
    return pipe


def _depth_hint(image, model: str | None, device: str | None):
    """``--depth-from``: the depth map of ``image`` (PIL) by a transformers depth-estimation model (diffusers'
    kandinsky-2-2-controlnet-depth example: ``pipeline("depth-estimation")``'s ``depth`` as an RGB hint)."""
    from transformers import pipeline

    model = model or DEFAULT_DEPTH_MODEL
    try:
        estimator = pipeline("depth-estimation", model=model, device=device)
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(f"--depth-model: cannot load {model!r}: {_message(error)}") from None
    return estimator(image)["depth"].convert("RGB")


def _check_adapters(adapters: list[tuple[str, float]]) -> None:
    """Read every --lora file before any model work: a bad one is one line, before a seed is printed."""
    from kandinsky.lora import read_lora

    for path, _ in adapters:
        try:
            read_lora(path)
        except ValueError as error:
            raise CommandError(f"--lora: {error}") from None


def _load_adapters(components, adapters: list[tuple[str, float]]) -> None:
    for path, scale in adapters:
        try:
            components.load_lora(path, scale)
        except ValueError as error:
            raise CommandError(f"--lora: {error}") from None


# the settings' fields (kandinsky.settings) as the generating commands spell them
FLAGS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "prior_num_inference_steps": "--prior-steps",
         "prior_guidance_scale": "--prior-guidance", "num_images_per_prompt": "--num-images", "height": "--height",
         "width": "--width", "sampler": "--sampler", "strength": "--strength", "mask_convention": "--legacy-mask",
         "crop": "--crop"}


def task_settings(args):
    """The command's settings (:mod:`kandinsky.settings`), validated by the same code as the Python API: a bad
    value is a :class:`UsageError` naming the flag."""
    from kandinsky.settings import TASK_SETTINGS, default_guidance

    task = _task(args)
    guidance = args.guidance if args.guidance is not None else default_guidance(task, _model(args))
    values = dict(num_inference_steps=args.steps, guidance_scale=guidance, height=args.height, width=args.width,
                  num_images_per_prompt=args.num_images, sampler=args.sampler, crop=args.crop,
                  prior_num_inference_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance)
    if task in ("img2img", "controlnet_img2img"):
        values["strength"] = args.strength if args.strength is not None else 0.3
    if task == "inpaint":
        values["mask_convention"] = "legacy" if args.legacy_mask else "repaint"
    try:
        return TASK_SETTINGS[task](**values)
    except ValueError as error:
        raise UsageError(_flag_message(str(error))) from None


def _task(args) -> str:
    """The pipeline task of the command (``controlnet`` with ``--image``: ``controlnet_img2img``)."""
    if args.command == "controlnet":
        return "controlnet_img2img" if args.image is not None else "controlnet"
    return {"generate": "text2img"}.get(args.command, args.command)


def _check_model(args) -> None:
    """Argument errors of the model choice, before any model work: ControlNet needs 2.2 weights."""
    model = _model(args)
    if args.command == "controlnet":
        if model != "2.2":
            raise UsageError(f"controlnet: needs Kandinsky 2.2 weights; {args.weights} are 2.1 "
                             "(--model 2.2 if they are 2.2, e.g. with tiny)")
        if args.image is None and args.strength is not None:
            raise UsageError("--strength: only with --image (controlnet_img2img)")
        if args.depth_model is not None and args.depth_from is None:
            raise UsageError("--depth-model: only with --depth-from IMAGE")


def _flag_message(message: str) -> str:
    """A settings error ("num_inference_steps: expected ...") in the command's words ("--steps: expected ...")."""
    name, _, rest = message.partition(": ")
    return f"{FLAGS[name]}: {rest}" if name in FLAGS else message


def _run(args, parser: argparse.ArgumentParser) -> int:
    import torch

    from kandinsky.png import save_png

    _check_model(args)
    settings = task_settings(args)  # every argument error before any model work and before a seed is printed
    if args.command == "mix" and args.ratios is not None and len(args.ratios) != len(args.items):
        parser.error(f"--ratios: expected one weight per item ({len(args.items)}), got {len(args.ratios)}")
    only = getattr(args, "only_image", None)  # --from-png of one image of a call that made several
    outputs = _outputs(args.output, 1 if only is not None else args.num_images)
    grid = Path(args.grid) if getattr(args, "grid", None) else None
    _check_free(outputs + ([grid] if grid else []), args.overwrite)

    # inputs are read before the (slow) model loading, so that a wrong path fails at once
    image = _open_image(args.image, "--image") if getattr(args, "image", None) is not None else None
    mask = _open_image(args.mask, "--mask", "L") if args.command == "inpaint" else None
    if args.command == "controlnet":
        hint = _open_image(args.hint, "--hint") if args.hint is not None else None
        depth_source = _open_image(args.depth_from, "--depth-from") if args.depth_from is not None else None
    if args.command == "mix":
        items = [_mix_item(item) for item in args.items]
        ratios = args.ratios or [1.0 / len(items)] * len(items)
    _check_adapters(args.lora)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    if args.seed is None:
        print(f"seed: {seed}", file=sys.stderr)
    generator = torch.Generator().manual_seed(seed)

    if args.command == "controlnet" and hint is None:
        hint = _depth_hint(depth_source, args.depth_model, args.device)
    pipe = _pipeline(args)
    common = dict(generator=generator, **settings.kwargs())
    if args.command == "generate":
        images = pipe.text2img(args.prompt, args.negative_prompt, **common)
    elif args.command == "img2img":
        images = pipe.img2img(args.prompt, image, negative_prompt=args.negative_prompt, **common)
    elif args.command == "inpaint":
        images = pipe.inpaint(args.prompt, image, mask, args.negative_prompt, **common)
    elif args.command == "controlnet" and image is None:
        images = pipe.controlnet(args.prompt, hint, args.negative_prompt, **common)
    elif args.command == "controlnet":
        images = pipe.controlnet_img2img(args.prompt, image, hint, negative_prompt=args.negative_prompt, **common)
    else:
        images = pipe.mix(items, ratios, negative_prompt=args.negative_prompt or "", **common)

    if only is not None:
        images = images[only:only + 1]
    for picture, path in zip(images, outputs):
        save_png(picture, path)  # the pipeline's metadata (kandinsky.png), as in Python
        print(path)
    if grid is not None:
        inputs = [i for i in items if not isinstance(i, str)]
        save_png(_grid(inputs, images), grid, images[0].info)
        print(grid)
    return 0


def _grid(inputs, results):
    """One row: the input images (resized to the result's height), then the results."""
    from PIL import Image

    height = results[0].height
    tiles = [i.resize((max(1, round(i.width * height / i.height)), height)) for i in inputs] + list(results)
    canvas = Image.new("RGB", (sum(t.width for t in tiles), height), "white")
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width
    return canvas


if __name__ == "__main__":
    sys.exit(main())

"""The ``kandinsky`` command: generate, img2img, inpaint, mix; convert, parity, bench (delegated).

    kandinsky generate "red cat, 4k photo" -o cat.png --seed 0
    kandinsky img2img "a frog" --image cat.png --strength 0.3 -o frog.png
    kandinsky inpaint "a hat" --image cat.png --mask mask.png -o hat.png
    kandinsky mix "a cat" starry_night.png --ratios 0.3 0.7 -o mix.png --grid mix-grid.png

Images are PNGs carrying the prompt, seed and settings in their text metadata. Existing files are never
replaced without ``--overwrite``. Exit codes: 0 success, 1 runtime error (message on stderr, no
traceback), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

PROG = "kandinsky"
DELEGATED = {
    "convert": ("kandinsky.weights", "convert_main", "convert official weights into this package's format"),
    "parity": ("kandinsky.parity", "main", "parity report against diffusers and the original fixtures"),
    "bench": ("kandinsky.benchmark", "main", "benchmarks against diffusers"),
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_WEIGHTS = "kandinsky-community/kandinsky-2-1"  # = kandinsky.hub.DEFAULT_WEIGHTS, without importing
# transformers (2+ s) just to print --help


class CommandError(Exception):
    """A runtime error reported as one line on stderr with exit code 1."""


def _common(parser: argparse.ArgumentParser, steps: int, guidance: float) -> None:
    from kandinsky.schedulers import SAMPLERS

    parser.add_argument("-o", "--output", default="out.png",
                        help="output PNG (default: out.png); several images are written as NAME-0.png, NAME-1.png, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    weights = parser.add_argument_group("weights and device")
    weights.add_argument("--weights", default=DEFAULT_WEIGHTS,
                         help=f"hub repository (diffusers or original layout) or local folder (default: {DEFAULT_WEIGHTS})")
    weights.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to pin")
    weights.add_argument("--cache-dir", default=None, help="converted-weights cache (default: $KANDINSKY21_CACHE "
                                                            "or ~/.cache/kandinsky21)")
    weights.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    weights.add_argument("--dtype", default="auto", choices=DTYPES,
                         help="weight dtype (default auto: float16 on CUDA, float32 on CPU)")
    weights.add_argument("--offload", action="store_true",
                         help="keep only the prior or the decoder in memory at a time")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=steps, help=f"decoder steps (default: {steps})")
    sampling.add_argument("--guidance", type=float, default=guidance, help=f"decoder guidance scale (default: {guidance})")
    sampling.add_argument("--prior-steps", type=int, default=25, help="prior steps (default: 25)")
    sampling.add_argument("--prior-guidance", type=float, default=4.0, help="prior guidance scale (default: 4.0)")
    sampling.add_argument("--height", type=int, default=512, help="height in px, rounded up to a multiple of 64 (default: 512)")
    sampling.add_argument("--width", type=int, default=512, help="width in px, rounded up to a multiple of 64 (default: 512)")
    sampling.add_argument("--crop", action="store_true", help="crop the result back to --height x --width")
    sampling.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    sampling.add_argument("--sampler", default="ddim", choices=[s for s in SAMPLERS if s != "unclip"],
                          help="decoder sampler (default: ddim)")
    sampling.add_argument("--negative-prompt", default=None, help="what the image should not show")
    sampling.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    sampling.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Kandinsky 2.1 text-to-image, image-to-image, "
                                     "inpainting and mixing (a PyTorch reimplementation).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate = commands.add_parser("generate", help="text to image")
    generate.add_argument("prompt")
    _common(generate, steps=100, guidance=4.0)
    img2img = commands.add_parser("img2img", help="repaint an image towards a prompt")
    img2img.add_argument("prompt")
    img2img.add_argument("--image", required=True, help="input image")
    img2img.add_argument("--strength", type=float, default=0.3, help="how much to change, in (0, 1] (default: 0.3)")
    _common(img2img, steps=100, guidance=7.0)
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
    for name, (_, _, description) in DELEGATED.items():
        commands.add_parser(name, help=description, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kandinsky`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module, function, _ = DELEGATED[argv[0]]
        entry = getattr(importlib.import_module(module), function)
        return int(entry(argv[1:], prog=f"{PROG} {argv[0]}") if argv[0] == "convert" else entry(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1


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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise CommandError(f"{option}: no such file {path!r}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise CommandError(f"{option}: cannot read image {path!r}: {error}") from None


def _pipeline(args):
    import torch

    from kandinsky.pipeline import Kandinsky21

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float16" if torch.device(device).type == "cuda" else "float32"
    return Kandinsky21.from_pretrained(args.weights, device=device, dtype=getattr(torch, dtype),
                                       revision=args.revision, cache_dir=args.cache_dir,
                                       offload="sequential" if args.offload else None, progress=not args.no_progress)


def _metadata(args, seed: int, index: int):
    from PIL.PngImagePlugin import PngInfo

    from kandinsky import __version__

    settings = {k: v for k, v in vars(args).items() if k not in ("output", "overwrite", "no_progress", "grid")}
    settings["seed"] = seed
    info = PngInfo()
    info.add_text("Software", f"kandinsky21 {__version__}")
    info.add_text("prompt", getattr(args, "prompt", None) or " | ".join(getattr(args, "items", [])))
    if args.negative_prompt:
        info.add_text("negative_prompt", args.negative_prompt)
    info.add_text("seed", str(seed))
    info.add_text("image_index", str(index))
    info.add_itxt("settings", json.dumps(settings, sort_keys=True))
    return info


def _run(args, parser: argparse.ArgumentParser) -> int:
    import torch

    for name in ("steps", "prior_steps", "num_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.height < 1 or args.width < 1:
        parser.error(f"--height/--width: expected positive integers, got {args.height} x {args.width}")
    if args.command == "mix" and args.ratios is not None and len(args.ratios) != len(args.items):
        parser.error(f"--ratios: expected one weight per item ({len(args.items)}), got {len(args.ratios)}")
    outputs = _outputs(args.output, args.num_images)
    grid = Path(args.grid) if getattr(args, "grid", None) else None
    _check_free(outputs + ([grid] if grid else []), args.overwrite)

    # inputs are read before the (slow) model loading, so that a wrong path fails at once
    image = _open_image(args.image, "--image") if args.command in ("img2img", "inpaint") else None
    mask = _open_image(args.mask, "--mask", "L") if args.command == "inpaint" else None
    if args.command == "mix":
        items = [_open_image(item, "items") if Path(item).is_file() else item for item in args.items]
        ratios = args.ratios or [1.0 / len(items)] * len(items)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    if args.seed is None:
        print(f"seed: {seed}", file=sys.stderr)
    generator = torch.Generator().manual_seed(seed)

    pipe = _pipeline(args)
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                  width=args.width, num_images_per_prompt=args.num_images, generator=generator,
                  sampler=args.sampler, crop=args.crop, prior_num_inference_steps=args.prior_steps,
                  prior_guidance_scale=args.prior_guidance)
    if args.command == "generate":
        images = pipe.text2img(args.prompt, negative_prompt=args.negative_prompt, **common)
    elif args.command == "img2img":
        images = pipe.img2img(args.prompt, image, strength=args.strength, negative_prompt=args.negative_prompt,
                              **common)
    elif args.command == "inpaint":
        images = pipe.inpaint(args.prompt, image, mask, negative_prompt=args.negative_prompt,
                              mask_convention="legacy" if args.legacy_mask else "repaint", **common)
    else:
        images = pipe.mix(items, ratios, negative_prompt=args.negative_prompt or "", **common)

    for index, (picture, path) in enumerate(zip(images, outputs)):
        picture.save(path, pnginfo=_metadata(args, seed, index))
        print(path)
    if grid is not None:
        inputs = [i for i in items if not isinstance(i, str)]
        _grid(inputs, images).save(grid, pnginfo=_metadata(args, seed, 0))
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

"""Convert official Kandinsky 2.1 weights into this package's format: ``kandinsky convert`` (see kandinsky.cli).

    python scripts/convert_weights.py movq movq_final.ckpt weights/movq
    python scripts/convert_weights.py prior prior_fp16.ckpt weights/prior --clip-stats ViT-L-14_stats.th
    python scripts/convert_weights.py movq kandinsky-2-1/movq weights/movq --layout diffusers --dtype bfloat16
"""

import sys

from kandinsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

"""Convert official Kandinsky 2.1 weights into this package's format.

    python scripts/convert_weights.py movq movq_final.ckpt weights/movq
    python scripts/convert_weights.py prior prior_fp16.ckpt weights/prior --clip-stats ViT-L-14_stats.th
    python scripts/convert_weights.py movq kandinsky-2-1/movq weights/movq --layout diffusers --dtype bfloat16

All the logic lives in ``kandinsky.weights`` (``convert_main``), which ``kandinsky convert`` reuses.
"""

from __future__ import annotations

import sys

from kandinsky.weights import convert_main


def main(argv: list[str] | None = None) -> int:
    return convert_main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks against diffusers 0.42.1 in the same run: ``kandinsky bench`` (see kandinsky.benchmark)."""

import sys

from kandinsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

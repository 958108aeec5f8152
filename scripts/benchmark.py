"""Benchmarks against diffusers 0.42.1 in the same run (see kandinsky.benchmark)."""

import sys

from kandinsky.benchmark import main

if __name__ == "__main__":
    sys.exit(main())

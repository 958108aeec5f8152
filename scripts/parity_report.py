"""Parity report of every component against diffusers 0.42.1 and the original fixtures (see kandinsky.parity)."""

import sys

from kandinsky.parity import main

if __name__ == "__main__":
    sys.exit(main())
